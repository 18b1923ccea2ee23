"""Runs a few train steps of a config on random uint8 clips: shared by in-process and subprocess tests."""
import jax
import numpy as np

from dferjax import sharding, train


def random_batch(config, batch_size: int, rng: np.random.Generator) -> dict:
  return {'video': rng.integers(0, 256, size=train.video_shape(config, batch_size), dtype=np.uint8),
          'label': rng.integers(0, config.num_classes, size=batch_size).astype(np.int32),
          'mask': np.ones(batch_size, bool)}


def run_random_steps(config, num_steps: int = 3, batch_size: int = 4, mesh=None):
  """Returns (state, accumulator) after `num_steps` train steps on seeded random batches (over `mesh`, default
  every device)."""
  steps = train.make_steps(config, steps_per_epoch=3, mesh=mesh)
  state = steps.init(jax.random.key(config.seed))
  accumulator = steps.init_accumulator()
  data = np.random.default_rng(0)
  for _ in range(num_steps):
    batch = random_batch(config, batch_size, data)
    state, accumulator = steps.train(state, accumulator, sharding.to_global(batch, steps.batch_sharding))
  return state, accumulator
