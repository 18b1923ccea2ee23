"""Starting one process of a multi-host run: where the coordinator is, how many processes, which one this is.

`jax.distributed.initialize()` reads only JAX_COORDINATOR_ADDRESS from the environment (and detects SLURM,
Open MPI, Kubernetes and Cloud TPU); the process count and id must come from a detected cluster or as arguments.
dferjax takes all three from flags, else from DFERJAX_COORDINATOR_ADDRESS, DFERJAX_NUM_PROCESSES and
DFERJAX_PROCESS_ID, else lets JAX detect the cluster:

    python -m dferjax.main --distributed --coordinator_address=host0:1234 --num_processes=2 --process_id=0 ...
    DFERJAX_COORDINATOR_ADDRESS=host0:1234 DFERJAX_NUM_PROCESSES=2 DFERJAX_PROCESS_ID=0 python -m dferjax.main ...

Which GPUs a process uses: under a detected SLURM or Open MPI job JAX gives each process one GPU, the one its
local task id names (one task per GPU); with one task per node that would leave all GPUs but the first idle, so
`--local_device_ids=all` (or DFERJAX_LOCAL_DEVICE_IDS=all) keeps every GPU the process sees, and '0,1' picks some.
Launch recipes: docs/multihost.md.
"""
from __future__ import annotations

import os
import re

ENV = {'coordinator_address': 'DFERJAX_COORDINATOR_ADDRESS', 'num_processes': 'DFERJAX_NUM_PROCESSES',
       'process_id': 'DFERJAX_PROCESS_ID'}
LOCAL_DEVICE_IDS_ENV = 'DFERJAX_LOCAL_DEVICE_IDS'


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


def local_device_ids(value: str | None = None, environ=None) -> list[int] | None:
  """The --local_device_ids flag, else DFERJAX_LOCAL_DEVICE_IDS: None (JAX's choice), [] for 'all' (every device
  the process sees; JAX restricts only to a non-empty list) or the listed ids."""
  environ = os.environ if environ is None else environ
  source, value = ('--local_device_ids', value) if value else (LOCAL_DEVICE_IDS_ENV, environ.get(LOCAL_DEVICE_IDS_ENV))
  if not value:
    return None
  if value == 'all':
    return []
  try:
    ids = [int(part) for part in value.split(',')]
  except ValueError:
    raise ValueError(f"{source}={value!r}: expected 'all' or device ids such as 0,1") from None
  if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
    raise ValueError(f'{source}={value!r}: device ids must be distinct and >= 0')
  return ids


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_devices: str | None = None):
  """jax.distributed.initialize with the resolved set, or cluster detection when none is given (SLURM, Open MPI,
  Kubernetes JobSet/Indexed Job, Cloud TPU pods). CPU processes use JAX's default gloo collectives."""
  import jax  # pylint: disable=import-outside-toplevel
  explicit = resolve(coordinator_address, num_processes, process_id)
  device_ids = local_device_ids(local_devices)
  try:
    jax.distributed.initialize(**explicit, **({} if device_ids is None else {'local_device_ids': device_ids}))
  except ValueError as error:  # JAX's 'Number of processes must be defined' names no flag
    if explicit:
      raise
    raise ValueError(f'--distributed found no cluster to join ({error}): outside SLURM, Open MPI, Kubernetes or '
                     'a Cloud TPU pod give --coordinator_address, --num_processes and --process_id (or '
                     f'{", ".join(ENV.values())})') from error


_URL = re.compile(r'^[a-zA-Z][a-zA-Z0-9+.-]*://')
_WHY = {'workdir': ('dferjax writes its metrics and reports with POSIX file operations', ''),
        'data': ('ArrayRecord, the TFDS file format grain reads, opens only POSIX paths (google/array_record#120)',
                 ", or copy the built dataset to each host's local disk")}


def check_posix_path(path: str, what: str, kind: str):
  """Stops on a URL (gs://, s3://, ...) before anything is written: a shared workdir or dataset on many hosts is a
  path every host mounts (NFS, Lustre, Filestore, a bucket through Cloud Storage FUSE), see docs/multihost.md."""
  if path and _URL.match(str(path)):
    why, alternative = _WHY[kind]
    raise ValueError(f'{what}={str(path)!r}: {why}; mount the bucket on every host (Cloud Storage FUSE, gcsfuse) '
                     f'or use a shared filesystem, and give the mounted path{alternative} (docs/multihost.md)')
