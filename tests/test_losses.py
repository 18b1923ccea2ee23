"""Losses against float64 numpy transcriptions of the formulas (STT Eq. 14-20)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dferjax import losses

NUM_CLASSES = 7


def _log_softmax(logits):
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _compact_numpy(logits, labels, beta):
  """STT Eq. (17)-(20) literally (with the sign/p' typos fixed, refs.md §1.3), float64, per example."""
  out = []
  for row, label in zip(logits, labels):
    log_p_target = _log_softmax(row)[label]
    non_target = np.delete(row, label)
    p_prime = np.exp(_log_softmax(non_target))  # Eq. (20)
    u_prime = np.full_like(p_prime, 1 / (len(row) - 1))
    kl_u_p = np.sum(u_prime * np.log(u_prime / p_prime))  # Eq. (18)
    kl_p_u = np.sum(p_prime * np.log(p_prime / u_prime))  # Eq. (19)
    out.append(-log_p_target + beta / 2 * (kl_u_p + kl_p_u))  # Eq. (17)
  return np.array(out)


def _kobayashi_numpy(logits, labels, beta):
  """Kobayashi's large-margin regulariser as written in his code (the 1e6 mask is harmless in float64)."""
  one_hot = np.eye(logits.shape[1])[labels]
  masked = logits - 1e6 * one_hot
  log_p = _log_softmax(masked)
  reg = 0.5 * ((np.exp(log_p) - 1 / (logits.shape[1] - 1)) * log_p * (1 - one_hot)).sum(axis=1)
  return -_log_softmax(logits)[np.arange(len(labels)), labels] + beta * reg


@pytest.fixture
def batch():
  rng = np.random.default_rng(0)
  return rng.normal(scale=3.0, size=(16, NUM_CLASSES)), rng.integers(0, NUM_CLASSES, size=16)


def test_cross_entropy_matches_numpy(batch):
  logits, labels = batch
  want = -_log_softmax(logits)[np.arange(len(labels)), labels]
  got = losses.cross_entropy(jnp.float32(logits), labels)
  assert got.shape == (16,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('smoothing', [0.0, 0.1, 0.3])
def test_label_smoothing_matches_numpy(batch, smoothing):
  logits, labels = batch
  soft_labels = (1 - smoothing) * np.eye(NUM_CLASSES)[labels] + smoothing / NUM_CLASSES  # Eq. (14), normalised
  want = -(soft_labels * _log_softmax(logits)).sum(axis=1)  # Eq. (15)
  got = losses.label_smoothed_cross_entropy(jnp.float32(logits), labels, smoothing)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('beta', [0.2, 1.0])
def test_compact_loss_matches_paper_formula(batch, beta):
  logits, labels = batch
  got = losses.compact_softmax_cross_entropy(jnp.float32(logits), labels, beta)
  assert got.shape == (16,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, _compact_numpy(logits, labels, beta), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got, _kobayashi_numpy(logits, labels, beta), rtol=1e-5, atol=1e-6)


def test_compact_regulariser_is_exactly_zero_for_uniform_non_targets():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, NUM_CLASSES, size=8)
  logits = np.repeat(rng.normal(size=(8, 1)), NUM_CLASSES, axis=1)  # one value per row for the non-targets
  logits[np.arange(8), labels] = rng.normal(scale=5.0, size=8)
  logits = jnp.float32(logits)
  np.testing.assert_array_equal(losses.compact_softmax_cross_entropy(logits, labels, 0.2),
                                losses.cross_entropy(logits, labels))


def test_compact_gradient_on_target_logit_equals_cross_entropy(batch):
  logits, labels = batch
  logits = jnp.float32(logits)
  grad_compact = jax.grad(lambda z: losses.compact_softmax_cross_entropy(z, labels, 0.2).sum())(logits)
  grad_ce = jax.grad(lambda z: losses.cross_entropy(z, labels).sum())(logits)
  rows = np.arange(len(labels))
  np.testing.assert_allclose(grad_compact[rows, labels], grad_ce[rows, labels], rtol=1e-6, atol=1e-7)
  assert not np.allclose(grad_compact, grad_ce)  # the regulariser does act on the other logits


def test_losses_are_float32_and_finite_for_extreme_bf16_logits():
  logits = jnp.array([[3e4, -3e4, 0, 0, 1e4, -1e4, 5], [0] * 7], jnp.bfloat16)
  labels = jnp.array([1, 3])
  smoothed = functools.partial(losses.label_smoothed_cross_entropy, smoothing=0.1)
  for loss in (losses.cross_entropy, smoothed, losses.compact_softmax_cross_entropy):
    value, grad = jax.value_and_grad(lambda z: loss(z, labels).sum())(logits)
    assert value.dtype == jnp.float32
    assert np.isfinite(value) and np.isfinite(np.float32(grad)).all(), loss


def test_bad_shapes_are_rejected():
  with pytest.raises(ValueError, match='labels'):
    losses.cross_entropy(jnp.zeros((4, 7)), jnp.zeros((3,), jnp.int32))


def test_registered_losses_return_their_terms_summing_to_the_total(batch):
  logits, labels = batch
  permutation = np.arange(16) % 10
  order_logits = np.random.default_rng(1).normal(size=(16, 10))
  inputs = (jnp.float32(logits), {'order_logits': jnp.float32(order_logits)},
            {'label': jnp.int32(labels), 'permutation': jnp.int32(permutation)})
  for spec in ({'name': 'cross_entropy'}, {'name': 'label_smoothing', 'smoothing': 0.2},
               {'name': 'compact', 'beta': 0.3}, {'name': 'order', 'order_weight': 0.25}):
    loss = losses.build_loss(spec)
    total, terms = loss(*inputs)
    assert set(terms) == set(loss.terms) and total.shape == (16,)
    np.testing.assert_allclose(total, sum(terms.values()), rtol=1e-6)
  _, compact_terms = losses.build_loss({'name': 'compact', 'beta': 0.3})(*inputs)
  np.testing.assert_allclose(compact_terms['cross_entropy'] + compact_terms['compactness'],
                             _compact_numpy(logits, labels, 0.3), rtol=1e-5)
  order_total, _ = losses.build_loss({'name': 'order', 'order_weight': 0.25})(*inputs)
  ce = lambda z, y: -_log_softmax(z)[np.arange(len(y)), y]
  np.testing.assert_allclose(order_total, ce(logits, labels) + 0.25 * ce(order_logits, permutation), rtol=1e-5)


def test_build_loss_names_unknown_losses_and_fields():
  with pytest.raises(ValueError, match=r"config.loss.name='focal' not in \['aen', 'aen_prototype', 'compact', 'cross_entropy'"):
    losses.build_loss({'name': 'focal'})
  with pytest.raises(ValueError, match=r"\['beta'\] are not fields of the 'cross_entropy' loss"):
    losses.build_loss({'name': 'cross_entropy', 'beta': 0.2})
  with pytest.raises(ValueError, match="aux\\['order_logits'\\]"):
    losses.build_loss({'name': 'order'})(jnp.zeros((2, 7)), {}, {'label': jnp.zeros(2, jnp.int32)})
