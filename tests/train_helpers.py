"""Runs a few train steps of a config on random uint8 clips: shared by in-process and subprocess tests."""
import jax
import numpy as np

from dferjax import sharding, train


def run_random_steps(config, num_steps: int = 3, batch_size: int = 4):
  """Returns (state, accumulator) after `num_steps` train steps on seeded random batches."""
  model = train.build_model(config)
  tx = train.create_optimizer(config.optimizer, train.learning_rate_schedule(config.optimizer, 3, 3))
  rng = jax.random.key(0)
  steps = train.compile_steps(config, model, tx, sharding.make_mesh(), rng)
  state = steps.init(rng)
  accumulator = jax.device_put(train.init_train_accumulator(), steps.replicated)
  data = np.random.default_rng(0)
  for _ in range(num_steps):
    batch = {'video': data.integers(0, 256, size=train.video_shape(config, batch_size), dtype=np.uint8),
             'label': data.integers(0, 7, size=batch_size).astype(np.int32), 'mask': np.ones(batch_size, bool)}
    state, accumulator = steps.train(state, accumulator, sharding.to_global(batch, steps.batch_sharding))
  return state, accumulator
