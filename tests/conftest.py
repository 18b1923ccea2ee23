"""Test-wide set-up: two host CPU devices, fast compiles, parsed absl flags for grain workers."""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update('jax_disable_most_optimizations', True)


def pytest_configure(config):
  del config
  flags.FLAGS.mark_as_parsed()
