"""A model's train-step and eval-step speed in dferjax and in its PyTorch transcription: same weights, same batch,
same optimizer and precision policy, same machine and run, so every figure is also a ratio dferjax / PyTorch.

    python scripts/bench_train.py --quick --out runs/bench_train_quick.json    # tiny STT, minutes on 2 CPU cores
    python scripts/bench_train.py --model paper --batch_sizes 32,64,128 --dtypes bfloat16,float32 \\
        --out runs/bench_train_gpu.json                                         # on a GPU
    python scripts/bench_train.py --model paper --batch_sizes 4 --flops_only   # FLOPs/clip, compile only (any host)

--model_name picks the model (a row of BENCH_MODELS: its paper config, tiny sizes and PyTorch transcription),
--model its size. dferjax: the trainer's own steps (`dferjax.train.make_steps`: mesh, shardings, donation),
compiled ahead of time so the compile time and memory analysis come from the executable that is timed. FLOPs
come from XLA's cost analysis of the same step lowered, before GPU compilation hides convolutions in cuDNN calls
(on GPU, a CPU worker lowers it). PyTorch (`dferjax.reference.torch_bench`): the transcription (for STT
`dferjax.reference.torch_stt`) with the flax init copied in, the config's optimizer (STT: SGD(momentum 0.9,
weight_decay 1e-4) = optax add_decayed_weights + sgd; EST: Adam) and loss, bf16 as AMP autocast, channels_last,
eager and `torch.compile`. A model's other inputs (EST: a permutation index per clip, its row's batch_fields) are
drawn with the batch and passed to both models. EST at --model paper is 35 frames of 224 px per clip: a GPU size.
Timing: `--steps` steps in windows of `--window`, one device sync per window, median per-step time over windows.
One uint8 batch is reused every step: this measures the device, not the input pipeline (scripts/bench_input.py
does that).

Each framework runs in its own worker process, one after the other (dferjax, torch eager, torch compile): XLA
keeps 75% of a GPU's memory for itself by default and neither allocator gives memory back, so two frameworks in
one process would measure each other's leftovers. A worker that crashes (e.g. torch.compile without a C++
compiler) is reported, not fatal, unless it is dferjax or torch eager. Only the torch workers import torch.
"""
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from configs import aen_dfew, ceflnet_dfew, est_dfew, nr_dfernet_dfew, stt_dfew
from dferjax import benchmarking, configlib, models, sharding, train
from dferjax.data import sampling

FLAGS = flags.FLAGS


def define_flags():
  """The command line (only when run as a script, so tests can import this file)."""
  flags.DEFINE_string('model_name', 'stt', f'The model: a key of BENCH_MODELS ({sorted(BENCH_MODELS)}).')
  flags.DEFINE_enum('model', 'paper', ['paper', 'tiny'],
                    "Size. paper: the model's paper config (STT: configs/stt_dfew.py, 16 x 112 px, d=512, 4 blocks); "
                    'tiny: the sizes of the end-to-end tests (STT: tests/tiny_config.py).')
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
  flags.DEFINE_enum('attention_impl', IMPL_DEFAULTS['attention_impl'], ['xla', 'cudnn', 'pallas'],
                    "STT attention ('cudnn': flash attention, GPU bf16; 'pallas': dferjax.models.pallas_attention, "
                    'Triton on a GPU, interpreted elsewhere); a model without the field takes the default.')
  flags.DEFINE_enum('max_pool_impl', IMPL_DEFAULTS['max_pool_impl'], ['reduce_window', 'slices', 'argmax'],
                    "dferjax's stem max-pool (dferjax.models.resnet.MAX_POOL_IMPLS; 'argmax': ReLU + pool with an "
                    'argmax-reusing gradient), where the model has one.')
  flags.DEFINE_enum('attention_layout', IMPL_DEFAULTS['attention_layout'], ['tokens_heads', 'heads_first'],
                    "STT attention layout ('heads_first': heads split/merged inside the projection einsums).")
  flags.DEFINE_integer('attention_pad_multiple', IMPL_DEFAULTS['attention_pad_multiple'],
                       'STT: pad attention sequences to a multiple of this, masked by sequence lengths (2: 50/18, '
                       '8: 56/24, 32: 64/32 tokens); with --attention_impl=cudnn, the lengths cuDNN trains.')
  flags.DEFINE_enum('stem_conv_impl', IMPL_DEFAULTS['stem_conv_impl'], ['conv', 'space_to_depth'],
                    "dferjax's 7x7/2 stem conv ('space_to_depth': a 4x4/1 conv on 2x2 pixel blocks, same kernel).")
  flags.DEFINE_enum('norm_impl', IMPL_DEFAULTS['norm_impl'], ['flax', 'fused'],
                    "dferjax's BatchNorm/LayerNorm ('fused': dferjax.models.fused, hand-written backward pass).")
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


def stt_reference(config, variables: dict):
  """STT's PyTorch transcription holding the flax `variables` (imports torch: called in torch workers only)."""
  from dferjax.reference import torch_stt  # pylint: disable=import-outside-toplevel
  model = torch_stt.STT(config.num_classes, image_size=config.input.image_size, **torch_model_fields(config))
  torch_stt.load_flax_variables(model, variables)
  return model


def nr_dfernet_reference(config, variables: dict):
  """NR-DFERNet's PyTorch transcription holding `variables`; its evaluation returns the filtered logits, as
  dferjax's does (the transcription's eval forward also returns the sequence and snippet logits)."""
  import torch  # pylint: disable=import-outside-toplevel
  from dferjax.reference import torch_nr_dfernet  # pylint: disable=import-outside-toplevel
  fields = torch_model_fields(config)
  if not fields.pop('snippet_filter'):
    raise ValueError('the NR-DFERNet benchmark times the evaluation with the snippet filter on')
  renamed = {'num_heads': 'heads', 'head_dim': 'dim_head', 'filter_max_probability': 'mu1',
             'filter_neutral_probability': 'mu2'}
  model = torch_nr_dfernet.NRDFERNet(config.num_classes, image_size=config.input.image_size,
                                     **{renamed.get(name, name): value for name, value in fields.items()})
  torch_nr_dfernet.load_flax_variables(model, variables)

  class FilteredLogits(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.model = model

    def forward(self, video):
      out = self.model(video)
      return out[0] if isinstance(out, tuple) else out

  return FilteredLogits()


def est_reference(config, variables: dict):
  """EST's PyTorch transcription holding `variables`, returning (logits, {'order_logits': ...}) as dferjax's EST.
  Training runs the transcription's forward (the clip shuffled before the backbone); evaluation runs the backbone
  once on the ordered clip and shuffles its snippet features, as dferjax's evaluation does (the transcription's
  eval forward runs the backbone on the shuffled and on the ordered clip: the same logits, twice the frames)."""
  import torch  # pylint: disable=import-outside-toplevel
  from dferjax.reference import torch_est  # pylint: disable=import-outside-toplevel
  model = torch_est.EST(config.num_classes, **torch_model_fields(config))
  torch_est.load_flax_variables(model, variables)

  class ClassAndOrderLogits(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.model = model

    def forward(self, video, permutation=None):
      if self.training or not model.ssop:
        logits, order_logits = self.model(video, permutation)
        return logits, {} if order_logits is None else {'order_logits': order_logits}
      b = video.shape[0]
      snippets = model.snippets(video.reshape(b, model.num_snippets, model.frames_per_snippet, *video.shape[2:]))
      in_order = torch.arange(model.num_snippets, device=video.device).expand(b, -1)
      order = model.permutations[permutation]
      shuffled = snippets[torch.arange(b, device=video.device)[:, None], order]
      emotion = model.emotion(shuffled, in_order if model.snippet_positions == 'slot' else order)
      order_logits = model.order_head((shuffled + emotion[:, None]).flatten(1))
      return model.classifier(model.emotion(snippets, in_order)), {'order_logits': order_logits}

  return ClassAndOrderLogits()


def ceflnet_reference(config, variables: dict):
  """CEFLNet's PyTorch transcription holding `variables`. Training runs the backbone per slot or jointly as the
  config's backbone_batch_norm says (per slot: the public code's loop); evaluation runs it once on all frames, as
  dferjax's does, and returns the snippet attention and frame weights beside the logits for the parity check."""
  import torch  # pylint: disable=import-outside-toplevel
  from dferjax.reference import torch_ceflnet  # pylint: disable=import-outside-toplevel
  model = torch_ceflnet.CEFLNet(config.num_classes, **torch_model_fields(config))
  torch_ceflnet.load_flax_variables(model, variables)

  class LogitsAndAttention(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.model = model

    def forward(self, video):
      if self.training:
        return self.model(video)
      logits, attention, _, frame_weights = self.model(video, return_aux=True)
      return logits, {'snippet_attention': attention, 'frame_weights': frame_weights}

  return LogitsAndAttention()


def aen_reference(config, variables: dict):
  """AEN's PyTorch transcription holding `variables` (the frozen guide included, kept in eval mode and out of the
  gradients): training returns the logits and the outputs the AEN losses read (the guide's frame logits among
  them, as dferjax's step runs the guide), evaluation the logits and the three heads' logits."""
  from dferjax.reference import torch_aen  # pylint: disable=import-outside-toplevel
  model = torch_aen.AEN(config.num_classes, image_size=config.input.image_size, **torch_model_fields(config))
  torch_aen.load_flax_variables(model, variables)
  return model


@dataclasses.dataclass(frozen=True)
class BenchModel:
  """What the benchmark needs of one model; a new model adds a row to BENCH_MODELS."""
  paper_config: Any  # a configs module: get_config() is the paper recipe (--model=paper)
  tiny_model: dict  # config.model fields for --model=tiny
  tiny_input: dict  # config.input fields for --model=tiny (a sampler giving tiny_model's frames, image_size)
  torch_reference: Callable  # (config, flax variables) -> the torch transcription holding those weights
  jax_only_fields: tuple[str, ...] = ()  # config.model fields the transcription does not take
  # Batch fields besides video/label/mask (the model's inputs): name -> (dtype, high), drawn in [0, high).
  batch_fields: dict = dataclasses.field(default_factory=dict)


BENCH_MODELS = {
    # tests/tiny_config.py's model and input (the end-to-end tests' STT).
    'stt': BenchModel(stt_dfew, tiny_model=dict(num_frames=4, embed_dim=32, num_layers=1, num_heads=2,
                                                mlp_ratio=2.0, drop_path_rate=0.1, backbone_stage=3,
                                                backbone_width=8),
                      tiny_input=dict(sampler=configlib.segment_sampler(num_segments=2, frames_per_segment=2),
                                      image_size=32),
                      torch_reference=stt_reference,
                      jax_only_fields=('attention_impl', 'max_pool_impl', 'attention_layout', 'attention_pad_multiple',
                                       'stem_conv_impl', 'norm_impl')),
    # configs/demo_synthetic.py:model=nr_dfernet's sizes on 32 px (1 x 1 maps after DSF).
    'nr_dfernet': BenchModel(nr_dfernet_dfew, tiny_model=dict(num_frames=8, stem_width=16, num_spatial_layers=1,
                                                              num_temporal_layers=2, num_heads=4, head_dim=16,
                                                              spatial_mlp_dim=64, temporal_mlp_dim=128,
                                                              snippet_filter=True),
                             tiny_input=dict(sampler=configlib.segment_sampler(num_segments=4, frames_per_segment=2),
                                             image_size=32),
                             torch_reference=nr_dfernet_reference),
    # configs/demo_synthetic.py:model=est's sizes (d = 128, 1 + 1 layers) on 32 px, 7 snippets x 2 frames, with
    # SSOP on as in the paper config (its 'order' loss).
    'est': BenchModel(est_dfew, tiny_model=dict(num_frames=14, num_snippets=7, backbone_width=16, num_heads=4,
                                                num_encoder_layers=1, num_decoder_layers=1, hidden_dim=256,
                                                dropout_rate=0.1, classifier_dims=(64, 32), classifier_dropout=0.4,
                                                ssop=True, snippet_positions='slot', order_head_dims=(256, 64)),
                      tiny_input=dict(sampler={'name': 'snippets', 'frames_per_snippet': 2}, image_size=32),
                      torch_reference=est_reference,
                      batch_fields={'permutation': ('int32', len(sampling.EST_PERMUTATIONS))}),
    # configs/demo_synthetic.py:model=ceflnet's sizes (d = 128, head 64-32) on 32 px, 7 snippets x 2 frames, the
    # backbone per slot as in the paper config.
    'ceflnet': BenchModel(ceflnet_dfew, tiny_model=dict(num_frames=14, num_snippets=7, frames_per_snippet=2,
                                                        backbone_width=16, num_heads=4, classifier_dims=(64, 32),
                                                        backbone_batch_norm='per_slot'),
                          tiny_input=dict(sampler={'name': 'snippets', 'frames_per_snippet': 2}, image_size=32),
                          torch_reference=ceflnet_reference,
                          jax_only_fields=('remat_backbone', 'slot_unroll', 'max_pool_impl')),
    # tests/test_aen.py's tiny AEN on 32 px (low 1 x 8 x 8, middle 4 x 2 x 2), with the frozen guide and the paper
    # loss as in the paper config.
    'aen': BenchModel(aen_dfew, tiny_model=dict(num_frames=4, backbone_width=8, low_channels=1, middle_channels=4,
                                                num_layers=1, num_heads=2, head_dim=8, mlp_dim=16, guide=True),
                      tiny_input=dict(sampler=configlib.segment_sampler(num_segments=2, frames_per_segment=2),
                                      image_size=32),
                      torch_reference=aen_reference),
}
QUICK = dict(model='tiny', batch_sizes=['8', '16'], dtypes=['float32'], steps=12, warmup=2, window=3,
             max_batch=False)
# Implementation switches some models have (flags), and their defaults, which any model accepts.
IMPL_DEFAULTS = {'attention_impl': 'xla', 'max_pool_impl': 'reduce_window', 'attention_layout': 'tokens_heads',
                 'attention_pad_multiple': 1, 'stem_conv_impl': 'conv', 'norm_impl': 'flax'}
TORCH_MODES = ('eager', 'compile')
# Only shapes the learning-rate schedule (the benchmark's few steps stay in its first epoch).
STEPS_PER_EPOCH = 1000


def bench_model(model_name: str) -> BenchModel:
  if model_name in BENCH_MODELS:
    return BENCH_MODELS[model_name]
  if model_name in models.MODELS:
    raise ValueError(f'--model_name={model_name!r}: the model exists but has no benchmark row yet; add its paper '
                     'config, tiny sizes and PyTorch transcription to BENCH_MODELS in scripts/bench_train.py')
  raise ValueError(f'--model_name={model_name!r} is not a model; benchmarked models: {sorted(BENCH_MODELS)}')


def bench_config(model_name: str, size: str, dtype: str, *, seed: int = 0, **impls):
  """The model's paper config (or its tiny sizes) computing in `dtype` (train.build_model passes it to the model).

  impls: the IMPL_DEFAULTS switches (attention_impl, max_pool_impl, ...); set where the model has the field, else they must be the default.
  """
  spec = bench_model(model_name)
  config = spec.paper_config.get_config()
  fields = models.model_fields(models.MODELS[config.model_name])
  with config.unlocked():
    if size == 'tiny':
      config.model = dict(spec.tiny_model)
      config.input.update(spec.tiny_input)
    elif size != 'paper':
      raise ValueError(f"size {size!r}: expected 'paper' or 'tiny'")
    for name, value in impls.items():
      if name in fields:
        config.model[name] = value
      elif value != IMPL_DEFAULTS[name]:
        raise ValueError(f'--{name}={value!r}: model {model_name!r} has no {name} field')
    config.dtype = dtype
    config.seed = seed
  return config


def torch_model_fields(config) -> dict:
  """config.model without the fields only dferjax's model takes (dtypes, implementation switches)."""
  jax_only = ('dtype', 'param_dtype', *bench_model(config.model_name).jax_only_fields)
  return {name: value for name, value in config.model.items() if name not in jax_only}


def settings_config(settings: dict, dtype: str, **impls):
  """bench_config for a worker's settings; `impls` default to the settings' (the flags')."""
  impls = {name: impls.get(name, settings[name]) for name in IMPL_DEFAULTS}
  return bench_config(settings['model_name'], settings['model'], dtype, seed=settings['seed'], **impls)


def batch_fields(config) -> dict[str, tuple[str, int]]:
  """The model's batch fields besides video/label/mask (its BenchModel row's), by name: (dtype, high)."""
  return dict(sorted(bench_model(config.model_name).batch_fields.items()))


def host_batch(config, batch_size: int, seed: int) -> dict[str, np.ndarray]:
  """The same uint8 batch in every worker (numpy, seeded), with the model's own fields (e.g. EST's permutation
  per clip) drawn after the video and labels."""
  rng = np.random.default_rng(seed)
  batch = {'video': rng.integers(0, 256, train.video_shape(config, batch_size), dtype=np.uint8),
           'label': rng.integers(0, config.num_classes, batch_size).astype(np.int32),
           'mask': np.ones(batch_size, bool)}
  for name, (dtype, high) in batch_fields(config).items():
    batch[name] = rng.integers(0, high, batch_size).astype(dtype)
  return batch


def describe_error(error: BaseException) -> str:
  lines = [line for line in str(error).splitlines() if line.strip()]
  return f'{type(error).__name__}: {lines[0][:400] if lines else ""}'


# ---------------------------------------------------------------------------------------------------------
# dferjax worker.


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

  def abstract(tree, where):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where), tree)

  batch = abstract({'video': jax.ShapeDtypeStruct(train.video_shape(config, batch_size), jnp.uint8),
                    'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32),
                    'mask': jax.ShapeDtypeStruct((batch_size,), jnp.bool_),
                    **{name: jax.ShapeDtypeStruct((batch_size,), dtype)
                       for name, (dtype, _) in batch_fields(config).items()}}, steps.batch_sharding)
  accumulator = abstract(jax.eval_shape(steps.init_accumulator), steps.replicated)
  confusions = abstract(jax.eval_shape(lambda: steps.init_confusions(config.num_classes)), steps.replicated)
  return {'train': (steps.train, (steps.abstract_state, accumulator, batch)),
          'eval': (steps.eval, (steps.abstract_state, confusions, batch))}


def lowered_flops(config, batch_size: int) -> dict:
  """FLOPs per clip of the train and eval steps from the lowered HLO (no compile). Run on the CPU backend
  (the 'flops' worker): jax on GPU returns no cost analysis for a lowered program, and a GPU-compiled one
  leaves cuDNN convolutions uncounted."""
  steps = train.make_steps(config, steps_per_epoch=STEPS_PER_EPOCH)
  return {part: per_clip(benchmarking.xla_flops(jitted.lower(*args)), batch_size)
          for part, (jitted, args) in abstract_step_inputs(config, batch_size, steps).items()}


def jax_flops_only(config, batch_size: int) -> dict:
  """Compiles the train and eval steps on abstract inputs (no arrays, any host) for FLOPs and memory."""
  steps = train.make_steps(config, steps_per_epoch=STEPS_PER_EPOCH)
  figures = {}
  for part, (jitted, args) in abstract_step_inputs(config, batch_size, steps).items():
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    compiled = lowered.compile()
    figures[part] = {'compile_s': time.perf_counter() - start,
                     'flops_per_clip': per_clip(benchmarking.xla_flops(lowered), batch_size),
                     'compiled_memory_bytes': benchmarking.compiled_memory_bytes(compiled)}
  return figures


def bench_jax(config, batch: dict, steps_flags: dict, profile_dir: str = '') -> tuple[dict, dict]:
  """Times dferjax's jitted train and eval steps; returns (figures, initial host variables)."""
  device = jax.devices()[0]
  device_count = jax.device_count()
  batch_size = len(batch['label'])
  steps = train.make_steps(config, steps_per_epoch=STEPS_PER_EPOCH)
  state = steps.init(jax.random.key(config.seed))
  variables = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
  accumulator = steps.init_accumulator()
  device_batch = sharding.to_global(batch, steps.batch_sharding)

  start = time.perf_counter()
  lowered = steps.train.lower(state, accumulator, device_batch)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  carry = [state, accumulator]

  def train_once():
    carry[0], carry[1] = compiled(carry[0], carry[1], device_batch)

  timing = benchmarking.throughput(
      benchmarking.time_windows(train_once, lambda: jax.block_until_ready(carry), **steps_flags), batch_size)
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
      'mean_loss': float(totals['sums']['loss']) / int(totals['count'])}}

  state = carry[0]
  confusions = [steps.init_confusions(config.num_classes)]
  start = time.perf_counter()
  lowered_eval = steps.eval.lower(state, confusions[0], device_batch)
  compiled_eval = lowered_eval.compile()
  eval_compile_s = time.perf_counter() - start

  def eval_once():
    confusions[0] = compiled_eval(state, confusions[0], device_batch)

  eval_timing = benchmarking.throughput(
      benchmarking.time_windows(eval_once, lambda: jax.block_until_ready(confusions), **steps_flags), batch_size)
  figures['eval'] = {**eval_timing, 'compile_s': eval_compile_s,
                     'flops_per_clip': per_clip(benchmarking.xla_flops(lowered_eval), batch_size)}
  return figures, variables


def largest_train_batch(config, start: int, settings: dict) -> dict:
  """Doubles then bisects the train batch until XLA runs out of memory (at compile or at run time)."""
  steps = train.make_steps(config, steps_per_epoch=STEPS_PER_EPOCH)
  fields = batch_fields(config)

  def run_two_steps(batch_size):
    shape = train.video_shape(config, batch_size)
    make_batch = jax.jit(lambda: {'video': jnp.zeros(shape, jnp.uint8), 'label': jnp.zeros(batch_size, jnp.int32),
                                  'mask': jnp.ones(batch_size, bool),
                                  **{name: jnp.zeros(batch_size, dtype) for name, (dtype, _) in fields.items()}},
                         out_shardings=steps.batch_sharding)
    state, accumulator = steps.init(jax.random.key(config.seed)), steps.init_accumulator()
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
    config = settings_config(settings, dtype)
    for batch_size in settings['batch_sizes']:
      print(f'dferjax {dtype} batch {batch_size}', file=sys.stderr, flush=True)
      if settings['flops_only']:
        results.append({'dtype': dtype, 'batch_size': batch_size,
                        'figures': jax_flops_only(config, batch_size)})
        yield
        continue
      batch = host_batch(config, batch_size, settings['seed'])
      try:
        profile_dir = (os.path.join(settings['profile_dir'], f'{dtype}_b{batch_size}')
                       if settings['profile_dir'] else '')
        figures, variables = bench_jax(config, batch, steps_flags, profile_dir)
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
        reference_batch = {name: batch[name][:2] for name in ('video', *batch_fields(config))}
        np.savez(os.path.join(folder, 'reference_logits.npz'), **reference_logits(settings, variables, reference_batch))
        np.savez(os.path.join(folder, 'reference_batch.npz'), **reference_batch)
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


def reference_logits(settings: dict, variables: dict, batch: dict) -> dict[str, np.ndarray]:
  """Float32 eval logits of `batch` (a few clips), the class logits as 'logits' and the auxiliary outputs by
  name: the torch workers check they hold the same weights."""
  model = train.build_model(settings_config(settings, 'float32', **IMPL_DEFAULTS))
  video = batch['video'] / np.float32(255)
  logits, aux = jax.jit(lambda v, x, inputs: model.apply(v, x, **inputs, train=False))(
      variables, video, train.model_inputs(model, batch))
  return {'logits': np.asarray(logits), **{name: np.asarray(value) for name, value in aux.items()}}


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


def run_torch_worker(settings: dict, folder: str, mode: str, output: dict):
  """Fills `output` as it goes (worker_main writes it after every measurement)."""
  from dferjax.reference import torch_bench  # pylint: disable=import-outside-toplevel  # torch workers only
  check_config = settings_config(settings, 'float32', **IMPL_DEFAULTS)
  bench = torch_bench.TorchBench(
      bench_model(settings['model_name']).torch_reference, load_variables(os.path.join(folder, 'variables.npz')),
      mode, seed=settings['seed'], channels_last=settings['channels_last'],
      compile_mode=settings['torch_compile_mode'],
      threads=settings['torch_threads'] or benchmarking.machine_info()['cores_visible'],
      model_inputs=train.build_model(check_config).model_inputs)  # EST's is a property (SSOP or not)
  info = bench.configure()
  results = []
  output.update({'info': info, 'results': results})
  steps_flags = {k: settings[k] for k in ('steps', 'warmup', 'window')}
  with np.load(os.path.join(folder, 'reference_batch.npz')) as batch, \
       np.load(os.path.join(folder, 'reference_logits.npz')) as logits:
    differences = bench.logit_difference(check_config, dict(batch), dict(logits))
  info['logit_max_abs_difference'] = differences.pop('logits')
  if differences:  # auxiliary outputs, e.g. EST's order logits
    info['aux_logit_max_abs_difference'] = differences
  for dtype in settings['dtypes']:
    config = settings_config(settings, dtype)
    for batch_size in settings['batch_sizes']:
      print(f'torch {mode} {dtype} batch {batch_size}', file=sys.stderr, flush=True)
      batch = host_batch(config, batch_size, settings['seed'])
      try:
        figures = bench.run(config, batch, steps_flags)
      except Exception as error:  # pylint: disable=broad-except
        if benchmarking.is_resource_exhausted(error):
          figures = out_of_memory_figures(error)
          bench.release_memory()
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
    # cuDNN attention is GPU-only; Pallas' would lower to its interpreter's loops, which the count sees once.
    config = settings_config(settings, dtype, attention_impl='xla')
    for batch_size in settings['batch_sizes']:
      results.append({'dtype': dtype, 'batch_size': batch_size, 'flops_per_clip': lowered_flops(config, batch_size)})
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
  settings = report['settings']
  torch_modes = settings['torch']
  columns = [(name, name) for name in ('dtype', 'batch', 'clips/s', 'step ms', 'compile s', 'GFLOP/clip', 'TFLOP/s',
                                       'MFU %', 'eval clips/s')]
  for mode in torch_modes:
    columns += [(f'torch {mode} clips/s', f'{mode} clips/s'), (f'train x {mode}', f'x {mode}'),
                (f'eval x {mode}', f'eval x {mode}')]
  machine, device = report['machine'], report['device']
  print(f"\n{settings['model_name'].upper()} ({settings['model']}) dferjax train step on {device['device_count']} x "
        f"{device['device_kind']} ({machine['cpu_model']}, {machine['cores_visible']} cores); "
        "'x' = dferjax / PyTorch clips/s")
  print(benchmarking.format_table(table_rows(report['results'], torch_modes), columns))
  for result in report['results']:
    for mode in torch_modes:
      if 'error' in result['torch'][mode]:
        print(f"torch {mode} failed ({result['dtype']}, batch {result['batch_size']}): "
              f"{result['torch'][mode]['error']}")
  for mode, info in report['torch'].items():
    if 'logit_max_abs_difference' in info:
      aux = ''.join(f', {name} {value:.2e}' for name, value in info.get('aux_logit_max_abs_difference', {}).items())
      print(f'torch {mode} vs dferjax, same weights: eval logits max |difference| '
            f"{info['logit_max_abs_difference']:.2e}{aux}")
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
  bench_model(FLAGS.model_name)  # an unknown name fails here, naming the known ones
  if FLAGS.attention_impl == 'cudnn' and 'float32' in FLAGS.dtypes:
    raise ValueError('--attention_impl=cudnn needs --dtypes=bfloat16 (cuDNN flash attention has no float32)')
  return {'model_name': FLAGS.model_name, 'model': FLAGS.model, 'batch_sizes': [int(b) for b in FLAGS.batch_sizes],
          'dtypes': list(FLAGS.dtypes), 'steps': FLAGS.steps, 'warmup': FLAGS.warmup, 'window': FLAGS.window,
          'torch': torch_modes, 'torch_compile_mode': FLAGS.torch_compile_mode, 'torch_threads': FLAGS.torch_threads,
          'channels_last': FLAGS.channels_last, 'attention_impl': FLAGS.attention_impl,
          **{name: FLAGS[name].value for name in IMPL_DEFAULTS if name != 'attention_impl'},
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
  config = settings_config(settings, 'float32')  # also checks the implementation flags fit the model
  settings['model_fields'] = torch_model_fields(config)
  settings['video_shape_per_clip'] = train.video_shape(config, 1)[1:]
  with tempfile.TemporaryDirectory(prefix='bench_train_') as folder:
    benchmarking.write_json(os.path.join(folder, 'settings.json'), settings)
    jax_output = run_worker('dferjax', folder, required=True)
    if any('error' not in r['figures'] and r['figures']['train'].get('flops_per_clip') is None
           for r in jax_output['results']):
      add_cpu_flops(jax_output, run_worker('flops', folder, required=False))
    torch_outputs = {mode: run_worker(mode, folder, required=mode == 'eager') for mode in settings['torch']}

  notes = ['One uint8 batch reused every step: device compute only, no input pipeline.',
           'FLOPs: XLA cost analysis of the lowered (pre-optimisation) step per clip, the same on every backend '
           '(train: forward, backward, optimizer update); '
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
