"""Issue 17's options compute what the defaults compute: outputs and gradients, with the same parameters."""
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dferjax.models import fused, layers
from dferjax.models.resnet import max_pool_3x3_stride_2
from dferjax.models.stt import STT

CONV = partial(jax.lax.conv_general_dilated, window_strides=(2, 2), padding=((3, 3), (3, 3)),
               dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def assert_trees_close(got, want, **tolerance):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for path, got_leaf in jax.tree_util.tree_leaves_with_path(got):
    want_leaf = _get(want, path)
    np.testing.assert_allclose(np.float32(got_leaf), np.float32(want_leaf), err_msg=jax.tree_util.keystr(path),
                               **tolerance)


def _get(tree, path):
  for key in path:
    tree = tree[getattr(key, 'key', getattr(key, 'idx', None))]
  return tree


@pytest.mark.parametrize('height, width', [(12, 12), (11, 9)])
def test_space_to_depth_conv_is_the_stride_2_conv(height, width):
  rng = np.random.default_rng(0)
  # Small integers: every product and sum is exact in float32, so any summation order gives the same bits.
  images = jnp.float32(rng.integers(-4, 5, (2, height, width, 3)))
  kernel = jnp.float32(rng.integers(-4, 5, (7, 7, 3, 5)))
  cotangent = jnp.float32(rng.integers(-3, 4, CONV(images, kernel).shape))
  want, want_vjp = jax.vjp(CONV, images, kernel)
  got, got_vjp = jax.vjp(fused.space_to_depth_conv7, images, kernel)
  np.testing.assert_array_equal(got, want)
  for got_grad, want_grad in zip(got_vjp(cotangent), want_vjp(cotangent)):  # d/d images, d/d kernel
    np.testing.assert_array_equal(got_grad, want_grad)
  images, kernel = jnp.float32(rng.normal(size=images.shape)), jnp.float32(rng.normal(size=kernel.shape))
  np.testing.assert_allclose(fused.space_to_depth_conv7(images, kernel), CONV(images, kernel), rtol=1e-5, atol=1e-5)


def test_relu_max_pool_matches_reduce_window():
  rng = np.random.default_rng(1)
  for shape in [(2, 12, 12, 4), (1, 9, 7, 3)]:
    x = jnp.float32(rng.normal(size=shape))  # continuous values: no ties inside a window
    want_fn = lambda x: max_pool_3x3_stride_2(jax.nn.relu(x), 'reduce_window')
    want, want_vjp = jax.vjp(want_fn, x)
    got, got_vjp = jax.vjp(fused.relu_max_pool, x)
    np.testing.assert_array_equal(got, want)
    # Overlapping windows add their gradients in another order: integer cotangents make every sum exact.
    cotangent = jnp.float32(rng.integers(-50, 51, want.shape))
    np.testing.assert_array_equal(got_vjp(cotangent)[0], want_vjp(cotangent)[0])
    cotangent = jnp.float32(rng.normal(size=want.shape))
    np.testing.assert_allclose(got_vjp(cotangent)[0], want_vjp(cotangent)[0], rtol=1e-6, atol=1e-6)


def _norm_outputs(module, x, train):
  variables = module.init(jax.random.key(0), x)
  params = jax.tree.map(lambda p: p + jnp.float32(np.random.default_rng(2).normal(size=p.shape)) * 0.1,
                        variables['params'])
  state = {k: v for k, v in variables.items() if k != 'params'}
  weights = jnp.float32(np.random.default_rng(3).normal(size=x.shape))

  def loss(params, x):
    y, updates = module.apply({'params': params, **state}, x, mutable=['batch_stats'] if train else [])
    return (y.astype(jnp.float32) * weights).sum(), (y, updates)

  (_, (y, updates)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
  return y, updates, grads


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_fused_norms_match_flax(dtype):
  """LayerNorm and BatchNorm (train: running statistics too; eval). float32: tight. bf16: 1e-3, and the input
  gradient is closer to the float32 one than flax's, which sums its three bf16 terms after rounding each."""
  x = jnp.asarray(np.random.default_rng(4).normal(1.5, 2.0, size=(4, 5, 6, 8)), dtype)
  modules = lambda dtype, train: [
      (nn.LayerNorm(epsilon=1e-6, dtype=dtype), fused.FusedLayerNorm(epsilon=1e-6, dtype=dtype)),
      (nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype),
       fused.FusedBatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype))]
  for train in (True, False) if dtype == jnp.float32 else (True,):
    for (flax_module, fused_module), (flax_f32, _) in zip(modules(dtype, train), modules(jnp.float32, train)):
      want, got = _norm_outputs(flax_module, x, train), _norm_outputs(fused_module, x, train)
      exact = _norm_outputs(flax_f32, x.astype(jnp.float32), train)
      assert got[0].dtype == want[0].dtype == dtype
      assert jax.tree.structure(got) == jax.tree.structure(want)
      for got_leaf, want_leaf, exact_leaf in zip(*map(jax.tree.leaves, (got, want, exact))):
        got_leaf, want_leaf, exact_leaf = np.float32(got_leaf), np.float32(want_leaf), np.float32(exact_leaf)
        if dtype == jnp.float32:
          np.testing.assert_allclose(got_leaf, want_leaf, rtol=2e-5, atol=2e-5)
        elif got_leaf.shape == x.shape:  # output, or input gradient from a bf16 cotangent: two bf16 roundings
          np.testing.assert_allclose(got_leaf, exact_leaf, rtol=2**-7, atol=1e-3 * np.abs(exact_leaf).max())
          assert np.abs(got_leaf - exact_leaf).mean() <= np.abs(want_leaf - exact_leaf).mean() + 1e-7
        else:  # float32 statistics and parameter gradients
          np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-3, atol=1e-3)


def _attention_outputs(module, x, params=None):
  params = params or module.init(jax.random.key(0), x)['params']
  weights = jnp.float32(np.random.default_rng(5).normal(size=x.shape))
  loss = lambda params, x: (module.apply({'params': params}, x).astype(jnp.float32) * weights).sum()
  out = jax.jit(module.apply)({'params': params}, x)
  return params, out, jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)


def test_attention_heads_first_layout_matches_default():
  x = jnp.float32(np.random.default_rng(6).normal(size=(2, 3, 7, 16)))  # [batch, frames, tokens, dim]
  params, want, want_grads = _attention_outputs(layers.MultiHeadSelfAttention(num_heads=4), x)
  heads_first = layers.MultiHeadSelfAttention(num_heads=4, attention_layout='heads_first')
  # The same parameter names and shapes (torch-converted weights load unchanged), and the same numbers.
  assert jax.tree.map(np.shape, heads_first.init(jax.random.key(0), x)['params']) == jax.tree.map(np.shape, params)
  _, got, got_grads = _attention_outputs(heads_first, x, params)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert_trees_close(got_grads, want_grads, rtol=1e-5, atol=1e-5)
  # Former-DFER's bias-free qkv with its own head_dim.
  x = x[0]
  params, want, want_grads = _attention_outputs(layers.MultiHeadSelfAttention(2, qkv_bias=False, head_dim=8), x)
  _, got, got_grads = _attention_outputs(
      layers.MultiHeadSelfAttention(2, qkv_bias=False, head_dim=8, attention_layout='heads_first'), x, params)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert_trees_close(got_grads, want_grads, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('num_tokens, multiple', [(17, 2), (49, 8)])
def test_attention_padding_masks_exactly(num_tokens, multiple):
  x = jnp.float32(np.random.default_rng(7).normal(size=(3, num_tokens, 16)))
  params, want, want_grads = _attention_outputs(layers.MultiHeadSelfAttention(num_heads=2), x)
  _, got, got_grads = _attention_outputs(
      layers.MultiHeadSelfAttention(num_heads=2, attention_pad_multiple=multiple), x, params)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert_trees_close(got_grads, want_grads, rtol=1e-5, atol=1e-5)


def test_option_errors_are_loud():
  x = jnp.zeros((2, 5, 8))
  with pytest.raises(ValueError, match='attention_layout'):
    layers.MultiHeadSelfAttention(2, attention_layout='bhtd').init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='heads_first'):
    layers.MultiHeadSelfAttention(2, attention_layout='heads_first', attention_pad_multiple=2).init(
        jax.random.key(0), x)
  with pytest.raises(ValueError, match='stem_conv_impl'):
    fused.StemConv7(4, impl='winograd').init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


TINY = dict(num_classes=7, num_frames=4, embed_dim=32, num_layers=1, num_heads=2, mlp_ratio=2.0,
            drop_path_rate=0.0, backbone_width=8)


def test_stt_options_reach_the_layers():
  """The tiny STT with every option on (each is tested alone above) has the default's variables (checkpoints and
  the torch converter see no difference) and computes its training forward: logits and BatchNorm statistics."""
  option = dict(attention_layout='heads_first', stem_conv_impl='space_to_depth', max_pool_impl='argmax',
                norm_impl='fused')
  video = jnp.float32(np.random.default_rng(8).uniform(size=(2, 4, 32, 32, 3)))
  default, optioned = STT(**TINY), STT(**TINY, **option)
  variables = jax.jit(partial(default.init, train=False))(jax.random.key(0), video)
  assert jax.tree.map(np.shape, jax.eval_shape(partial(optioned.init, train=False), jax.random.key(0), video)) == \
      jax.tree.map(np.shape, variables)
  forward = jax.jit(lambda model: model.apply(variables, video, train=True, mutable=['batch_stats']), static_argnums=0)
  (want, _), want_stats = forward(default)
  (got, _), got_stats = forward(optioned)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert_trees_close(got_stats, want_stats, rtol=1e-5, atol=1e-6)
