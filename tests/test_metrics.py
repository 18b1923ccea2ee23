"""Confusion matrix and UAR/WAR against scikit-learn on random data."""
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from dferjax import metrics
from tfds_builders.labels import CLASS_NAMES, NUM_CLASSES


def random_batch(seed, batch_size=64):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(batch_size, NUM_CLASSES)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, size=batch_size).astype(np.int32)
  mask = rng.random(batch_size) < 0.8
  return logits, labels, mask


def sklearn_confusion(logits, labels, mask):
  return sk_metrics.confusion_matrix(labels[mask], logits[mask].argmax(axis=1), labels=range(NUM_CLASSES))


def test_confusion_matrix_matches_sklearn_and_masks_padding():
  logits, labels, mask = random_batch(0)
  assert not mask.all()
  # Padding rows get a label and logits that would count if unmasked.
  labels[~mask] = 5
  logits[~mask, 5] = 100.0
  confusion = metrics.confusion_matrix(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask), NUM_CLASSES)
  assert confusion.dtype == jnp.int32 and confusion.shape == (NUM_CLASSES, NUM_CLASSES)
  np.testing.assert_array_equal(confusion, sklearn_confusion(logits, labels, mask))
  assert int(confusion.sum()) == mask.sum()

  from_predictions = metrics.confusion_matrix(jnp.asarray(logits.argmax(axis=1)), jnp.asarray(labels),
                                              jnp.asarray(mask), NUM_CLASSES)
  np.testing.assert_array_equal(from_predictions, confusion)
  unmasked = metrics.confusion_matrix(jnp.asarray(logits), jnp.asarray(labels), None, NUM_CLASSES)
  np.testing.assert_array_equal(unmasked, sklearn_confusion(logits, labels, np.ones_like(mask)))


def test_confusion_matrix_jit_and_two_device_sharding():
  assert jax.device_count() == 2, 'tests/conftest.py should give two host CPU devices'
  logits, labels, mask = random_batch(1, batch_size=32)
  mesh = jax.make_mesh((2,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  batch_sharding, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  sharded = [jax.device_put(x, batch_sharding) for x in (logits, labels, mask)]
  assert len(sharded[0].sharding.device_set) == 2
  compute = jax.jit(partial(metrics.confusion_matrix, num_classes=NUM_CLASSES), out_shardings=replicated)
  confusion = compute(*sharded)
  np.testing.assert_array_equal(confusion, sklearn_confusion(logits, labels, mask))

  # Summing per-batch matrices gives the split's matrix.
  logits2, labels2, mask2 = random_batch(2, batch_size=32)
  total = confusion + compute(*[jax.device_put(x, batch_sharding) for x in (logits2, labels2, mask2)])
  want = sklearn_confusion(np.concatenate([logits, logits2]), np.concatenate([labels, labels2]),
                           np.concatenate([mask, mask2]))
  np.testing.assert_array_equal(total, want)


def test_confusion_matrix_rejects_bad_shapes():
  logits, labels, mask = random_batch(3, batch_size=4)
  with pytest.raises(ValueError, match='num_classes=5'):
    metrics.confusion_matrix(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask), 5)
  with pytest.raises(ValueError, match='mask'):
    metrics.confusion_matrix(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask[:3]), NUM_CLASSES)
  with pytest.raises(ValueError, match='integer class ids'):
    metrics.confusion_matrix(jnp.asarray(logits[:, 0]), jnp.asarray(labels), jnp.asarray(mask), NUM_CLASSES)


def test_recall_metrics_match_sklearn():
  rng = np.random.default_rng(4)
  labels = rng.integers(0, NUM_CLASSES, size=500)
  # Skewed predictions, so UAR and WAR differ.
  skewed = rng.choice(NUM_CLASSES, size=500, p=[.4, .1, .2, .1, .1, .05, .05])
  predictions = np.where(rng.random(500) < 0.5, labels, skewed)
  confusion = sk_metrics.confusion_matrix(labels, predictions, labels=range(NUM_CLASSES))
  result = metrics.recall_metrics(confusion, CLASS_NAMES)
  assert result['uar'] == pytest.approx(sk_metrics.balanced_accuracy_score(labels, predictions), rel=1e-12)
  assert result['war'] == pytest.approx(sk_metrics.accuracy_score(labels, predictions), rel=1e-12)
  per_class = sk_metrics.recall_score(labels, predictions, average=None, labels=range(NUM_CLASSES))
  np.testing.assert_allclose([result['per_class'][name] for name in CLASS_NAMES], per_class, rtol=1e-12)
  assert list(result['per_class']) == list(CLASS_NAMES)
  assert result['num_clips'] == 500
  assert abs(result['uar'] - result['war']) > 1e-3


def test_recall_metrics_empty_class():
  rng = np.random.default_rng(5)
  labels = rng.choice([0, 1, 2, 3, 4, 6], size=200)  # no disgust clips
  predictions = rng.integers(0, NUM_CLASSES, size=200)
  confusion = sk_metrics.confusion_matrix(labels, predictions, labels=range(NUM_CLASSES))
  with pytest.raises(ValueError, match=r"\['disgust'\] have no clips"):
    metrics.recall_metrics(confusion, CLASS_NAMES)
  with pytest.warns(UserWarning, match='disgust'):
    result = metrics.recall_metrics(confusion, CLASS_NAMES, allow_empty=True)
  # sklearn's balanced accuracy averages over the classes present in y_true.
  with pytest.warns(UserWarning):
    want = sk_metrics.balanced_accuracy_score(labels, predictions)
  assert result['uar'] == pytest.approx(want, rel=1e-12)
  assert np.isnan(result['per_class']['disgust'])


def test_recall_metrics_rejects_bad_confusion():
  with pytest.raises(ValueError, match=r'expected \(7, 7\)'):
    metrics.recall_metrics(np.ones((6, 6), np.int32), CLASS_NAMES)
  with pytest.raises(ValueError, match='integer counts'):
    metrics.recall_metrics(np.ones((7, 7)) * 0.5, CLASS_NAMES)
  with pytest.raises(ValueError, match='empty'):
    metrics.recall_metrics(np.zeros((7, 7), np.int32), CLASS_NAMES)
