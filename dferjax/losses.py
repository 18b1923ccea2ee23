"""Training losses: per-example functions, and the registry the trainer builds `config.loss` from.

The functions take logits [batch, classes] and integer labels [batch] and return losses [batch] in float32
(bf16 logits are upcast first). A registered loss is a frozen dataclass whose fields are its hyperparameters,
called as `loss(logits, aux, batch) -> (total [batch], {term: [batch]})`: it may read the model's auxiliary
outputs (`aux`) and any batch field, and names each term so the trainer logs them apart.

    config.loss = dict(name='compact', beta=0.2)   # -> CompactLoss(beta=0.2), fields checked by build_loss
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import optax

from dferjax import configlib


def _check(logits, labels):
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f'expected logits [batch, classes] and labels [batch], got {logits.shape} and {labels.shape}')
  return logits.astype(jnp.float32)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """-log softmax(logits)[label] -> [batch]."""
  logits = _check(logits, labels)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))


def label_smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
  """CE against (1 - smoothing) * one_hot + smoothing / classes (STT Eq. 14-16, torch's label_smoothing)."""
  logits = _check(logits, labels)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32), smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def compactness_regulariser(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """KL(p'||u') + KL(u'||p') of STT Eq. (17)-(20), p' = softmax over the non-target logits (Eq. 20), u' uniform
  over those C-1 classes (Kobayashi's large-margin softmax regulariser, refs.md §1.3) -> [batch].

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
  return jnp.sum(jnp.where(is_target, 0.0, (non_target_probs - uniform) * shifted), axis=-1)


def compact_softmax_cross_entropy(logits: jax.Array, labels: jax.Array, beta: float = 0.2) -> jax.Array:
  """STT Eq. (17): CE + beta/2 * (KL(p'||u') + KL(u'||p'))."""
  return cross_entropy(logits, labels) + 0.5 * beta * compactness_regulariser(logits, labels)


# ---------------------------------------------------------------------------------------------------------
# Registered losses: `loss(logits, aux, batch) -> (total [batch], {term: [batch]})`.


@dataclasses.dataclass(frozen=True)
class CrossEntropy:
  """Softmax cross-entropy on the model's logits."""
  terms: ClassVar[tuple[str, ...]] = ('cross_entropy',)

  def __call__(self, logits, aux, batch):
    del aux
    value = cross_entropy(logits, batch['label'])
    return value, {'cross_entropy': value}


@dataclasses.dataclass(frozen=True)
class LabelSmoothing:
  """CE against smoothed targets (STT Tab. 2's label-smoothing row)."""
  smoothing: float = 0.1
  terms: ClassVar[tuple[str, ...]] = ('smoothed_cross_entropy',)

  def __call__(self, logits, aux, batch):
    del aux
    value = label_smoothed_cross_entropy(logits, batch['label'], self.smoothing)
    return value, {'smoothed_cross_entropy': value}


@dataclasses.dataclass(frozen=True)
class CompactLoss:
  """STT Eq. (17): cross-entropy + beta/2 * the symmetric KL compactness term; the two are logged apart."""
  beta: float = 0.2
  terms: ClassVar[tuple[str, ...]] = ('cross_entropy', 'compactness')

  def __call__(self, logits, aux, batch):
    del aux
    ce = cross_entropy(logits, batch['label'])
    compactness = 0.5 * self.beta * compactness_regulariser(logits, batch['label'])
    return ce + compactness, {'cross_entropy': ce, 'compactness': compactness}


@dataclasses.dataclass(frozen=True)
class OrderLoss:
  """EST Eq. (5)-(6) as its code trains it: CE(class) + order_weight * CE(aux['order_logits'], batch['permutation']),
  the snippet-order prediction on shuffled input (refs.md §1.7: weight 0.1428 ~ 1/7)."""
  order_weight: float = 0.1428
  terms: ClassVar[tuple[str, ...]] = ('cross_entropy', 'order')

  def __call__(self, logits, aux, batch):
    if 'order_logits' not in aux or 'permutation' not in batch:
      raise ValueError("config.loss.name='order' needs the model output aux['order_logits'] and the batch field "
                       "'permutation' (config.input.transforms.shuffle_snippets)")
    ce = cross_entropy(logits, batch['label'])
    order = self.order_weight * cross_entropy(aux['order_logits'], batch['permutation'])
    return ce + order, {'cross_entropy': ce, 'order': order}


LOSSES = {'cross_entropy': CrossEntropy, 'label_smoothing': LabelSmoothing, 'compact': CompactLoss,
          'order': OrderLoss}


def build_loss(spec) -> CrossEntropy | LabelSmoothing | CompactLoss | OrderLoss:
  """The loss `config.loss` names (`{name, **fields}`); unknown names and fields fail listing the valid ones."""
  return configlib.from_registry(spec, LOSSES, 'config.loss', 'loss')
