"""Shared layers against torch: PostNormAttention = LN(x + MultiheadAttention(x)), the CEFLNet/EST block."""
import jax
import numpy as np
import pytest

from dferjax.models import layers


@pytest.fixture(autouse=True)
def highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def test_post_norm_attention_matches_torch_multihead_attention():
  torch = pytest.importorskip('torch')
  x = np.random.default_rng(0).normal(size=(3, 5, 16)).astype(np.float32)  # 3 sequences of 5 tokens
  module = layers.PostNormAttention(num_heads=4, dropout_rate=0.1)
  variables = module.init(jax.random.key(0), x, train=False)
  params = jax.tree.map(lambda a: torch.tensor(np.asarray(a)), variables['params'])
  reference = torch.nn.MultiheadAttention(16, 4, dropout=0.1, batch_first=True).eval()
  with torch.no_grad():  # the fused qkv Dense is torch's in-projection, transposed
    reference.in_proj_weight.copy_(params['attention']['qkv']['kernel'].T)
    reference.in_proj_bias.copy_(params['attention']['qkv']['bias'])
    reference.out_proj.weight.copy_(params['attention']['proj']['kernel'].T)
    reference.out_proj.bias.copy_(params['attention']['proj']['bias'])
    inputs = torch.tensor(x)
    attended, _ = reference(inputs, inputs, inputs)
    want = torch.nn.functional.layer_norm(inputs + attended, (16,), params['norm']['scale'], params['norm']['bias'])
  np.testing.assert_allclose(module.apply(variables, x, train=False), want.numpy(), atol=2e-6)
  # Training drops attention weights and the residual branch: random, and only then.
  first, second = (module.apply(variables, x, train=True, rngs={'dropout': jax.random.key(k)}) for k in (1, 2))
  assert np.abs(np.asarray(first) - np.asarray(second)).max() > 1e-3


def test_max_over_routes_the_gradient_to_one_maximal_element():
  x = np.array([[1.0, 3.0, 3.0, -2.0], [0.5, -1.0, 4.0, 4.0]], np.float32)  # ties in both rows
  np.testing.assert_array_equal(layers.max_over(x, axis=1), x.max(axis=1))
  gradient = np.asarray(jax.grad(lambda v: layers.max_over(v, axis=1).sum())(x))
  np.testing.assert_array_equal(gradient, [[0, 1, 0, 0], [0, 0, 1, 0]])  # the first maximum, as torch's max-pool
