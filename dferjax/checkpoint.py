"""Checkpoints of a run: the only module that talks to Orbax.

One `CheckpointManager` per workdir keeps the train state, each host's input position (a record: the restart
continues at the batch its step says) and the config; it keeps the latest `keep` checkpoints plus the best one by
an eval metric.
Orbax writes each step to a temporary directory and renames it when complete, so a run killed mid-save
leaves the previous checkpoints readable and the half-written one ignored.

A checkpoint damaged after it was written (a file truncated or removed) is found by its file list
(`<workdir>/checkpoint_files/<step>.json`, every file's size, written once the save is complete): a training run
sets it aside as `checkpoints/<step>.damaged` with a warning naming the step, and resumes from the newest intact
one (the best one, too, becomes the best intact checkpoint). A read-only reader (dferjax.evaluate) moves nothing:
it asks `damaged_steps()` and chooses among the others.

A save that the disk refuses (full, over quota, past the file-size limit) raises an OSError naming the step's
directory, from whichever call sees it first (`check_for_errors`, `wait`, the next `save`); Orbax's own reports of
it (logged tracebacks, tensorstore's late writes to the closed event loop) are silenced, so the caller's one
message is all. The earlier checkpoints and their file lists stay as they were.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import warnings
from typing import Any, Callable

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from dferjax import cli, configlib

_ITEMS = ('state', 'data', 'config')


class _QuietDiskFull(logging.Filter):
  """Orbax logs a failed save's traceback from each of its threads, and asyncio each unfinished write of it;
  when the disk refused a write, the error reaches the caller instead (cli: one line), so those are dropped."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.exc_info and record.exc_info[1] is not None and cli.is_disk_full(record.exc_info[1]))


class _QuietOnPurpose(logging.Filter):
  """Orbax's warnings about what this module asks for on purpose: a save between evaluations
  (`checkpoint_every_steps`, a SIGTERM's) has no metrics, so it is never the best one; a reader (evaluate, predict,
  export) opens the checkpoints read-only."""
  _MESSAGES = ('Requested `tracked_metric`; did not provide metrics',
               'CheckpointManagerOptions.read_only=True, setting save_interval_steps=0', 'Given directory is read only=')

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self._MESSAGES)


def _quiet_closed_event_loop(previous: Callable) -> Callable:
  """When one write of a save fails, Orbax closes the save's event loop while tensorstore still finishes the
  others; each then reports 'Event loop is closed' as an unraisable error. Only those are dropped."""
  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == 'Event loop is closed'):
      previous(unraisable)
  hook.quiets_closed_event_loop = True
  return hook


def _quiet_orbax():
  """A save the disk refused is reported once, by the error it raises (see `Checkpoints.check_for_errors`); what is
  asked for on purpose is not reported."""
  for name, quiet in (('absl', _QuietDiskFull), ('asyncio', _QuietDiskFull), ('absl', _QuietOnPurpose)):
    if not any(isinstance(f, quiet) for f in logging.getLogger(name).filters):  # Orbax logs through absl
      logging.getLogger(name).addFilter(quiet())
  if not getattr(sys.unraisablehook, 'quiets_closed_event_loop', False):
    sys.unraisablehook = _quiet_closed_event_loop(sys.unraisablehook)
  # the writes that the closed loop never started
  warnings.filterwarnings('ignore', r"coroutine '.*write_fragment' was never awaited", RuntimeWarning)


def _manager(directory: str, *, keep: int = 2, best_metric: str | None = 'war', also_best: str | None = None,
             read_only: bool = False) -> ocp.CheckpointManager:
  policies = [preservation.LatestN(n=keep)]
  for metric in filter(None, (best_metric, also_best)):  # also_best: the hold-out's checkpoint (data/validation.py)
    policies.append(preservation.BestN(get_metric_fn=lambda metrics, metric=metric: metrics[metric], n=1,
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

  def __init__(self, workdir: str, *, keep: int = 2, best_metric: str | None = 'war', also_best: str | None = None,
               read_only: bool = False):
    self.directory = os.path.join(workdir, 'checkpoints')
    self.files_directory = os.path.join(workdir, 'checkpoint_files')
    if read_only and not os.path.isdir(self.directory):
      raise FileNotFoundError(f'no checkpoints in {workdir!r}: expected the directory {self.directory}')
    if not read_only:
      self._set_aside_damaged()
    _quiet_orbax()
    self._read_only = read_only
    self._saving: int | None = None  # the step of the save in flight
    self.manager = _manager(self.directory, keep=keep, best_metric=best_metric, also_best=also_best,
                            read_only=read_only)

  def _set_aside_damaged(self):
    """Process 0 renames every checkpoint whose files differ from its file list to `<step>.damaged` (warning
    naming it), before any process opens the manager, so resume and `best_step` see only intact ones."""
    if jax.process_index() == 0 and os.path.isdir(self.directory):
      steps = sorted((int(name) for name in os.listdir(self.directory) if name.isdigit()), reverse=True)
      damaged = self._damage(steps)  # the manager is not open yet: the steps on disk
      intact = [step for step in steps if step not in damaged]
      for step, why in damaged.items():
        target = os.path.join(self.directory, f'{step}.damaged')
        while os.path.exists(target):
          target += '_'
        os.rename(os.path.join(self.directory, str(step)), target)
        sys.stderr.write(f'warning: checkpoint {self.directory}/{step} is damaged ({why}): set aside as {target}; '
                         f'{f"resuming from step {intact[0]}" if intact else "no intact checkpoint is left"}\n')
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices('damaged checkpoints set aside')

  def _record_files(self):
    """Writes the file list of every complete checkpoint that has none (process 0; after the save finished)."""
    if self._read_only or jax.process_index() != 0:
      return
    os.makedirs(self.files_directory, exist_ok=True)
    steps = {str(step) for step in self.manager.all_steps()}
    for name in os.listdir(self.files_directory):
      # deleted by the keep policy; judged on disk, as a failed save also drops from Orbax's list the steps it
      # was to delete
      if not os.path.isdir(os.path.join(self.directory, name.removesuffix('.json'))):
        os.remove(os.path.join(self.files_directory, name))
    for step in steps:
      path = os.path.join(self.files_directory, f'{step}.json')
      if not os.path.exists(path):
        with open(path + '.tmp', 'w') as f:
          json.dump(checkpoint_files(os.path.join(self.directory, step)), f)
        os.replace(path + '.tmp', path)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def damaged_steps(self) -> dict[int, str]:
    """{step: what is wrong} for the checkpoints whose files differ from their file lists (nothing is moved)."""
    return self._damage(self.all_steps())

  def _damage(self, steps) -> dict[int, str]:
    return {step: why for step in steps if (why := checkpoint_damage(self.directory, self.files_directory, step))}

  def best_step_among(self, steps, metric: str) -> int | None:
    """Of `steps`, the one whose saved metrics hold the highest `metric`, the latest on ties (as Orbax's best);
    None when none of them saved it (a checkpoint saved between evaluations has no metrics)."""
    scored = [(metrics[metric], step) for step in steps if metric in (metrics := self.manager.metrics(step) or {})]
    return max(scored)[1] if scored else None

  def save(self, step: int, state, data_iterator, config_dict: dict, metrics: dict[str, float] | None = None):
    """Starts an asynchronous save; the next save or `wait()` completes it."""
    self.wait()  # the previous save, complete: its file list
    args = {'state': ocp.args.StandardSave(state), 'config': ocp.args.JsonSave(config_dict)}
    if data_iterator is not None:
      args['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    self._saving = step
    with self._disk_full_names_the_step():
      self.manager.save(step, args=ocp.args.Composite(**args),
                        metrics={k: float(v) for k, v in metrics.items()} if metrics else None)

  def wait(self):
    with self._disk_full_names_the_step():
      self.manager.wait_until_finished()
    self._saving = None
    self._record_files()

  def check_for_errors(self):
    """Raises the error of a finished asynchronous save (a full disk), so a run stops at once, not a save later."""
    with self._disk_full_names_the_step():
      self.manager.check_for_errors()
      if not self.manager.is_saving_in_progress():
        # A failed save's error is held by Orbax's finalize thread (the check above sees it only if it comes
        # first); the save is over, so this returns at once or raises it.
        self.manager.wait_until_finished()

  @contextlib.contextmanager
  def _disk_full_names_the_step(self):
    """A save the disk refused (full, quota, file-size limit) raises an OSError naming the step's directory;
    Orbax leaves its temporary directory, which the next run's manager removes."""
    try:
      yield
    except Exception as error:  # pylint: disable=broad-exception-caught
      if not cli.is_disk_full(error) or self._saving is None:
        raise
      found = cli.os_error(error)
      step, self._saving = self._saving, None
      raise OSError(found.errno, found.strerror, os.path.join(self.directory, str(step))) from error

  def close(self):
    # Orbax removes half-written saves in a thread of its own that only a save waits for; a run stopped before its
    # first save (a config error) would leave it to the interpreter's exit, where it fails with a traceback.
    if (cleanup := getattr(self.manager, '_cleanup_tmp_directory_future', None)) is not None:
      cleanup.result()
    self.manager.close()

  def saved_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def restore(self, step: int, abstract_state):
    """Restores the train state after checking the saved tree matches."""
    check_compatible(self.saved_shapes(step), abstract_shapes(abstract_state),
                     what=f'checkpoint {self.directory}/{step}')
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    return self.manager.restore(step, args=args).state

  def restore_arrays(self, step: int) -> dict[str, Any]:
    """The saved train state as a plain tree of host numpy arrays (to start another run from it)."""
    metadata = self.manager.item_metadata(step)['state']
    metadata = getattr(metadata, 'tree', metadata)
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # not the saving run's devices: any topology
    target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=here)
                          if hasattr(leaf, 'shape') else leaf, metadata)
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return jax.tree.map(np.asarray, restored.state)

  def saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    metadata = self.manager.item_metadata(step)['state']
    metadata = getattr(metadata, 'tree', metadata)
    return {path: tuple(leaf.shape) for path, leaf in _flatten(metadata).items() if hasattr(leaf, 'shape')}


def checkpoint_files(step_directory: str) -> dict[str, int]:
  """{relative path: size in bytes} of every file of one checkpoint."""
  files = {}
  for root, _, names in os.walk(step_directory):
    for name in names:
      path = os.path.join(root, name)
      files[os.path.relpath(path, step_directory)] = os.path.getsize(path)
  return files


def checkpoint_damage(directory: str, files_directory: str, step: int) -> str | None:
  """What is wrong with checkpoint `step` against its file list ('state/x is missing', 'state/x has 10 of 99
  bytes'), or None when it matches or has no list yet (a run stopped before the save was recorded)."""
  listing = os.path.join(files_directory, f'{step}.json')
  if not os.path.exists(listing):
    return None
  with open(listing) as f:
    expected = json.load(f)
  found = checkpoint_files(os.path.join(directory, str(step)))
  for path, size in sorted(expected.items()):
    if path not in found:
      return f'{path} is missing'
    if found[path] != size:
      return f'{path} has {found[path]} of {size} bytes'
  return None


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


# ---------------------------------------------------------------------------------------------------------
# Where a run starts: its own latest checkpoint (resume), a pretrained backbone, another run's checkpoint.


def check_starting_point(config):
  """A config whose paper starts from a pretrained backbone leaves `init_from.backbone` empty: fail before any
  work unless a backbone, another run (`init_from.workdir`) or 'none' (random on purpose) is given."""
  if config.init_from.get('guide', 'none') == '' and not config.init_from.workdir:
    raise ValueError(
        f'{config.model_name} learns from a frozen frame-level guide network, and none was given: train one with '
        'the frame-level config (model_name aen_frame) and pass --config.init_from.guide=<its workdir>, or '
        '--config.init_from.guide=none for a random guide')
  if config.init_from.backbone == '' and not config.init_from.workdir:
    raise ValueError(
        f'{config.model_name} trains from a pretrained backbone in its paper, and none was given: pass '
        '--config.init_from.backbone=<dir written by python -m dferjax.convert>, or '
        '--config.init_from.backbone=none to train from random weights')




# Fields added after runs were saved, at the value that behaves as those runs did: such a run still resumes.
ADDED_FIELDS = {'validation.fraction': 0.0, 'validation.seed': 0}


def check_resumable(config_json: dict, saved_config: dict, directory: str):
  """Refuses to resume a workdir whose checkpoint was written with another config (another fold, model, recipe),
  except for configlib.RESUMABLE_FIELDS; the error names every differing field."""
  saved, current = ({**ADDED_FIELDS, **configlib.flatten_config(saved_config)},
                    configlib.flatten_config(config_json))
  missing = object()
  differing = [name for name in sorted({*saved, *current}) if name not in configlib.RESUMABLE_FIELDS
               and saved.get(name, missing) != current.get(name, missing)]
  if differing:
    shown = lambda value: 'absent' if value is missing else repr(value)
    lines = [f'config.{name}={shown(current.get(name, missing))} (checkpoint: {shown(saved.get(name, missing))})'
             for name in differing]
    raise ValueError(f'{directory} holds a checkpoint of another config; this run differs in\n  '
                     + '\n  '.join(lines) + '\nUse another --workdir, or the saved config to resume (a resumed run '
                     f'may change only {", ".join(configlib.RESUMABLE_FIELDS)}).')


def initial_state(config, state, model, state_sharding):
  """The freshly initialised `state` with the config's starting weights merged in (backbone, then workdir)."""
  if config.init_from.backbone not in ('', 'none'):
    from dferjax import convert  # pylint: disable=import-outside-toplevel
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    backbone = convert.load_backbone(config.init_from.backbone)
    try:
      variables = convert.merge_backbone(variables, backbone)
    except ValueError as error:
      fields = ', '.join(f'config.model.{name}={value!r}' for name, value in config.model.items()
                         if 'backbone' in name) or f'config.model_name={config.model_name!r}'
      raise ValueError(f'config.init_from.backbone={config.init_from.backbone!r} does not fit the model built '
                       f'from {fields}: {error}') from error
    state = state.replace(params=variables['params'], batch_stats=variables['batch_stats'])
    if jax.process_index() == 0:
      print(f'loaded backbone {convert.describe_backbone(config.init_from.backbone, backbone)}', flush=True)
  if config.init_from.get('guide', 'none') not in ('', 'none'):
    state = state_from_guide(config, state, model)
  if config.init_from.workdir:
    state = state_from_workdir(config, state, model.classifier_names)
  return jax.device_put(state, state_sharding)


def state_from_guide(config, state, model):
  """Copies a frame-level run (config.init_from.guide, e.g. an 'aen_frame' workdir) into the parts of `model` its
  `guide_sources()` names: AEN's frozen guide whole, its trainable backbone and squeeze where they overlap (the
  backbone's last stage, which the frame network does not have, keeps its initialisation)."""
  directory = config.init_from.guide
  if not hasattr(model, 'guide_sources'):
    raise ValueError(f'config.init_from.guide={directory!r}, but {config.model_name!r} has no frame-level guide: '
                     "leave config.init_from.guide='none'")
  source = Checkpoints(directory, read_only=True)
  step = source.best_step() or source.latest_step()
  if step is None:
    raise FileNotFoundError(f'config.init_from.guide={directory!r} holds no checkpoint: train the frame-level '
                            'network there first (model_name aen_frame)')
  saved_model = source.saved_config(step).get('model_name')
  if saved_model != 'aen_frame':
    raise ValueError(f'config.init_from.guide={directory!r} holds a {saved_model!r} model, not the frame-level '
                     "'aen_frame' network")
  saved = source.restore_arrays(step)
  source.close()
  current = {'params': flax.core.unfreeze(state.params), 'batch_stats': flax.core.unfreeze(state.batch_stats)}
  for collection in current:
    saved_collection = saved.get(collection, {})
    for target, source_name in model.guide_sources().items():
      part = saved_collection if source_name == '' else saved_collection.get(source_name, {})
      if target not in current[collection]:
        if part:
          raise ValueError(f'{config.model_name} has no {collection}[{target!r}] for config.init_from.guide')
        continue
      current[collection][target] = _overlay(current[collection][target], part, whole=source_name == '',
                                             what=f'config.init_from.guide={directory!r} {collection}/{target}')
  if jax.process_index() == 0:
    print(f'guide and backbone initialised from {directory} step {step}', flush=True)
  return state.replace(params=current['params'], batch_stats=current['batch_stats'])


def _overlay(target, source, *, whole: bool, what: str):
  """`target` with the arrays of `source` put in by path; every source array must fit, and with `whole` cover
  all of target."""
  flat_target, flat_source = _flatten(target), _flatten(source)
  check_compatible({k: tuple(np.shape(v)) for k, v in flat_source.items()},
                   {k: tuple(np.shape(v)) for k, v in flat_target.items() if whole or k in flat_source}, what=what)
  merged = {k: jnp.asarray(flat_source.get(k, v), v.dtype) for k, v in flat_target.items()}
  return flax.traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in merged.items()})


def state_from_workdir(config, state, classifier_names: tuple[str, ...]):
  """Starts from another run's parameters and BN statistics (e.g. AFEW from DFEW fold 1); fresh optimizer.
  With `init_from.reset_classifier`, the model's `classifier_names` keep their fresh initialisation."""
  source = Checkpoints(config.init_from.workdir, read_only=True)
  step = config.init_from.step if config.init_from.step >= 0 else (source.best_step() or source.latest_step())
  if step is None:
    raise FileNotFoundError(f'config.init_from.workdir={config.init_from.workdir!r} holds no checkpoint')
  saved_config = source.saved_config(step)
  if saved_config.get('model_name') != config.model_name:
    raise ValueError(f'config.init_from.workdir={config.init_from.workdir!r} holds a {saved_config.get("model_name")!r} '
                     f'model, this run trains {config.model_name!r}')
  saved = source.restore_arrays(step)
  source.close()
  wanted = {'params': state.params, 'batch_stats': state.batch_stats}
  saved = {'params': saved['params'], 'batch_stats': saved.get('batch_stats', {})}
  if config.init_from.reset_classifier:
    for collection in saved.values():
      for name in classifier_names:
        collection.pop(name, None)
    kept = {c: {k: v for k, v in wanted[c].items() if k not in classifier_names} for c in wanted}
  else:
    kept = wanted
  check_compatible(abstract_shapes(saved), abstract_shapes(kept),
                   what=f'config.init_from.workdir={config.init_from.workdir!r} step {step}')
  merged = {c: {**flax.core.unfreeze(wanted[c]), **saved[c]} for c in wanted}
  merged = jax.tree.map(lambda new, old: jnp.asarray(new, old.dtype), merged, wanted)
  if jax.process_index() == 0:
    print(f'initialised from {config.init_from.workdir} step {step}'
          f'{" (classifier reset)" if config.init_from.reset_classifier else ""}', flush=True)
  return state.replace(params=merged['params'], batch_stats=merged['batch_stats'])


def restore_for_evaluation(checkpoints: Checkpoints, step: int, abstract_state):
  """The parameters and BN statistics of a saved train state, checked against and placed like `abstract_state`
  (an optimizer-free evaluation state), without building an optimizer to restore into."""
  saved = checkpoints.restore_arrays(step)
  saved = {'params': saved['params'], 'batch_stats': saved.get('batch_stats', {})}
  wanted = {'params': abstract_state.params, 'batch_stats': abstract_state.batch_stats}
  check_compatible(abstract_shapes(saved), abstract_shapes(wanted), what=f'checkpoint {checkpoints.directory}/{step}')
  placed = jax.tree.map(lambda x, target: jax.device_put(np.asarray(x, target.dtype), target.sharding), saved, wanted)
  return abstract_state.replace(**placed)
