"""Training and evaluation: the state born sharded, pure jitted steps, the loop that joins data, model and checkpoints.

    python -m dferjax.main --config configs/stt_dfew.py --workdir runs/stt_fold1
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import re
import socket
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
from dferjax import (benchmarking, configlib, distributed, environment, losses, metrics, models, preemption, reports,
                     sharding, writers)
from dferjax.data import inputs, pipeline, sampling, validation


class TrainState(train_state.TrainState):
  batch_stats: Any = None


class NonFiniteLossError(FloatingPointError):
  pass


# ---------------------------------------------------------------------------------------------------------
# Optimizer.


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
  elif optimizer.schedule == 'exponential':  # torch's ExponentialLR stepped once per epoch
    def by_epoch(epoch):
      return base * optimizer.decay_rate ** epoch
  elif optimizer.schedule == 'constant':
    def by_epoch(epoch):
      return base * jnp.ones_like(epoch, jnp.float32)
  else:
    raise ValueError(f"config.optimizer.schedule={optimizer.schedule!r}: expected 'step', 'cosine', 'exponential' "
                     "or 'constant'")

  def schedule(step):
    epoch = step // steps_per_epoch
    lr = by_epoch(epoch)
    if optimizer.warmup_epochs:  # pytorch_warmup.LinearWarmup dampened once per epoch
      lr = lr * jnp.minimum(1.0, (epoch + 1) / optimizer.warmup_epochs)
    return lr
  return schedule


def schedule_change_note(optimizer: ml_collections.ConfigDict, steps_per_epoch: int, saved_epochs: int,
                         num_epochs: int, step: int) -> str | None:
  """A run resumed with another `num_epochs` (a resumable field): a cosine whose period is num_epochs
  (`cosine_epochs=0`) then anneals to another end, so the learning rate from `step` on is not the saved run's.
  Said at the start, with the field that keeps the saved schedule."""
  if optimizer.schedule != 'cosine' or optimizer.cosine_epochs or saved_epochs == num_epochs:
    return None
  saved, now = (float(learning_rate_schedule(optimizer, steps_per_epoch, epochs)(step))
                for epochs in (saved_epochs, num_epochs))
  return (f'note: config.num_epochs={num_epochs}, and the checkpoint\'s run had {saved_epochs}: the cosine schedule '
          f'anneals over num_epochs, so from step {step} the learning rate is {now:.4g} (the saved run\'s '
          f'{saved:.4g}). To keep the saved schedule, pass --config.optimizer.cosine_epochs={saved_epochs} too.')


def create_optimizer(optimizer: ml_collections.ConfigDict, schedule: optax.Schedule,
                     frozen: tuple[str, ...] = ()) -> optax.GradientTransformation:
  """SGD/Adam with PyTorch's coupled weight decay (added to the gradient before momentum), on every parameter but
  the top-level ones named in `frozen` (a model's `frozen_params`, e.g. AEN's guide): no update, no decay, no state."""
  if frozen:
    def labels(params):
      return {name: jax.tree.map(lambda _: 'frozen' if name in frozen else 'trained', subtree)
              for name, subtree in params.items()}
    return optax.multi_transform({'trained': create_optimizer(optimizer, schedule), 'frozen': optax.set_to_zero()},
                                 labels)
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


# ---------------------------------------------------------------------------------------------------------
# Model, state and steps.


def build_model(config: ml_collections.ConfigDict):
  """The config's model, computing in `config.dtype` (parameters stay float32)."""
  fields = config.model.to_dict()
  if fields.get('dtype', config.dtype) != config.dtype:
    raise ValueError(f'config.model.dtype={fields["dtype"]!r} disagrees with config.dtype={config.dtype!r}: '
                     'set only config.dtype')
  return models.build(config.model_name, config.num_classes, **{**fields, 'dtype': config.dtype})


def video_shape(config: ml_collections.ConfigDict, batch_size: int) -> tuple[int, ...]:
  num_frames = sampling.make_sampler(config.input.sampler).num_output_frames
  return (batch_size, num_frames, config.input.image_size, config.input.image_size, 3)


def check_frames(model, config: ml_collections.ConfigDict):
  """A model with a frame count must get as many frames as the sampler gives, named before anything compiles."""
  num_frames = sampling.make_sampler(config.input.sampler).num_output_frames
  if getattr(model, 'num_frames', num_frames) != num_frames:
    raise ValueError(f'config.model.num_frames={model.num_frames} but config.input.sampler '
                     f'({dict(config.input.sampler)}) gives {num_frames} frames per clip: make them agree')


class EvalState(flax.struct.PyTreeNode):
  """What evaluation needs of a trained state: no optimizer."""
  params: Any
  batch_stats: Any


def create_train_state(model, tx, rng, input_shape) -> TrainState:
  variables = init_variables(model, rng, input_shape)
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           batch_stats=variables.get('batch_stats', {}), tx=tx)


def create_eval_state(model, rng, input_shape) -> EvalState:
  variables = init_variables(model, rng, input_shape)
  return EvalState(params=variables['params'], batch_stats=variables.get('batch_stats', {}))


def init_variables(model, rng, input_shape):
  rngs = {'params': rng, **{stream: rng for stream in model.rng_streams}}
  return model.init(rngs, jnp.zeros(input_shape, jnp.float32), train=False)


def init_train_accumulator(loss_terms: tuple[str, ...]) -> dict[str, Any]:
  """Sums on device since the last log: the loss, accuracy and every loss term (times clips), the clip count."""
  sums = {name: jnp.zeros((), jnp.float32) for name in ('loss', 'accuracy', *loss_terms)}
  return {'sums': sums, 'count': jnp.zeros((), jnp.int32), 'first_nonfinite_step': jnp.full((), -1, jnp.int32)}


def frozen_params(model) -> tuple[str, ...]:
  """The model's top-level parameters that training leaves as they are (optional contract field, default none)."""
  return tuple(getattr(model, 'frozen_params', ()))


def model_inputs(model, batch: dict) -> dict:
  """The batch fields a model takes besides the video (its `model_inputs`, e.g. EST's 'permutation')."""
  if missing := [name for name in model.model_inputs if name not in batch]:
    raise ValueError(f'{type(model).__name__} takes the batch fields {list(model.model_inputs)}, but the batch lacks '
                     f'{missing} (it has {sorted(batch)}): add the clip transform that makes them to '
                     'config.input.transforms')
  return {name: batch[name] for name in model.model_inputs}


def train_step(state: TrainState, accumulator: dict, batch: dict, *, model, loss_fn, rng: jax.Array,
               dtype) -> tuple[TrainState, dict]:
  """One optimizer step on a global batch; metrics are summed into `accumulator` on device (no host sync).

  `loss_fn(logits, aux, batch) -> (total [batch], {term: [batch]})` sees the model's auxiliary outputs and
  every batch field; the model draws from its declared RNG streams, one key per stream and step.
  """
  step_rng = jax.random.fold_in(rng, state.step)
  rngs = dict(zip(model.rng_streams, jax.random.split(step_rng, len(model.rng_streams))))
  video = batch['video'].astype(dtype) / 255  # uint8 crosses the host link; scaling happens here

  inputs = model_inputs(model, batch)

  def loss_of(params):
    (logits, aux), updates = model.apply({'params': params, 'batch_stats': state.batch_stats}, video, **inputs,
                                         train=True, rngs=rngs, mutable=['batch_stats'])
    logits = logits.astype(jnp.float32)
    total, terms = loss_fn(logits, aux, batch)
    return total.mean(), (logits, terms, updates)

  (loss, (logits, terms, updates)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads, batch_stats=updates.get('batch_stats', state.batch_stats))
  count = batch['label'].shape[0]
  batch_sums = {'loss': loss * count, 'accuracy': (logits.argmax(-1) == batch['label']).sum().astype(jnp.float32),
                **{name: value.sum() for name, value in terms.items()}}
  first_bad = accumulator['first_nonfinite_step']
  accumulator = {
      'sums': {name: accumulator['sums'][name] + batch_sums[name] for name in accumulator['sums']},
      'count': accumulator['count'] + count,
      'first_nonfinite_step': jnp.where((first_bad < 0) & ~jnp.isfinite(loss), state.step.astype(jnp.int32),
                                        first_bad),
  }
  return new_state, accumulator


def eval_step(state, confusions: dict, batch: dict, *, model, heads, dtype, num_classes: int) -> dict:
  """Adds one batch to the confusion matrix of every head ('classes': the emotions; the model's metric heads)."""
  video = batch['video'].astype(dtype) / 255
  logits, aux = model.apply({'params': state.params, 'batch_stats': state.batch_stats}, video,
                            **model_inputs(model, batch), train=False)
  batch_confusions = metrics.head_confusions(logits, aux, batch, heads, num_classes)
  return jax.tree.map(jnp.add, confusions, batch_confusions)


@dataclasses.dataclass
class Steps:
  """A model's jitted steps, built from a config by `make_steps`, and what they need around them."""
  model: Any
  loss: Any  # None for evaluation only
  heads: dict  # name -> metrics.MetricHead, besides the emotion classes
  init: Callable  # rng -> a state born sharded
  train: Callable | None  # (state, accumulator, batch) -> (state, accumulator); None for evaluation only
  eval: Callable  # (state, confusions, batch) -> confusions
  schedule: Callable | None  # step -> learning rate
  state_sharding: Any
  batch_sharding: Any
  replicated: Any
  abstract_state: Any  # ShapeDtypeStructs with shardings: the restore target

  def init_accumulator(self) -> dict:
    return jax.device_put(init_train_accumulator(self.loss.terms), self.replicated)

  def init_confusions(self, num_classes: int) -> dict:
    sizes = {'classes': num_classes, **{name: len(head.class_names) for name, head in self.heads.items()}}
    return jax.device_put({name: jnp.zeros((n, n), jnp.int32) for name, n in sizes.items()}, self.replicated)


def make_steps(config: ml_collections.ConfigDict, *, steps_per_epoch: int | None, mesh=None) -> Steps:
  """The one way to build a config's model, loss, optimizer and jitted steps (trainer, evaluate, tests, benchmarks).

  steps_per_epoch: sets the learning-rate schedule; None builds evaluation only (no optimizer, no train step).
  """
  mesh = mesh or sharding.make_mesh()
  replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  dtype = jnp.dtype(config.dtype)
  model = build_model(config)
  check_frames(model, config)
  heads = model.metric_heads()
  metrics.check_heads(heads)
  rng = jax.random.key(config.seed)
  input_shape = video_shape(config, 1)
  training = steps_per_epoch is not None
  loss = schedule = train = None
  if training:
    loss = losses.build_loss(config.loss)
    if clash := sorted(set(loss.terms) & {'loss', 'accuracy', 'learning_rate'}):
      raise ValueError(f'loss terms {clash} clash with the logged train metrics')
    schedule = learning_rate_schedule(config.optimizer, steps_per_epoch, config.num_epochs)
    tx = create_optimizer(config.optimizer, schedule, frozen_params(model))
    init = functools.partial(create_train_state, model, tx, input_shape=input_shape)
  else:
    init = functools.partial(create_eval_state, model, input_shape=input_shape)
  abstract_state = jax.eval_shape(init, rng)  # shapes only, no memory
  state_sharding = jax.tree.map(lambda _: replicated, abstract_state)
  if training:
    train = jax.jit(
        functools.partial(train_step, model=model, loss_fn=loss, rng=rng, dtype=dtype),
        in_shardings=(state_sharding, replicated, batch_sharding),
        out_shardings=(state_sharding, replicated), donate_argnums=(0, 1))
  evaluate_fn = jax.jit(
      functools.partial(eval_step, model=model, heads=heads, dtype=dtype, num_classes=config.num_classes),
      in_shardings=(state_sharding, replicated, batch_sharding), out_shardings=replicated, donate_argnums=1)
  return Steps(model=model, loss=loss, heads=heads, init=jax.jit(init, out_shardings=state_sharding), train=train,
               eval=evaluate_fn, schedule=schedule, state_sharding=state_sharding, batch_sharding=batch_sharding,
               replicated=replicated,
               abstract_state=jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                           abstract_state, state_sharding))


# ---------------------------------------------------------------------------------------------------------
# Evaluation.


def evaluate(steps: Steps, state, config, reader: pipeline.EvalReader) -> dict[str, Any]:
  """UAR, WAR, per-class recall and the confusion matrix over one pass of `reader` (inputs.eval_reader: a whole
  split, one host sync), and the same under its own name for each of the model's metric heads."""
  confusions = steps.init_confusions(config.num_classes)
  for batch in reader:
    confusions = steps.eval(state, confusions, sharding.to_global(batch, steps.batch_sharding))
  confusions = jax.device_get(confusions)
  result = head_result(confusions['classes'], config.class_names)
  for name, head in steps.heads.items():
    result[name] = head_result(confusions[name], head.class_names)
  return result


def head_result(confusion, class_names) -> dict[str, Any]:
  confusion = np.asarray(confusion)
  return {**metrics.recall_metrics(confusion, class_names, allow_empty=True), 'confusion': confusion.tolist()}


# ---------------------------------------------------------------------------------------------------------
# The loop.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the final eval metrics."""
  configlib.check_known_fields(config)
  configlib.check_classes(config)
  distributed.check_posix_path(workdir, '--workdir', 'workdir')
  sharding.check_batch_size(config.eval_batch_size, 'eval_batch_size')
  local_batch_size = sharding.check_batch_size(config.batch_size)
  try:
    os.makedirs(workdir, exist_ok=True)
  except (FileExistsError, NotADirectoryError):  # it, or a folder above it, is a file
    path = os.path.abspath(workdir)
    while path != os.path.dirname(path) and not os.path.isfile(path):
      path = os.path.dirname(path)
    raise ValueError(f'--workdir {workdir}: {path} is a file, not a directory; give a directory (it is made if '
                     'missing)') from None
  # The lock before Orbax, which removes half-written saves; the SIGTERM handler before the lock, so that a run
  # holding it turns a notice into a checkpoint.
  with preemption.Notice() as notice, workdir_lock(workdir), device_memory_errors(config):
    checkpoints = checkpoint_lib.Checkpoints(workdir, keep=config.keep_checkpoints, best_metric=config.best_metric,
                                             also_best=validation.checkpoint_metric(config))
    try:  # closed on any error too: Orbax's background threads must not outlive the interpreter's executors
      return _train_and_evaluate(config, workdir, checkpoints, local_batch_size, notice)
    finally:
      checkpoints.close()


# Two JAX processes on one GPU (two folds started by hand) each take 75 % of its memory at start.
_SHARED_GPU_HINT = (' If another process uses this GPU (nvidia-smi), give each run its own (CUDA_VISIBLE_DEVICES; '
                    'scripts/run_folds.py --gpus) or a share of its memory (XLA_PYTHON_CLIENT_MEM_FRACTION).')


class DeviceOutOfMemoryError(MemoryError):
  """XLA ran out of device memory (RESOURCE_EXHAUSTED), at compilation or at run time."""


@contextlib.contextmanager
def device_memory_errors(config: ml_collections.ConfigDict):
  """XLA's out-of-memory error (a traceback from deep inside it) -> DeviceOutOfMemoryError: one line saying what
  ran out, with which batches, and what to change."""
  try:
    yield
  except Exception as error:  # pylint: disable=broad-except  # re-raised unless XLA ran out of device memory
    if isinstance(error, MemoryError) or not benchmarking.is_resource_exhausted(error):
      raise
    found = re.search(r'(RESOURCE_EXHAUSTED|[Oo]ut of memory)[^\n]*', str(error))
    train_batch, eval_batch = (batch // jax.device_count() for batch in (config.batch_size, config.eval_batch_size))
    raise DeviceOutOfMemoryError(
        f'the device ran out of memory ({found[0][:200] if found else type(error).__name__}) with '
        f'{config.model_name} at config.batch_size={config.batch_size} ({train_batch} clips per device), '
        f'config.eval_batch_size={config.eval_batch_size} ({eval_batch} clips per device), '
        f'{config.input.image_size} px, dtype {config.dtype}. Lower the batch size (scripts/bench_train.py '
        '--max_batch finds the largest train batch that fits), train in bfloat16, or recompute activations where '
        'the model offers it (CEFLNet: config.model.remat_backbone=True).'
        + (_SHARED_GPU_HINT if jax.default_backend() == 'gpu' else '')) from error


LOCK_FILENAME = 'run.lock'


class WorkdirInUseError(OSError):
  """Another run trains in the workdir: its process holds the workdir's lock."""


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds `<workdir>/run.lock` (flock, process 0) while a run trains there. A second run in the same workdir (the
  command started twice, or a scheduler's requeue while the first still runs) would resume from the first's
  checkpoints, remove its half-written save and interleave its records; it stops instead, naming the holder. The
  kernel releases the lock when its process ends, however it ends. Where the filesystem has no locks, no lock."""
  if jax.process_index() != 0:
    yield
    return
  path = os.path.join(workdir, LOCK_FILENAME)
  descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(descriptor, 1024).decode(errors='replace').strip() or 'a process that has not said which'
      raise WorkdirInUseError(f'another run is training in {workdir} ({holder}): two runs there would share its '
                              'checkpoints and records. Wait for it to end or stop it (the same command then '
                              'resumes), or give this run another --workdir.') from None
    except OSError as error:  # a filesystem without flock (some network mounts)
      print(f'note: cannot lock {path} ({error.strerror}); nothing stops a second run in this workdir', flush=True)
    else:
      os.ftruncate(descriptor, 0)
      os.pwrite(descriptor, f'pid {os.getpid()} on {socket.gethostname()}, since '
                f'{time.strftime("%Y-%m-%d %H:%M:%S %Z")}\n'.encode(), 0)
    yield
  finally:
    os.close(descriptor)  # releases the lock; the file stays, naming the last holder


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, checkpoints, local_batch_size: int,
                        notice: preemption.Notice) -> dict[str, Any]:
  is_chief = jax.process_index() == 0
  start_step = checkpoints.latest_step()
  notice.begin(start_step or 0)
  config_json = checkpoint_lib.config_to_json(config)
  saved_config = None
  if start_step is None:
    checkpoint_lib.check_starting_point(config)
  else:
    saved_config = checkpoints.saved_config(start_step)
    checkpoint_lib.check_resumable(config_json, saved_config, checkpoints.directory)

  train_source, eval_source = inputs.data_sources(config)
  train_source, heldout_source = validation.split(config, train_source, workdir, write=is_chief)
  steps_per_epoch = config.steps_per_epoch if config.steps_per_epoch > 0 else len(train_source) // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f'the train split has {len(train_source)} clips, fewer than config.batch_size={config.batch_size}')
  total_steps = steps_per_epoch * config.num_epochs
  steps = make_steps(config, steps_per_epoch=steps_per_epoch)

  # The next batch follows from the step alone (any process count); the saved iterator states are a record.
  train_iter = inputs.train_iterator(config, train_source, local_batch_size, start_step or 0)
  if start_step is not None:
    state = checkpoints.restore(start_step, steps.abstract_state)
    if is_chief:
      print(f'resumed from {checkpoints.directory} at step {start_step}', flush=True)
      if note := schedule_change_note(config.optimizer, steps_per_epoch, saved_config['num_epochs'],
                                      config.num_epochs, start_step):
        print(note, flush=True)
  else:
    state = checkpoint_lib.initial_state(config, steps.init(jax.random.key(config.seed)), steps.model,
                                         steps.state_sharding)
    start_step = 0

  writer = writers.MetricWriter(workdir, enabled=is_chief)
  writer.truncate_after(start_step)
  if is_chief:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(config_json, f, indent=2)
    environment.append(workdir, config, start_step)

  accumulator = steps.init_accumulator()
  epoch_totals = EpochTotals()
  last_eval: dict[str, Any] = {}
  step = start_step
  epoch_start_time, epoch_start_step = time.time(), step

  def progress_bar(step):
    return writers.ProgressBar(total=steps_per_epoch, initial=step % steps_per_epoch, batch_size=config.batch_size,
                               description=f'epoch {step // steps_per_epoch + 1}/{config.num_epochs}',
                               enabled=is_chief and config.progress_bar)

  # With input worker processes, each eval split keeps its own for the run; they read ahead between evaluations.
  eval_reader = inputs.eval_reader(config, eval_source)
  heldout_reader = inputs.eval_reader(config, heldout_source) if heldout_source is not None else None
  progress = progress_bar(step)
  try:
    batch = None
    while step < total_steps:
      if batch is None:
        batch = sharding.to_global(next(train_iter), steps.batch_sharding)
      state, accumulator = steps.train(state, accumulator, batch)
      step += 1
      end_of_epoch = step % steps_per_epoch == 0
      preempted = notice.reached(step) and step < total_steps  # a notice in the last step: the run ends anyway
      checkpoint_now = end_of_epoch or preempted or (config.checkpoint_every_steps and
                                                     step % config.checkpoint_every_steps == 0)
      # The next batch is read and sent while this step runs (the bar and the logs wait for it), except before a
      # save: the saved iterator state is then that of the batches trained on.
      batch = None if checkpoint_now or step == total_steps else sharding.to_global(next(train_iter),
                                                                                  steps.batch_sharding)
      progress.update(wait_for=accumulator)  # clips/s of finished steps; waits only while the bar is shown
      if end_of_epoch or checkpoint_now or step % config.log_every_steps == 0:
        checkpoints.check_for_errors()  # a save that failed (full disk) stops the run here, not an epoch later
        train_metrics = epoch_totals.add(fetch_train_sums(accumulator, step))
        accumulator = steps.init_accumulator()
        train_metrics['learning_rate'] = float(steps.schedule(step - 1))
        writer.write(step=step, epoch=step / steps_per_epoch, split='train', values=train_metrics)
        progress.set_postfix(loss=train_metrics['loss'])
      if end_of_epoch:
        epoch = step // steps_per_epoch
        eval_metrics = heldout_metrics = eval_seconds = None
        if epoch % config.eval_every_epochs == 0 or step == total_steps:
          eval_start = time.time()
          eval_metrics = evaluate(steps, state, config, eval_reader)
          last_eval = eval_metrics
          writer.write(step=step, epoch=epoch, split=config.dataset.eval_split,
                       values={**eval_metrics, 'seconds': time.time() - eval_start})
          if heldout_source is not None:  # the honest protocol's selection data
            heldout_start = time.time()
            heldout_metrics = evaluate(steps, state, config, heldout_reader)
            writer.write(step=step, epoch=epoch, split=validation.SPLIT,
                         values={**heldout_metrics, 'seconds': time.time() - heldout_start})
          eval_seconds = time.time() - eval_start
        seconds = time.time() - epoch_start_time
        progress.close()
        if is_chief:
          print(writers.epoch_summary_line(epoch, {**epoch_totals.means(), 'learning_rate': train_metrics['learning_rate']},
                                           validation.with_heldout(eval_metrics, heldout_metrics), seconds,
                                           eval_split=config.dataset.eval_split, eval_seconds=eval_seconds,
                                           train_steps=((epoch_start_step + 1, step)  # resumed mid-epoch
                                                        if epoch_start_step % steps_per_epoch else None),
                                           clips_per_second=(step - epoch_start_step) * config.batch_size / seconds),
                flush=True)
        checkpoints.save(step, state, train_iter, config_json,
                         metrics=validation.checkpoint_metrics(eval_metrics, heldout_metrics))
        epoch_start_time, epoch_start_step = time.time(), step
        epoch_totals = EpochTotals()
        if step < total_steps:
          progress = progress_bar(step)
      elif checkpoint_now:
        checkpoints.save(step, state, train_iter, config_json)
      if preempted:  # an epoch's end is evaluated and saved first, as without the notice: the records stay the same
        checkpoints.wait()
        notice.all_saved()
        raise preemption.Preempted(step)
  finally:
    progress.close()
    for reader in (train_iter, eval_reader, heldout_reader):
      if reader is not None:
        reader.close()  # its worker processes, if any
    checkpoints.wait()
  if not last_eval:  # resumed after the last epoch's checkpoint: evaluate what was trained
    with contextlib.closing(inputs.eval_reader(config, eval_source)) as reader:
      last_eval = evaluate(steps, state, config, reader)
  best_step = checkpoints.best_step()
  if is_chief:
    write_final_reports(workdir, config, last_eval, best_step, list(steps.heads))
    reports.add_protocols(workdir, config.best_metric, config.dataset.eval_split)
  writer.close()
  return last_eval


def fetch_train_sums(accumulator: dict, step: int) -> dict[str, float]:
  """The one host sync per logging interval; stops the run on a non-finite loss before anything is saved."""
  values = jax.device_get(accumulator)
  first_bad = int(values['first_nonfinite_step'])
  if first_bad >= 0:
    raise NonFiniteLossError(
        f'the training loss became non-finite at step {first_bad + 1} (between the last log and step {step}); '
        'stopping without saving, so the last checkpoint stays the last good state. Lower '
        'config.optimizer.learning_rate, set config.optimizer.grad_clip_norm, or use config.dtype=float32.')
  return {'count': float(values['count']), **{name: float(value) for name, value in values['sums'].items()}}


class EpochTotals:
  """Host-side sums of the train metrics since the epoch began; `add` returns the interval's means."""

  def __init__(self):
    self.sums: dict[str, float] = {}

  def add(self, interval: dict[str, float]) -> dict[str, float]:
    for key, value in interval.items():
      self.sums[key] = self.sums.get(key, 0.0) + value
    return self._means(interval)

  def means(self) -> dict[str, float]:
    return self._means(self.sums)

  @staticmethod
  def _means(sums):
    count = max(sums.get('count', 0.0), 1)
    return {key: value / count for key, value in sums.items() if key != 'count'}


def confusion_title(config, record: dict) -> str:
  """Which checkpoint the confusion-matrix PNG shows: 'test, best WAR: step 2400 (epoch 8), UAR 51.2% WAR 64.0%'."""
  where = f'step {record["step"]} (epoch {record["epoch"]})' if 'step' in record else 'the last evaluation'
  return (f'{config.dataset.eval_split}, best {config.best_metric.upper()}: {where}, '
          f'UAR {100 * record["uar"]:.1f}% WAR {100 * record["war"]:.1f}%')


def write_final_reports(workdir: str, config, last_eval: dict, best_step: int | None, head_names: list[str]):
  """results.json (the last and the best evaluation, every head) and the confusion-matrix and curve plots."""
  from dferjax import plots  # pylint: disable=import-outside-toplevel  # matplotlib only at the end
  records = writers.read_records(workdir)
  eval_records = [r for r in records if r.get('split') == config.dataset.eval_split]
  best = max(eval_records, key=lambda r: r[config.best_metric]) if eval_records else last_eval
  plots.plot_confusion_matrix(np.asarray(best['confusion']), config.class_names,
                              os.path.join(workdir, 'confusion_matrix.png'), title=confusion_title(config, best))
  for head in head_names:  # e.g. AEN's 3 emotion groups (the paper's Fig. 4, bottom)
    if isinstance(best.get(head), dict) and 'confusion' in best[head]:
      plots.plot_confusion_matrix(np.asarray(best[head]['confusion']), list(best[head]['per_class']),
                                  os.path.join(workdir, f'confusion_matrix_{head}.png'),
                                  title=f'{head}: {confusion_title(config, best)}')
  plots.plot_learning_curves(records, os.path.join(workdir, 'learning_curves.png'))
  keys = ('uar', 'war', 'per_class', *head_names)
  summary = {'last': {k: last_eval[k] for k in keys},
             'best': {k: best[k] for k in (*keys, 'epoch') if k in best}, 'best_step': best_step}
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(summary, f, indent=2)
