"""Transformer pieces shared by the video models: pre-LN attention, MLP, stochastic depth, position tables.

Everything works on token arrays `[*batch, tokens, dim]` with any number of leading batch axes, so a
factorised space-time model attends over positions with `[batch, frames, positions, dim]` and over time
with `[batch, positions, frames, dim]` without flattening to one token list.
"""
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dferjax.models import pallas_attention

# 'xla'/'cudnn': jax.nn.dot_product_attention's implementations; 'pallas': pallas_attention.attention, one fused
# forward and one backward kernel per (sequence, head), tokens padded inside (issue 17).
ATTENTION_IMPLS = ('xla', 'cudnn', 'pallas')
# 'tokens_heads': one qkv Dense, reshaped to [batch, tokens, heads, head_dim] for jax.nn.dot_product_attention;
# 'heads_first': the same parameters applied as einsums that yield [batch, heads, tokens, head_dim] directly and
# merge heads inside the output projection, so no separate head split/merge transposes (issue 17).
ATTENTION_LAYOUTS = ('tokens_heads', 'heads_first')

# PyTorch's nn.Linear default (kaiming_uniform with a=sqrt(5)) = U(+-1/sqrt(fan_in)) for weight and bias.
torch_linear_kernel_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def torch_linear_bias_init(fan_in: int):
  """U(+-1/sqrt(fan_in)), PyTorch's Linear/Conv bias default; flax's bias_init cannot see fan_in."""
  bound = 1 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def torch_dense(features: int, in_features: int, kernel_init=None, **kwargs) -> nn.Dense:
  """nn.Dense initialised like torch.nn.Linear (or with `kernel_init`, where the reference code re-draws weights)."""
  return nn.Dense(features, kernel_init=kernel_init or torch_linear_kernel_init,
                  bias_init=torch_linear_bias_init(in_features), **kwargs)


# torch's kaiming_uniform_(a=0) on a weight: U(+-sqrt(6 / fan_in)) (EST's transformer re-draws its weights so).
kaiming_uniform = nn.initializers.variance_scaling(2.0, 'fan_in', 'uniform')


def merge_frames(video: jax.Array) -> jax.Array:
  """[batch, frames, *rest] -> [batch * frames, *rest], for running a 2D backbone per frame."""
  if video.ndim < 3:
    raise ValueError(f'expected [batch, frames, ...], got shape {video.shape}')
  return video.reshape((-1,) + video.shape[2:])


def split_frames(x: jax.Array, num_frames: int) -> jax.Array:
  """[batch * frames, *rest] -> [batch, frames, *rest]."""
  if x.shape[0] % num_frames:
    raise ValueError(f'leading axis {x.shape[0]} of {x.shape} is not a multiple of num_frames={num_frames}')
  return x.reshape((x.shape[0] // num_frames, num_frames) + x.shape[1:])


def flatten_positions(feature_map: jax.Array) -> jax.Array:
  """[n, height, width, channels] -> [n, height * width, channels], row-major like torch's flatten(2)."""
  if feature_map.ndim != 4:
    raise ValueError(f'expected [n, height, width, channels], got shape {feature_map.shape}')
  n, height, width, channels = feature_map.shape
  return feature_map.reshape(n, height * width, channels)


class MultiHeadSelfAttention(nn.Module):
  """Self-attention over axis -2 of `x: [*batch, tokens, dim]`; leading axes are independent sequences.

  One fused `qkv` Dense whose outputs are ordered (q|k|v, head, head_dim), as timm/mx-mark's
  `Linear(dim, 3 * dim)`, so torch weights copy over with a transpose.
  """
  num_heads: int
  qkv_bias: bool = True
  head_dim: Optional[int] = None  # None: dim // num_heads; else inner width num_heads * head_dim (Former-DFER)
  attention_dropout: float = 0.0  # on the attention weights, as torch's nn.MultiheadAttention(dropout=...)
  attention_impl: str = 'xla'  # 'cudnn': flash attention on GPU (bf16/fp16 only); 'pallas': pallas_attention
  attention_layout: str = 'tokens_heads'  # or 'heads_first' (ATTENTION_LAYOUTS), same parameters
  attention_pad_multiple: int = 1  # pad tokens to a multiple (49 -> 50/56/64 at 2/8/32), masked by sequence lengths
  kernel_init: Optional[Any] = None  # None: torch.nn.Linear's default for qkv and proj
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f'attention_impl {self.attention_impl!r} not in {ATTENTION_IMPLS}')
    if self.attention_layout not in ATTENTION_LAYOUTS:
      raise ValueError(f'attention_layout {self.attention_layout!r} not in {ATTENTION_LAYOUTS}')
    if self.attention_pad_multiple < 1:
      raise ValueError(f'attention_pad_multiple={self.attention_pad_multiple} must be >= 1')
    if self.attention_layout == 'heads_first' and (self.attention_impl != 'xla' or self.attention_pad_multiple != 1):
      raise ValueError("attention_layout='heads_first' computes its own softmax: it needs attention_impl='xla' and "
                       'attention_pad_multiple=1')
    if self.attention_impl == 'pallas' and self.attention_pad_multiple != 1:
      raise ValueError("attention_impl='pallas' pads the tokens itself: attention_pad_multiple must be 1, "
                       f'got {self.attention_pad_multiple}')
    if self.attention_impl == 'pallas' and self.attention_dropout:
      raise ValueError("attention_impl='pallas' has no dropout on the weights: attention_dropout must be 0, "
                       f'got {self.attention_dropout}')
    *batch_shape, num_tokens, dim = x.shape
    if self.head_dim is None and dim % self.num_heads:
      raise ValueError(f'dim {dim} is not divisible by num_heads {self.num_heads}')
    head_dim = self.head_dim or dim // self.num_heads
    inner_dim = self.num_heads * head_dim
    dropout = self.attention_dropout and not deterministic
    if self.attention_layout == 'heads_first':
      qkv = HeadsFirstQKV(self.num_heads, head_dim, self.qkv_bias, self.kernel_init, dtype=self.dtype,
                          param_dtype=self.param_dtype, name='qkv')(x)  # [3, *batch, heads, tokens, head_dim]
      query, key, value = qkv[0], qkv[1], qkv[2]
      logits = jnp.einsum('...hqd,...hkd->...hqk', query, key, preferred_element_type=jnp.float32)
      weights = jax.nn.softmax(logits * jnp.float32(1 / math.sqrt(head_dim)), axis=-1)
      if dropout:
        weights = nn.Dropout(self.attention_dropout)(weights, deterministic=False)
      out = jnp.einsum('...hqk,...hkd->...hqd', weights.astype(value.dtype), value)
      return HeadsMergeProj(dim, self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype, name='proj')(out)
    num_padded = -(-num_tokens // self.attention_pad_multiple) * self.attention_pad_multiple
    if num_padded != num_tokens:  # padding rows: masked as keys, zeroed as queries, sliced off below
      x = jnp.pad(x, [(0, 0)] * len(batch_shape) + [(0, num_padded - num_tokens), (0, 0)])
    qkv = torch_dense(3 * inner_dim, dim, self.kernel_init, use_bias=self.qkv_bias, dtype=self.dtype,
                      param_dtype=self.param_dtype, name='qkv')(x)
    # jax.nn.dot_product_attention wants exactly [batch, tokens, heads, head_dim].
    qkv = qkv.reshape(-1, num_padded, 3, self.num_heads, head_dim)
    query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if dropout:  # dropped weights: the explicit softmax path
      if num_padded != num_tokens:
        raise ValueError('attention_pad_multiple > 1 has no attention-dropout path')
      logits = jnp.einsum('bqhd,bkhd->bhqk', query, key) / math.sqrt(head_dim)
      weights = nn.Dropout(self.attention_dropout)(jax.nn.softmax(logits.astype(jnp.float32), axis=-1),
                                                   deterministic=False).astype(value.dtype)
      out = jnp.einsum('bhqk,bkhd->bqhd', weights, value).reshape(*batch_shape, num_tokens, inner_dim)
      return torch_dense(dim, inner_dim, self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype,
                         name='proj')(out)
    lengths = {}
    if num_padded != num_tokens:  # a padding mask without bias, which cuDNN accepts at any length (issue 17)
      lengths = jnp.full(query.shape[:1], num_tokens, jnp.int32)
      lengths = dict(query_seq_lengths=lengths, key_value_seq_lengths=lengths)
    if self.attention_impl == 'pallas':  # pads to a power of two inside (num_padded == num_tokens here)
      out = pallas_attention.attention(query, key, value)
    else:
      try:
        out = jax.nn.dot_product_attention(query, key, value, implementation=self.attention_impl, **lengths)
      except NotImplementedError as error:  # cuDNN refuses some shapes, e.g. STT's odd 49/17-token training
        raise ValueError(
            f"attention_impl='{self.attention_impl}' cannot run {num_padded} tokens with head_dim {head_dim} "
            f"({error}); set config.model.attention_impl='xla', or attention_pad_multiple to pad them") from error
    out = out.reshape(*batch_shape, num_padded, inner_dim)
    out = torch_dense(dim, inner_dim, self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype,
                      name='proj')(out)
    return out[..., :num_tokens, :] if num_padded != num_tokens else out


class HeadsFirstQKV(nn.Module):
  """The qkv Dense (kernel [dim, 3 * heads * head_dim], bias [3 * heads * head_dim], outputs ordered
  (q|k|v, head, head_dim)) as one einsum to [3, *batch, heads, tokens, head_dim]."""
  num_heads: int
  head_dim: int
  use_bias: bool = True
  kernel_init: Optional[Any] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # x: [*batch, tokens, dim]
    dim, inner_dim = x.shape[-1], self.num_heads * self.head_dim
    kernel = self.param('kernel', self.kernel_init or torch_linear_kernel_init, (dim, 3 * inner_dim),
                        self.param_dtype)
    kernel = jnp.asarray(kernel, self.dtype).reshape(dim, 3, self.num_heads, self.head_dim)
    out = jnp.einsum('...tc,cshd->s...htd', jnp.asarray(x, self.dtype), kernel)
    if self.use_bias:
      bias = self.param('bias', torch_linear_bias_init(dim), (3 * inner_dim,), self.param_dtype)
      bias = jnp.asarray(bias, self.dtype).reshape((3,) + (1,) * (x.ndim - 2) + (self.num_heads, 1, self.head_dim))
      out = out + bias
    return out


class HeadsMergeProj(nn.Module):
  """The output projection Dense (kernel [heads * head_dim, dim], bias [dim]) applied to
  [*batch, heads, tokens, head_dim], merging the heads inside the contraction -> [*batch, tokens, dim]."""
  features: int
  kernel_init: Optional[Any] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    num_heads, head_dim = x.shape[-3], x.shape[-1]
    inner_dim = num_heads * head_dim
    kernel = self.param('kernel', self.kernel_init or torch_linear_kernel_init, (inner_dim, self.features),
                        self.param_dtype)
    kernel = jnp.asarray(kernel, self.dtype).reshape(num_heads, head_dim, self.features)
    out = jnp.einsum('...htd,hdf->...tf', jnp.asarray(x, self.dtype), kernel)
    bias = self.param('bias', torch_linear_bias_init(inner_dim), (self.features,), self.param_dtype)
    return out + jnp.asarray(bias, self.dtype)


class Mlp(nn.Module):
  """Dense -> GELU -> Dense on the last axis; hidden width `hidden_dim` or `mlp_ratio * dim`."""
  mlp_ratio: float = 4.0
  hidden_dim: Optional[int] = None
  approximate_gelu: bool = False  # False: exact erf GELU (torch nn.GELU); True: tanh form (Former-DFER)
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    dim = x.shape[-1]
    hidden_dim = self.hidden_dim or int(dim * self.mlp_ratio)
    dense = lambda features, in_features, name: torch_dense(
        features, in_features, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    x = dense(hidden_dim, dim, 'fc1')(x)
    x = jax.nn.gelu(x, approximate=self.approximate_gelu)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = dense(dim, hidden_dim, 'fc2')(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class PostNormAttention(nn.Module):
  """LN(x + Dropout(SelfAttention(x))), SelfAttention = torch's nn.MultiheadAttention (biased in-projection,
  dropout on the weights): CEFLNet's self-attention layer and EST's AA-SFE (refs.md §1.6, §1.7).
  x: [*batch, tokens, dim]; the 'dropout' RNG stream in training."""
  num_heads: int = 4
  dropout_rate: float = 0.1
  kernel_init: Optional[Any] = None  # None: torch.nn.Linear's default
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    attended = MultiHeadSelfAttention(self.num_heads, qkv_bias=True, attention_dropout=self.dropout_rate,
                                      kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype,
                                      name='attention')(x, deterministic=not train)
    attended = nn.Dropout(self.dropout_rate)(attended, deterministic=not train)
    return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype, name='norm')(x + attended)


class PreNormBlock(nn.Module):
  """Former-DFER's transformer layer (lucidrains ViT): x + Attn(LN(x)), then x + MLP(LN(x)); no final LN.
  Attention: qkv without bias, `num_heads` x `head_dim` inner width; MLP: GELU in its tanh form (refs.md §1.1)."""
  num_heads: int
  head_dim: int
  mlp_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # x: [*batch, tokens, dim]
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    x = x + MultiHeadSelfAttention(self.num_heads, qkv_bias=False, head_dim=self.head_dim, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name='attention')(norm('attention_norm')(x))
    mlp = Mlp(hidden_dim=self.mlp_dim, approximate_gelu=True, dtype=self.dtype, param_dtype=self.param_dtype,
              name='mlp')
    return x + mlp(norm('mlp_norm')(x), deterministic=True)


class DropPath(nn.Module):
  """Stochastic depth: zeroes a residual branch per batch element and rescales survivors by 1/(1-rate).

  `batch_ndim` leading axes each get their own draw, e.g. 2 on `[batch, frames, positions, dim]` drops per
  (sample, frame) as torch does on its reshaped `[(batch frames), positions, dim]`. `x` may be a pytree
  whose leaves share those leading axes; they then share one mask. Uses the 'drop_path' rng collection.
  """
  rate: float
  batch_ndim: int = 1

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    leaves = jax.tree.leaves(x)
    mask_shape = leaves[0].shape[:self.batch_ndim]
    if any(leaf.shape[:self.batch_ndim] != mask_shape for leaf in leaves):
      raise ValueError(f'DropPath leaves disagree on the first {self.batch_ndim} axes: '
                       f'{[leaf.shape for leaf in leaves]}')
    keep_prob = 1.0 - self.rate
    keep = jax.random.bernoulli(self.make_rng('drop_path'), keep_prob, mask_shape)

    def apply(leaf):
      scale = keep.reshape(mask_shape + (1,) * (leaf.ndim - self.batch_ndim)) / keep_prob
      return leaf * scale.astype(leaf.dtype)

    return jax.tree.map(apply, x)


class PositionEmbedding(nn.Module):
  """Adds a learnable table `[x.shape[axis], x.shape[-1]]` (trunc-normal 0.02) along `axis` of x."""
  axis: int = -2
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    axis = self.axis % x.ndim
    if axis == x.ndim - 1:
      raise ValueError('PositionEmbedding axis must not be the feature axis')
    table = self.param('embedding', nn.initializers.truncated_normal(0.02),
                       (x.shape[axis], x.shape[-1]), self.param_dtype)
    shape = [1] * x.ndim
    shape[axis], shape[-1] = x.shape[axis], x.shape[-1]
    return x + table.reshape(shape).astype(x.dtype)


def max_over(x: jax.Array, axis: int) -> jax.Array:
  """x.max(axis) with the gradient on one maximal element, as torch's max-pooling routes it.

  jnp.max's gradient goes to every element equal to the max; XLA may compute the compared copy of x one ulp apart
  from the maximised one (seen on CPU without optimisations), leaving no element equal and a 0/0 gradient.
  """
  index = jnp.expand_dims(x.argmax(axis=axis), axis)
  return jnp.take_along_axis(x, index, axis=axis).squeeze(axis)


def drop_path_rates(max_rate: float, num_layers: int) -> list[float]:
  """Linearly growing stochastic-depth rates, 0 for the first layer (timm / mx-mark convention)."""
  return [float(rate) for rate in np.linspace(0.0, max_rate, num_layers)]
