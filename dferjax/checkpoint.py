"""Checkpoints of a run: the only module that talks to Orbax.

One `CheckpointManager` per workdir keeps the train state, the grain iterator state (so a restart resumes at
the exact batch) and the config; it keeps the latest `keep` checkpoints plus the best one by an eval metric.
Orbax writes each step to a temporary directory and renames it when complete, so a run killed mid-save
leaves the previous checkpoints readable and the half-written one ignored.
"""
from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

_ITEMS = ('state', 'data', 'config')


def _manager(directory: str, *, keep: int = 2, best_metric: str | None = 'war',
             read_only: bool = False) -> ocp.CheckpointManager:
  policies = [preservation.LatestN(n=keep)]
  if best_metric:
    policies.append(preservation.BestN(get_metric_fn=lambda metrics: metrics[best_metric], n=1,
                                       keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=preservation.AnyPreservationPolicy(policies),
      best_fn=(lambda metrics: metrics[best_metric]) if best_metric else None, best_mode='max',
      keep_checkpoints_without_metrics=True, create=not read_only, read_only=read_only,
      cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(
      os.path.abspath(directory), options=options,
      item_handlers={'state': ocp.StandardCheckpointHandler(), 'data': grain.checkpoint.CheckpointHandler(),
                     'config': ocp.JsonCheckpointHandler()})


class Checkpoints:
  """The checkpoints of one workdir: `workdir/checkpoints/<step>/{state,data,config}`."""

  def __init__(self, workdir: str, *, keep: int = 2, best_metric: str | None = 'war', read_only: bool = False):
    self.directory = os.path.join(workdir, 'checkpoints')
    if read_only and not os.path.isdir(self.directory):
      raise FileNotFoundError(f'no checkpoints in {workdir!r}: expected the directory {self.directory}')
    self.manager = _manager(self.directory, keep=keep, best_metric=best_metric, read_only=read_only)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iterator, config_dict: dict, metrics: dict[str, float] | None = None):
    """Starts an asynchronous save; the next save or `wait()` completes it."""
    args = {'state': ocp.args.StandardSave(state), 'config': ocp.args.JsonSave(config_dict)}
    if data_iterator is not None:
      args['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**args),
                      metrics={k: float(v) for k, v in metrics.items()} if metrics else None)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()

  def saved_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores the train state (and the iterator in place) after checking the saved tree matches."""
    check_compatible(self.saved_shapes(step), abstract_shapes(abstract_state),
                     what=f'checkpoint {self.directory}/{step}')
    args = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      args['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self.manager.restore(step, args=ocp.args.Composite(**args)).state

  def restore_arrays(self, step: int) -> dict[str, Any]:
    """The saved train state as a plain tree of host numpy arrays (to start another run from it)."""
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return jax.tree.map(np.asarray, restored.state)

  def saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    metadata = self.manager.item_metadata(step)['state']
    metadata = getattr(metadata, 'tree', metadata)
    return {path: tuple(leaf.shape) for path, leaf in _flatten(metadata).items() if hasattr(leaf, 'shape')}


def _flatten(tree) -> dict[str, Any]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(_key_name(k) for k in path): leaf for path, leaf in flat}


def _key_name(key) -> str:
  for attribute in ('key', 'name', 'idx'):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def abstract_shapes(tree) -> dict[str, tuple[int, ...]]:
  return {path: tuple(np.shape(leaf)) for path, leaf in _flatten(tree).items()}


def check_compatible(saved: dict[str, tuple], expected: dict[str, tuple], *, what: str, limit: int = 12):
  """Fails naming the parameters that a checkpoint lacks, has in excess, or holds with another shape."""
  missing = sorted(set(expected) - set(saved))
  unexpected = sorted(set(saved) - set(expected))
  mismatched = sorted(f'{p}: saved {saved[p]} vs model {expected[p]}'
                      for p in set(saved) & set(expected) if saved[p] != expected[p])
  if missing or unexpected or mismatched:
    lines = [f'{what} does not match this model (is it a checkpoint of another model or size?):']
    for title, items in (('missing', missing), ('unexpected', unexpected), ('shape mismatch', mismatched)):
      if items:
        shown = ', '.join(items[:limit]) + (f' ... (+{len(items) - limit} more)' if len(items) > limit else '')
        lines.append(f'  {title} ({len(items)}): {shown}')
    raise ValueError('\n'.join(lines))


def config_to_json(config) -> dict:
  return json.loads(config.to_json_best_effort())
