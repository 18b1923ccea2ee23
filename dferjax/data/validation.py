"""The validation hold-out: a stratified, seeded part of the training split that training never sees, on which
the honest protocol selects its checkpoint (`config.validation`).

    config.validation.fraction = 0.1   # 0 (the default): no hold-out, the papers' protocol only
    config.validation.seed = 0         # which clips; independent of config.seed, so seeds share one hold-out

The clips are chosen from their ids alone (a seeded hash ranks the clips of each class), so every host, any
record order and any shard count hold out the same clips. The choice is written to
`<workdir>/validation_clips.json`.
"""
from __future__ import annotations

import hashlib
import json
import os


from dferjax.data import datasets

SPLIT = 'heldout'  # the records' split name ('validation' is AFEW's test split)
CLIPS_FILENAME = 'validation_clips.json'


def settings(config) -> tuple[float, int]:
  """(fraction, seed) of `config.validation`; (0, 0) for runs saved before it existed."""
  if 'validation' not in config:
    return 0.0, 0
  fraction, seed = float(config.validation.fraction), int(config.validation.seed)
  if not 0 <= fraction < 1:
    raise ValueError(f'config.validation.fraction={fraction}: expected 0 (off) or a fraction in (0, 1)')
  return fraction, seed


def clip_rank(clip_id: str, seed: int) -> int:
  """A seeded, platform-independent rank of one clip id (the held-out clips are the lowest of their class)."""
  return int.from_bytes(hashlib.sha256(f'{seed}\t{clip_id}'.encode()).digest()[:8], 'big')


def held_out_ids(clip_ids, labels, fraction: float, seed: int) -> set[str]:
  """The ids held out: per class, round(fraction * clips) of the lowest-ranked ones, at least one for a class of
  two or more clips (so the hold-out's UAR covers every class), never all of a class."""
  by_class: dict[int, list[str]] = {}
  for clip_id, label in zip(clip_ids, labels):
    by_class.setdefault(int(label), []).append(clip_id)
  if len(set(clip_ids)) != len(clip_ids):
    raise ValueError('the training split has duplicated clip ids: the hold-out is chosen by id')
  held = set()
  for ids in by_class.values():
    count = min(max(1, round(fraction * len(ids))), len(ids) - 1) if fraction > 0 else 0
    held.update(sorted(ids, key=lambda clip_id: (clip_rank(clip_id, seed), clip_id))[:count])
  return held


def _as_str(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def split(config, source, workdir: str | None = None, *, write: bool = True):
  """(training part, held-out part or None) of the training `source`; with a hold-out, records the held-out ids
  per class in `workdir/validation_clips.json` (when `write`: the chief)."""
  fraction, seed = settings(config)
  if fraction == 0:
    return source, None
  records = [source[i] for i in range(len(source))]
  clip_ids = [_as_str(record['clip_id']) for record in records]
  labels = [int(record['label']) for record in records]
  held = held_out_ids(clip_ids, labels, fraction, seed)
  if not held:
    raise ValueError(f'config.validation.fraction={fraction} holds out no clip of the {len(source)} training clips')
  keep = [i for i, clip_id in enumerate(clip_ids) if clip_id not in held]
  out = [i for i, clip_id in enumerate(clip_ids) if clip_id in held]
  if write and workdir:
    names = list(config.class_names)
    per_class = {names[label]: sorted(clip_ids[i] for i in out if labels[i] == label) for label in sorted(set(labels))}
    with open(os.path.join(workdir, CLIPS_FILENAME), 'w') as f:
      json.dump({'fraction': fraction, 'seed': seed, 'train_split': config.dataset.train_split,
                 'num_training': len(keep), 'num_held_out': len(out), 'clips': per_class}, f, indent=2)
  return datasets.ClipSubset(source, keep), datasets.ClipSubset(source, out)


def checkpoint_metric(config) -> str | None:
  """The checkpoint metric that the hold-out selects by ('heldout_war'), kept besides the best on test; None off."""
  return f'{SPLIT}_{config.best_metric}' if settings(config)[0] > 0 else None


def checkpoint_metrics(eval_metrics: dict | None, heldout_metrics: dict | None) -> dict | None:
  """What a checkpoint is ranked by: the test UAR/WAR (papers' protocol) and the hold-out's (honest protocol)."""
  if not eval_metrics:
    return None
  ranked = {key: eval_metrics[key] for key in ('uar', 'war')}
  if heldout_metrics:
    ranked.update({f'{SPLIT}_{key}': heldout_metrics[key] for key in ('uar', 'war')})
  return ranked


def with_heldout(eval_metrics: dict | None, heldout_metrics: dict | None) -> dict | None:
  """The epoch line's eval part: the hold-out's UAR/WAR shown like a metric head ('heldout UAR .. WAR ..')."""
  if not eval_metrics or not heldout_metrics:
    return eval_metrics
  return {**eval_metrics, SPLIT: {key: heldout_metrics[key] for key in ('uar', 'war', 'per_class')}}
