"""One row per clip of an evaluated split, written by `dferjax.evaluate` for every model: the clip, its label, the
prediction and the class probabilities (softmax of the logits, in `config.class_names` order), for error
analysis, per-clip comparisons of two models (e.g. McNemar's test) or ensembles; plus the per-clip outputs a model
declares, such as CEFLNet's salient snippet (its Fig. 3) and the frames that snippet holds, so a user can look at
what it chose.

A model names such aux outputs in its `clip_outputs` ClassVar, {aux name: kind}:
- 'value': written as it is (a number or a list);
- 'snippet': an index into the sampler's snippets, written with the frames of that snippet of the clip as
  `<name>_frames` (0-based indices into the clip's frames, in time order: frame i is DFEW's file i + 1).
One JSON line per clip, in the split's order:

    {"clip_id": "00042", "label": 3, "prediction": 3, "probabilities": [0.01, 0.02, 0.05, 0.83, ...],
     "salient_snippet": 4, "salient_snippet_frames": [50, 57], "snippet_attention": [0.11, ...]}
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
  """One eval batch -> the predicted class, the class probabilities, the label, the mask and the named aux outputs,
  per row."""
  video = batch['video'].astype(dtype) / 255
  logits, aux = model.apply({'params': state.params, 'batch_stats': state.batch_stats}, video,
                            **train.model_inputs(model, batch), train=False)
  if missing := [name for name in names if name not in aux]:
    raise ValueError(f'{type(model).__name__}.clip_outputs names {missing}, not in its aux outputs {sorted(aux)}')
  return {'prediction': logits.argmax(-1), 'probabilities': jax.nn.softmax(logits.astype(jnp.float32)),
          'label': batch['label'], 'mask': batch['mask'],
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


def make_predict(steps: train.Steps, config: ml_collections.ConfigDict):
  """The jitted `predict_step` for the model's declared outputs: (state, global batch) -> per-row outputs."""
  return jax.jit(functools.partial(predict_step, model=steps.model, names=tuple(declared(steps.model)),
                                   dtype=jnp.dtype(config.dtype)),
                 in_shardings=(steps.state_sharding, steps.batch_sharding), out_shardings=steps.replicated)


def collect(steps: train.Steps, state, config: ml_collections.ConfigDict, reader: pipeline.EvalReader,
            predict=None) -> list[dict]:
  """One row per clip of the reader's split (a pass of inputs.eval_reader, test sampling). `predict`: a
  `make_predict` of these steps, to compile it once for several checkpoints."""
  outputs = declared(steps.model)
  frames_of = snippet_frames(config) if 'snippet' in outputs.values() else None
  predict = predict or make_predict(steps, config)
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
  row = {'clip_id': pipeline.clip_name(record),
         'label': int(values['label']), 'prediction': int(values['prediction']),
         'probabilities': np.round(values['probabilities'].astype(np.float64), 6).tolist()}
  if row['label'] != int(record['label']):
    raise RuntimeError(f'clip {row["clip_id"]}: the batch row holds label {row["label"]}, the record '
                       f'{int(record["label"])}: eval rows and records are out of step')
  for name, kind in outputs.items():
    row[name] = np.asarray(values[name]).tolist()
    if kind == 'snippet':
      row[f'{name}_frames'] = frames_of(int(record['num_frames']))[int(values[name])].tolist()
  return row


def report(steps: train.Steps, state, config: ml_collections.ConfigDict, reader: pipeline.EvalReader,
           path_stem: str, predict=None) -> dict:
  """Writes the rows to `<path_stem>.jsonl` (process 0): {'clip_report': path, 'clip_summary': text} there, {} on
  the other processes."""
  rows = collect(steps, state, config, reader, predict)
  if jax.process_index() != 0:
    return {}
  path = path_stem + '.jsonl'
  with open(path, 'w') as f:
    f.writelines(json.dumps(row) + '\n' for row in rows)
  return {'clip_report': path, 'clip_summary': summary(rows, declared(steps.model))}


def summary(rows: list[dict], outputs: dict[str, str]) -> str:
  """How many clips are right, and how often each snippet was chosen per 'snippet' output (a check that the choice
  varies)."""
  lines = [f'{sum(row["prediction"] == row["label"] for row in rows)} of {len(rows)} clips predicted right']
  for name in (name for name, kind in outputs.items() if kind == 'snippet'):
    counts = collections.Counter(row[name] for row in rows)
    lines.append(f'{name} over {len(rows)} clips: ' + ', '.join(f'{k}: {counts[k]}' for k in sorted(counts)))
  return '\n'.join(lines)
