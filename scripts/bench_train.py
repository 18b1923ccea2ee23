"""STT train-step and eval-step speed in dferjax and in the PyTorch transcription: same weights, same batch, same
optimizer and precision policy, same machine and run, so every figure is also a ratio dferjax / PyTorch.

    python scripts/bench_train.py --quick --out runs/bench_train_quick.json    # tiny STT, minutes on 2 CPU cores
    python scripts/bench_train.py --model paper --batch_sizes 32,64,128 --dtypes bfloat16,float32 \\
        --out runs/bench_train_gpu.json                                         # on a GPU
    python scripts/bench_train.py --model paper --batch_sizes 4 --flops_only   # FLOPs/clip, compile only (any host)

dferjax: the real `dferjax.train.compile_steps` steps (mesh, shardings, donation), compiled ahead of time so the
compile time and memory analysis come from the executable that is timed. FLOPs come from XLA's cost analysis of
the same step lowered, before GPU compilation hides convolutions in cuDNN calls (on GPU, a CPU worker lowers it).
PyTorch: `dferjax.reference.torch_stt` with the flax init copied in (`load_flax_variables`), SGD(momentum 0.9,
weight_decay 1e-4) = optax add_decayed_weights + sgd, STT's compact loss, bf16 as AMP autocast, channels_last,
eager and `torch.compile`. Timing: `--steps` steps in windows of `--window`, one device sync per window, median per-step
time over windows. One uint8 batch is reused every step: this measures the device, not the input pipeline
(scripts/bench_input.py does that).

Each framework runs in its own worker process, one after the other (dferjax, torch eager, torch compile): XLA
keeps 75% of a GPU's memory for itself by default and neither allocator gives memory back, so two frameworks in
one process would measure each other's leftovers. A worker that crashes (e.g. torch.compile without a C++
compiler) is reported, not fatal, unless it is dferjax or torch eager.
"""
import functools
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from dferjax import benchmarking  # noqa: E402  pylint: disable=g-import-not-at-top
from dferjax import configlib  # noqa: E402  pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS


def define_flags():
  """The command line (only when run as a script, so tests can import this file)."""
  flags.DEFINE_enum('model', 'paper', ['paper', 'tiny'],
                    'paper: configs/stt_dfew.py (16 x 112 px, d=512, 4 blocks); tiny: tests/tiny_config.py sizes.')
  flags.DEFINE_list('batch_sizes', ['32', '64', '128'], 'Global batch sizes (multiples of the device count).')
  flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Compute dtypes (model + input; parameters stay float32).')
  flags.DEFINE_integer('steps', 20, 'Timed steps per measurement.')
  flags.DEFINE_integer('warmup', 3, 'Untimed steps before timing.')
  flags.DEFINE_integer('window', 5, 'Steps between device syncs; the figure is the median over windows.')
  flags.DEFINE_list('torch', ['eager', 'compile'], "PyTorch variants: 'eager', 'compile', or 'none'.")
  flags.DEFINE_string('torch_compile_mode', 'default', "torch.compile mode ('default', 'max-autotune', ...).")
  flags.DEFINE_integer('torch_threads', 0, 'PyTorch intra-op threads on a CPU (0: the cores this process may use).')
  flags.DEFINE_bool('channels_last', True, 'PyTorch convs in channels_last memory (NHWC, as XLA): faster for torch '
                    'eager on CPU too (tiny STT +15-20%, paper STT +17%, 2 cores).')
  flags.DEFINE_enum('attention_impl', 'xla', ['xla', 'cudnn'], "STT attention ('cudnn': flash attention, GPU bf16).")
  flags.DEFINE_enum('max_pool_impl', 'reduce_window', ['reduce_window', 'slices'],
                    "dferjax's stem max-pool (dferjax.models.resnet.max_pool_3x3_stride_2).")
  flags.DEFINE_bool('max_batch', True,
                    'On an accelerator, search the largest dferjax train batch that fits, per dtype.')
  flags.DEFINE_integer('max_batch_limit', 4096, 'Largest batch the search tries.')
  flags.DEFINE_integer('max_batch_resolution', 8, 'The search stops at this many clips (times the device count).')
  flags.DEFINE_bool('flops_only', False, 'Only compile the dferjax steps (abstract inputs) and report FLOPs per clip.')
  flags.DEFINE_bool('quick', False, 'Tiny STT, batch 8 and 16, float32, 12 steps, no batch search: minutes on a CPU.'
                    ' Flags given explicitly still win.')
  flags.DEFINE_integer('seed', 0, 'Seed of the initial weights and the batch.')
  flags.DEFINE_string('profile_dir', '', 'dferjax: trace --window more train steps after timing each setting with '
                      'jax.profiler into this folder (TensorBoard/XProf .xplane.pb); not part of the timed steps.')
  flags.DEFINE_string('compilation_cache', '', "dferjax: jax's persistent compilation cache folder; a second run "
                      'with the same shapes then loads its executables instead of compiling (compile_s shows it).')
  flags.DEFINE_string('out', '', 'Write the JSON report here.')
  flags.DEFINE_string('worker', '', "Internal: run one framework ('dferjax', 'eager', 'compile') in this process.")
  flags.DEFINE_string('worker_dir', '', 'Internal: folder with settings.json; the worker writes its results there.')


# tests/tiny_config.py's model and input (the end-to-end tests' STT).
TINY_MODEL = dict(num_frames=4, embed_dim=32, num_layers=1, num_heads=2, mlp_ratio=2.0, drop_path_rate=0.1,
                  backbone_stage=3, backbone_width=8)
TINY_INPUT = dict(num_segments=2, frames_per_segment=2, image_size=32)
QUICK = dict(model='tiny', batch_sizes=['8', '16'], dtypes=['float32'], steps=12, warmup=2, window=3,
             max_batch=False)
JAX_ONLY_FIELDS = ('dtype', 'param_dtype', 'attention_impl', 'max_pool_impl')
TORCH_MODES = ('eager', 'compile')


def bench_config(model: str, dtype: str, attention_impl: str = 'xla', max_pool_impl: str = 'reduce_window'):
  """configs/stt_dfew.py (or the tiny sizes) computing in `dtype` (train.build_model passes it to the model)."""
  config = configlib.load_config(os.path.join(REPO, 'configs', 'stt_dfew.py'))
  with config.unlocked():
    if model == 'tiny':
      config.model = dict(TINY_MODEL)
      config.input.update(TINY_INPUT)
    config.model.attention_impl = attention_impl
    config.model.max_pool_impl = max_pool_impl
    config.dtype = dtype
  return config


def video_shape(config, batch_size: int) -> tuple[int, ...]:
  from dferjax import train  # pylint: disable=import-outside-toplevel
  return train.video_shape(config, batch_size)


def host_batch(config, batch_size: int, seed: int) -> dict[str, np.ndarray]:
  """The same uint8 batch in every worker (numpy, seeded)."""
  rng = np.random.default_rng(seed)
  return {'video': rng.integers(0, 256, video_shape(config, batch_size), dtype=np.uint8),
          'label': rng.integers(0, config.num_classes, batch_size).astype(np.int32),
          'mask': np.ones(batch_size, bool)}


def throughput(timing: dict, batch_size: int) -> dict:
  return {**timing, 'clips_per_s': batch_size / timing['step_time_s']}


def describe_error(error: BaseException) -> str:
  lines = [line for line in str(error).splitlines() if line.strip()]
  return f'{type(error).__name__}: {lines[0][:400] if lines else ""}'


# ---------------------------------------------------------------------------------------------------------
# dferjax worker.


def build_jax_steps(config, seed: int):
  import jax  # pylint: disable=import-outside-toplevel
  from dferjax import sharding, train  # pylint: disable=import-outside-toplevel
  model = train.build_model(config)
  tx = train.create_optimizer(config.optimizer, train.learning_rate_schedule(config.optimizer, 1000, config.num_epochs))
  rng = jax.random.key(seed)
  return model, train.compile_steps(config, model, tx, sharding.make_mesh(), rng), rng


def flop_figures(flops_per_clip, clips_per_s, dtype: str, device_kind: str, device_count: int) -> dict:
  """Achieved FLOP/s and model-FLOPs utilisation against the table's dense peak of all devices."""
  peak, peak_name = benchmarking.peak_flops(device_kind, dtype)
  achieved = flops_per_clip * clips_per_s if flops_per_clip and clips_per_s else None
  figures = {'flops_per_s': achieved, 'peak_flops_per_s': peak * device_count if peak else None,
             'peak_source': peak_name or f'peak unknown for device_kind {device_kind!r}'}
  figures['mfu'] = achieved / figures['peak_flops_per_s'] if achieved and peak else None
  return figures


def per_clip(flops, batch_size: int):
  return flops / batch_size if flops else None  # a lowered program is the global one (before SPMD partitioning)


def abstract_step_inputs(config, batch_size: int, steps) -> dict:
  """The train and eval steps' arguments as shapes with shardings: lowering needs no arrays."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from dferjax import train  # pylint: disable=import-outside-toplevel
  batch = {'video': jax.ShapeDtypeStruct(video_shape(config, batch_size), jnp.uint8, sharding=steps.batch_sharding),
           'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=steps.batch_sharding),
           'mask': jax.ShapeDtypeStruct((batch_size,), jnp.bool_, sharding=steps.batch_sharding)}
  accumulator = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=steps.replicated),
                             jax.eval_shape(train.init_train_accumulator))
  confusion = jax.ShapeDtypeStruct((config.num_classes,) * 2, jnp.int32, sharding=steps.replicated)
  return {'train': (steps.train, (steps.abstract_state, accumulator, batch)),
          'eval': (steps.eval, (steps.abstract_state, confusion, batch))}


def lowered_flops(config, batch_size: int, seed: int) -> dict:
  """FLOPs per clip of the train and eval steps from the lowered HLO (no compile). Run on the CPU backend
  (the 'flops' worker): jax on GPU returns no cost analysis for a lowered program, and a GPU-compiled one
  leaves cuDNN convolutions uncounted."""
  _, steps, _ = build_jax_steps(config, seed)
  return {part: per_clip(benchmarking.xla_flops(jitted.lower(*args)), batch_size)
          for part, (jitted, args) in abstract_step_inputs(config, batch_size, steps).items()}


def jax_flops_only(config, batch_size: int, seed: int) -> dict:
  """Compiles the train and eval steps on abstract inputs (no arrays, any host) for FLOPs and memory."""
  _, steps, _ = build_jax_steps(config, seed)
  figures = {}
  for part, (jitted, args) in abstract_step_inputs(config, batch_size, steps).items():
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    compiled = lowered.compile()
    figures[part] = {'compile_s': time.perf_counter() - start,
                     'flops_per_clip': per_clip(benchmarking.xla_flops(lowered), batch_size),
                     'compiled_memory_bytes': benchmarking.compiled_memory_bytes(compiled)}
  return figures


def bench_jax(config, batch: dict, steps_flags: dict, seed: int, profile_dir: str = '') -> tuple[dict, dict]:
  """Times dferjax's jitted train and eval steps; returns (figures, initial host variables)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from dferjax import sharding, train  # pylint: disable=import-outside-toplevel
  device = jax.devices()[0]
  device_count = jax.device_count()
  batch_size = len(batch['label'])
  _, steps, rng = build_jax_steps(config, seed)
  state = steps.init(rng)
  variables = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
  accumulator = jax.device_put(train.init_train_accumulator(), steps.replicated)
  device_batch = sharding.to_global(batch, steps.batch_sharding)

  start = time.perf_counter()
  lowered = steps.train.lower(state, accumulator, device_batch)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  carry = [state, accumulator]

  def train_once():
    carry[0], carry[1] = compiled(carry[0], carry[1], device_batch)

  timing = throughput(benchmarking.time_windows(train_once, lambda: jax.block_until_ready(carry), **steps_flags),
                      batch_size)
  if profile_dir:  # a few more steps under the profiler: an XSpace (.xplane.pb) per-kernel timeline
    jax.block_until_ready(carry)
    with jax.profiler.trace(profile_dir):
      for _ in range(steps_flags['window']):
        train_once()
      jax.block_until_ready(carry)
  flops_per_clip = per_clip(benchmarking.xla_flops(lowered), batch_size)
  totals = jax.device_get(carry[1])
  figures = {'train': {
      **timing, 'lower_s': lower_s, 'compile_s': compile_s, 'flops_per_clip': flops_per_clip,
      **flop_figures(flops_per_clip, timing['clips_per_s'], config.dtype, device.device_kind, device_count),
      'compiled_memory_bytes': benchmarking.compiled_memory_bytes(compiled),
      'peak_bytes_in_use': benchmarking.device_peak_bytes(device),
      'mean_loss': float(totals['loss_sum']) / int(totals['count'])}}

  state = carry[0]
  confusion = [jax.device_put(jnp.zeros((config.num_classes,) * 2, jnp.int32), steps.replicated)]
  start = time.perf_counter()
  lowered_eval = steps.eval.lower(state, confusion[0], device_batch)
  compiled_eval = lowered_eval.compile()
  eval_compile_s = time.perf_counter() - start

  def eval_once():
    confusion[0] = compiled_eval(state, confusion[0], device_batch)

  eval_timing = throughput(benchmarking.time_windows(eval_once, lambda: jax.block_until_ready(confusion),
                                                     **steps_flags), batch_size)
  figures['eval'] = {**eval_timing, 'compile_s': eval_compile_s,
                     'flops_per_clip': per_clip(benchmarking.xla_flops(lowered_eval), batch_size)}
  return figures, variables


def largest_train_batch(config, start: int, settings: dict) -> dict:
  """Doubles then bisects the train batch until XLA runs out of memory (at compile or at run time)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from dferjax import train  # pylint: disable=import-outside-toplevel
  _, steps, rng = build_jax_steps(config, settings['seed'])

  def run_two_steps(batch_size):
    shape = video_shape(config, batch_size)
    make_batch = jax.jit(lambda: {'video': jnp.zeros(shape, jnp.uint8), 'label': jnp.zeros(batch_size, jnp.int32),
                                  'mask': jnp.ones(batch_size, bool)}, out_shardings=steps.batch_sharding)
    state, accumulator = steps.init(rng), jax.device_put(train.init_train_accumulator(), steps.replicated)
    batch = make_batch()
    compiled = steps.train.lower(state, accumulator, batch).compile()
    for _ in range(2):
      state, accumulator = compiled(state, accumulator, batch)
    jax.block_until_ready((state, accumulator))

  def fits(batch_size):
    print(f'  largest batch: trying {batch_size}', file=sys.stderr, flush=True)
    try:
      run_two_steps(batch_size)
      return True
    except Exception as error:  # pylint: disable=broad-except  # only XLA's out-of-memory is an answer
      if not benchmarking.is_resource_exhausted(error):
        raise
      return False
    finally:
      gc.collect()

  multiple = jax.device_count() * settings['max_batch_resolution']
  return benchmarking.largest_fitting(fits, max(multiple, start // multiple * multiple), multiple=multiple,
                                      limit=settings['max_batch_limit'])


def summary_line(name: str, dtype: str, batch_size: int, figures: dict) -> str:
  """One stderr line per measurement, so a run cut short still leaves its numbers in the log."""
  if 'error' in figures:
    return f'{name} {dtype} batch {batch_size}: {figures["error"]}'
  train_figures, eval_figures = figures['train'], figures['eval']
  mfu = train_figures.get('mfu')
  return (f'{name} {dtype} batch {batch_size}: train {train_figures["clips_per_s"]:.1f} clips/s '
          f'({train_figures["step_time_s"] * 1e3:.2f} ms/step), eval {eval_figures["clips_per_s"]:.1f} clips/s, '
          f'compile {train_figures.get("compile_s") or 0:.1f} s' + (f', MFU {100 * mfu:.1f}%' if mfu else ''))


def out_of_memory_figures(error: BaseException) -> dict:
  return {'error': f'out of memory: {describe_error(error)}', 'out_of_memory': True}


def run_jax_worker(settings: dict, folder: str, output: dict) -> dict:
  """Fills `output` as it goes (worker_main writes it after every measurement)."""
  import jax  # pylint: disable=import-outside-toplevel
  from dferjax import sharding  # pylint: disable=import-outside-toplevel
  if settings.get('compilation_cache'):
    jax.config.update('jax_compilation_cache_dir', settings['compilation_cache'])
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  device = benchmarking.jax_device_info()
  for batch_size in settings['batch_sizes']:
    sharding.check_batch_size(batch_size, 'batch_size (--batch_sizes)')
  steps_flags = {k: settings[k] for k in ('steps', 'warmup', 'window')}
  results, max_batch, saved = [], {}, False
  output.update({'device': device, 'results': results, 'max_batch': max_batch})
  for dtype in settings['dtypes']:
    config = bench_config(settings['model'], dtype, settings['attention_impl'], settings['max_pool_impl'])
    for batch_size in settings['batch_sizes']:
      print(f'dferjax {dtype} batch {batch_size}', file=sys.stderr, flush=True)
      if settings['flops_only']:
        results.append({'dtype': dtype, 'batch_size': batch_size,
                        'figures': jax_flops_only(config, batch_size, settings['seed'])})
        yield
        continue
      batch = host_batch(config, batch_size, settings['seed'])
      try:
        profile_dir = (os.path.join(settings['profile_dir'], f'{dtype}_b{batch_size}')
                       if settings['profile_dir'] else '')
        figures, variables = bench_jax(config, batch, steps_flags, settings['seed'], profile_dir)
      except Exception as error:  # pylint: disable=broad-except  # out of memory is a result; the rest is not
        if not benchmarking.is_resource_exhausted(error):
          raise
        figures, variables = out_of_memory_figures(error), None
      results.append({'dtype': dtype, 'batch_size': batch_size, 'figures': figures})
      print(summary_line('dferjax', dtype, batch_size, figures), file=sys.stderr, flush=True)
      if variables is None:
        gc.collect()
        yield
        continue
      if not saved:  # the initial weights do not depend on dtype or batch; float32 logits for the parity check
        save_variables(os.path.join(folder, 'variables.npz'), variables)
        np.save(os.path.join(folder, 'reference_logits.npy'), reference_logits(settings, variables, batch))
        np.save(os.path.join(folder, 'reference_batch.npy'), batch['video'][:2])
        saved = True
      gc.collect()
      yield
    if device['platform'] == 'cpu':
      max_batch[dtype] = {'skipped': 'CPU (host memory)'}
    elif settings['flops_only'] or not settings['max_batch']:
      max_batch[dtype] = {'skipped': '--flops_only' if settings['flops_only'] else '--nomax_batch'}
    else:
      print(f'dferjax {dtype}: largest batch search', file=sys.stderr, flush=True)
      max_batch[dtype] = largest_train_batch(config, max(settings['batch_sizes']), settings)
      yield


def reference_logits(settings: dict, variables: dict, batch: dict) -> np.ndarray:
  """Float32 eval logits of the first two clips: the torch workers check they hold the same weights."""
  import jax  # pylint: disable=import-outside-toplevel
  from dferjax import train  # pylint: disable=import-outside-toplevel
  model = train.build_model(bench_config(settings['model'], 'float32', 'xla'))
  video = batch['video'][:2] / np.float32(255)
  return np.asarray(jax.jit(functools.partial(model.apply, train=False))(variables, video)[0])


def save_variables(path: str, variables: dict):
  flat = {}

  def visit(tree, prefix):
    for name, value in tree.items():
      if hasattr(value, 'items'):
        visit(value, prefix + (name,))
      else:
        flat['/'.join(prefix + (name,))] = np.asarray(value)

  visit(variables, ())
  np.savez(path, **flat)


def load_variables(path: str) -> dict:
  variables = {}
  with np.load(path) as flat:
    for key in flat.files:
      *parents, leaf = key.split('/')
      node = variables
      for name in parents:
        node = node.setdefault(name, {})
      node[leaf] = flat[key]
  return variables


# ---------------------------------------------------------------------------------------------------------
# PyTorch worker.


def torch_compact_loss(logits, labels, beta: float):
  """STT Eq. (17) in torch, as dferjax.losses.compact_softmax_cross_entropy: CE + beta/2 * symmetric KL between
  the softmax over the non-target logits and the uniform distribution over them. logits [b, C] -> [b]."""
  import torch  # pylint: disable=import-outside-toplevel
  num_classes = logits.shape[-1]
  is_target = torch.nn.functional.one_hot(labels, num_classes).bool()
  non_target = logits.masked_fill(is_target, float('-inf'))
  non_target_probs = non_target.softmax(dim=-1)
  centre = non_target.max(dim=-1, keepdim=True).values.detach()
  shifted = (logits - centre).masked_fill(is_target, 0.0)
  symmetric_kl = ((non_target_probs - 1.0 / (num_classes - 1)) * shifted).masked_fill(is_target, 0.0).sum(dim=-1)
  return torch.nn.functional.cross_entropy(logits, labels, reduction='none') + 0.5 * beta * symmetric_kl


def torch_input(video, channels_last: bool):
  """uint8 [b, t, h, w, 3] -> float [b, t, 3, h, w] in [0, 1]. The permuted view keeps NHWC memory, which is
  channels_last for the frames' convs once the model flattens (b, t); NCHW needs a copy."""
  video = video.permute(0, 1, 4, 2, 3).float() / 255
  return video if channels_last else video.contiguous()


class TorchBench:
  """The PyTorch transcription on one device, `mode` 'eager' or 'compile', with the flax initial weights."""

  def __init__(self, settings: dict, variables: dict, mode: str):
    import torch  # pylint: disable=import-outside-toplevel
    self.torch, self.settings, self.variables, self.mode = torch, settings, variables, mode
    self.device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    self.channels_last = settings['channels_last']

  def sync(self):
    if self.device.type == 'cuda':
      self.torch.cuda.synchronize()

  def model(self, config):
    from dferjax.reference import torch_stt  # pylint: disable=import-outside-toplevel
    fields = {k: v for k, v in config.model.items() if k not in JAX_ONLY_FIELDS}
    model = torch_stt.STT(config.num_classes, image_size=config.input.image_size, **fields)
    torch_stt.load_flax_variables(model, self.variables)
    model.to(self.device)
    if self.channels_last:
      model.to(memory_format=self.torch.channels_last)
    return model

  def logit_difference(self, config, clips: np.ndarray, want: np.ndarray) -> float:
    model = self.model(config).eval()
    with self.torch.inference_mode():
      video = torch_input(self.torch.from_numpy(clips).to(self.device), self.channels_last)
      got = model(video).float().cpu().numpy()
    return float(np.abs(got - want).max())

  def run(self, config, batch: dict, steps_flags: dict) -> dict:
    """Train and eval speed at one (dtype, batch size)."""
    torch = self.torch
    from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=import-outside-toplevel
    torch.manual_seed(self.settings['seed'])
    if self.mode == 'compile':
      torch._dynamo.reset()  # pylint: disable=protected-access
    model = self.model(config).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.optimizer.learning_rate,
                                momentum=config.optimizer.momentum, weight_decay=config.optimizer.weight_decay)
    video = torch.from_numpy(batch['video']).to(self.device)
    labels = torch.from_numpy(batch['label']).long().to(self.device)
    batch_size = labels.shape[0]
    autocast = functools.partial(torch.autocast, self.device.type, dtype=torch.bfloat16,
                                 enabled=config.dtype == 'bfloat16')
    channels_last = self.channels_last

    def forward_loss(video, labels):
      with autocast():
        logits = model(torch_input(video, channels_last))
      logits = logits.float()
      return torch_compact_loss(logits, labels, config.loss.beta).mean(), logits

    def predict(video):
      with autocast():
        return model(torch_input(video, channels_last)).float()

    if self.mode == 'compile':
      forward_loss = torch.compile(forward_loss, mode=self.settings['torch_compile_mode'], dynamic=False)
      predict = torch.compile(predict, mode=self.settings['torch_compile_mode'], dynamic=False)
    totals = {'loss_sum': torch.zeros((), device=self.device),
              'correct': torch.zeros((), dtype=torch.long, device=self.device)}

    def train_once():
      loss, logits = forward_loss(video, labels)
      optimizer.zero_grad(set_to_none=True)
      loss.backward()
      optimizer.step()
      with torch.no_grad():  # the metrics dferjax's step accumulates on device
        totals['loss_sum'] += loss.detach() * batch_size
        totals['correct'] += (logits.argmax(-1) == labels).sum()

    if self.device.type == 'cuda':
      torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train_once()  # compiles under torch.compile
    self.sync()
    first_step_s = time.perf_counter() - start
    flops_per_clip, extra_steps = None, 0
    if self.mode == 'eager':  # torch's own count of matmul/conv/attention FLOPs (forward + backward)
      with FlopCounterMode(display=False) as counter:
        train_once()
      flops_per_clip, extra_steps = counter.get_total_flops() / batch_size, 1
    timing = throughput(benchmarking.time_windows(train_once, self.sync, **steps_flags), batch_size)
    num_steps = 1 + extra_steps + steps_flags['warmup'] + steps_flags['steps']
    figures = {'train': {
        **timing, 'first_step_s': first_step_s,
        'compile_s': first_step_s - timing['step_time_s'] if self.mode == 'compile' else None,
        'matmul_conv_flops_per_clip': flops_per_clip,
        'peak_bytes_in_use': torch.cuda.max_memory_allocated() if self.device.type == 'cuda' else None,
        'mean_loss': float(totals['loss_sum']) / (num_steps * batch_size)}}

    model.eval()
    confusion = torch.zeros((config.num_classes,) * 2, dtype=torch.long, device=self.device)
    ones = torch.ones_like(labels)

    def eval_once():
      with torch.inference_mode():
        predicted = predict(video).argmax(-1)
        confusion.index_put_((labels, predicted), ones, accumulate=True)

    start = time.perf_counter()
    eval_once()
    self.sync()
    eval_first_s = time.perf_counter() - start
    eval_timing = throughput(benchmarking.time_windows(eval_once, self.sync, **steps_flags), batch_size)
    figures['eval'] = {**eval_timing, 'first_step_s': eval_first_s,
                       'compile_s': eval_first_s - eval_timing['step_time_s'] if self.mode == 'compile' else None}
    del model, optimizer
    if self.device.type == 'cuda':
      torch.cuda.empty_cache()
    return figures


def run_torch_worker(settings: dict, folder: str, mode: str, output: dict):
  """Fills `output` as it goes (worker_main writes it after every measurement)."""
  import torch  # pylint: disable=import-outside-toplevel
  variables = load_variables(os.path.join(folder, 'variables.npz'))
  bench = TorchBench(settings, variables, mode)
  info = {'device': str(bench.device), 'channels_last': bench.channels_last}
  results = []
  output.update({'info': info, 'results': results})
  if bench.device.type == 'cpu':
    torch.set_num_threads(settings['torch_threads'] or benchmarking.machine_info()['cores_visible'])
    info['threads'] = torch.get_num_threads()
  else:
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True  # float32 as XLA's default precision on GPU: TF32
    torch.backends.cudnn.allow_tf32 = True
    info['device_name'] = torch.cuda.get_device_name()
  steps_flags = {k: settings[k] for k in ('steps', 'warmup', 'window')}
  info['logit_max_abs_difference'] = bench.logit_difference(
      bench_config(settings['model'], 'float32'), np.load(os.path.join(folder, 'reference_batch.npy')),
      np.load(os.path.join(folder, 'reference_logits.npy')))
  for dtype in settings['dtypes']:
    config = bench_config(settings['model'], dtype)
    for batch_size in settings['batch_sizes']:
      print(f'torch {mode} {dtype} batch {batch_size}', file=sys.stderr, flush=True)
      batch = host_batch(config, batch_size, settings['seed'])
      try:
        figures = bench.run(config, batch, steps_flags)
      except Exception as error:  # pylint: disable=broad-except
        if benchmarking.is_resource_exhausted(error):
          figures = out_of_memory_figures(error)
          if torch.cuda.is_available():
            torch.cuda.empty_cache()
        elif mode == 'compile':  # reported, not fatal: e.g. no C++ compiler on the host
          figures = {'error': describe_error(error)}
        else:
          raise
      results.append({'dtype': dtype, 'batch_size': batch_size, 'figures': figures})
      print(summary_line(f'torch {mode}', dtype, batch_size, figures), file=sys.stderr, flush=True)
      yield


def run_flops_worker(settings: dict, output: dict):
  """FLOPs per clip of every (dtype, batch) from the CPU backend's lowering (see lowered_flops)."""
  results = output.setdefault('results', [])
  for dtype in settings['dtypes']:
    config = bench_config(settings['model'], dtype, 'xla', settings['max_pool_impl'])  # cuDNN attention is GPU-only
    for batch_size in settings['batch_sizes']:
      results.append({'dtype': dtype, 'batch_size': batch_size,
                      'flops_per_clip': lowered_flops(config, batch_size, settings['seed'])})
      yield


def add_cpu_flops(jax_output: dict, flops_output: dict):
  """Fills the FLOPs (and so MFU) the accelerator's cost analysis left out with the CPU lowering's count."""
  counted = {(r['dtype'], r['batch_size']): r['flops_per_clip'] for r in flops_output.get('results', [])}
  device = jax_output['device']
  for result in jax_output['results']:
    figures, key = result['figures'], (result['dtype'], result['batch_size'])
    if 'error' in figures or key not in counted:
      continue
    for part in ('train', 'eval'):
      if figures[part].get('flops_per_clip') is None and counted[key][part]:
        figures[part]['flops_per_clip'] = counted[key][part]
        figures[part]['flops_source'] = 'XLA cost analysis of the step lowered for CPU'
    train_figures = figures['train']
    if 'clips_per_s' in train_figures:  # not under --flops_only
      train_figures.update(flop_figures(train_figures['flops_per_clip'], train_figures['clips_per_s'],
                                        result['dtype'], device['device_kind'], device['device_count']))


def worker_main(name: str, folder: str):
  """Runs one framework, rewriting its JSON after every measurement: a worker that is killed or crashes
  part-way still leaves what it measured."""
  with open(os.path.join(folder, 'settings.json')) as f:
    settings = json.load(f)
  output = {'complete': False}
  if name == 'dferjax':
    progress = run_jax_worker(settings, folder, output)
  elif name == 'flops':
    progress = run_flops_worker(settings, output)
  elif name in TORCH_MODES:
    progress = run_torch_worker(settings, folder, name, output)
  else:
    raise ValueError(f"--worker={name!r}: expected 'dferjax', 'flops' or one of {TORCH_MODES}")
  path = os.path.join(folder, f'{name}.json')
  for _ in progress:
    benchmarking.write_json(path, output)
  output['complete'] = True
  benchmarking.write_json(path, output)


# ---------------------------------------------------------------------------------------------------------
# The parent: runs the workers one after the other, joins their figures.


def run_worker(name: str, folder: str, required: bool) -> dict:
  env = dict(os.environ)
  if name != 'dferjax':
    env['JAX_PLATFORMS'] = 'cpu'  # torch and flops workers: keep XLA off the accelerator
  command = [sys.executable, os.path.abspath(__file__), f'--worker={name}', f'--worker_dir={folder}']
  process = subprocess.run(command, env=env, check=False)
  path = os.path.join(folder, f'{name}.json')
  output = None
  if os.path.exists(path):
    with open(path) as f:
      output = json.load(f)
  if process.returncode == 0 and output is not None:
    return output
  message = f'the {name} worker exited with code {process.returncode} (its stderr is above)'
  if output is not None and output.get('results'):  # what it measured before it stopped
    output['error'] = message
    return output
  if required:
    raise RuntimeError(message)
  return {'error': message}


def ratio(numerator, denominator):
  return numerator / denominator if numerator and denominator else None


def ratios(jax_figures: dict, torch_figures: dict) -> dict:
  """dferjax / PyTorch for each figure: > 1 is dferjax faster for clips/s, < 1 for times and memory."""
  if 'error' in torch_figures or 'error' in jax_figures:
    return {}
  pairs = {'train_clips_per_s': ('train', 'clips_per_s'), 'train_step_time': ('train', 'step_time_s'),
           'train_compile_s': ('train', 'compile_s'), 'train_peak_bytes': ('train', 'peak_bytes_in_use'),
           'eval_clips_per_s': ('eval', 'clips_per_s'), 'eval_compile_s': ('eval', 'compile_s')}
  return {name: ratio(jax_figures[part].get(key), torch_figures[part].get(key)) for name, (part, key) in pairs.items()}


def join_results(jax_output: dict, torch_outputs: dict) -> list[dict]:
  results = []
  for jax_result in jax_output['results']:
    key = (jax_result['dtype'], jax_result['batch_size'])
    result = {'dtype': key[0], 'batch_size': key[1], 'dferjax': jax_result['figures'], 'torch': {}, 'ratios': {}}
    for mode, output in torch_outputs.items():
      measured = {(r['dtype'], r['batch_size']): r['figures'] for r in output.get('results', [])}
      figures = measured.get(key, {'error': output.get('error', 'not measured')})
      result['torch'][mode] = figures
      result['ratios'][mode] = ratios(jax_result['figures'], figures)
    results.append(result)
  return results


def scaled(value, factor):
  return value * factor if value is not None else None


def table_rows(results: list[dict], torch_modes: list[str]) -> list[dict]:
  rows = []
  for result in results:
    if 'error' in result['dferjax']:
      rows.append({'dtype': result['dtype'], 'batch': result['batch_size'],
                   'clips/s': 'OOM' if result['dferjax'].get('out_of_memory') else 'failed'})
      continue
    jax_train, jax_eval = result['dferjax']['train'], result['dferjax']['eval']
    row = {'dtype': result['dtype'], 'batch': result['batch_size'], 'clips/s': jax_train.get('clips_per_s'),
           'step ms': scaled(jax_train.get('step_time_s'), 1e3), 'compile s': jax_train['compile_s'],
           'GFLOP/clip': scaled(jax_train['flops_per_clip'], 1e-9),
           'TFLOP/s': scaled(jax_train.get('flops_per_s'), 1e-12), 'MFU %': scaled(jax_train.get('mfu'), 100),
           'eval clips/s': jax_eval.get('clips_per_s')}
    for mode in torch_modes:
      torch_figures = result['torch'][mode]
      if 'error' in torch_figures:
        row[f'{mode} clips/s'] = 'OOM' if torch_figures.get('out_of_memory') else 'failed'
        continue
      row[f'{mode} clips/s'] = torch_figures['train']['clips_per_s']
      row[f'x {mode}'] = result['ratios'][mode]['train_clips_per_s']
      row[f'eval x {mode}'] = result['ratios'][mode]['eval_clips_per_s']
    rows.append(row)
  return rows


def print_report(report: dict):
  torch_modes = report['settings']['torch']
  columns = [(name, name) for name in ('dtype', 'batch', 'clips/s', 'step ms', 'compile s', 'GFLOP/clip', 'TFLOP/s',
                                       'MFU %', 'eval clips/s')]
  for mode in torch_modes:
    columns += [(f'torch {mode} clips/s', f'{mode} clips/s'), (f'train x {mode}', f'x {mode}'),
                (f'eval x {mode}', f'eval x {mode}')]
  machine, device = report['machine'], report['device']
  print(f"\nSTT ({report['settings']['model']}) dferjax train step on {device['device_count']} x "
        f"{device['device_kind']} ({machine['cpu_model']}, {machine['cores_visible']} cores); "
        "'x' = dferjax / PyTorch clips/s")
  print(benchmarking.format_table(table_rows(report['results'], torch_modes), columns))
  for result in report['results']:
    for mode in torch_modes:
      if 'error' in result['torch'][mode]:
        print(f"torch {mode} failed ({result['dtype']}, batch {result['batch_size']}): "
              f"{result['torch'][mode]['error']}")
  for dtype, search in report['max_batch'].items():
    print(f"largest dferjax train batch ({dtype}): {search.get('largest', search.get('skipped'))}")
  for note in report['notes']:
    print(f'note: {note}')


def resolve_settings() -> dict:
  if FLAGS.quick:
    for name, value in QUICK.items():
      if not FLAGS[name].present:
        FLAGS[name].value = value
  torch_modes = [] if FLAGS.torch == ['none'] or FLAGS.flops_only else list(FLAGS.torch)
  if unknown := sorted(set(torch_modes) - set(TORCH_MODES)):
    raise ValueError(f"--torch: {unknown} not in {list(TORCH_MODES)} (or 'none')")
  for dtype in FLAGS.dtypes:
    if dtype not in ('float32', 'bfloat16'):
      raise ValueError(f"--dtypes: {dtype!r} is not 'float32' or 'bfloat16'")
  if FLAGS.attention_impl == 'cudnn' and 'float32' in FLAGS.dtypes:
    raise ValueError('--attention_impl=cudnn needs --dtypes=bfloat16 (cuDNN flash attention has no float32)')
  return {'model': FLAGS.model, 'batch_sizes': [int(b) for b in FLAGS.batch_sizes], 'dtypes': list(FLAGS.dtypes),
          'steps': FLAGS.steps, 'warmup': FLAGS.warmup, 'window': FLAGS.window, 'torch': torch_modes,
          'torch_compile_mode': FLAGS.torch_compile_mode, 'torch_threads': FLAGS.torch_threads,
          'channels_last': FLAGS.channels_last, 'attention_impl': FLAGS.attention_impl,
          'max_pool_impl': FLAGS.max_pool_impl,
          'max_batch': FLAGS.max_batch, 'max_batch_limit': FLAGS.max_batch_limit,
          'max_batch_resolution': FLAGS.max_batch_resolution, 'flops_only': FLAGS.flops_only, 'quick': FLAGS.quick,
          'seed': FLAGS.seed, 'profile_dir': os.path.abspath(FLAGS.profile_dir) if FLAGS.profile_dir else '',
          'compilation_cache': os.path.abspath(FLAGS.compilation_cache)
                                                   if FLAGS.compilation_cache else ''}


def main(argv):
  del argv
  if FLAGS.worker:
    worker_main(FLAGS.worker, FLAGS.worker_dir)
    return
  settings = resolve_settings()
  config = bench_config(settings['model'], 'float32')
  settings['model_fields'] = {k: v for k, v in config.model.items() if k not in JAX_ONLY_FIELDS}
  settings['video_shape_per_clip'] = video_shape(config, 1)[1:]
  with tempfile.TemporaryDirectory(prefix='bench_train_') as folder:
    benchmarking.write_json(os.path.join(folder, 'settings.json'), settings)
    jax_output = run_worker('dferjax', folder, required=True)
    if any('error' not in r['figures'] and r['figures']['train'].get('flops_per_clip') is None
           for r in jax_output['results']):
      add_cpu_flops(jax_output, run_worker('flops', folder, required=False))
    torch_outputs = {mode: run_worker(mode, folder, required=mode == 'eager') for mode in settings['torch']}

  notes = ['One uint8 batch reused every step: device compute only, no input pipeline.',
           'FLOPs: XLA cost analysis of the lowered (pre-optimisation) step per clip, the same on every backend '
           '(train: forward, backward, SGD update); '
           'torch matmul_conv_flops_per_clip counts matmuls/convs only (torch.utils.flop_counter).',
           'Each framework ran in its own process, one after the other.',
           (f'dferjax used the persistent compilation cache {settings["compilation_cache"]}: compile_s is a warm '
            'figure where an earlier run compiled the same step.' if settings['compilation_cache'] else
            'dferjax compiles cold (no persistent compilation cache).') +
           ' torch.compile may reuse inductor\'s on-disk cache from an earlier run, so its compile_s can be warm.']
  for name, output in {'dferjax': jax_output, **torch_outputs}.items():
    if output.get('error') and output.get('results'):
      notes.append(f'{name}: {output["error"]}; the figures it measured before are kept.')
  if jax_output['device']['jax_disable_most_optimizations']:
    notes.append('WARNING: jax_disable_most_optimizations is set: dferjax numbers are not representative.')
  torch_info = {mode: output.get('info', {'error': output.get('error')}) for mode, output in torch_outputs.items()}
  for mode, info in torch_info.items():
    if 'threads' in info:
      notes.append(f'torch {mode}: {info["threads"]} intra-op threads (the cores this process may use), '
                   f'channels_last={info["channels_last"]}.')
    elif 'device_name' in info:
      notes.append(f'torch {mode}: cudnn.benchmark on, TF32 allowed for float32 as in XLA\'s default.')
  report = {'machine': benchmarking.machine_info(), 'device': jax_output['device'], 'torch': torch_info,
            'versions': benchmarking.package_versions(), 'settings': settings,
            'results': join_results(jax_output, torch_outputs) if not settings['flops_only'] else [
                {'dtype': r['dtype'], 'batch_size': r['batch_size'], 'dferjax': r['figures']}
                for r in jax_output['results']],
            'max_batch': jax_output['max_batch'], 'notes': notes,
            'definitions': {'ratios': 'dferjax / PyTorch: > 1 means dferjax faster for clips_per_s, '
                                      '< 1 means dferjax faster (smaller) for times and bytes',
                            'step_time_s': 'median over windows of (window time / steps in the window)',
                            'mfu': 'XLA FLOPs per clip x clips/s / (dense peak of the device kind x devices)'}}
  print_report(report)
  if FLAGS.out:
    benchmarking.write_json(FLAGS.out, report)
    print(f'wrote {FLAGS.out}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
