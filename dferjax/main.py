"""Trains and evaluates a DFER model.

    python -m dferjax.main --config configs/stt_dfew.py:fold=1 --workdir runs/stt_fold1 [--config.batch_size=64]

Restarting the same command resumes from the workdir's latest checkpoint. To see a config's fields and defaults:

    python -m dferjax.main --config configs/stt_dfew.py --print_config

Expected errors (a misspelt field, bad data, a full disk) print one `error: ...` message and exit 1; Ctrl-C
stops naming the last checkpoint; --verbose shows tracebacks.
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

from dferjax import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py[:args]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and reports.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Join a multi-process run first (jax.distributed.initialize): the coordinator from the '
    'three flags below, else DFERJAX_COORDINATOR_ADDRESS, DFERJAX_NUM_PROCESSES, DFERJAX_PROCESS_ID, else the '
    'detected cluster (SLURM, Open MPI, Kubernetes, Cloud TPU). See docs/multihost.md.')
_COORDINATOR_ADDRESS = flags.DEFINE_string('coordinator_address', None,
                                           'With --distributed: host:port of process 0, the same on every process.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'With --distributed: how many processes the run has.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'With --distributed: this process, 0 .. num_processes - 1.')
_LOCAL_DEVICE_IDS = flags.DEFINE_string(
    'local_device_ids', None, "With --distributed: 'all' (every GPU this process sees: one process per node under "
    "SLURM or Open MPI, where JAX would give each process only the GPU of its local task id) or ids such as 0,1; "
    'else DFERJAX_LOCAL_DEVICE_IDS, else JAX\'s choice.')
_VERBOSE = flags.DEFINE_bool('verbose', False, "Show the libraries' INFO logs (Orbax logs every save step) and the "
                             'tracebacks of expected errors.')
_PRINT_CONFIG = flags.DEFINE_bool('print_config', False, 'Print the config (every field, after overrides) and exit.')
_COMPILATION_CACHE = flags.DEFINE_string(
    'compilation_cache', os.path.expanduser('~/.cache/dferjax/jax'),
    'Persistent XLA compilation cache, so a restarted run does not recompile; empty to disable.')
flags.mark_flags_as_required(['config'])
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _PRINT_CONFIG.value:
    print(_CONFIG.value)
    return
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required (or --print_config to print the config)')
  if not _VERBOSE.value:
    logging.set_verbosity(logging.WARNING)
  if not _DISTRIBUTED.value and (explicit := [f'--{flag.name}' for flag in (_COORDINATOR_ADDRESS, _NUM_PROCESSES,
                                                                            _PROCESS_ID, _LOCAL_DEVICE_IDS)
                                                     if flag.value is not None]):
    raise app.UsageError(f'{", ".join(explicit)} given without --distributed')
  if _DISTRIBUTED.value:
    from dferjax import distributed  # pylint: disable=import-outside-toplevel
    cli.run(lambda: distributed.initialize(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                           _LOCAL_DEVICE_IDS.value), verbose=_VERBOSE.value)
  import jax  # pylint: disable=import-outside-toplevel
  if _COMPILATION_CACHE.value:
    jax.config.update('jax_compilation_cache_dir', _COMPILATION_CACHE.value)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  if jax.process_index() == 0:
    print(f'JAX process {jax.process_index()}/{jax.process_count()}, {jax.device_count()} devices: '
          f'{jax.devices()[0].device_kind} ...', flush=True)
  from dferjax import train  # pylint: disable=import-outside-toplevel
  cli.run(lambda: train.train_and_evaluate(_CONFIG.value, _WORKDIR.value), verbose=_VERBOSE.value,
          workdir=_WORKDIR.value)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
