"""Test-wide set-up: two host CPU devices, fast compiles, parsed absl flags for grain workers."""
import os
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update('jax_disable_most_optimizations', True)
# Many tests compile the same tiny programs (each builds its own jitted steps); a compilation cache for the test
# session lets the later ones load them. Keyed on the program and the jax version: it cannot change a result.
jax.config.update('jax_compilation_cache_dir', os.path.join(tempfile.gettempdir(),
                                                            f'dferjax_tests_inprocess_xla_cache_{os.getpid()}'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)


def pytest_configure(config):
  del config
  flags.FLAGS.mark_as_parsed()
