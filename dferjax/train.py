"""Training and evaluation: the state born sharded, pure jitted steps, the loop that joins data, model and checkpoints.

    python -m dferjax.main --config configs/stt_dfew.py --workdir runs/stt_fold1
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from dferjax import checkpoint as checkpoint_lib
from dferjax import losses, metrics, models, sharding, writers

# Top-level parameter collections that hold a model's classifier (dropped by `init_from.reset_classifier`).
CLASSIFIER_NAMES = ('head',)


class TrainState(train_state.TrainState):
  batch_stats: Any = None


class NonFiniteLossError(FloatingPointError):
  pass


# ---------------------------------------------------------------------------------------------------------
# Optimizer and loss.


def learning_rate_schedule(optimizer: ml_collections.ConfigDict, steps_per_epoch: int, num_epochs: int) -> optax.Schedule:
  """Per-step schedule that changes at epoch boundaries, as the PyTorch schedulers stepped once per epoch."""
  base = optimizer.learning_rate
  if optimizer.schedule == 'step':
    def by_epoch(epoch):
      return base * optimizer.step_factor ** (epoch // optimizer.step_epochs)
  elif optimizer.schedule == 'cosine':
    period = optimizer.cosine_epochs or num_epochs
    def by_epoch(epoch):
      return base * 0.5 * (1 + jnp.cos(jnp.pi * epoch / period))
  elif optimizer.schedule == 'constant':
    def by_epoch(epoch):
      return base * jnp.ones_like(epoch, jnp.float32)
  else:
    raise ValueError(f"config.optimizer.schedule={optimizer.schedule!r}: expected 'step', 'cosine' or 'constant'")

  def schedule(step):
    epoch = step // steps_per_epoch
    lr = by_epoch(epoch)
    if optimizer.warmup_epochs:  # pytorch_warmup.LinearWarmup dampened once per epoch
      lr = lr * jnp.minimum(1.0, (epoch + 1) / optimizer.warmup_epochs)
    return lr
  return schedule


def create_optimizer(optimizer: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
  """SGD/Adam with PyTorch's coupled weight decay (added to the gradient before momentum), on every parameter."""
  parts = []
  if optimizer.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(optimizer.grad_clip_norm))
  if optimizer.weight_decay:
    parts.append(optax.add_decayed_weights(optimizer.weight_decay))
  if optimizer.name == 'sgd':
    parts.append(optax.sgd(schedule, momentum=optimizer.momentum or None))
  elif optimizer.name == 'adam':
    parts.append(optax.adam(schedule))
  else:
    raise ValueError(f"config.optimizer.name={optimizer.name!r}: expected 'sgd' or 'adam'")
  return optax.chain(*parts)


def loss_function(loss: ml_collections.ConfigDict) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Per-example loss `(logits [b, C], labels [b]) -> [b]` named by the config (STT Tab. 2 rows)."""
  if loss.name == 'compact':
    return functools.partial(losses.compact_softmax_cross_entropy, beta=loss.beta)
  if loss.name == 'cross_entropy':
    return losses.cross_entropy
  if loss.name == 'label_smoothing':
    return functools.partial(losses.label_smoothed_cross_entropy, smoothing=loss.label_smoothing)
  raise ValueError(f"config.loss.name={loss.name!r}: expected 'compact', 'cross_entropy' or 'label_smoothing'")


# ---------------------------------------------------------------------------------------------------------
# State and steps.


def build_model(config: ml_collections.ConfigDict):
  """The config's model, computing in `config.dtype` (parameters stay float32)."""
  fields = config.model.to_dict()
  if fields.get('dtype', config.dtype) != config.dtype:
    raise ValueError(f'config.model.dtype={fields["dtype"]!r} disagrees with config.dtype={config.dtype!r}: '
                     'set only config.dtype')
  return models.build(config.model_name, config.num_classes, **{**fields, 'dtype': config.dtype})


def video_shape(config: ml_collections.ConfigDict, batch_size: int) -> tuple[int, ...]:
  if config.input.sampler == 'segments':
    num_frames = config.input.num_segments * config.input.frames_per_segment
  elif config.input.sampler == 'snippets':
    num_frames = config.input.num_snippets * config.input.frames_per_snippet
  else:
    raise ValueError(f"config.input.sampler={config.input.sampler!r}: expected 'segments' or 'snippets'")
  return (batch_size, num_frames, config.input.image_size, config.input.image_size, 3)


def create_train_state(model, tx, rng, input_shape) -> TrainState:
  variables = model.init({'params': rng, 'dropout': rng, 'drop_path': rng},
                         jnp.zeros(input_shape, jnp.float32), train=False)
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           batch_stats=variables.get('batch_stats', {}), tx=tx)


def init_train_accumulator() -> dict[str, jax.Array]:
  return {'loss_sum': jnp.zeros((), jnp.float32), 'correct': jnp.zeros((), jnp.int32),
          'count': jnp.zeros((), jnp.int32), 'first_nonfinite_step': jnp.full((), -1, jnp.int32)}


def train_step(state: TrainState, accumulator: dict, batch: dict, *, rng: jax.Array, loss_fn, dtype) -> tuple[TrainState, dict]:
  """One SGD step on a global batch; metrics are summed into `accumulator` on device (no host sync)."""
  step_rng = jax.random.fold_in(rng, state.step)
  dropout_rng, drop_path_rng = jax.random.split(step_rng)
  video = batch['video'].astype(dtype) / 255  # uint8 crosses the host link; scaling happens here

  def loss_of(params):
    (logits, _), updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, video, train=True,
        rngs={'dropout': dropout_rng, 'drop_path': drop_path_rng}, mutable=['batch_stats'])
    logits = logits.astype(jnp.float32)
    return loss_fn(logits, batch['label']).mean(), (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads, batch_stats=updates.get('batch_stats', state.batch_stats))
  finite = jnp.isfinite(loss)
  first_bad = accumulator['first_nonfinite_step']
  accumulator = {
      'loss_sum': accumulator['loss_sum'] + loss * batch['label'].shape[0],
      'correct': accumulator['correct'] + (logits.argmax(-1) == batch['label']).sum(),
      'count': accumulator['count'] + batch['label'].shape[0],
      'first_nonfinite_step': jnp.where((first_bad < 0) & ~finite, state.step.astype(jnp.int32), first_bad),
  }
  return new_state, accumulator


def eval_step(state: TrainState, confusion: jax.Array, batch: dict, *, dtype, num_classes: int) -> jax.Array:
  video = batch['video'].astype(dtype) / 255
  logits, _ = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats}, video, train=False)
  return confusion + metrics.confusion_matrix(logits, batch['label'], batch['mask'], num_classes)


@dataclasses.dataclass
class Steps:
  """The jitted steps of a run and the shardings they use."""
  init: Callable
  train: Callable
  eval: Callable
  state_sharding: Any
  batch_sharding: Any
  replicated: Any
  abstract_state: Any


def compile_steps(config, model, tx, mesh, rng) -> Steps:
  replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  dtype = jnp.dtype(config.dtype)
  init = functools.partial(create_train_state, model, tx, input_shape=video_shape(config, 1))
  abstract_state = jax.eval_shape(init, rng)  # shapes only, no memory
  state_sharding = jax.tree.map(lambda _: replicated, abstract_state)
  train = jax.jit(
      functools.partial(train_step, rng=rng, loss_fn=loss_function(config.loss), dtype=dtype),
      in_shardings=(state_sharding, replicated, batch_sharding),
      out_shardings=(state_sharding, replicated), donate_argnums=(0, 1))
  evaluate = jax.jit(
      functools.partial(eval_step, dtype=dtype, num_classes=config.num_classes),
      in_shardings=(state_sharding, replicated, batch_sharding), out_shardings=replicated, donate_argnums=1)
  return Steps(init=jax.jit(init, out_shardings=state_sharding), train=train, eval=evaluate,
               state_sharding=state_sharding, batch_sharding=batch_sharding, replicated=replicated,
               abstract_state=jax.tree.map(
                   lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, state_sharding))


# ---------------------------------------------------------------------------------------------------------
# Data.


def data_sources(config):
  from dferjax.data import datasets  # pylint: disable=import-outside-toplevel
  if config.dataset.synthetic.generate_if_missing:
    ensure_synthetic_dataset(config)
  train = datasets.data_source(config.dataset.name, config.dataset.train_split, config.dataset.data_dir)
  evaluation = datasets.data_source(config.dataset.name, config.dataset.eval_split, config.dataset.data_dir)
  return train, evaluation


def ensure_synthetic_dataset(config):
  """Writes the synthetic DFEW-layout clips and builds the TFDS dataset the config names, if missing (demo)."""
  from dferjax.data import build, synthetic  # pylint: disable=import-outside-toplevel
  settings = config.dataset.synthetic
  manual_dir = settings.manual_dir or os.path.join(config.dataset.data_dir, 'manual', 'synthetic_dfew')
  wanted = {'clips_per_class': settings.clips_per_class, 'seed': settings.seed}
  marker = os.path.join(manual_dir, 'synthetic.json')
  if jax.process_index() == 0:
    if os.path.isfile(marker):
      with open(marker) as f:
        written = json.load(f)
      if written != wanted:
        raise ValueError(f'{manual_dir} holds a synthetic dataset written with {written}, but the config asks for '
                         f'{wanted}: give another config.dataset.data_dir, or delete {config.dataset.data_dir}')
    else:
      print(f'writing the synthetic DFEW-layout dataset to {manual_dir}', flush=True)
      synthetic.write_dfew(manual_dir, **wanted)
      with open(marker, 'w') as f:
        json.dump(wanted, f)
    builder_name, builder_config = config.dataset.name.split('/')
    build.build(builder_name, manual_dir=manual_dir, data_dir=config.dataset.data_dir, configs=[builder_config])
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices('synthetic dataset ready')


def train_iterator(config, source, local_batch_size: int):
  from dferjax.data import pipeline  # pylint: disable=import-outside-toplevel
  dataset = pipeline.train_dataset(
      source, sampler=pipeline.make_sampler(config.input, train=True), augment=config.input.augment,
      image_size=config.input.image_size, batch_size=local_batch_size, seed=config.seed,
      shard_index=jax.process_index(), shard_count=jax.process_count(),
      class_balanced=config.input.class_balanced, num_threads=config.input.num_threads,
      prefetch=config.input.prefetch)
  return iter(dataset)


def eval_iterator(config, source, local_batch_size: int):
  from dferjax.data import pipeline  # pylint: disable=import-outside-toplevel
  return pipeline.eval_batches(
      source, sampler=pipeline.make_sampler(config.input, train=False), image_size=config.input.image_size,
      batch_size=local_batch_size, shard_index=jax.process_index(), shard_count=jax.process_count())


# ---------------------------------------------------------------------------------------------------------
# Evaluation.


def evaluate(steps: Steps, state: TrainState, config, source) -> dict[str, Any]:
  """UAR, WAR, per-class recall and the confusion matrix over a whole split (one host sync)."""
  local_batch_size = sharding.check_batch_size(config.eval_batch_size, 'eval_batch_size')
  confusion = jax.device_put(jnp.zeros((config.num_classes, config.num_classes), jnp.int32), steps.replicated)
  for batch in eval_iterator(config, source, local_batch_size):
    confusion = steps.eval(state, confusion, sharding.to_global(batch, steps.batch_sharding))
  confusion = np.asarray(jax.device_get(confusion))
  result = metrics.recall_metrics(confusion, config.class_names, allow_empty=True)
  result['confusion'] = confusion.tolist()
  return result


# ---------------------------------------------------------------------------------------------------------
# Starting points: resume, pretrained backbone, another run's checkpoint.


def initial_state(config, steps: Steps, rng) -> TrainState:
  state = steps.init(rng)
  if config.init_from.backbone:
    from dferjax import convert  # pylint: disable=import-outside-toplevel
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    variables = convert.merge_backbone(variables, convert.load_backbone(config.init_from.backbone))
    state = state.replace(params=variables['params'], batch_stats=variables['batch_stats'])
  if config.init_from.workdir:
    state = state_from_workdir(config, state)
  return jax.device_put(state, steps.state_sharding)


def state_from_workdir(config, state: TrainState) -> TrainState:
  """Starts from another run's parameters and BN statistics (e.g. AFEW from DFEW fold 1); fresh optimizer."""
  source = checkpoint_lib.Checkpoints(config.init_from.workdir, read_only=True)
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
      for name in CLASSIFIER_NAMES:
        collection.pop(name, None)
    kept = {c: {k: v for k, v in wanted[c].items() if k not in CLASSIFIER_NAMES} for c in wanted}
  else:
    kept = wanted
  checkpoint_lib.check_compatible(checkpoint_lib.abstract_shapes(saved), checkpoint_lib.abstract_shapes(kept),
                                  what=f'config.init_from.workdir={config.init_from.workdir!r} step {step}')
  merged = {c: {**flax.core.unfreeze(wanted[c]), **saved[c]} for c in wanted}
  merged = jax.tree.map(lambda new, old: jnp.asarray(new, old.dtype), merged, wanted)
  if jax.process_index() == 0:
    print(f'initialised from {config.init_from.workdir} step {step}'
          f'{" (classifier reset)" if config.init_from.reset_classifier else ""}', flush=True)
  return state.replace(params=merged['params'], batch_stats=merged['batch_stats'])


def check_resumable(config_json: dict, saved_config: dict, directory: str):
  """Refuses to resume a workdir written by another model: the config holds what the arrays cannot say."""
  for field in ('model_name', 'model', 'num_classes'):
    saved = saved_config.get(field)
    current = config_json[field]
    if saved != current:
      raise ValueError(f'{directory} holds a checkpoint with config.{field}={saved!r}, but this run has '
                       f'{current!r}: use another --workdir, or the same config to resume')


# ---------------------------------------------------------------------------------------------------------
# The loop.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the final eval metrics."""
  os.makedirs(workdir, exist_ok=True)
  is_chief = jax.process_index() == 0
  mesh = sharding.make_mesh()
  rng = jax.random.key(config.seed)

  train_source, eval_source = data_sources(config)
  steps_per_epoch = config.steps_per_epoch if config.steps_per_epoch > 0 else len(train_source) // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f'the train split has {len(train_source)} clips, fewer than config.batch_size={config.batch_size}')
  total_steps = steps_per_epoch * config.num_epochs
  local_batch_size = sharding.check_batch_size(config.batch_size)

  model = build_model(config)
  schedule = learning_rate_schedule(config.optimizer, steps_per_epoch, config.num_epochs)
  tx = create_optimizer(config.optimizer, schedule)
  steps = compile_steps(config, model, tx, mesh, rng)

  checkpoints = checkpoint_lib.Checkpoints(workdir, keep=config.keep_checkpoints, best_metric=config.best_metric)
  config_json = checkpoint_lib.config_to_json(config)
  train_iter = train_iterator(config, train_source, local_batch_size)
  start_step = checkpoints.latest_step()
  if start_step is not None:
    check_resumable(config_json, checkpoints.saved_config(start_step), checkpoints.directory)
    state = checkpoints.restore(start_step, steps.abstract_state, train_iter)
    if is_chief:
      print(f'resumed from {checkpoints.directory} at step {start_step}', flush=True)
  else:
    state = initial_state(config, steps, rng)
    start_step = 0

  writer = writers.MetricWriter(workdir, enabled=is_chief)
  writer.truncate_after(start_step)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config_json, f, indent=2)

  accumulator = jax.device_put(init_train_accumulator(), steps.replicated)
  epoch_totals = EpochTotals()
  last_eval: dict[str, Any] = {}
  step = start_step
  epoch_start_time, epoch_start_step = time.time(), step

  def progress_bar(step):
    return writers.ProgressBar(total=steps_per_epoch, initial=step % steps_per_epoch, batch_size=config.batch_size,
                               description=f'epoch {step // steps_per_epoch + 1}/{config.num_epochs}',
                               enabled=is_chief and config.progress_bar)

  progress = progress_bar(step)
  try:
    while step < total_steps:
      batch = sharding.to_global(next(train_iter), steps.batch_sharding)
      state, accumulator = steps.train(state, accumulator, batch)
      step += 1
      progress.update()
      end_of_epoch = step % steps_per_epoch == 0
      checkpoint_now = end_of_epoch or (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0)
      if end_of_epoch or checkpoint_now or step % config.log_every_steps == 0:
        train_metrics = epoch_totals.add(_fetch_train_sums(accumulator, step))
        accumulator = jax.device_put(init_train_accumulator(), steps.replicated)
        train_metrics['learning_rate'] = float(schedule(step - 1))
        writer.write(step=step, epoch=step / steps_per_epoch, split='train', values=train_metrics)
        progress.set_postfix(loss=train_metrics['loss'])
      if end_of_epoch:
        epoch = step // steps_per_epoch
        eval_metrics = None
        if epoch % config.eval_every_epochs == 0 or step == total_steps:
          eval_metrics = evaluate(steps, state, config, eval_source)
          last_eval = eval_metrics
          writer.write(step=step, epoch=epoch, split=config.dataset.eval_split, values=eval_metrics)
        seconds = time.time() - epoch_start_time
        progress.close()
        if is_chief:
          print(writers.epoch_summary_line(epoch, {**epoch_totals.means(), 'learning_rate': train_metrics['learning_rate']},
                                           eval_metrics, seconds,
                                           clips_per_second=(step - epoch_start_step) * config.batch_size / seconds),
                flush=True)
        checkpoints.save(step, state, train_iter, config_json,
                         metrics={k: eval_metrics[k] for k in ('uar', 'war')} if eval_metrics else None)
        epoch_start_time, epoch_start_step = time.time(), step
        epoch_totals = EpochTotals()
        if step < total_steps:
          progress = progress_bar(step)
      elif checkpoint_now:
        checkpoints.save(step, state, train_iter, config_json)
  finally:
    progress.close()
    checkpoints.wait()
  if not last_eval:  # resumed after the last epoch's checkpoint: evaluate what was trained
    last_eval = evaluate(steps, state, config, eval_source)
  best_step = checkpoints.best_step()
  checkpoints.close()
  if is_chief:
    write_final_reports(workdir, config, last_eval, best_step)
  writer.close()
  return last_eval


def _fetch_train_sums(accumulator: dict, step: int) -> dict[str, float]:
  """The one host sync per logging interval; stops the run on a non-finite loss before anything is saved."""
  values = jax.device_get(accumulator)
  first_bad = int(values['first_nonfinite_step'])
  if first_bad >= 0:
    raise NonFiniteLossError(
        f'the training loss became non-finite at step {first_bad + 1} (between the last log and step {step}); '
        'stopping without saving, so the last checkpoint stays the last good state. Lower '
        'config.optimizer.learning_rate, set config.optimizer.grad_clip_norm, or use config.dtype=float32.')
  return {k: float(values[k]) for k in ('loss_sum', 'correct', 'count')}


class EpochTotals:
  """Host-side sums of the train metrics since the epoch began; `add` returns the interval's means."""

  def __init__(self):
    self.sums = {'loss_sum': 0.0, 'correct': 0.0, 'count': 0.0}

  def add(self, interval: dict[str, float]) -> dict[str, float]:
    for key in self.sums:
      self.sums[key] += interval[key]
    return self._means(interval)

  def means(self) -> dict[str, float]:
    return self._means(self.sums)

  @staticmethod
  def _means(sums):
    count = max(sums['count'], 1)
    return {'loss': sums['loss_sum'] / count, 'accuracy': sums['correct'] / count}


def write_final_reports(workdir: str, config, last_eval: dict, best_step: int | None):
  from dferjax import reports  # pylint: disable=import-outside-toplevel
  records = writers.read_records(workdir)
  eval_records = [r for r in records if r.get('split') == config.dataset.eval_split]
  best = max(eval_records, key=lambda r: r[config.best_metric]) if eval_records else last_eval
  reports.plot_confusion_matrix(np.asarray(best['confusion']), config.class_names,
                                os.path.join(workdir, 'confusion_matrix.png'))
  reports.plot_learning_curves(records, os.path.join(workdir, 'learning_curves.png'))
  summary = {'last': {k: last_eval[k] for k in ('uar', 'war', 'per_class')},
             'best': {k: best[k] for k in ('uar', 'war', 'per_class', 'epoch')}, 'best_step': best_step}
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(summary, f, indent=2)
