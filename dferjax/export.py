"""Exports a run's checkpoint as a PyTorch state dict of the project's transcription of its model (dferjax/reference).

    python -m dferjax.export --workdir runs/stt_dfew_fold1 --output stt_fold1.pt [--step best|latest|N]

FILE.pt is a plain `torch.save`d state dict (parameters and BatchNorm running statistics) that loads with
`strict=True`; FILE.json beside it names the torch class and its arguments, and the input it expects. In Python:

    from dferjax import export
    model = export.load_exported('stt_fold1.pt')   # the transcription, weights loaded strictly, in eval mode
    logits = model(video)                           # video: float [batch, frames, 3, height, width] in [0, 1]

Expected errors are one `error: ...` line on stderr, exit status 1 (`--verbose`: the traceback).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import pathlib
import sys
from typing import Any

from dferjax import cli

# Fields of a flax model that set how it computes, not what it computes: they have no torch argument.
COMPUTE_FIELDS = ('dtype', 'param_dtype', 'attention_impl', 'max_pool_impl', 'remat_backbone', 'slot_unroll',
                  'attention_layout', 'attention_pad_multiple', 'stem_conv_impl', 'norm_impl')


@dataclasses.dataclass(frozen=True)
class Transcription:
  """Where a model's PyTorch transcription lives, and how its arguments differ from the flax fields."""
  module: str  # holds the class and load_flax_variables(model, variables)
  class_name: str
  renames: tuple[tuple[str, str], ...] = ()  # (flax field, torch argument)
  # Flax fields the torch class lacks on purpose, besides COMPUTE_FIELDS (the weights do not depend on them).
  ignored: tuple[str, ...] = ()
  outputs: str = 'logits'  # what forward returns in eval mode


TRANSCRIPTIONS = {
    'stt': Transcription('dferjax.reference.torch_stt', 'STT'),
    'nr_dfernet': Transcription(
        'dferjax.reference.torch_nr_dfernet', 'NRDFERNet',
        renames=(('num_heads', 'heads'), ('head_dim', 'dim_head'), ('filter_max_probability', 'mu1'),
                 ('filter_neutral_probability', 'mu2')),
        ignored=('snippet_filter',),  # torch returns the filtered and the unfiltered logits both
        outputs='(filtered logits, sequence logits, snippet logits [batch, snippets, classes])'),
    'est': Transcription('dferjax.reference.torch_est', 'EST',
                         outputs='(class logits, order logits or None); forward(video, permutation=None)'),
    'ceflnet': Transcription('dferjax.reference.torch_ceflnet', 'CEFLNet'),
    'aen': Transcription('dferjax.reference.torch_aen', 'AEN',
                         outputs='(logits, {global_logits, group_logits, local_logits, class_groups})'),
    'aen_frame': Transcription('dferjax.reference.torch_aen', 'AENFrame',
                               outputs='(mean frame logits, frame logits [batch, frames, classes])'),
}


def _transcription(model_name: str) -> Transcription:
  if model_name not in TRANSCRIPTIONS:
    raise ValueError(f'model {model_name!r} has no PyTorch transcription in dferjax/reference to export to '
                     f'(transcribed: {sorted(TRANSCRIPTIONS)})')
  return TRANSCRIPTIONS[model_name]


def _import_torch_module(name: str):
  try:
    return importlib.import_module(name)
  except ImportError as error:
    raise ImportError(f'export needs PyTorch (pip install -e ".[torch]"): {error}') from error


def torch_arguments(config) -> dict[str, Any]:
  """The transcription's constructor arguments for the run's model: every flax field, renamed, plus the frame size
  where the torch class needs it; a field the torch class cannot take fails, naming it."""
  from dferjax import train  # pylint: disable=import-outside-toplevel
  transcription = _transcription(config.model_name)
  model = train.build_model(config)
  cls = getattr(_import_torch_module(transcription.module), transcription.class_name)
  accepted = set(inspect.signature(cls.__init__).parameters) - {'self'}
  renames = dict(transcription.renames)
  arguments = {'num_classes': config.num_classes}
  if 'image_size' in accepted:
    arguments['image_size'] = config.input.image_size
  unplaced = []
  for field in dataclasses.fields(model):
    if field.name in ('parent', 'name', 'num_classes') or field.name in COMPUTE_FIELDS + transcription.ignored:
      continue
    name = renames.get(field.name, field.name)
    if name in accepted:
      value = getattr(model, field.name)
      arguments[name] = list(value) if isinstance(value, tuple) else value
    else:
      unplaced.append(field.name)
  if unplaced:
    raise ValueError(f'{transcription.module}.{transcription.class_name} has no argument for the {config.model_name} '
                     f'fields {unplaced}: the transcription cannot hold this model')
  return arguments


def build_torch_model(model_name: str, arguments: dict):
  transcription = _transcription(model_name)
  module = _import_torch_module(transcription.module)
  return getattr(module, transcription.class_name)(**arguments)


def export(workdir: str, output: str, step: str = 'best') -> dict:
  """Writes `output` (the state dict) and its .json description; returns the description."""
  import jax  # pylint: disable=import-outside-toplevel
  from dferjax import predict  # pylint: disable=import-outside-toplevel
  from dferjax.evaluate import load_run_config  # pylint: disable=import-outside-toplevel
  config = load_run_config(workdir)
  transcription = _transcription(config.model_name)  # before any restore: fail fast
  torch = _import_torch_module('torch')
  arguments = torch_arguments(config)
  run = predict.load_run(workdir, step)
  torch_model = build_torch_model(config.model_name, arguments)
  variables = jax.device_get({'params': run.state.params, 'batch_stats': run.state.batch_stats})
  _import_torch_module(transcription.module).load_flax_variables(torch_model, variables)
  state_dict = torch_model.state_dict()  # num_batches_tracked included, so strict=True loads it
  output_path = pathlib.Path(output)
  output_path.parent.mkdir(parents=True, exist_ok=True)
  torch.save(state_dict, output_path)
  description = {
      'model_name': config.model_name, 'module': transcription.module, 'class': transcription.class_name,
      'arguments': arguments, 'workdir': os.path.abspath(workdir), 'step': run.step,
      'class_names': list(config.class_names), 'image_size': config.input.image_size,
      'sampler': config.input.sampler.to_dict(),
      'input': 'video float32 [batch, frames, 3, height, width], RGB in [0, 1] (uint8 / 255), frames as the sampler '
               'picks them',
      'outputs': transcription.outputs}
  with open(description_path(output_path), 'w') as f:
    json.dump(description, f, indent=2)
  build_torch_model(config.model_name, arguments).load_state_dict(
      torch.load(output_path, weights_only=True), strict=True)  # what a user will do, checked once here
  return description


def description_path(output) -> pathlib.Path:
  return pathlib.Path(output).with_suffix('.json')


def load_exported(path):
  """The torch transcription described beside `path`, its state dict loaded with strict=True, in eval mode."""
  torch = _import_torch_module('torch')
  with open(description_path(path)) as f:
    description = json.load(f)
  model = build_torch_model(description['model_name'], description['arguments'])
  model.load_state_dict(torch.load(path, weights_only=True), strict=True)
  return model.eval()


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(prog='python -m dferjax.export', description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True, help='a dferjax run directory')
  parser.add_argument('--output', required=True, help='the .pt file to write (its .json description goes beside it)')
  parser.add_argument('--step', default='best', help="'best', 'selected', 'latest' or a step number")
  parser.add_argument('--verbose', action='store_true', help='the traceback of an expected error (else one line)')
  args = parser.parse_args(argv)
  description = cli.run(lambda: export(args.workdir, args.output, args.step), verbose=args.verbose)
  print(f'wrote {args.output} ({description["module"]}.{description["class"]}, {args.workdir} step '
        f'{description["step"]}) and {description_path(args.output)}')
  return description


if __name__ == '__main__':
  main(sys.argv[1:])
