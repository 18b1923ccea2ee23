"""What a run ran with, so it can be rerun exactly and its data checked later: `<workdir>/environment.json`.

One record per start of the run (a resume appends one): package versions, the project's git commit (and whether
the tree had uncommitted changes), devices and processes, the seeds, the command line, and the dataset it read
(records per split, the build record `dferjax_build.json` that `scripts/build_dataset.py` wrote, and a
fingerprint of the built files' names and sizes). `python -m dferjax.evaluate` warns when the dataset it reads
differs from the one the run trained on.
"""
from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys
import warnings

import jax

from dferjax.data import datasets

FILENAME = 'environment.json'
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'tensorflow-datasets', 'numpy',
            'ml-collections', 'opencv-python-headless', 'dferjax')


class DatasetChangedWarning(UserWarning):
  """The dataset `evaluate` reads is not the one the run trained on."""


def package_versions() -> dict[str, str | None]:
  versions = {'python': sys.version.split()[0]}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def git_state() -> dict | None:
  """{'commit', 'dirty'} of the checkout dferjax is imported from; None outside a git checkout (a wheel)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def git(*args):
    return subprocess.run(['git', '-C', root, *args], capture_output=True, text=True, timeout=20, check=True).stdout
  try:
    commit = git('rev-parse', 'HEAD').strip()
    dirty = bool(git('status', '--porcelain', '--untracked-files=no').strip())
  except (OSError, subprocess.SubprocessError):
    return None
  return {'commit': commit, 'dirty': dirty}


# The variables that choose a process's devices and its share of their memory (scripts/run_folds.py --gpus sets
# the first two): which GPU a fold ran on.
DEVICE_VARIABLES = ('CUDA_VISIBLE_DEVICES', 'XLA_PYTHON_CLIENT_MEM_FRACTION', 'XLA_PYTHON_CLIENT_PREALLOCATE',
                    'TPU_VISIBLE_CHIPS')


# The variables that change how XLA computes (deterministic GPU kernels, TF32 matmuls, autotuning): a rerun that
# should match bit for bit needs them too.
NUMERICS_VARIABLES = ('XLA_FLAGS', 'JAX_DEFAULT_MATMUL_PRECISION', 'NVIDIA_TF32_OVERRIDE', 'LIBTPU_INIT_ARGS')


def device_state() -> dict:
  devices = jax.devices()
  return {'backend': jax.default_backend(), 'device_kind': devices[0].device_kind, 'device_count': len(devices),
          'local_device_count': jax.local_device_count(), 'process_count': jax.process_count(),
          'variables': {name: os.environ[name] for name in DEVICE_VARIABLES if name in os.environ},
          'numerics': {'default_matmul_precision': jax.config.jax_default_matmul_precision,
                       **{name: os.environ[name] for name in NUMERICS_VARIABLES if name in os.environ}}}


def files_fingerprint(path: pathlib.Path) -> str:
  """A digest of every built file's relative name and size (content hashing would read gigabytes)."""
  digest = hashlib.sha256()
  for file in sorted(p for p in path.rglob('*') if p.is_file()):
    digest.update(f'{file.relative_to(path).as_posix()}\t{file.stat().st_size}\n'.encode())
  return digest.hexdigest()[:16]


def file_digest(path: str) -> str | None:
  """The first 16 hex digits of a small file's SHA-256; None when it cannot be read."""
  try:
    with open(path, 'rb') as f:
      return hashlib.sha256(f.read()).hexdigest()[:16]
  except OSError:
    return None


def dataset_state(config) -> dict:
  """The dataset `config` reads: name, where, records per split, its build record and built files' fingerprint."""
  from dferjax.data import clip_list, image_list, inputs  # pylint: disable=import-outside-toplevel
  name = config.dataset.name
  if name == image_list.NAME:
    return {'name': name, 'note': 'an image list, read as it is: not fingerprinted'}
  if name == clip_list.NAME:
    return {'name': name, 'note': 'a clip list, read as it is: only the list files are fingerprinted',
            'lists': {split: {'path': path, 'sha256': file_digest(path)}
                      for split, path in sorted(config.dataset.clip_lists.items())}}
  builder = datasets.builder(name, inputs.data_dir(config))
  path = pathlib.Path(builder.data_path)
  if not path.is_dir():
    return {'name': name, 'data_path': str(path), 'missing': True}
  build_path = path / datasets.BUILD_RECORD
  return {'name': name, 'data_path': str(path),
          'records': {split: info.num_examples for split, info in sorted(builder.info.splits.items())},
          'build': json.loads(build_path.read_text()) if build_path.is_file() else None,
          'files_fingerprint': files_fingerprint(path)}


def run_record(config, start_step: int) -> dict:
  return {'started': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
          'start_step': start_step, 'command': sys.argv, 'packages': package_versions(), 'git': git_state(),
          'devices': device_state(), 'seed': config.seed,
          'validation': config.validation.to_dict() if 'validation' in config else None,
          'dataset': dataset_state(config)}


def read(workdir: str) -> list[dict]:
  """The run's records, oldest first ([] for a run written before environment.json)."""
  path = os.path.join(workdir, FILENAME)
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return json.load(f)['runs']


def append(workdir: str, config, start_step: int) -> dict:
  """Adds this start's record to `workdir/environment.json` (the chief's job)."""
  record = run_record(config, start_step)
  runs = read(workdir) + [record]
  with open(os.path.join(workdir, FILENAME), 'w') as f:
    json.dump({'runs': runs}, f, indent=2)
  return record


def dataset_differences(trained: dict, current: dict) -> list[str]:
  """What differs between two `dataset_state`s: records per split, build fingerprint, built files."""
  differences = []
  if trained.get('records') != current.get('records'):
    differences.append(f'records per split: trained on {trained.get("records")}, now {current.get("records")}')
  trained_build, current_build = trained.get('build') or {}, current.get('build') or {}
  if trained_build.get('fingerprint') != current_build.get('fingerprint'):
    differences.append(f'build fingerprint ({datasets.BUILD_RECORD}): trained on '
                       f'{trained_build.get("fingerprint")!r}, '
                       f'now {current_build.get("fingerprint")!r}')
  if trained.get('files_fingerprint') != current.get('files_fingerprint'):
    differences.append(f'built files: trained on {trained.get("files_fingerprint")!r}, '
                       f'now {current.get("files_fingerprint")!r}')
  return differences


def warn_if_dataset_changed(workdir: str, config) -> list[str]:
  """Warns (DatasetChangedWarning) when the dataset `config` reads now is not the one the run last trained on;
  returns the differences ([] also for a run without environment.json)."""
  runs = read(workdir)
  if not runs or 'records' not in runs[-1]['dataset']:
    return []
  trained = runs[-1]['dataset']
  differences = dataset_differences(trained, dataset_state(config))
  if differences:
    warnings.warn(f'{workdir} trained on another build of {config.dataset.name} than the one read now '
                  f'({trained.get("data_path")} then): ' + '; '.join(differences), DatasetChangedWarning,
                  stacklevel=2)
  return differences
