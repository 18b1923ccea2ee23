"""Starting one process of a multi-host run: where the coordinator is, how many processes, which one this is.

`jax.distributed.initialize()` reads only JAX_COORDINATOR_ADDRESS from the environment (and detects SLURM,
Open MPI, Kubernetes and Cloud TPU); the process count and id must come from a detected cluster or as arguments.
dferjax takes all three from flags, else from DFERJAX_COORDINATOR_ADDRESS, DFERJAX_NUM_PROCESSES and
DFERJAX_PROCESS_ID, else lets JAX detect the cluster:

    python -m dferjax.main --distributed --coordinator_address=host0:1234 --num_processes=2 --process_id=0 ...
    DFERJAX_COORDINATOR_ADDRESS=host0:1234 DFERJAX_NUM_PROCESSES=2 DFERJAX_PROCESS_ID=0 python -m dferjax.main ...
"""
from __future__ import annotations

import os

ENV = {'coordinator_address': 'DFERJAX_COORDINATOR_ADDRESS', 'num_processes': 'DFERJAX_NUM_PROCESSES',
       'process_id': 'DFERJAX_PROCESS_ID'}


def _flag(name: str) -> str:
  return f'--{name}'


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, environ=None) -> dict:
  """The explicit set from flags, else from the DFERJAX_* variables; {} when neither gives any (JAX detects the
  cluster). Half a set fails naming what is missing, as JAX's own error names no flag or variable."""
  environ = os.environ if environ is None else environ
  given = {'coordinator_address': coordinator_address, 'num_processes': num_processes, 'process_id': process_id}
  source = {name: _flag(name) for name, value in given.items() if value not in (None, '')}
  if not source:
    given = {name: environ.get(variable) or None for name, variable in ENV.items()}
    source = {name: ENV[name] for name, value in given.items() if value is not None}
  if not source:
    return {}
  if missing := [name for name in given if name not in source]:
    by_env = next(iter(source.values())).startswith('DFERJAX_')
    missing = ', '.join(ENV[name] if by_env else _flag(name) for name in missing)
    raise ValueError(f'{", ".join(source.values())} given without {missing}: a run without a cluster scheduler needs '
                     'the coordinator address, the process count and this process id (or none of them, to '
                     'detect the cluster)')
  return _checked(given, source)


def _checked(given: dict, source: dict) -> dict:
  """Types and ranges, each error naming its flag or variable."""
  address = str(given['coordinator_address'])
  host, _, port = address.rpartition(':')
  if not host or not port.isdigit():
    raise ValueError(f'{source["coordinator_address"]}={address!r}: expected host:port, e.g. 10.0.0.1:1234')
  numbers = {}
  for name in ('num_processes', 'process_id'):
    try:
      numbers[name] = int(given[name])
    except ValueError:
      raise ValueError(f'{source[name]}={given[name]!r}: expected an integer') from None
  if numbers['num_processes'] < 1:
    raise ValueError(f'{source["num_processes"]}={numbers["num_processes"]}: a run needs at least one process')
  if not 0 <= numbers['process_id'] < numbers['num_processes']:
    raise ValueError(f'{source["process_id"]}={numbers["process_id"]} must be in [0, {numbers["num_processes"]}) '
                     f'({source["num_processes"]}={numbers["num_processes"]})')
  return {'coordinator_address': address, **numbers}


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None):
  """jax.distributed.initialize with the resolved set, or cluster detection when none is given (SLURM, Open MPI,
  Kubernetes JobSet/Indexed Job, Cloud TPU pods). CPU processes use JAX's default gloo collectives."""
  import jax  # pylint: disable=import-outside-toplevel
  explicit = resolve(coordinator_address, num_processes, process_id)
  try:
    jax.distributed.initialize(**explicit)
  except ValueError as error:  # JAX's 'Number of processes must be defined' names no flag
    if explicit:
      raise
    raise ValueError(f'--distributed found no cluster to join ({error}): outside SLURM, Open MPI, Kubernetes or '
                     'a Cloud TPU pod give --coordinator_address, --num_processes and --process_id (or '
                     f'{", ".join(ENV.values())})') from error
