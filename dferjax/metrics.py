"""Evaluation metrics: a confusion matrix summed on device, UAR/WAR/per-class recall on the host.

The papers report WAR (weighted average recall = accuracy over clips) and UAR (unweighted average recall =
mean of the per-class recalls), both computed over the whole test split. Both follow from one confusion
matrix, so eval steps only return `confusion_matrix(...)`, the loop sums it over batches, and the host turns
the sum into numbers once per evaluation.
"""
from collections.abc import Mapping, Sequence
import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(logits_or_predictions: jax.Array, labels: jax.Array, mask: jax.Array | None,
                     num_classes: int) -> jax.Array:
  """Counts of (true class, predicted class) pairs over the unmasked clips of a batch.

  Args:
    logits_or_predictions: logits [batch, num_classes] (argmax is the prediction) or predicted class ids
      [batch] (integer).
    labels: true class ids, int [batch].
    mask: bool [batch]; False marks padding clips of an eval batch, which are not counted. None counts all.
    num_classes: the static number of classes C.

  Returns:
    int32 [C, C] with rows = true class, columns = predicted class. Sums over batches (and devices: the
    batch axis may be sharded) give the split's matrix. A label outside [0, C) has an all-zero one-hot row
    and is not counted, so `confusion.sum()` below the number of real clips points at bad labels.
  """
  if logits_or_predictions.ndim == 2:
    if logits_or_predictions.shape[1] != num_classes:
      raise ValueError(f'logits have {logits_or_predictions.shape[1]} classes, expected num_classes={num_classes}')
    predictions = jnp.argmax(logits_or_predictions, axis=-1)
  elif logits_or_predictions.ndim == 1:
    if not jnp.issubdtype(logits_or_predictions.dtype, jnp.integer):
      raise ValueError(f'1-D predictions must be integer class ids, got {logits_or_predictions.dtype}')
    predictions = logits_or_predictions
  else:
    raise ValueError(f'expected logits [batch, classes] or predictions [batch], got shape '
                     f'{logits_or_predictions.shape}')
  if labels.shape != predictions.shape:
    raise ValueError(f'labels {labels.shape} do not match predictions {predictions.shape}')
  if mask is None:
    mask = jnp.ones(labels.shape, jnp.bool_)
  elif mask.shape != labels.shape:
    raise ValueError(f'mask {mask.shape} does not match labels {labels.shape}')
  true_one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.int32) * mask[:, None].astype(jnp.int32)
  predicted_one_hot = jax.nn.one_hot(predictions, num_classes, dtype=jnp.int32)
  # A matmul of one-hots rather than a scatter-add: the batch axis contracts, so a sharded batch reduces
  # with one all-reduce and no data-dependent indexing.
  return jnp.einsum('bt,bp->tp', true_one_hot, predicted_one_hot, preferred_element_type=jnp.int32)


def recall_metrics(confusion, class_names: Sequence[str], *, allow_empty: bool = False) -> dict:
  """UAR, WAR and per-class recall from a split's confusion matrix (host side, float64).

  Args:
    confusion: int [C, C], rows = true class, columns = predicted (numpy or a fetched jax array).
    class_names: C names, in class-id order; keys of 'per_class'.
    allow_empty: a class with no clips makes UAR undefined, so by default it raises. With True (small
      subsets in tests, demo splits) such classes are left out of UAR with a warning and their recall is nan.

  Returns:
    {'uar': float, 'war': float, 'per_class': {name: recall}, 'num_clips': int}; recalls are fractions.
  """
  confusion = np.asarray(confusion)
  num_classes = len(class_names)
  if confusion.shape != (num_classes, num_classes):
    raise ValueError(f'confusion has shape {confusion.shape}, expected ({num_classes}, {num_classes}) for '
                     f'class_names {list(class_names)}')
  if not np.issubdtype(confusion.dtype, np.integer) or (confusion < 0).any():
    raise ValueError(f'confusion must hold non-negative integer counts, got dtype {confusion.dtype}, '
                     f'min {confusion.min()}')
  support = confusion.sum(axis=1).astype(np.float64)
  num_clips = int(support.sum())
  if num_clips == 0:
    raise ValueError('confusion matrix is empty: no clips were counted')
  empty = [name for name, count in zip(class_names, support) if count == 0]
  if empty and not allow_empty:
    raise ValueError(f'classes {empty} have no clips, so UAR is undefined; evaluate on a split that has '
                     f'them or pass allow_empty=True to leave them out of UAR')
  if empty:
    warnings.warn(f'classes {empty} have no clips: UAR is the mean over the other '
                  f'{num_classes - len(empty)} classes', stacklevel=2)
  with np.errstate(invalid='ignore', divide='ignore'):
    per_class = np.diag(confusion) / support  # nan where support == 0
  return {
      'uar': float(np.nanmean(per_class)),
      'war': float(np.trace(confusion) / num_clips),
      'per_class': {name: float(recall) for name, recall in zip(class_names, per_class)},
      'num_clips': num_clips,
  }


# ---------------------------------------------------------------------------------------------------------
# Evaluation heads beyond the emotion classes.

# Keys of an eval result that a head's name may not take.
RESULT_KEYS = ('uar', 'war', 'per_class', 'confusion', 'num_clips', 'step', 'epoch', 'classes')


@dataclasses.dataclass(frozen=True)
class MetricHead:
  """An evaluation head a model adds to the emotion classes (AEN's 3 emotion groups, EST's snippet order,
  NR-DFERNet's filtered prediction): its own confusion matrix, UAR, WAR and per-class recall.

  The head's prediction is `aux[output]` (logits [batch, classes] or class ids [batch]); its truth is the batch
  field `labels`, mapped through `label_map` when given (true class = label_map[batch[labels]]).
  """
  output: str
  class_names: tuple[str, ...]
  labels: str = 'label'
  label_map: tuple[int, ...] = ()


def check_heads(heads: Mapping[str, MetricHead]):
  if clash := sorted(set(heads) & set(RESULT_KEYS)):
    raise ValueError(f'metric head names {clash} clash with eval result keys {RESULT_KEYS}')


def head_confusions(logits: jax.Array, aux: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
                    heads: Mapping[str, MetricHead], num_classes: int) -> dict[str, jax.Array]:
  """{'classes': the emotion confusion [C, C], head name: its confusion} of one batch (padding masked)."""
  mask = batch.get('mask')
  confusions = {'classes': confusion_matrix(logits, batch['label'], mask, num_classes)}
  for name, head in heads.items():
    if head.output not in aux or head.labels not in batch:
      raise ValueError(f'metric head {name!r} reads aux[{head.output!r}] and batch[{head.labels!r}]; the model '
                       f'gives aux {sorted(aux)} and the batch has {sorted(batch)}')
    labels = batch[head.labels]
    if head.label_map:
      labels = jnp.asarray(head.label_map, jnp.int32)[labels]
    confusions[name] = confusion_matrix(aux[head.output], labels, mask, len(head.class_names))
  return confusions
