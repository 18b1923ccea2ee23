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


def _aen_group_matrix(aux, name):
  """One-hot [classes, groups] of AEN's grouping, after checking the aux outputs the AEN losses read."""
  needed = ('global_logits', 'group_logits', 'local_logits', 'class_groups', 'clip_features', 'frame_features',
            'guide_logits')
  if missing := [key for key in needed if key not in aux]:
    raise ValueError(f"config.loss.name={name!r} needs AEN's training outputs {missing} (model_name='aen' with "
                     "config.model.guide=True)")
  return jax.nn.one_hot(aux['class_groups'], aux['group_logits'].shape[-1], dtype=jnp.float32)  # [C, G]


@dataclasses.dataclass(frozen=True)
class AENLoss:
  """AEN's L = L_mc + lambda1 * L_ta + lambda2 * L_ga (Eq. 2-6), on the model's aux outputs.

  L_mc (Eq. 2-3): cross-entropy of the fused probability P_O^a = alpha * softmax(P_L^a) + (1 - alpha) *
  softmax(P_G)^a at both affective levels, the group level summing P_G's class probabilities per group.
  L_ta (Eq. 4): sum over the three levels of || V_s - sum_t I_s,t S_2[t, y] ||_1, S_2 the guide's per-frame
  probabilities. L_ga (Eq. 5): sum over levels of beta_a || sigmoid(P_L^a) - mean_t S_a[t] ||_2^2, S_1 the group
  sums of S_2. beta = (1.4, 0.6) orders the levels a = 1 (groups), a = 2 (emotions): the paper's beta_0, beta_1.
  """
  alpha: float = 0.7
  ta_weight: float = 0.4  # lambda1
  ga_weight: float = 0.5  # lambda2
  level_weights: tuple[float, float] = (1.4, 0.6)  # beta_0, beta_1
  terms: ClassVar[tuple[str, ...]] = ('multi_class', 'temporal_affectivity', 'global_affectivity')

  def __call__(self, logits, aux, batch):
    del logits
    groups = _aen_group_matrix(aux, 'aen')
    labels = batch['label']
    group_labels = aux['class_groups'][labels]
    global_probs = jax.nn.softmax(aux['global_logits'].astype(jnp.float32))
    fused_classes = (self.alpha * jax.nn.softmax(aux['local_logits'].astype(jnp.float32))
                     + (1 - self.alpha) * global_probs)
    fused_groups = (self.alpha * jax.nn.softmax(aux['group_logits'].astype(jnp.float32))
                    + (1 - self.alpha) * global_probs @ groups)
    pick = lambda probs, y: jnp.take_along_axis(probs, y[:, None], axis=-1)[:, 0]
    multi_class = -jnp.log(pick(fused_groups, group_labels)) - jnp.log(pick(fused_classes, labels))

    frame_probs = jax.nn.softmax(aux['guide_logits'].astype(jnp.float32))  # S_2 [batch, T, C]
    frame_weights = jnp.einsum('btc,bc->bt', frame_probs, jax.nn.one_hot(labels, frame_probs.shape[-1]))  # S_2 Y
    temporal = sum(jnp.abs(aux['clip_features'][level] - jnp.einsum('btc,bt->bc', frames, frame_weights)).sum(-1)
                   for level, frames in aux['frame_features'].items())

    targets = (frame_probs @ groups).mean(axis=1), frame_probs.mean(axis=1)  # a = 1, 2
    outputs = aux['group_logits'], aux['local_logits']
    global_affectivity = sum(weight * jnp.square(jax.nn.sigmoid(out.astype(jnp.float32)) - target).sum(-1)
                             for weight, out, target in zip(self.level_weights, outputs, targets))
    temporal, global_affectivity = self.ta_weight * temporal, self.ga_weight * global_affectivity
    return multi_class + temporal + global_affectivity, {
        'multi_class': multi_class, 'temporal_affectivity': temporal, 'global_affectivity': global_affectivity}


@dataclasses.dataclass(frozen=True)
class AENPrototypeLoss:
  """The losses AEN's prototype trains with (refs.md §1.5), where they differ from the paper's AENLoss.

  Mixes losses, not probabilities: L_P = alpha * NLL(P_L) + (1 - alpha) * NLL(P_G) per level, the group level of
  P_G the mean of its classes' log-probabilities; L_ta weighs frames by the guide's raw logit of the label and
  takes mean absolute differences divided by the level's width, times 3; L_ga takes mean absolute differences
  to softmax(sum_t guide logits) and its group means. Total 0.6 L_P1 + 1.4 L_P2 + 0.4 L_ta + 0.7 L_ga1 + 0.3 L_ga2.
  """
  alpha: float = 0.7
  multi_class_weights: tuple[float, float] = (0.6, 1.4)  # groups, emotions
  ta_weight: float = 0.4
  ta_scale: float = 3.0
  ga_weights: tuple[float, float] = (0.7, 0.3)  # groups, emotions
  terms: ClassVar[tuple[str, ...]] = ('multi_class', 'temporal_affectivity', 'global_affectivity')

  def __call__(self, logits, aux, batch):
    del logits
    groups = _aen_group_matrix(aux, 'aen_prototype')
    labels = batch['label']
    group_labels = aux['class_groups'][labels]
    pick = lambda values, y: jnp.take_along_axis(values, y[:, None], axis=-1)[:, 0]
    global_log_probs = jax.nn.log_softmax(aux['global_logits'].astype(jnp.float32))
    global_group_log_probs = (global_log_probs @ groups) / groups.sum(axis=0)  # mean within each group
    level_1 = (self.alpha * -pick(jax.nn.log_softmax(aux['group_logits'].astype(jnp.float32)), group_labels)
               + (1 - self.alpha) * -pick(global_group_log_probs, group_labels))
    level_2 = (self.alpha * -pick(jax.nn.log_softmax(aux['local_logits'].astype(jnp.float32)), labels)
               + (1 - self.alpha) * -pick(global_log_probs, labels))
    multi_class = self.multi_class_weights[0] * level_1 + self.multi_class_weights[1] * level_2

    guide_logits = aux['guide_logits'].astype(jnp.float32)  # [batch, T, C]
    frame_scores = jnp.einsum('btc,bc->bt', guide_logits, jax.nn.one_hot(labels, guide_logits.shape[-1]))  # raw
    temporal = sum(jnp.abs(aux['clip_features'][level] - jnp.einsum('btc,bt->bc', frames, frame_scores)).mean(-1)
                   / frames.shape[-1] for level, frames in aux['frame_features'].items())
    temporal = self.ta_weight * self.ta_scale * temporal

    target_classes = jax.nn.softmax(guide_logits.sum(axis=1))
    target_groups = (target_classes @ groups) / groups.sum(axis=0)  # group means
    global_affectivity = (
        self.ga_weights[0] * jnp.abs(jax.nn.sigmoid(aux['group_logits'].astype(jnp.float32)) - target_groups).mean(-1)
        + self.ga_weights[1] * jnp.abs(jax.nn.sigmoid(aux['local_logits'].astype(jnp.float32))
                                       - target_classes).mean(-1))
    return multi_class + temporal + global_affectivity, {
        'multi_class': multi_class, 'temporal_affectivity': temporal, 'global_affectivity': global_affectivity}


LOSSES = {'cross_entropy': CrossEntropy, 'label_smoothing': LabelSmoothing, 'compact': CompactLoss,
          'order': OrderLoss, 'aen': AENLoss, 'aen_prototype': AENPrototypeLoss}


def build_loss(spec) -> CrossEntropy | LabelSmoothing | CompactLoss | OrderLoss | AENLoss | AENPrototypeLoss:
  """The loss `config.loss` names (`{name, **fields}`); unknown names and fields fail listing the valid ones."""
  return configlib.from_registry(spec, LOSSES, 'config.loss', 'loss')
