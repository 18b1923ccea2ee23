"""NR-DFERNet: paper-size parameters by hand count (no compute), shapes, the snippet-based filter's rule (Eq. 7)
on hand-made probabilities, gradients, the short-clip filter of the data. PyTorch parity: test_nr_dfernet_parity.py."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dferjax import configlib, train
from dferjax.data import datasets
from dferjax.models import nr_dfernet
from dferjax.models.nr_dfernet import NRDFERNet


def conv(k, cin, cout):
  return k * k * cin * cout


def basic_block(cin, cout):  # two 3x3 convs with BN, a 1x1 conv + BN shortcut when the shape changes
  shortcut = conv(1, cin, cout) + 2 * cout if cin != cout else 0
  return conv(3, cin, cout) + conv(3, cout, cout) + 4 * cout + shortcut


def encoder(dim, inner, mlp):  # two LayerNorms, qkv without bias, projection, MLP
  return 4 * dim + dim * 3 * inner + inner * dim + dim + dim * mlp + mlp + mlp * dim + dim


def test_paper_sized_parameter_count_by_hand():
  model = NRDFERNet(num_classes=7)
  variables = jax.eval_shape(partial(model.init, train=False), jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 16, 112, 112, 3), jnp.float32))
  by_module = {name: sum(x.size for x in jax.tree.leaves(tree)) for name, tree in variables['params'].items()}
  stem = conv(3, 3, 64) + 2 * 64 + conv(3, 64, 64) + 2 * 64 + basic_block(64, 64) + basic_block(64, 128) + \
      basic_block(128, 256)
  dim = 256 * 4 * 4  # C * H/2 * W/2 at 112 px
  fusion = basic_block(256, 256) + conv(1, 256, 256) + 2 * 256 + 2 * basic_block(256, 256) + \
      conv(3, 256, 256) + 2 * 256 + 16 * 256 + 2 * encoder(256, 4 * 32, 256)
  temporal = 16 * dim + 4 * encoder(dim, 4 * 32, 512)
  assert by_module == {'stem': stem, 'fusion': fusion, 'temporal': temporal, 'head': dim * 7 + 7}
  assert sum(by_module.values()) == 31_352_775


def test_shapes_aux_outputs_and_heads():
  model = NRDFERNet(num_classes=7, num_frames=8, stem_width=8, num_spatial_layers=1, num_temporal_layers=1,
                    head_dim=8, spatial_mlp_dim=16, temporal_mlp_dim=16)
  video = jnp.asarray(np.random.default_rng(0).random((2, 8, 32, 32, 3)), jnp.float32)
  variables = jax.jit(lambda key: model.init(key, video, train=False))(jax.random.key(0))  # one compile, not per op
  (logits, aux), _ = jax.jit(lambda v: model.apply(v, video, train=True, mutable=['batch_stats']))(variables)
  assert logits.shape == (2, 7) and aux == {}
  logits, aux = jax.jit(lambda v: model.apply(v, video, train=False))(variables)
  assert aux['snippet_logits'].shape == (2, 3, 7)  # 7 frame vectors, L=3, S=2
  assert aux['sequence_logits'].shape == (2, 7) and logits.dtype == jnp.float32
  assert set(model.metric_heads()) == {'unfiltered'}
  assert NRDFERNet(num_classes=7, snippet_filter=False).metric_heads() == {}
  with pytest.raises(ValueError, match='num_frames=8'):
    model.apply(variables, video[:, :6], train=False)


def test_snippet_windows_follow_eq_6():
  for vectors, length, stride in ((15, 3, 2), (15, 3, 1), (15, 6, 3), (7, 3, 2)):
    starts = nr_dfernet.snippet_starts(vectors, length, stride)
    assert len(starts) == (vectors - length) // stride + 1 and starts[-1] + length <= vectors
  assert nr_dfernet.snippet_starts(15, 3, 2) == [0, 2, 4, 6, 8, 10, 12]


def _logits_with_probabilities(probabilities):
  return jnp.log(jnp.asarray(probabilities, jnp.float32))


def test_snippet_filter_rule_both_ways():
  neutral = nr_dfernet.NEUTRAL
  sequence = jnp.asarray([[0.1, 0.2, 2.0, 0.0, 0.3, 0.0, 0.1]] * 4, jnp.float32)  # predicts neutral
  confident = [0.895, 0.02, 0.035, 0.01, 0.02, 0.01, 0.01]  # P_max 0.895 > 0.7, P_neutral 0.035 < 0.05
  neutral_high = [0.8, 0.0, 0.1, 0.05, 0.05, 0.0, 0.0]  # P_neutral 0.1 >= 0.05
  unsure = [0.6, 0.1, 0.01, 0.1, 0.1, 0.05, 0.04]  # P_max 0.6 <= 0.7
  snippets = _logits_with_probabilities([[unsure, confident], [unsure, neutral_high], [neutral_high, unsure],
                                         [unsure, unsure]]) + 1e-12
  filtered = np.asarray(nr_dfernet.snippet_filter(sequence, snippets, 0.7, 0.05))
  assert np.isneginf(filtered[0, neutral]) and filtered[0].argmax() == 4  # neutral probability set to 0
  np.testing.assert_array_equal(np.delete(filtered[0], neutral), np.delete(np.asarray(sequence[0]), neutral))
  np.testing.assert_array_equal(filtered[1:], sequence[1:])  # no snippet is confidently non-neutral
  # The code's thresholds (0.75 / 0.03) leave the first row alone: its neutral probability 0.035 is not below.
  np.testing.assert_array_equal(nr_dfernet.snippet_filter(sequence, snippets, 0.75, 0.03), sequence)


def test_gradients_reach_every_parameter():
  model = NRDFERNet(num_classes=7, num_frames=4, stem_width=8, num_spatial_layers=1, num_temporal_layers=1,
                    head_dim=8, spatial_mlp_dim=16, temporal_mlp_dim=16)
  video = jnp.asarray(np.random.default_rng(1).random((2, 4, 32, 32, 3)), jnp.float32)
  variables = jax.jit(lambda key: model.init(key, video, train=False))(jax.random.key(0))

  def loss(params):
    (logits, _), _ = model.apply({**variables, 'params': params}, video, train=True, mutable=['batch_stats'])
    return jax.nn.log_softmax(logits)[:, 3].sum()

  grads = jax.jit(jax.grad(loss))(variables['params'])
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  zero = [jax.tree_util.keystr(path) for path, g in flat if not np.any(np.asarray(g))]
  assert not zero, zero


def test_short_clips_are_left_out_of_both_splits():
  source = [{'num_frames': n, 'label': 0} for n in (8, 16, 15, 40, 16)]
  kept, left_out = datasets.drop_short_clips(source, 16)
  assert left_out == 2 and [kept[i]['num_frames'] for i in range(len(kept))] == [16, 40, 16]
  with pytest.raises(ValueError, match='leaves none of the 5 clips'):
    datasets.drop_short_clips(source, 41)


def test_paper_configs():
  config = configlib.load_config('configs/nr_dfernet_dfew.py', 'fold=2')
  assert (config.dataset.name, config.dataset.min_frames, config.init_from.backbone) == ('dfew/fold2', 16, 'none')
  assert (config.optimizer.learning_rate, config.batch_size, config.num_epochs) == (1e-3, 32, 70)
  schedule = train.learning_rate_schedule(config.optimizer, steps_per_epoch=10, num_epochs=70)
  np.testing.assert_allclose(float(schedule(700)), 1e-5, rtol=1e-4)
  model = train.build_model(config)
  assert (model.num_temporal_layers, model.filter_max_probability, model.filter_neutral_probability) == (4, 0.7, 0.05)
  code = train.build_model(configlib.load_config('configs/nr_dfernet_dfew.py', 'code'))
  assert (code.num_temporal_layers, code.filter_max_probability, code.filter_neutral_probability) == (2, 0.75, 0.03)
  assert configlib.load_config('configs/nr_dfernet_dfew.py', 'oversample').input.class_balanced
  afew = configlib.load_config('configs/nr_dfernet_afew.py')
  assert (afew.optimizer.learning_rate, afew.num_epochs, afew.dataset.eval_split) == (3e-4, 30, 'validation')


def test_xla_flops_reproduce_the_differences_of_tab_3():
  """Tab. 3 (G): M = 1, 2, 3 at N = 4: 6.20, 6.33, 6.46; N = 6: +1.11. XLA's counts of the evaluation forward
  (snippet passes included) give the same steps, so the paper's transformer figures are FLOPs, not MACs."""
  from dferjax import summary

  def gflops(spatial, temporal):
    config = configlib.load_config('configs/nr_dfernet_dfew.py')
    with config.unlocked():
      config.model.num_spatial_layers, config.model.num_temporal_layers = spatial, temporal
    return summary.summarize(config)['gflops_per_clip']

  base = gflops(2, 4)
  assert gflops(1, 4) == pytest.approx(base - 0.13, abs=0.005)
  assert gflops(2, 6) == pytest.approx(base + 1.11, abs=0.01)
