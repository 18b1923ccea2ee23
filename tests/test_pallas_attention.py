"""attention_impl='pallas': the kernels (interpret mode on CPU, so their own code) against float64 numpy and
jax.nn.dot_product_attention, inside a tiny STT, and lowered to Triton for CUDA without a GPU."""
import os
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dferjax import configlib, models, sharding
from dferjax.models import layers, pallas_attention

TINY_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tiny_config.py')


def reference(query, key, value):
  """softmax(q k^T / sqrt(head_dim)) v in float64; [batch, tokens, heads, head_dim] -> (out, probs)."""
  logits = np.einsum('bqhd,bkhd->bhqk', query, key) / np.sqrt(query.shape[-1])
  probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
  probs /= probs.sum(axis=-1, keepdims=True)
  return np.einsum('bhqk,bkhd->bqhd', probs, value), probs


def reference_grads(query, key, value, out_grad):
  """d/dq, d/dk, d/dv of sum(out * out_grad) in float64, by the chain rule through the softmax."""
  _, probs = reference(query, key, value)
  value_grad = np.einsum('bhqk,bqhd->bkhd', probs, out_grad)
  probs_grad = np.einsum('bqhd,bkhd->bhqk', out_grad, value)
  logits_grad = probs * (probs_grad - (probs * probs_grad).sum(axis=-1, keepdims=True)) / np.sqrt(query.shape[-1])
  return (np.einsum('bhqk,bkhd->bqhd', logits_grad, key), np.einsum('bhqk,bqhd->bkhd', logits_grad, query),
          value_grad)


def _inputs(num_tokens, head_dim, seed):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(2, num_tokens, 2, head_dim)) for _ in range(4)]  # query, key, value, out_grad


def test_reference_grads_are_the_derivative():
  """The float64 gradients below are the directional derivative of the float64 attention (central differences)."""
  *operands, out_grad = _inputs(17, 16, seed=0)
  grads = reference_grads(*operands, out_grad)
  rng, step = np.random.default_rng(1), 1e-6
  for _ in range(3):
    directions = [rng.normal(size=x.shape) for x in operands]
    loss = lambda sign: (reference(*(x + sign * step * d for x, d in zip(operands, directions)))[0] * out_grad).sum()
    want = (loss(1) - loss(-1)) / (2 * step)
    np.testing.assert_allclose(sum((g * d).sum() for g, d in zip(grads, directions)), want, rtol=1e-7)


@pytest.mark.parametrize('num_tokens, head_dim', [(49, 16), (17, 12)])  # 49 -> 64, 17 -> 32; head_dim 12 -> 16
def test_outputs_and_grads_match_float64_and_jax(num_tokens, head_dim):
  *operands, out_grad = _inputs(num_tokens, head_dim, seed=2)
  query, key, value = map(jnp.float32, operands)
  loss = lambda attention, *operands: (attention(*operands) * jnp.float32(out_grad)).sum()
  grad = lambda attention: jax.jit(jax.grad(partial(loss, attention), argnums=(0, 1, 2)))(query, key, value)
  got, got_grads = jax.jit(pallas_attention.attention)(query, key, value), grad(pallas_attention.attention)
  want, want_grads = reference(*operands)[0], reference_grads(*operands, out_grad)
  assert got.shape == query.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  for name, got_grad, want_grad in zip('qkv', got_grads, want_grads):
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-5, err_msg=f'd{name}')
  # And against jax's own attention in float32 (autodiff of its XLA path).
  np.testing.assert_allclose(got, jax.nn.dot_product_attention(query, key, value), rtol=1e-5, atol=1e-6)
  for name, got_grad, want_grad in zip('qkv', got_grads, grad(jax.nn.dot_product_attention)):
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-5, err_msg=f'd{name}')


def test_bfloat16_stays_bfloat16_near_float64():
  *operands, out_grad = _inputs(17, 16, seed=3)
  query, key, value = (jnp.asarray(x, jnp.bfloat16) for x in operands)
  operands = [np.float64(np.float32(x)) for x in (query, key, value)]  # the rounded inputs, exactly
  loss = lambda *operands: (pallas_attention.attention(*operands).astype(jnp.float32) * jnp.float32(out_grad)).sum()
  got = jax.jit(pallas_attention.attention)(query, key, value)
  got_grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(query, key, value)
  assert got.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in got_grads)
  for got_x, want_x in zip([got, *got_grads], [reference(*operands)[0], *reference_grads(*operands, out_grad)]):
    # bf16 probabilities, dO and dS (8 bits) into float32-accumulated matmuls, then one bf16 rounding.
    np.testing.assert_allclose(np.float32(got_x), want_x, rtol=2**-6, atol=2**-6 * np.abs(want_x).max())


def test_stt_with_pallas_attention_matches_default():
  """The end-to-end tests' tiny STT (4 positions, 5 time steps) built from its config, with attention_impl='pallas':
  the same variables, training logits and gradients of every parameter after the backbone (patch_embed's and the
  position tables' carry the gradient the backbone would get; leaving the backbone's out halves the compile)."""
  config = configlib.load_config(TINY_CONFIG)
  video = jnp.float32(np.random.default_rng(4).uniform(size=(2, 4, 32, 32, 3)))
  weights = jnp.float32(np.random.default_rng(5).normal(size=(2, 7)))
  default = models.build(config.model_name, 7, **config.model)
  with config.unlocked():
    config.model.attention_impl = 'pallas'
  pallas = models.build(config.model_name, 7, **config.model)
  shapes = jax.eval_shape(partial(default.init, train=False), jax.random.key(0), video)
  assert jax.tree.map(np.shape, jax.eval_shape(partial(pallas.init, train=False), jax.random.key(0), video)) == \
      jax.tree.map(np.shape, shapes)
  rng = np.random.default_rng(6)  # random variables without compiling init: O(1) activations at every layer
  draw = lambda x: jnp.float32(rng.normal(size=x.shape) / np.sqrt(np.prod(x.shape[:-1]) if x.ndim > 1 else 10))
  params = jax.tree.map(draw, shapes['params'])
  backbone, transformer = params['backbone'], {name: p for name, p in params.items() if name != 'backbone'}
  batch_stats = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), shapes['batch_stats'])  # train: only updated

  def loss(model, transformer):
    (logits, _), _ = model.apply({'params': {'backbone': backbone, **transformer}, 'batch_stats': batch_stats}, video, train=True,
                                 mutable=['batch_stats'], rngs={'drop_path': jax.random.key(1)})
    return (logits * weights).sum(), logits

  grads = jax.jit(jax.grad(loss, argnums=1, has_aux=True), static_argnums=0)
  want_grads, want = grads(default, transformer)
  got_grads, got = grads(pallas, transformer)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  for path, got_grad in jax.tree_util.tree_leaves_with_path(got_grads):
    want_grad = want_grads
    for key in path:
      want_grad = want_grad[key.key]
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def _collectives(hlo_text):
  return {op: len(re.findall(rf'= \S+ {op}(-start)?\(', hlo_text))
          for op in ('all-gather', 'all-to-all', 'collective-permute', 'all-reduce')}


@pytest.mark.parametrize('spec', [jax.sharding.PartitionSpec('data'),  # the trainer's batch sharding
                                  jax.sharding.PartitionSpec(None, None, 'data')])  # heads
def test_sharded_batch_or_heads_runs_per_device_without_collectives(spec):
  """The value and gradient jitted over 2 devices: equal to one device's, and each device runs the kernels on its
  own sequences or heads. Without the custom partitioning every operand was all-gathered (3 in the forward, 6 in
  value_and_grad); the one all-reduce left is the loss's sum, as in jax.nn.dot_product_attention's program."""
  assert jax.device_count() == 2, 'conftest.py asks for 2 host devices'
  in_sharding = jax.sharding.NamedSharding(sharding.make_mesh(), spec)
  *operands, out_grad = _inputs(17, 12, seed=7)  # [2, 17, 2, 12]: batch and heads both split in two
  query, key, value = (jax.device_put(jnp.float32(x), in_sharding) for x in operands)
  loss = lambda attention, *operands: (attention(*operands) * jnp.float32(out_grad)).sum()
  value_and_grad = lambda attention: jax.value_and_grad(partial(loss, attention), argnums=(0, 1, 2))
  sharded = lambda attention: jax.jit(value_and_grad(attention), in_shardings=(in_sharding,) * 3)
  want = jax.jit(value_and_grad(pallas_attention.attention))(*map(np.float32, operands))  # one device
  got = sharded(pallas_attention.attention)(query, key, value)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for name, got_grad, want_grad in zip('qkv', got[1], want[1]):
    assert got_grad.sharding.is_equivalent_to(in_sharding, 4), name
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-6, atol=1e-6, err_msg=f'd{name}')
  hlo, xla_hlo = (sharded(attention).lower(query, key, value).compile().as_text()
                  for attention in (pallas_attention.attention, jax.nn.dot_product_attention))
  local_shape = 'f32[1,32,2,16]' if spec == jax.sharding.PartitionSpec('data') else 'f32[2,32,1,16]'
  assert local_shape in hlo  # the padded operands the kernels see: half the batch or half the heads
  assert _collectives(hlo) == _collectives(xla_hlo) == {
      'all-gather': 0, 'all-to-all': 0, 'collective-permute': 0, 'all-reduce': 1}


def test_lowers_to_triton_for_cuda_without_a_gpu():
  """Paper shapes (49 and 17 tokens, 8 heads of 64), forward and gradient, exported for CUDA on this host: the
  Triton lowering runs (block shapes, ops it supports) and yields one kernel per direction, no interpreter loop.
  What it cannot catch: Triton's own compilation to PTX, which happens on the GPU."""
  triton = '__gpu$xla.gpu.triton'
  for dtype in (jnp.bfloat16, jnp.float32):
    for num_tokens, batch in [(49, 2), (17, 3)]:
      spec = jax.ShapeDtypeStruct((batch, num_tokens, 8, 64), dtype)
      loss = lambda *operands: pallas_attention.attention(*operands).astype(jnp.float32).sum()
      exported = jax.export.export(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))), platforms=['cuda'],
                                   disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)])(
                                       spec, spec, spec)
      module = exported.mlir_module()
      assert module.count(f'@{triton}(') == 2, (dtype, num_tokens)
      assert 'stablehlo.while' not in module  # the interpret-mode branch was not lowered


def test_option_errors_are_loud():
  x = jnp.zeros((2, 5, 8))
  for fields, match in [(dict(attention_pad_multiple=2), 'attention_pad_multiple'),
                        (dict(attention_dropout=0.1), 'attention_dropout'),
                        (dict(attention_layout='heads_first'), 'heads_first')]:
    with pytest.raises(ValueError, match=match):
      layers.MultiHeadSelfAttention(2, attention_impl='pallas', **fields).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='one shape'):
    pallas_attention.attention(jnp.zeros((2, 5, 2, 8)), jnp.zeros((2, 6, 2, 8)), jnp.zeros((2, 6, 2, 8)))
