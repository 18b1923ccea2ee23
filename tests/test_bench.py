"""scripts/bench_train.py end to end (tiny STT, a few steps, torch eager), its PyTorch side
(dferjax.reference.torch_bench) and the helpers it shares.

No speed assertions: the figures must exist, be positive, and come from the same weights in both frameworks.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dferjax import benchmarking, losses, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'scripts', 'bench_train.py')


def load_bench_train():
  spec = importlib.util.spec_from_file_location('bench_train', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)  # defines no flags: they are defined only when run as a script
  return module


def positive(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_run_reports_every_figure_from_the_same_weights(tmp_path):
  pytest.importorskip('torch')
  out = tmp_path / 'bench.json'
  # conftest's XLA_FLAGS (2 host devices) reach the dferjax worker: the sharded path is measured.
  subprocess.run([sys.executable, SCRIPT, '--quick', '--batch_sizes=4', '--steps=2', '--warmup=1', '--window=1',
                  '--torch=eager', f'--out={out}'], cwd=REPO, check=True, timeout=300)
  report = json.loads(out.read_text())

  assert report['machine']['cores_visible'] >= 1 and report['machine']['cpu_model']
  assert {'python', 'jax', 'jaxlib', 'flax', 'optax', 'torch'} <= set(report['versions'])
  assert report['device']['device_count'] == 2 and report['device']['platform'] == 'cpu'
  assert not report['device']['jax_disable_most_optimizations']
  assert report['settings']['model'] == 'tiny' and report['settings']['model_name'] == 'stt'
  assert report['settings']['torch'] == ['eager']
  assert report['max_batch']['float32'] == {'skipped': 'CPU (host memory)'}
  # The flax init was copied into the torch model: eval logits agree.
  assert report['torch']['eager']['logit_max_abs_difference'] < 1e-4
  assert report['torch']['eager']['threads'] >= 1

  [result] = report['results']
  assert (result['dtype'], result['batch_size']) == ('float32', 4)
  jax_train, jax_eval = result['dferjax']['train'], result['dferjax']['eval']
  for key in ('clips_per_s', 'step_time_s', 'compile_s', 'flops_per_clip', 'flops_per_s', 'mean_loss'):
    assert positive(jax_train[key]), key
  assert len(jax_train['window_step_times_s']) == 2
  assert jax_train['mfu'] is None and 'peak unknown' in jax_train['peak_source']
  assert positive(jax_train['compiled_memory_bytes']['total'])
  for key in ('clips_per_s', 'step_time_s', 'compile_s', 'flops_per_clip'):
    assert positive(jax_eval[key]), key
  # A train step costs about three forward passes.
  assert 2 < jax_train['flops_per_clip'] / jax_eval['flops_per_clip'] < 4

  torch_train, torch_eval = result['torch']['eager']['train'], result['torch']['eager']['eval']
  for key in ('clips_per_s', 'step_time_s', 'first_step_s', 'matmul_conv_flops_per_clip', 'mean_loss'):
    assert positive(torch_train[key]), key
  assert positive(torch_eval['clips_per_s'])
  for key in ('train_clips_per_s', 'train_step_time', 'eval_clips_per_s'):
    assert positive(result['ratios']['eager'][key]), key
  np.testing.assert_allclose(result['ratios']['eager']['train_clips_per_s'],
                             jax_train['clips_per_s'] / torch_train['clips_per_s'])


def test_torch_compact_loss_matches_dferjax():
  torch = pytest.importorskip('torch')
  from dferjax.reference import torch_bench  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  logits, labels = rng.normal(size=(6, 7)) * 3, rng.integers(0, 7, size=6)
  want = losses.compact_softmax_cross_entropy(np.float32(logits), labels, beta=0.2)
  got = torch_bench.torch_compact_loss(torch.tensor(logits), torch.tensor(labels), beta=0.2).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # The config's loss reaches torch with dferjax's fields and defaults.
  np.testing.assert_allclose(torch_bench.torch_loss({'name': 'compact'})(torch.tensor(logits), torch.tensor(labels)),
                             want, rtol=1e-5, atol=1e-6)
  smoothed = torch_bench.torch_loss({'name': 'label_smoothing', 'smoothing': 0.1})
  np.testing.assert_allclose(smoothed(torch.tensor(logits), torch.tensor(labels)),
                             losses.label_smoothed_cross_entropy(np.float32(logits), labels, 0.1), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='no torch transcription'):
    torch_bench.torch_loss({'name': 'order'})


def test_torch_order_loss_matches_dferjax():
  torch = pytest.importorskip('torch')
  from dferjax.reference import torch_bench  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(1)
  logits, order_logits = np.float32(rng.normal(size=(6, 7)) * 3), np.float32(rng.normal(size=(6, 10)) * 3)
  batch = {'label': rng.integers(0, 7, size=6).astype(np.int32),
           'permutation': rng.integers(0, 10, size=6).astype(np.int32)}
  want, _ = losses.OrderLoss(order_weight=0.25)(logits, {'order_logits': order_logits}, batch)
  torch_batch = {name: torch.tensor(value).long() for name, value in batch.items()}
  got = torch_bench.torch_batch_loss({'name': 'order', 'order_weight': 0.25})(
      torch.tensor(logits), {'order_logits': torch.tensor(order_logits)}, torch_batch)
  np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(torch_bench.torch_order_loss(torch.tensor(logits), torch.tensor(order_logits),
                                                          torch_batch['label'], torch_batch['permutation'], 0.25),
                             want, rtol=1e-5, atol=1e-6)
  # dferjax's default weight (the code's 1/7) reaches torch; the losses of (logits, labels) read batch['label'].
  default, _ = losses.OrderLoss()(logits, {'order_logits': order_logits}, batch)
  np.testing.assert_allclose(torch_bench.torch_batch_loss({'name': 'order'})(
      torch.tensor(logits), {'order_logits': torch.tensor(order_logits)}, torch_batch), default, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(torch_bench.torch_batch_loss({'name': 'compact'})(torch.tensor(logits), {}, torch_batch),
                             losses.compact_softmax_cross_entropy(logits, batch['label']), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('spec', [{'name': 'aen', 'ga_weight': 0.25}, {'name': 'aen_prototype'}])
def test_torch_aen_losses_match_dferjax(spec):
  """The benchmark's torch AEN step trains on the config's AEN loss (paper or prototype), fields included."""
  torch = pytest.importorskip('torch')
  from dferjax.reference import torch_bench  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(2)
  normal = lambda *shape: np.float32(rng.normal(size=shape))
  aux = {'global_logits': normal(4, 7), 'group_logits': normal(4, 3), 'local_logits': normal(4, 7),
         'class_groups': np.array([0, 2, 1, 2, 0, 2, 2], np.int32), 'guide_logits': normal(4, 5, 7),
         'clip_features': {'low': normal(4, 6), 'middle': normal(4, 5), 'high': normal(4, 4)},
         'frame_features': {'low': normal(4, 5, 6), 'middle': normal(4, 5, 5), 'high': normal(4, 5, 4)}}
  batch = {'label': np.array([0, 2, 4, 6], np.int32)}
  want, _ = losses.build_loss(spec)(None, aux, batch)
  to_torch = lambda tree: jax.tree.map(lambda x: torch.from_numpy(np.array(x)), tree)
  got = torch_bench.torch_batch_loss(spec)(None, to_torch(aux), {'label': torch.tensor(batch['label']).long()})
  np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_host_batch_draws_the_rows_batch_fields():
  """EST's row adds a permutation index per clip, seeded and in range, to the batch and to the abstract inputs
  the FLOPs are lowered on; a model without batch_fields keeps video/label/mask, drawn as before."""
  bench_train = load_bench_train()
  est = bench_train.bench_config('est', 'tiny', 'float32')
  batch = bench_train.host_batch(est, 64, seed=5)
  assert set(batch) == {'video', 'label', 'mask', 'permutation'}
  assert batch['permutation'].dtype == np.int32 and batch['permutation'].shape == (64,)
  assert 0 <= batch['permutation'].min() and batch['permutation'].max() < 10
  assert len(set(batch['permutation'].tolist())) > 1
  np.testing.assert_array_equal(bench_train.host_batch(est, 64, seed=5)['permutation'], batch['permutation'])
  stt = bench_train.bench_config('stt', 'tiny', 'float32')
  stt_batch = bench_train.host_batch(stt, 4, seed=5)
  assert set(stt_batch) == {'video', 'label', 'mask'}
  rng = np.random.default_rng(5)
  np.testing.assert_array_equal(stt_batch['video'], rng.integers(0, 256, (4, 4, 32, 32, 3), dtype=np.uint8))
  steps = train.make_steps(est, steps_per_epoch=bench_train.STEPS_PER_EPOCH)
  _, (_, _, abstract_batch) = bench_train.abstract_step_inputs(est, 4, steps)['train']
  assert abstract_batch['permutation'].shape == (4,) and abstract_batch['permutation'].dtype == np.int32


def test_est_reference_evaluates_as_the_transcription():
  """The benchmark's torch EST runs the backbone once in evaluation (as dferjax does), where the transcription's
  eval forward runs it on the shuffled and the ordered clip: both give the same class and order logits."""
  torch = pytest.importorskip('torch')
  bench_train = load_bench_train()
  config = bench_train.bench_config('est', 'tiny', 'float32')
  model = train.build_model(config)
  shapes = jax.eval_shape(lambda: train.init_variables(model, jax.random.key(0), train.video_shape(config, 1)))
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map_with_path(
      lambda path, x: np.float32(rng.uniform(0.5, 1.5, x.shape) if path[-1].key == 'var'
                                 else rng.normal(size=x.shape) * 0.1), shapes)
  reference = bench_train.est_reference(config, variables).eval()
  video, permutation = torch.rand(3, 14, 3, 32, 32), torch.tensor([0, 4, 9])
  with torch.inference_mode():
    logits, aux = reference(video, permutation)
    want_logits, want_order_logits = reference.model(video, permutation)
  torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-5)
  torch.testing.assert_close(aux['order_logits'], want_order_logits, rtol=1e-4, atol=1e-5)
  logits, aux = reference.train()(video, permutation)
  assert logits.shape == (3, config.num_classes) and aux['order_logits'].shape == (3, 10)


def test_model_name_picks_a_row_and_an_unknown_name_fails_clearly():
  bench_train = load_bench_train()
  config = bench_train.bench_config('stt', 'tiny', 'bfloat16', seed=3, max_pool_impl='slices')
  assert config.model_name == 'stt' and config.dtype == 'bfloat16' and config.seed == 3
  assert config.model.embed_dim == 32 and config.model.max_pool_impl == 'slices'
  assert train.video_shape(config, 2) == (2, 4, 32, 32, 3)
  assert bench_train.bench_config('stt', 'paper', 'float32').model.embed_dim == 512
  assert set(bench_train.torch_model_fields(config)) == {
      'num_frames', 'embed_dim', 'num_layers', 'num_heads', 'mlp_ratio', 'drop_path_rate', 'backbone_stage',
      'backbone_width'}
  with pytest.raises(ValueError, match=r"'vivit' is not a model; benchmarked models: "
                                       r"\['aen', 'ceflnet', 'est', 'nr_dfernet', 'stt'\]"):
    bench_train.bench_config('vivit', 'tiny', 'float32')
  nr_dfernet = bench_train.bench_config('nr_dfernet', 'tiny', 'float32')
  assert train.video_shape(nr_dfernet, 2) == (2, 8, 32, 32, 3) and nr_dfernet.model.num_temporal_layers == 2
  est = bench_train.bench_config('est', 'tiny', 'float32')
  assert est.model_name == 'est' and est.loss.name == 'order' and est.model.backbone_width == 16
  assert train.video_shape(est, 2) == (2, 14, 32, 32, 3)
  assert train.video_shape(bench_train.bench_config('est', 'paper', 'float32'), 2) == (2, 35, 224, 224, 3)


@pytest.mark.parametrize('device_kind, dtype, want', [
    ('NVIDIA H100 80GB HBM3', 'bfloat16', 989e12), ('NVIDIA H100 PCIe', 'bfloat16', 756e12),
    ('NVIDIA H100 80GB HBM3', 'float32', 495e12), ('NVIDIA H200', 'bfloat16', 989e12),
    ('NVIDIA A100-SXM4-80GB', 'bfloat16', 312e12), ('TPU v4', 'bfloat16', 275e12),
    ('TPU v5 lite', 'bfloat16', 197e12), ('TPU v5p', 'bfloat16', 459e12), ('cpu', 'bfloat16', None)])
def test_peak_flops_by_device_kind(device_kind, dtype, want):
  assert benchmarking.peak_flops(device_kind, dtype)[0] == want


def test_largest_fitting_doubles_then_bisects():
  calls = []

  def fits(n):
    calls.append(n)
    return n <= 300

  search = benchmarking.largest_fitting(fits, 32, multiple=8)
  assert search['largest'] == 296 and not search['limit_reached']
  assert calls[:5] == [32, 64, 128, 256, 512]  # doubling until the first failure, then bisection
  assert benchmarking.largest_fitting(lambda n: n <= 20, 32, multiple=4)['largest'] == 20
  assert benchmarking.largest_fitting(lambda n: False, 8, multiple=8)['largest'] == 0
  assert benchmarking.largest_fitting(lambda n: True, 8, limit=100) == {
      'largest': 64, 'limit_reached': True, 'tried': [(8, True), (16, True), (32, True), (64, True)]}


def test_time_windows_syncs_once_per_window():
  events = []
  timing = benchmarking.time_windows(lambda: events.append('step'), lambda: events.append('sync'),
                                     steps=7, warmup=2, window=3)
  assert events == ['step'] * 2 + ['sync'] + (['step'] * 3 + ['sync']) * 2 + ['step', 'sync']
  assert len(timing['window_step_times_s']) == 3 and timing['step_time_s'] >= 0


def test_xla_flops_accepts_the_list_and_dict_forms():
  class Stage:
    def __init__(self, analysis):
      self.analysis = analysis

    def cost_analysis(self):
      return self.analysis

  assert benchmarking.xla_flops(Stage({'flops': 12.0})) == 12.0
  assert benchmarking.xla_flops(Stage([{'flops': 12.0}])) == 12.0
  assert benchmarking.xla_flops(Stage(None)) is None
  assert benchmarking.xla_flops(Stage([{'bytes accessed': 3.0}])) is None


def test_write_json_and_table(tmp_path):
  path = tmp_path / 'sub' / 'report.json'
  benchmarking.write_json(str(path), {'a': np.float32(1.5), 'b': float('nan'), 'c': [np.int64(2)]})
  assert json.loads(path.read_text()) == {'a': 1.5, 'b': None, 'c': [2]}
  table = benchmarking.format_table([{'x': 1234.5, 'y': None}], [('X', 'x'), ('Y', 'y')])
  assert table.splitlines()[2] == '| 1,234 | - |'


def test_xla_flops_of_a_lowered_step_counts_convolutions_and_matmuls():
  """The count bench_train.py uses (cost analysis of the lowered step): 2 x multiply-adds of a VALID conv
  and a matmul, which GPU compilation would hide inside cuDNN/cuBLAS calls."""

  import jax.numpy as jnp

  def forward(images, kernel, weights):
    features = jax.lax.conv_general_dilated(images, kernel, (1, 1), 'VALID',
                                            dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return features.reshape(features.shape[0], -1) @ weights

  images, kernel = jnp.ones((2, 10, 10, 4)), jnp.ones((3, 3, 4, 16))
  weights = jnp.ones((8 * 8 * 16, 5))
  conv_flops = 2 * 2 * 8 * 8 * 16 * (3 * 3 * 4)
  matmul_flops = 2 * 2 * (8 * 8 * 16) * 5
  got = benchmarking.xla_flops(jax.jit(forward).lower(images, kernel, weights))
  assert got == pytest.approx(conv_flops + matmul_flops, rel=0.01)


def test_cpu_flops_fill_in_what_an_accelerator_leaves_out():
  """On GPU jax gives no cost analysis of the lowered step: the 'flops' worker's CPU lowering fills the
  FLOPs in and MFU follows. The worker's count equals the lowered count the CPU dferjax worker reports."""
  bench_train = load_bench_train()
  settings = {'model_name': 'stt', 'model': 'tiny', 'dtypes': ['float32'], 'batch_sizes': [4],
              **bench_train.IMPL_DEFAULTS, 'seed': 0}
  flops_output = {}
  for _ in bench_train.run_flops_worker(settings, flops_output):
    pass
  [counted] = flops_output['results']
  train_flops, eval_flops = counted['flops_per_clip']['train'], counted['flops_per_clip']['eval']
  assert 2 < train_flops / eval_flops < 4
  # The lowered program is the global one: conftest's 2 devices must not scale the count. The compiled
  # program is one device's share (and optimised, so only close): per clip it is about the same.
  config = bench_train.bench_config('stt', 'tiny', 'float32')
  steps = train.make_steps(config, steps_per_epoch=bench_train.STEPS_PER_EPOCH)
  jitted, args = bench_train.abstract_step_inputs(config, 4, steps)['train']
  assert jax.device_count() == 2
  per_device_compiled = benchmarking.xla_flops(jitted.lower(*args).compile())
  assert 0.8 < per_device_compiled * 2 / 4 / train_flops < 1.25

  jax_output = {'device': {'device_kind': 'NVIDIA H200', 'device_count': 1}, 'results': [
      {'dtype': 'float32', 'batch_size': 4, 'figures': {
          'train': {'clips_per_s': 1000.0, 'flops_per_clip': None}, 'eval': {'flops_per_clip': None}}},
      {'dtype': 'float32', 'batch_size': 8, 'figures': {'error': 'out of memory', 'out_of_memory': True}}]}
  bench_train.add_cpu_flops(jax_output, flops_output)
  figures = jax_output['results'][0]['figures']
  assert figures['train']['flops_per_clip'] == train_flops and figures['eval']['flops_per_clip'] == eval_flops
  assert figures['train']['mfu'] == pytest.approx(train_flops * 1000.0 / 495e12)  # H200 dense TF32 peak
  assert jax_output['results'][1]['figures'] == {'error': 'out of memory', 'out_of_memory': True}
  # --flops_only figures (compiled on the GPU, nothing timed) get the count and no MFU.
  flops_only = {'device': jax_output['device'], 'results': [{'dtype': 'float32', 'batch_size': 4, 'figures': {
      'train': {'compile_s': 1.0, 'flops_per_clip': None}, 'eval': {'compile_s': 1.0, 'flops_per_clip': None}}}]}
  bench_train.add_cpu_flops(flops_only, flops_output)
  assert flops_only['results'][0]['figures']['train'] == {
      'compile_s': 1.0, 'flops_per_clip': train_flops,
      'flops_source': 'XLA cost analysis of the step lowered for CPU'}


def test_join_results_matches_by_setting_and_keeps_out_of_memory_rows():
  """An out-of-memory batch stays in the report as 'OOM'; a torch worker that stopped early leaves its
  unmeasured settings marked with its error; ratios pair the same (dtype, batch)."""
  bench_train = load_bench_train()
  measured = lambda clips_per_s: {'train': {'clips_per_s': clips_per_s, 'step_time_s': 8 / clips_per_s,
                                            'compile_s': 1.0, 'flops_per_clip': None},
                                  'eval': {'clips_per_s': 2 * clips_per_s}}
  oom = {'error': 'out of memory: XlaRuntimeError: RESOURCE_EXHAUSTED', 'out_of_memory': True}
  jax_output = {'results': [{'dtype': 'bfloat16', 'batch_size': 8, 'figures': measured(300.0)},
                            {'dtype': 'bfloat16', 'batch_size': 16, 'figures': oom}]}
  torch_outputs = {'eager': {'results': [{'dtype': 'bfloat16', 'batch_size': 8, 'figures': measured(100.0)}],
                             'error': 'the eager worker exited with code -9'}}
  results = bench_train.join_results(jax_output, torch_outputs)
  assert results[0]['ratios']['eager']['train_clips_per_s'] == pytest.approx(3.0)
  assert results[0]['ratios']['eager']['eval_clips_per_s'] == pytest.approx(3.0)
  assert results[1]['torch']['eager'] == {'error': 'the eager worker exited with code -9'}
  assert results[1]['ratios']['eager'] == {}
  rows = bench_train.table_rows(results, ['eager'])
  assert rows[0]['x eager'] == pytest.approx(3.0) and rows[1]['clips/s'] == 'OOM'
  assert bench_train.summary_line('dferjax', 'bfloat16', 16, oom).endswith('RESOURCE_EXHAUSTED')
  assert '300.0 clips/s' in bench_train.summary_line('dferjax', 'bfloat16', 8, measured(300.0))
