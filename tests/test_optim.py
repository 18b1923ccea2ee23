"""The optimizer and schedule against PyTorch's SGD + StepLR, the reference the papers trained with."""
import numpy as np
import pytest

from dferjax import configlib, train


def _optimizer_config(**overrides):
  """STT's optimizer (SGD 0.01, momentum 0.9, wd 1e-4, / 10 every 40 epochs) with `overrides`."""
  config = configlib.base_config().optimizer
  config.update(dict(name='sgd', learning_rate=0.01, momentum=0.9, weight_decay=1e-4, schedule='step',
                     step_epochs=40, step_factor=0.1))
  config.update(overrides)
  return config


def test_step_schedule_divides_by_ten_every_40_epochs():
  schedule = train.learning_rate_schedule(_optimizer_config(), steps_per_epoch=5, num_epochs=100)
  epochs = np.array([0, 39, 40, 79, 80, 99])
  np.testing.assert_allclose([float(schedule(e * 5 + 4)) for e in epochs],
                             [0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001], rtol=1e-6)


def test_cosine_warmup_schedule_matches_formula():
  config = _optimizer_config(schedule='cosine', learning_rate=1e-4, cosine_epochs=160, warmup_epochs=10)
  schedule = train.learning_rate_schedule(config, steps_per_epoch=3, num_epochs=120)
  for epoch in (0, 4, 9, 10, 50, 119):
    want = 1e-4 * 0.5 * (1 + np.cos(np.pi * epoch / 160)) * min(1.0, (epoch + 1) / 10)
    np.testing.assert_allclose(float(schedule(epoch * 3 + 1)), want, rtol=1e-5)


def test_resuming_with_another_num_epochs_says_when_the_cosine_changes():
  """num_epochs is resumable; a cosine over num_epochs then anneals elsewhere, and the run says so, with numbers."""
  cosine = _optimizer_config(schedule='cosine', learning_rate=0.1, cosine_epochs=0)
  note = train.schedule_change_note(cosine, steps_per_epoch=10, saved_epochs=30, num_epochs=40, step=200)
  saved, now = 0.1 * 0.5 * (1 + np.cos(np.pi * 20 / 30)), 0.1 * 0.5 * (1 + np.cos(np.pi * 20 / 40))
  assert note == (f"note: config.num_epochs=40, and the checkpoint's run had 30: the cosine schedule anneals over "
                  f"num_epochs, so from step 200 the learning rate is {now:.4g} (the saved run's {saved:.4g}). To "
                  f"keep the saved schedule, pass --config.optimizer.cosine_epochs=30 too.")
  assert train.schedule_change_note(cosine, 10, 30, 30, 200) is None  # the same epochs
  fixed = _optimizer_config(schedule='cosine', learning_rate=0.1, cosine_epochs=160)  # its own period
  assert train.schedule_change_note(fixed, 10, 30, 40, 200) is None
  assert train.schedule_change_note(_optimizer_config(), 10, 30, 40, 200) is None  # step: by epoch, not by the end


def test_exponential_schedule_matches_torch_exponential_lr():
  torch = pytest.importorskip('torch')
  config = _optimizer_config(schedule='exponential', learning_rate=1e-3, decay_rate=0.01 ** (1 / 70))
  schedule = train.learning_rate_schedule(config, steps_per_epoch=4, num_epochs=70)
  sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
  exponential = torch.optim.lr_scheduler.ExponentialLR(sgd, gamma=0.01 ** (1 / 70))
  for epoch in range(71):
    for step in range(epoch * 4, epoch * 4 + 4):
      np.testing.assert_allclose(float(schedule(step)), sgd.param_groups[0]['lr'], rtol=1e-5)
    sgd.step()  # (no gradients: nothing moves) torch wants it before the scheduler's step
    exponential.step()
  np.testing.assert_allclose(float(schedule(70 * 4)), 1e-5, rtol=1e-4)  # a hundredth after 70 epochs


def test_sgd_momentum_weight_decay_matches_torch():
  torch = pytest.importorskip('torch')
  import jax.numpy as jnp
  import optax
  steps_per_epoch = 2
  config = _optimizer_config(step_epochs=2)
  tx = train.create_optimizer(config, train.learning_rate_schedule(config, steps_per_epoch, 10))
  rng = np.random.default_rng(0)
  w0, targets = rng.normal(size=(4, 3)), rng.normal(size=(8, 4, 3))

  weight = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
  sgd = torch.optim.SGD([weight], lr=0.01, momentum=0.9, weight_decay=1e-4)
  step_lr = torch.optim.lr_scheduler.StepLR(sgd, step_size=2, gamma=0.1)
  params = jnp.asarray(w0, jnp.float32)
  opt_state = tx.init(params)
  for i, target in enumerate(targets):
    sgd.zero_grad()
    ((weight - torch.tensor(target)) ** 3).abs().sum().backward()
    sgd.step()
    if (i + 1) % steps_per_epoch == 0:
      step_lr.step()
    grads = 3 * (params - target) ** 2 * jnp.sign(params - target)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(np.asarray(params), weight.detach().numpy(), rtol=1e-5, atol=1e-6)
