"""Per-example classification losses, all computed in float32 (bf16 logits are upcast first).

Each takes logits [batch, classes] and integer labels [batch] and returns losses [batch]; the trainer
reduces them (with the batch mask).
"""
import jax
import jax.numpy as jnp


def _check(logits, labels):
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f'expected logits [batch, classes] and labels [batch], got {logits.shape} and {labels.shape}')
  return logits.astype(jnp.float32)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """-log softmax(logits)[label] -> [batch]."""
  logits = _check(logits, labels)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def label_smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
  """CE against (1 - smoothing) * one_hot + smoothing / classes (STT Eq. 14-16, torch's label_smoothing)."""
  logits = _check(logits, labels)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  return (1.0 - smoothing) * nll - smoothing * log_probs.mean(axis=-1)


def compact_softmax_cross_entropy(logits: jax.Array, labels: jax.Array, beta: float = 0.2) -> jax.Array:
  """STT Eq. (17): CE + beta/2 * (KL(p'||u') + KL(u'||p')), p' = softmax over the non-target logits (Eq. 20),
  u' uniform over those C-1 classes (Kobayashi's large-margin softmax regulariser, refs.md §1.3).

  Uses KL(p'||u') + KL(u'||p') = sum_{c != y} (p'_c - u') log p'_c (both sum to 1), and log p'_c may be
  shifted by any constant for the same reason: with z_c - max_{c != y} z the term is exactly 0 when the
  non-target logits are equal, and the target never meets a log(0).
  """
  logits = _check(logits, labels)
  num_classes = logits.shape[-1]
  is_target = jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_)
  non_target_probs = jax.nn.softmax(jnp.where(is_target, -jnp.inf, logits), axis=-1)  # 0 at the target
  centre = jax.lax.stop_gradient(jnp.max(jnp.where(is_target, -jnp.inf, logits), axis=-1, keepdims=True))
  shifted = jnp.where(is_target, 0.0, logits - centre)
  uniform = 1.0 / (num_classes - 1)
  symmetric_kl = jnp.sum(jnp.where(is_target, 0.0, (non_target_probs - uniform) * shifted), axis=-1)
  return cross_entropy(logits, labels) + 0.5 * beta * symmetric_kl
