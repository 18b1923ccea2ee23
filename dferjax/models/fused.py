"""Exact re-expressions of the STT step's memory-bound pieces, each a model option (issue 17), none the default.

The H200 profile (docs/performance.md) puts half the step in small memory-bound work: the stem's 7x7 conv on
3 channels, BN + ReLU + max-pool on the 56x56x64 stem maps, and BN/LN statistics and their gradients. Each
function here computes the same numbers as the default layers (tested forward and backward in
tests/test_fused.py) with fewer passes over memory or a better-shaped kernel; whether that is faster is a GPU
question (scripts/gpu_bench.sh stages), and they stay options until measured.
"""
from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

STEM_CONV_IMPLS = ('conv', 'space_to_depth')
NORM_IMPLS = ('flax', 'fused')


def space_to_depth_conv7(images: jax.Array, kernel: jax.Array) -> jax.Array:
  """torchvision's conv1 (7x7, stride 2, padding 3, no bias) as a 4x4 stride-1 conv on 2x2 pixel blocks.

  images: [n, height, width, c], kernel: [7, 7, c, features] -> [n, (height - 1) // 2 + 1, ..., features].
  With the input padded by 3, out[i, j] = sum_{a, b < 7} x[2i + a, 2j + b] . W[a, b]. Writing a = 2u + r
  (u < 4, r < 2) and zero-padding W to 8x8 turns this into sum_{u, v < 4} z[i + u, j + v] . K[u, v] with
  z[p, q, (r, s, c)] = x[2p + r, 2q + s, c] (12 channels instead of 3) and K[u, v, (r, s, c)] = W[2u + r, 2v + s, c]:
  the same products, so only the summation order differs. A stride-1 conv on 12 channels fills tensor cores
  better than a stride-2 one on 3.
  """
  if kernel.shape[:2] != (7, 7) or images.shape[-1] != kernel.shape[2]:
    raise ValueError(f'expected a [7, 7, {images.shape[-1]}, features] kernel, got {kernel.shape}')
  n, height, width, channels = images.shape
  features = kernel.shape[-1]
  out_height, out_width = (height - 1) // 2 + 1, (width - 1) // 2 + 1
  # Pad 3 on each side as conv1 does, plus one more row/column where needed for an even size.
  padded = jnp.pad(images, ((0, 0), (3, 3 + (height % 2)), (3, 3 + (width % 2)), (0, 0)))
  blocks_h, blocks_w = padded.shape[1] // 2, padded.shape[2] // 2
  blocks = padded.reshape(n, blocks_h, 2, blocks_w, 2, channels).transpose(0, 1, 3, 2, 4, 5)
  blocks = blocks.reshape(n, blocks_h, blocks_w, 4 * channels)  # channel order (r, s, c)
  kernel8 = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))
  kernel4 = kernel8.reshape(4, 2, 4, 2, channels, features).transpose(0, 2, 1, 3, 4, 5)
  kernel4 = kernel4.reshape(4, 4, 4 * channels, features)
  out = jax.lax.conv_general_dilated(blocks, kernel4, (1, 1), 'VALID',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  assert out.shape[1:3] == (blocks_h - 3, blocks_w - 3), out.shape
  return out[:, :out_height, :out_width]


class StemConv7(nn.Module):
  """conv1 of torchvision's ResNet with the parameter `kernel` [7, 7, 3, features] as nn.Conv names it, so
  checkpoints and the torch converter do not see which implementation runs."""
  features: int
  impl: str = 'conv'  # or 'space_to_depth' (space_to_depth_conv7)
  kernel_init: Any = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    if self.impl not in STEM_CONV_IMPLS:
      raise ValueError(f'stem_conv_impl {self.impl!r} not in {STEM_CONV_IMPLS}')
    kernel = self.param('kernel', self.kernel_init, (7, 7, images.shape[-1], self.features), self.param_dtype)
    images, kernel = jnp.asarray(images, self.dtype), jnp.asarray(kernel, self.dtype)
    if self.impl == 'space_to_depth':
      return space_to_depth_conv7(images, kernel)
    return jax.lax.conv_general_dilated(images, kernel, (2, 2), ((3, 3), (3, 3)),
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _pool_views(x: jax.Array) -> list[jax.Array]:
  """The nine strided views of the -inf-padded x whose elementwise max is the 3x3 / stride 2 / pad 1 pool."""
  n, height, width, channels = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  out_height, out_width = (height - 1) // 2 + 1, (width - 1) // 2 + 1
  return [jax.lax.slice(padded, (0, row, col, 0), (n, row + 2 * out_height - 1, col + 2 * out_width - 1, channels),
                        (1, 2, 2, 1)) for row in range(3) for col in range(3)]


@jax.custom_vjp
def relu_max_pool(x: jax.Array) -> jax.Array:
  """relu(max_pool_3x3_stride_2(x)) (= the pool of relu(x): both are monotone), with a gradient that reuses the
  forward's argmax (one int8 per output) instead of XLA's select-and-scatter, which re-reads the input.

  x: [n, height, width, channels] (the stem's BN output) -> [n, (height - 1) // 2 + 1, ..., channels]. The
  gradient goes to the first maximal element of each window (row-major), like torch; ReLU after the pool also
  runs on a quarter of the elements.
  """
  return _relu_max_pool_fwd(x)[0]


def _relu_max_pool_fwd(x):
  views = jnp.stack(_pool_views(x))  # [9, n, h', w', c]
  index = jnp.argmax(views, axis=0).astype(jnp.int8)
  pooled = jnp.max(views, axis=0)
  return jnp.maximum(pooled, 0), (index, pooled > 0, x.shape)


def _relu_max_pool_bwd(residuals, grad):
  index, positive, shape = residuals
  n, height, width, channels = shape
  grad = jnp.where(positive, grad, 0)
  zero = jnp.zeros((), grad.dtype)
  total = None
  for k in range(9):  # the transpose of each strided view: interior padding puts it back on the input grid
    row, col = divmod(k, 3)
    out_height, out_width = grad.shape[1:3]
    config = ((0, 0, 0), (row, height + 2 - row - 2 * out_height + 1, 1),
              (col, width + 2 - col - 2 * out_width + 1, 1), (0, 0, 0))
    placed = jax.lax.pad(jnp.where(index == k, grad, zero), zero, config)
    total = placed if total is None else total + placed
  return (total[:, 1:height + 1, 1:width + 1],)


relu_max_pool.defvjp(_relu_max_pool_fwd, _relu_max_pool_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _normalize(x, scale, bias, reduction_axes, epsilon):
  return _normalize_fwd(x, scale, bias, reduction_axes, epsilon)[0]


def _normalize_fwd(x, scale, bias, reduction_axes, epsilon):
  # Flax's statistics: float32, one pass, E[x^2] - E[x]^2 clipped at 0.
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = xf.mean(reduction_axes, keepdims=True)
  var = jnp.maximum(0.0, (xf * xf).mean(reduction_axes, keepdims=True) - mean * mean)
  rstd = jax.lax.rsqrt(var + epsilon)
  y = (xf - mean) * (rstd * scale) + bias
  return (y, mean, var), (x, mean, rstd, scale)


def _normalize_bwd(reduction_axes, epsilon, residuals, cotangents):
  """The closed-form gradient: two reductions (of dy and dy * x_hat) in one pass; the statistics' own
  cotangents are dropped (callers stop their gradient)."""
  del epsilon
  x, mean, rstd, scale = residuals
  grad = cotangents[0].astype(mean.dtype)
  x_hat = (x.astype(mean.dtype) - mean) * rstd
  param_axes = tuple(range(x.ndim - 1))
  grad_bias = grad.sum(param_axes)
  grad_scale = (grad * x_hat).sum(param_axes)
  grad_x_hat = grad * scale
  grad_x = rstd * (grad_x_hat - grad_x_hat.mean(reduction_axes, keepdims=True)
                   - x_hat * (grad_x_hat * x_hat).mean(reduction_axes, keepdims=True))
  return grad_x.astype(x.dtype), grad_scale.astype(scale.dtype), grad_bias.astype(scale.dtype)


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def normalize(x: jax.Array, scale: jax.Array, bias: jax.Array, reduction_axes: Sequence[int], epsilon: float):
  """(x - mean) / sqrt(var + epsilon) * scale + bias over `reduction_axes` (features last) in float32, as flax's
  LayerNorm/BatchNorm compute it, with a hand-written backward pass. Returns (y float32, mean, var) with the
  statistics keepdims and gradient-free."""
  y, mean, var = _normalize(x, scale, bias, tuple(sorted(a % x.ndim for a in reduction_axes)), epsilon)
  return y, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)


class FusedLayerNorm(nn.Module):
  """nn.LayerNorm (scale, bias; statistics over the last axis) with normalize's backward pass."""
  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (features,), self.param_dtype)
    y, _, _ = normalize(x, scale, bias, (x.ndim - 1,), self.epsilon)
    return y.astype(self.dtype)


class FusedBatchNorm(nn.Module):
  """nn.BatchNorm over all axes but the last (params scale/bias, batch_stats mean/var, the same momentum
  update with the biased batch variance), training statistics through normalize."""
  use_running_average: bool
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((features,), jnp.float32))
    scale = self.param('scale', nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (features,), self.param_dtype)
    if self.use_running_average:  # eval: an affine map, nothing to fuse
      mul = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale
      return ((x - ra_mean.value) * mul + bias).astype(self.dtype)
    y, mean, var = normalize(x, scale, bias, tuple(range(x.ndim - 1)), self.epsilon)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean.reshape(features)
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var.reshape(features)
    return y.astype(self.dtype)
