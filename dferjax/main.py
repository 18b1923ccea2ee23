"""Trains and evaluates a DFER model.

    python -m dferjax.main --config configs/stt_dfew.py:fold=1 --workdir runs/stt_fold1 [--config.batch_size=64]

Restarting the same command resumes from the workdir's latest checkpoint.
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py[:args]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and reports.')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False,
                                 'Call jax.distributed.initialize() first (multi-host GPU clusters, TPU pods).')
_VERBOSE = flags.DEFINE_bool('verbose', False, "Show the libraries' INFO logs (Orbax logs every save step).")
_COMPILATION_CACHE = flags.DEFINE_string(
    'compilation_cache', os.path.expanduser('~/.cache/dferjax/jax'),
    'Persistent XLA compilation cache, so a restarted run does not recompile; empty to disable.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _VERBOSE.value:
    logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=import-outside-toplevel
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  if _COMPILATION_CACHE.value:
    jax.config.update('jax_compilation_cache_dir', _COMPILATION_CACHE.value)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  if jax.process_index() == 0:
    print(f'JAX process {jax.process_index()}/{jax.process_count()}, {jax.device_count()} devices: '
          f'{jax.devices()[0].device_kind} ...', flush=True)
  from dferjax import train  # pylint: disable=import-outside-toplevel
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
