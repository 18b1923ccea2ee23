"""Softmax attention over short sequences (STT's 49 spatial and 17 temporal tokens) as two Pallas kernels.

`attention(query, key, value)` computes softmax(q k^T * scale) v on `[batch, tokens, heads, head_dim]`, as
`jax.nn.dot_product_attention` without mask or bias. One program of the forward kernel and one of the backward
kernel each hold a whole (sequence, head) pair: the `[tokens, tokens]` logits never leave on-chip memory, and
the heads are read in place (block `[tokens, head_dim]` of `[batch, tokens, heads, head_dim]`, strided), so
there is no head split/merge transpose. The forward saves the rows' log-sum-exp; the backward recomputes the
probabilities from q, k and it (the flash-attention backward, here without tiling: a sequence is one tile).

Triton wants power-of-two blocks of at least 16, so the wrapper pads the tokens (49 -> 64, 17 -> 32) and the
head_dim with zeros. Padded keys are masked before the softmax; padded query rows and head_dim columns are
sliced off (zero-padded q and k columns add nothing to q k^T).

Backend: `jax.lax.platform_dependent` picks the compiled Triton kernels where the computation is lowered for
CUDA or ROCm, and the same kernels under `interpret=True` (plain XLA, slow) anywhere else: the CPU tests run
the kernel code itself, and `jax.export(..., platforms=['cuda'])` on a CPU-only host lowers the Triton one.

Several devices: XLA's SPMD partitioner cannot see into the Triton custom call (nor, usefully, into the interpreter's
loop), so left alone it would all-gather every operand and run the kernels on the whole batch on every device.
The forward and backward calls are therefore `jax.experimental.custom_partitioning` ops with a Shardy sharding
rule: batch and heads keep the operands' sharding (the trainer's `P('data')` batch), tokens and head_dim are
replicated if sharded, and each device runs the kernels on its own sequences and heads with no collective.
On one device the calls lower as they are.
"""
import math
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.custom_partitioning import custom_partitioning
from jax.experimental.pallas import triton as plgpu
from jax.sharding import NamedSharding, PartitionSpec as P

# A finite "minus infinity" for masked logits: exp(_MASKED - row max) is exactly 0 in float32, and unlike -inf it
# cannot produce inf - inf = nan.
_MASKED = -1e30
# One warp group per (sequence, head): a 64 x 64 float32 tile is 32 registers per thread. Nothing to pipeline.
_COMPILER_PARAMS = plgpu.CompilerParams(num_warps=4, num_stages=1)


def padded_length(length: int) -> int:
  """The block length Triton takes for `length`: a power of two, at least 16 (its smallest dot)."""
  return max(16, 1 << (length - 1).bit_length())


def attention(query: jax.Array, key: jax.Array, value: jax.Array, scale: Optional[float] = None) -> jax.Array:
  """softmax(query key^T * scale) value per (batch, head), `scale` defaulting to 1/sqrt(head_dim).

  query, key, value: [batch, tokens, heads, head_dim] (float32 or bfloat16, one dtype) -> the same shape and
  dtype. Logits, softmax and the matmuls' accumulation are float32; the probabilities are cast to the input
  dtype before they multiply value, as jax.nn.dot_product_attention's XLA path does.
  """
  if query.ndim != 4 or key.shape != query.shape or value.shape != query.shape:
    raise ValueError(f'expected query, key and value of one shape [batch, tokens, heads, head_dim], got '
                     f'{query.shape}, {key.shape}, {value.shape} (self-attention only)')
  if not query.dtype == key.dtype == value.dtype:
    raise ValueError(f'query, key and value dtypes differ: {query.dtype}, {key.dtype}, {value.dtype}')
  _, num_tokens, _, head_dim = query.shape
  scale = 1 / math.sqrt(head_dim) if scale is None else float(scale)
  pad = [(0, 0), (0, padded_length(num_tokens) - num_tokens), (0, 0), (0, padded_length(head_dim) - head_dim)]
  out = _padded_attention(*(jnp.pad(x, pad) for x in (query, key, value)), num_tokens, scale)
  return out[:, :num_tokens, :, :head_dim]


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _padded_attention(query, key, value, num_tokens: int, scale: float):
  """attention() on padded [batch, padded tokens, heads, padded head_dim]; keys from num_tokens on are masked."""
  return _forward_call(query, key, value, num_tokens, scale)[0]


def _block_specs(shape):
  """Grid (batch, heads); a program's block of [batch, tokens, heads, head_dim] is one head's [tokens, head_dim],
  of the log-sum-exp [batch, heads, tokens] its [tokens]."""
  _, tokens, _, head_dim = shape
  return (pl.BlockSpec((None, tokens, None, head_dim), lambda b, h: (b, 0, h, 0)),
          pl.BlockSpec((None, None, tokens), lambda b, h: (b, h, 0)))


def _forward_kernel_call(query, key, value, num_tokens, scale):
  """The forward kernel -> (out like query, log-sum-exp [batch, heads, tokens] float32)."""
  batch, tokens, heads, _ = query.shape
  sequence, row_stats = _block_specs(query.shape)
  call = lambda interpret: pl.pallas_call(
      partial(_forward_kernel, num_tokens=num_tokens, scale=scale),
      out_shape=(jax.ShapeDtypeStruct(query.shape, query.dtype),
                 jax.ShapeDtypeStruct((batch, heads, tokens), jnp.float32)),
      grid=(batch, heads), in_specs=[sequence] * 3, out_specs=(sequence, row_stats),
      compiler_params=_COMPILER_PARAMS, interpret=interpret, name='sequence_attention_forward')(query, key, value)
  return _on_platform(call, query, key, value)


def _padded_attention_fwd(query, key, value, num_tokens, scale):
  out, log_sum_exp = _forward_call(query, key, value, num_tokens, scale)
  return out, (query, key, value, out, log_sum_exp)


def _padded_attention_bwd(num_tokens, scale, residuals, out_grad):
  query, key, value, out, log_sum_exp = residuals
  return _backward_call(query, key, value, out, out_grad.astype(query.dtype), log_sum_exp, num_tokens, scale)


_padded_attention.defvjp(_padded_attention_fwd, _padded_attention_bwd)


def _backward_kernel_call(query, key, value, out, out_grad, log_sum_exp, num_tokens, scale):
  """The backward kernel -> (dq, dk, dv)."""
  batch, _, heads, _ = query.shape
  sequence, row_stats = _block_specs(query.shape)
  operands = (query, key, value, out, out_grad, log_sum_exp)
  call = lambda interpret: pl.pallas_call(
      partial(_backward_kernel, num_tokens=num_tokens, scale=scale),
      out_shape=(jax.ShapeDtypeStruct(query.shape, query.dtype),) * 3,
      grid=(batch, heads), in_specs=[sequence] * 5 + [row_stats], out_specs=(sequence,) * 3,
      compiler_params=_COMPILER_PARAMS, interpret=interpret, name='sequence_attention_backward')(*operands)
  return _on_platform(call, *operands)


def _partitioned_by_sequence_and_head(kernel_call, num_operands, sharding_rule):
  """kernel_call(*operands, num_tokens, scale) as a custom_partitioning op: each (sequence, head) is computed
  apart, so batch and heads keep query's sharding, tokens and head_dim are made whole (Shardy's need_replication
  factors), and each device runs kernel_call on its [batch / shards, tokens, heads / shards, head_dim] block."""
  partitioned = custom_partitioning(kernel_call, static_argnums=(num_operands, num_operands + 1))

  def partition(num_tokens, scale, mesh, operand_shapes, result_shapes):
    spec = operand_shapes[0].sharding.spec  # query's
    batch_axes, head_axes = (spec[axis] if axis < len(spec) else None for axis in (0, 2))
    sequence = NamedSharding(mesh, P(batch_axes, None, head_axes, None))  # [batch, tokens, heads, head_dim]
    row_stats = NamedSharding(mesh, P(batch_axes, head_axes, None))  # log-sum-exp [batch, heads, tokens]
    sharding = lambda shape: sequence if len(shape.shape) == 4 else row_stats
    lower = lambda *operands: kernel_call(*operands, num_tokens, scale)
    return mesh, lower, tuple(map(sharding, result_shapes)), tuple(map(sharding, operand_shapes))

  partitioned.def_partition(partition, sharding_rule=sharding_rule, need_replication_factors=('tokens', 'head_dim'))
  return partitioned


_sequence = 'batch tokens heads head_dim'
_row_stats = 'batch heads tokens'
_forward_call = _partitioned_by_sequence_and_head(
    _forward_kernel_call, 3, f'{_sequence}, {_sequence}, {_sequence} -> {_sequence}, {_row_stats}')
_backward_call = _partitioned_by_sequence_and_head(
    _backward_kernel_call, 6, f'{", ".join([_sequence] * 5)}, {_row_stats} -> {_sequence}, {_sequence}, {_sequence}')


def _on_platform(call, *operands):
  """call(False) (Triton) where the program is lowered for a GPU, call(True) (interpreted) elsewhere; `operands`
  are what `call` closes over, which platform_dependent wants as its arguments."""
  compiled, interpreted = (lambda *_: call(False)), (lambda *_: call(True))
  return jax.lax.platform_dependent(*operands, cuda=compiled, rocm=compiled, default=interpreted)


def _dot(a, b, contract=(1, 0)):
  """a @ b over a's axis contract[0] and b's axis contract[1], accumulated in float32 (2D blocks)."""
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=jnp.float32)


def _logits(query, key, num_tokens, scale):
  """query key^T * scale [tokens, tokens] in float32, keys from num_tokens on masked."""
  logits = _dot(query, key, (1, 1)) * scale
  key_index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
  return jnp.where(key_index < num_tokens, logits, _MASKED)


def _forward_kernel(query_ref, key_ref, value_ref, out_ref, log_sum_exp_ref, *, num_tokens, scale):
  """One (sequence, head): refs [tokens, head_dim], log_sum_exp [tokens]."""
  value = value_ref[...]
  logits = _logits(query_ref[...], key_ref[...], num_tokens, scale)
  row_max = logits.max(axis=1)
  unnormalised = jnp.exp(logits - row_max[:, None])
  row_sum = unnormalised.sum(axis=1)
  probs = unnormalised / row_sum[:, None]
  out_ref[...] = _dot(probs.astype(value.dtype), value).astype(out_ref.dtype)
  log_sum_exp_ref[...] = row_max + jnp.log(row_sum)


def _backward_kernel(query_ref, key_ref, value_ref, out_ref, out_grad_ref, log_sum_exp_ref,
                     query_grad_ref, key_grad_ref, value_grad_ref, *, num_tokens, scale):
  """dq, dk, dv of one (sequence, head) from the forward's inputs, output and log-sum-exp.

  With P = softmax(S), S = q k^T * scale, O = P v: dv = P^T dO, dP = dO v^T, dS = P * (dP - delta) with
  delta_i = sum_j P_ij dP_ij = sum_d dO_id O_id, then dq = dS k * scale, dk = dS^T q * scale. Padded keys have
  P = 0, so they get no gradient and send none; padded query rows have dO = 0 (their outputs are sliced off).
  """
  query, key, value, out_grad = query_ref[...], key_ref[...], value_ref[...], out_grad_ref[...]
  probs = jnp.exp(_logits(query, key, num_tokens, scale) - log_sum_exp_ref[...][:, None])
  delta = (out_grad.astype(jnp.float32) * out_ref[...].astype(jnp.float32)).sum(axis=1)
  value_grad_ref[...] = _dot(probs.astype(value.dtype), out_grad, (0, 0)).astype(value_grad_ref.dtype)
  probs_grad = _dot(out_grad, value, (1, 1))
  logits_grad = (probs * (probs_grad - delta[:, None]) * scale).astype(query.dtype)  # scale folded in: dS * scale
  query_grad_ref[...] = _dot(logits_grad, key).astype(query_grad_ref.dtype)
  key_grad_ref[...] = _dot(logits_grad, query, (0, 0)).astype(key_grad_ref.dtype)
