"""Per-clip outputs that a model declares, written by `dferjax.evaluate` for every clip of a split: CEFLNet's
salient snippet (its Fig. 3) and the frames that snippet holds, so a user can look at what the model chose.

A model names aux outputs in its `clip_outputs` ClassVar, {aux name: kind}:
- 'value': written as it is (a number or a list);
- 'snippet': an index into the sampler's snippets, written with the frames of that snippet of the clip as
  `<name>_frames` (0-based indices into the clip's frames, in time order: frame i is DFEW's file i + 1).
One JSON line per clip, in the split's order:

    {"clip_id": "00042", "label": 3, "prediction": 3, "salient_snippet": 4, "salient_snippet_frames": [50, 57],
     "snippet_attention": [0.11, ...]}
"""
from __future__ import annotations

import collections
import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dferjax import sharding, train
from dferjax.data import pipeline, sampling

KINDS = ('value', 'snippet')


def declared(model) -> dict[str, str]:
  """The model's clip outputs, {aux name: kind}; {} for a model that declares none."""
  outputs = dict(getattr(type(model), 'clip_outputs', {}))
  if bad := {name: kind for name, kind in outputs.items() if kind not in KINDS}:
    raise ValueError(f'{type(model).__name__}.clip_outputs: kinds {bad} not in {KINDS}')
  return outputs


def predict_step(state, batch: dict, *, model, names: tuple[str, ...], dtype) -> dict:
  """One eval batch -> the predicted class, the label, the mask and the named aux outputs, per row."""
  video = batch['video'].astype(dtype) / 255
  logits, aux = model.apply({'params': state.params, 'batch_stats': state.batch_stats}, video,
                            **train.model_inputs(model, batch), train=False)
  if missing := [name for name in names if name not in aux]:
    raise ValueError(f'{type(model).__name__}.clip_outputs names {missing}, not in its aux outputs {sorted(aux)}')
  return {'prediction': logits.argmax(-1), 'label': batch['label'], 'mask': batch['mask'],
          **{name: aux[name] for name in names}}


def snippet_frames(config: ml_collections.ConfigDict):
  """num_frames -> the test-mode frame indices of each snippet [num_snippets, frames_per_snippet]."""
  sampler = sampling.make_sampler(config.input.sampler)
  if not isinstance(sampler, sampling.SnippetSampler):
    raise ValueError(f"a 'snippet' clip output needs the snippet sampler, but config.input.sampler is "
                     f'{dict(config.input.sampler)}')
  if 'shuffle_snippets' in config.input.transforms:  # its slots are no longer the sampler's snippets
    raise ValueError("a 'snippet' clip output cannot be placed in time under config.input.transforms."
                     'shuffle_snippets')
  return lambda num_frames: sampler(num_frames, None).reshape(sampler.num_snippets, -1)


def collect(steps: train.Steps, state, config: ml_collections.ConfigDict, reader: pipeline.EvalReader) -> list[dict]:
  """One row per clip of the reader's split (a pass of inputs.eval_reader, test sampling); [] if the model
  declares none."""
  outputs = declared(steps.model)
  if not outputs:
    return []
  frames_of = snippet_frames(config) if 'snippet' in outputs.values() else None
  predict = jax.jit(functools.partial(predict_step, model=steps.model, names=tuple(outputs),
                                      dtype=jnp.dtype(config.dtype)),
                    in_shardings=(steps.state_sharding, steps.batch_sharding), out_shardings=steps.replicated)
  local_batch_size = reader.batch_size
  rows = []
  for index, batch in enumerate(reader):
    batch_outputs = jax.device_get(predict(state, sharding.to_global(batch, steps.batch_sharding)))
    for row in np.flatnonzero(batch_outputs['mask']):
      # The global batch is the hosts' local batches in process order; host h reads records h::process_count.
      host, position = divmod(int(row), local_batch_size)
      record_index = host + (index * local_batch_size + position) * jax.process_count()
      rows.append(clip_row(reader.source[record_index], {k: v[row] for k, v in batch_outputs.items()}, outputs,
                           frames_of))
  return rows


def clip_row(record: dict, values: dict, outputs: dict[str, str], frames_of) -> dict:
  clip_id = record['clip_id']
  row = {'clip_id': clip_id.decode() if isinstance(clip_id, bytes) else str(clip_id),
         'label': int(values['label']), 'prediction': int(values['prediction'])}
  if row['label'] != int(record['label']):
    raise RuntimeError(f'clip {row["clip_id"]}: the batch row holds label {row["label"]}, the record '
                       f'{int(record["label"])}: eval rows and records are out of step')
  for name, kind in outputs.items():
    row[name] = np.asarray(values[name]).tolist()
    if kind == 'snippet':
      row[f'{name}_frames'] = frames_of(int(record['num_frames']))[int(values[name])].tolist()
  return row


def report(steps: train.Steps, state, config: ml_collections.ConfigDict, reader: pipeline.EvalReader,
           path_stem: str) -> dict:
  """Writes the rows to `<path_stem>.jsonl` (process 0): {'clip_report': path, 'clip_summary': text}, or {} for a
  model that declares no clip outputs."""
  rows = collect(steps, state, config, reader)
  if not rows or jax.process_index() != 0:
    return {}
  path = path_stem + '.jsonl'
  with open(path, 'w') as f:
    f.writelines(json.dumps(row) + '\n' for row in rows)
  return {'clip_report': path, 'clip_summary': summary(rows, declared(steps.model))}


def summary(rows: list[dict], outputs: dict[str, str]) -> str:
  """How often each snippet was chosen, per 'snippet' output: a one-line check that the choice varies."""
  lines = []
  for name in (name for name, kind in outputs.items() if kind == 'snippet'):
    counts = collections.Counter(row[name] for row in rows)
    lines.append(f'{name} over {len(rows)} clips: ' + ', '.join(f'{k}: {counts[k]}' for k in sorted(counts)))
  return '\n'.join(lines)
