"""PyTorch ResNet18 checkpoint -> Orbax checkpoint of the flax backbone's {'params', 'batch_stats'}.

Accepts the MS-Celeb-1M `Resnet18_MS1M_pytorch.pth.tar` ({'state_dict': {'module.*'}} with the extra heads
`module.feature.*` and `module.fc.*`, refs.md §3.1), a plain torchvision resnet18 state_dict, or a
RAF-DB-trained ResNet18 in either form. Heads are dropped; anything else that is not a ResNet18 fails with
the list of missing/unexpected keys and shape mismatches. Run:

  python -m dferjax.convert --input Resnet18_MS1M_pytorch.pth.tar --output ~/ckpt/resnet18_ms1m

The functions raise exceptions; the command prints them as `error: ...` lines on stderr and exits 1.

The trainer loads the result with `load_backbone(dir)` and `merge_backbone(variables, backbone)`
(`config.init_from.backbone`).
"""
import argparse
import json
from collections.abc import Mapping
from functools import partial
from pathlib import Path
import sys
from typing import Any, Sequence

from absl import logging
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dferjax.models.resnet import ResNet

DROPPED_HEADS = ('fc.', 'feature.')  # classifier; MS1M's Linear(512 -> 256) embedding
_TORCH_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
               'var': 'running_var'}
_MAX_LISTED = 20
# What a bad --input/--output raises here (OSError covers missing, existing and unwritable paths); anything else
# is a bug and keeps its traceback.
CLI_ERRORS = (ValueError, OSError, KeyError, RuntimeError, ImportError)


def torch_key(path: Sequence[str]) -> str:
  """('layer1_0', 'downsample_1', 'mean') -> 'layer1.0.downsample.1.running_mean' (torchvision names)."""
  return '.'.join([name.replace('_', '.') for name in path[:-1]] + [_TORCH_LEAF[path[-1]]])


def _listing(label: str, items: list[str]) -> str:
  shown = items[:_MAX_LISTED] + ([f'... {len(items) - _MAX_LISTED} more'] if len(items) > _MAX_LISTED else [])
  return f'{len(items)} {label}: ' + ', '.join(shown)


def _torch_load_reason(error: Exception) -> str:
  """The line of a torch.load error that says what is wrong, without torch's paragraphs of advice."""
  text = str(error).split('WeightsUnpickler error:', 1)[-1]
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  reason = lines[0].split(' Please use ')[0] if lines else type(error).__name__
  return reason if len(reason) <= 300 else reason[:300] + '...'


def _data_only_globals() -> list:
  """What training scripts commonly save beside the state_dict, allowed to the weights-only unpickler: numpy scalars
  and dtypes (`'best_prec1': np.float64(91.5)`) and argparse.Namespace (`'args': args`). Each only holds data: no
  code runs when it is rebuilt, and its contents pass the same unpickler."""
  scalar = getattr(getattr(np, '_core', None), 'multiarray', None) or np.core.multiarray
  dtype_classes = [type(np.dtype(code)) for code in '?bhilqBHILQefdgFDGSUV']  # numpy >= 1.25 pickles these
  return [scalar.scalar, np.dtype, *dtype_classes, argparse.Namespace]


def read_state_dict(path) -> dict[str, np.ndarray]:
  """Tensors of a torch checkpoint (a state_dict, or a dict holding one under 'state_dict') as numpy.

  Other entries beside 'state_dict' (epoch, arch, best_prec1, args) are reported and ignored. A file that pickles
  anything else (an optimizer, a model object, a logger) is refused with the line that extracts its state_dict.
  """
  path = Path(path)
  try:
    import torch  # pylint: disable=import-outside-toplevel  # optional dependency: only the converter needs it
  except ImportError as error:
    raise ImportError(f'{path}: reading a torch checkpoint needs PyTorch (pip install -e ".[torch]")') from error
  if not path.is_file():
    raise FileNotFoundError(f'{path}: {"a directory, not a" if path.is_dir() else "no such"} checkpoint file')
  try:
    with torch.serialization.safe_globals(_data_only_globals()):
      checkpoint = torch.load(path, weights_only=True, map_location='cpu')
  except Exception as error:  # pickle/zip errors have many types; all mean "not a weights-only torch file"
    reason = _torch_load_reason(error).rstrip('.')
    remedy = ''
    if 'allowed global' in reason:  # a torch file, with an object: the user may extract the tensors if they trust it
      remedy = (f'. If you trust the file, save its tensors alone and convert that: python -c "import torch; '
                f"c = torch.load('{path}', weights_only=False); torch.save(c.get('state_dict', c), "
                f"'{path.with_suffix('.state_dict.pth')}')\"")
    raise ValueError(f'{path}: torch.load(weights_only=True) cannot read it (not a torch checkpoint, or it '
                     f'pickles Python objects besides tensors): {reason}{remedy}') from error
  if isinstance(checkpoint, Mapping) and 'state_dict' in checkpoint:
    if ignored := sorted(str(key) for key in checkpoint if key != 'state_dict'):
      print(f'{path}: ignoring entries beside state_dict: {ignored}')
    checkpoint = checkpoint['state_dict']
  if not isinstance(checkpoint, Mapping):
    raise ValueError(f'{path}: expected a state_dict (a dict of tensors), got {type(checkpoint).__name__}')
  if not_tensors := sorted(str(key) for key, value in checkpoint.items() if not torch.is_tensor(value)):
    raise ValueError(f'{path}: state_dict entries that are not tensors: {not_tensors[:_MAX_LISTED]}')
  # float() first: numpy has no bfloat16/half tensors from torch; everything is stored as float32 anyway.
  return {str(key): (value.detach().cpu().float() if value.is_floating_point() else value.detach().cpu()).numpy()
          for key, value in checkpoint.items()}


def convert_state_dict(state_dict: Mapping[str, np.ndarray], stage_sizes=(2, 2, 2, 2), *,
                       source: str = 'state_dict') -> tuple[dict[str, Any], list[str]]:
  """torchvision-layout ResNet tensors -> (flax {'params', 'batch_stats'} of `ResNet`, dropped key names).

  Strips DataParallel's 'module.' prefix, drops the heads and `num_batches_tracked`; the width comes from
  conv1. Raises ValueError listing missing/unexpected keys and shape mismatches.
  """
  tensors, dropped = {}, []
  for key, value in state_dict.items():
    name = key.removeprefix('module.')
    if name.startswith(DROPPED_HEADS) or name.endswith('num_batches_tracked'):
      dropped.append(f'{key} {tuple(value.shape)}')
    else:
      tensors[name] = np.asarray(value)
  conv1 = tensors.get('conv1.weight')
  # A conv1 that is not [width, 3, 7, 7]-like gets the default width and is then listed as a shape mismatch.
  width = conv1.shape[0] if conv1 is not None and conv1.ndim == 4 and conv1.shape[0] > 0 else 64
  model = ResNet(stage_sizes=tuple(stage_sizes), width=width)
  abstract = jax.eval_shape(partial(model.init, train=False), jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  flat, missing, mismatched = {}, [], []
  expected_keys = set()
  for path, spec in traverse_util.flatten_dict(abstract).items():
    key = torch_key(path[1:])
    expected_keys.add(key)
    if key not in tensors:
      missing.append(key)
      continue
    torch_shape = tuple(spec.shape[i] for i in (3, 2, 0, 1)) if path[-1] == 'kernel' else spec.shape
    if tensors[key].shape != torch_shape:
      mismatched.append(f'{key} {tuple(tensors[key].shape)}, expected {torch_shape}')
      continue
    value = tensors[key].transpose(2, 3, 1, 0) if path[-1] == 'kernel' else tensors[key]  # OIHW -> HWIO
    flat[path] = value.astype(np.float32)
  unexpected = sorted(set(tensors) - expected_keys)
  if missing or unexpected or mismatched:
    problems = [_listing(label, items) for label, items in (
        ('missing keys', sorted(missing)), ('unexpected keys', unexpected), ('shape mismatches', sorted(mismatched)))
        if items]
    raise ValueError(f'{source}: not a torchvision ResNet (stage_sizes {tuple(stage_sizes)}, width {width}):\n  '
                     + '\n  '.join(problems))
  return traverse_util.unflatten_dict(flat), dropped


def save_backbone(variables: Mapping[str, Any], directory, *, overwrite: bool = False) -> Path:
  """Writes {'params', 'batch_stats'} as an Orbax StandardCheckpointer checkpoint to `directory`."""
  directory = Path(directory).expanduser().absolute()
  if directory.exists() and not overwrite:
    raise FileExistsError(f'{directory} exists; pass --overwrite to replace it')
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory, dict(variables), force=overwrite)
  return directory


def load_backbone(directory) -> dict[str, Any]:
  """Reads a checkpoint written by `save_backbone` -> {'params': ..., 'batch_stats': ...} (numpy)."""
  directory = Path(directory).expanduser().absolute()
  if not directory.is_dir():
    raise FileNotFoundError(f'{directory}: no backbone checkpoint (write one with python -m dferjax.convert)')
  with ocp.StandardCheckpointer() as checkpointer:
    variables = checkpointer.restore(directory)
  if set(variables) != {'params', 'batch_stats'}:
    raise ValueError(f'{directory}: expected a checkpoint of {{params, batch_stats}}, found {sorted(variables)}')
  return variables


def merge_backbone(variables: Mapping[str, Any], backbone_variables: Mapping[str, Any]) -> dict[str, Any]:
  """Returns `variables` with params/batch_stats['backbone'] replaced by `backbone_variables`.

  Every backbone variable of the model must be present with its shape; extra ones (e.g. layer4 for STT,
  which stops after layer3) are ignored and logged. Values take the model's dtypes.
  """
  merged, unused = dict(variables), set()
  for collection in ('params', 'batch_stats'):
    target = variables.get(collection, {}).get('backbone')
    if target is None:
      raise ValueError(f"model variables have no {collection}['backbone'] to load a backbone into")
    if collection not in backbone_variables:
      raise ValueError(f'backbone checkpoint has no {collection!r} (has {sorted(backbone_variables)})')
    flat_target = traverse_util.flatten_dict(target, sep='/')
    flat_source = traverse_util.flatten_dict(backbone_variables[collection], sep='/')
    missing = sorted(set(flat_target) - set(flat_source))
    mismatched = [f'{name}: checkpoint {tuple(np.shape(flat_source[name]))} vs model {tuple(value.shape)}'
                  for name, value in flat_target.items()
                  if name in flat_source and np.shape(flat_source[name]) != tuple(value.shape)]
    if missing or mismatched:
      problems = [_listing(label, items) for label, items in (
          ('missing', missing), ('shape mismatches', mismatched)) if items]
      raise ValueError(f'backbone checkpoint does not fit the model ({collection}):\n  ' + '\n  '.join(problems))
    unused |= {name.split('/')[0] for name in set(flat_source) - set(flat_target)}
    loaded = {name: jnp.asarray(flat_source[name], dtype=value.dtype) for name, value in flat_target.items()}
    merged[collection] = {**variables[collection], 'backbone': traverse_util.unflatten_dict(loaded, sep='/')}
  if unused:
    logging.info('backbone checkpoint: %s not used by this model', sorted(unused))
  return merged


SOURCE_FILENAME = 'dferjax_source.json'  # beside the arrays: which torch file a backbone came from


def describe_backbone(directory, variables: Mapping[str, Any]) -> str:
  """'<dir> (122 tensors, 11,176,512 parameters, from Resnet18_MS1M_pytorch.pth.tar)': the run's start line."""
  source_path = Path(directory).expanduser() / SOURCE_FILENAME
  source = json.loads(source_path.read_text())['source'] if source_path.is_file() else 'an unrecorded source file'
  leaves = jax.tree.leaves(variables)
  num_params = sum(np.size(x) for x in jax.tree.leaves(variables['params']))
  return f'{directory} ({len(leaves)} tensors, {num_params:,} parameters, from {source})'


def convert_checkpoint(input_path, output, *, overwrite: bool = False) -> Path:
  """torch checkpoint file -> Orbax backbone directory (returned); prints what it drops and writes."""
  variables, dropped = convert_state_dict(read_state_dict(input_path), source=str(input_path))
  for name in dropped:
    print(f'dropped {name}')
  directory = save_backbone(variables, output, overwrite=overwrite)
  (directory / SOURCE_FILENAME).write_text(json.dumps({'source': Path(input_path).name,
                                                       'path': str(Path(input_path).absolute())}))
  num_params = sum(x.size for x in jax.tree.leaves(variables['params']))
  print(f'wrote ResNet backbone ({num_params:,} params, width {variables["params"]["conv1"]["kernel"].shape[-1]}) '
        f'to {directory}')
  return directory


def _error_message(error: Exception, input_path: str) -> str:
  """The exception's text, led by the input file unless it names it already (ours do); with its type where the
  text alone says little (a KeyError is just the key)."""
  text = str(error) if isinstance(error, (ValueError, OSError)) else f'{type(error).__name__}: {error}'
  return text if input_path in text or str(Path(input_path)) in text else f'{input_path}: {text}'


def main(argv=None) -> None:
  """The command: a conversion error exits 1 with `error: <message>` on stderr, not a traceback."""
  parser = argparse.ArgumentParser(prog='python -m dferjax.convert', description=__doc__.split('\n\n')[0])
  parser.add_argument('--input', required=True, help='torch checkpoint (.pth / .pth.tar)')
  parser.add_argument('--output', required=True, help='directory for the Orbax checkpoint')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing --output')
  parser.add_argument('--verbose', action='store_true', help='show the traceback of an error')
  args = parser.parse_args(argv)
  try:
    convert_checkpoint(args.input, args.output, overwrite=args.overwrite)
  except CLI_ERRORS as error:
    if args.verbose:
      raise
    raise SystemExit(f'error: {_error_message(error, args.input)}') from error


if __name__ == '__main__':
  main(sys.argv[1:])
