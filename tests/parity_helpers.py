"""Checks shared by the PyTorch parity tests."""
import numpy as np

from dferjax.reference import loading


def assert_running_stats_match(batch_stats, key_of, before: dict, after: dict, counts: dict):
  """flax's updated BatchNorm statistics equal torch's after the same train step, every one of them moved.

  flax moves the running variance towards the biased batch variance, torch towards the unbiased one: torch's
  update is converted with the batch's element count (`counts`, by BN module name).
  """
  for path, got in loading.flax_leaves(batch_stats):
    key = key_of(path)
    if path[-1] == 'mean':
      np.testing.assert_allclose(got, after[key].numpy(), atol=1e-5, err_msg=key)
    else:
      n, old = counts[key.rsplit('.', 1)[0]], before[key].numpy()
      biased = (after[key].numpy() - 0.9 * old) / 0.1 * (n - 1) / n
      np.testing.assert_allclose(got, 0.9 * old + 0.1 * biased, rtol=1e-5, atol=1e-5, err_msg=key)
    assert not np.allclose(got, before[key].numpy())  # the statistics did move
