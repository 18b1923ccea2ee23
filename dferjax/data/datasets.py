"""Class names and a one-call random-access source for the built DFEW / AFEW / FERV39K datasets.

`data_source('dfew/fold1_px48', 'train', data_dir)` hides the TFDS builder classes: the pipeline and the trainer
only name a dataset. Build first with `python scripts/build_dataset.py` (see `dferjax.data.build`).
"""
import json
import os
import pathlib

import numpy as np

from tfds_builders.labels import CLASS_NAMES  # noqa: F401  # re-exported: label order 0..6 of every builder

DATASETS = ('dfew', 'afew', 'ferv39k')
REPORTED_SPLITS = {'dfew': 'test', 'afew': 'validation', 'ferv39k': 'test'}  # the split each paper's table reports


def builder_class(dataset: str):
  """The TFDS builder class of 'dfew' | 'afew' | 'ferv39k' (imports tfds lazily)."""
  if dataset == 'dfew':
    from tfds_builders.dfew import Dfew
    return Dfew
  if dataset == 'afew':
    from tfds_builders.afew import Afew
    return Afew
  if dataset == 'ferv39k':
    from tfds_builders.ferv39k import Ferv39k
    return Ferv39k
  raise ValueError(f'dataset {dataset!r} not in {DATASETS}')


def split_name(name: str) -> tuple[str, str | None]:
  """'dfew/fold1_px48' -> ('dfew', 'fold1_px48'); 'afew' -> ('afew', None) (the default config)."""
  dataset, _, config = name.partition('/')
  if dataset not in DATASETS:
    raise ValueError(f'dataset name {name!r}: expected "<dataset>[/<config>]" with dataset in {DATASETS} '
                     f"(or 'image_list', dferjax.data.image_list, or 'clip_list', dferjax.data.clip_list)")
  return dataset, (config or None)


def builder(name: str, data_dir: str):
  """The TFDS builder for 'dfew/fold3_px224' etc.; any `px{size}` is accepted (tiny sizes for tests/demos)."""
  dataset, config_name = split_name(name)
  cls = builder_class(dataset)
  # By name, not object: a pickled builder (grain worker processes) re-resolves it to the one config object
  # TFDS accepts for that name.
  config = cls.config_from_name(config_name).name if config_name else None
  try:
    return cls(config=config, data_dir=os.fspath(data_dir))
  except Exception as error:  # pylint: disable=broad-except  # re-raised unless a metadata file is unreadable
    # TFDS reads a built config's dataset_info.json on construction; a cut or empty one (an interrupted copy)
    # raises protobuf's ParseError or a JSON error from deep inside TFDS.
    if not any(kind in type(error).__name__ for kind in ('ParseError', 'JSONDecodeError', 'DecodeError')):
      raise
    where = os.path.join(os.fspath(data_dir), dataset, config or '')
    raise ValueError(f'{name}: the built metadata under {where} cannot be read ({type(error).__name__}: '
                     f'{str(error).strip().splitlines()[0][:200]}): a cut or unfinished copy? Copy it again from '
                     'where it was built, or rebuild it (scripts/build_dataset.py --overwrite).') from error


BUILD_RECORD = 'dferjax_build.json'  # written by dferjax.data.build beside the built files


def data_files(data_path) -> dict[str, int]:
  """{file name: bytes} of a built config's record files (the ArrayRecord shards)."""
  return {entry.name: entry.stat().st_size for entry in os.scandir(data_path) if '.array_record-' in entry.name}


def check_files(name: str, data_path) -> None:
  """Compares a built config's record files with the sizes its build recorded: a cut copy (an interrupted rsync
  or scp to a node's disk) would otherwise fail inside ArrayRecord ('Corrupted Riegeli/records file') at the first
  read of a damaged record, or not at all. Builds recorded before sizes were are not checked."""
  record_path = pathlib.Path(data_path) / BUILD_RECORD
  recorded = json.loads(record_path.read_text()).get('files') if record_path.is_file() else None
  if not recorded:
    return
  found = data_files(data_path)
  differing = [f'{file} is {"missing" if file not in found else f"{found[file]:,} bytes"}, the build wrote '
               f'{size:,}' for file, size in sorted(recorded.items()) if found.get(file) != size]
  if differing:
    raise ValueError(f'{name} in {data_path} is not as built: {"; ".join(differing)} (a cut or unfinished copy?). '
                     'Copy it again from where it was built, or rebuild it (scripts/build_dataset.py --overwrite).')


def data_source(name: str, split: str, data_dir: str):
  """Random-access source (len + __getitem__) of one split; records follow docs/contracts.md.

  name: 'dfew/fold1', 'dfew/fold3_px224', 'dfew/fold1_px48', 'afew/px112', 'ferv39k/px112', ...
  split: 'train' | 'test' (DFEW, FERV39K) | 'train' | 'validation' (AFEW); TFDS slices ('train[:10%]') work too.
  """
  dataset_builder = builder(name, data_dir)
  if not (dataset_builder.data_path.is_dir() and dataset_builder.is_prepared()):
    dataset, config_name = split_name(name)
    raise FileNotFoundError(
        f'{name} is not built: {dataset_builder.data_path} does not exist. Build it with\n'
        f'  python scripts/build_dataset.py --dataset {dataset} --manual_dir <{dataset} root> '
        f'--data_dir {data_dir} --configs {dataset_builder.builder_config.name}\n'
        f'(or `python -m dferjax.data.synthetic --layout {dataset} --out <dir>` for a synthetic root).')
  check_files(name, dataset_builder.data_path)
  base_split = split.split('[', 1)[0]
  if base_split not in dataset_builder.info.splits:
    raise ValueError(f'split {split!r} not in {sorted(dataset_builder.info.splits)} of {name} '
                     f'({dataset_builder.data_path})')
  return dataset_builder.as_data_source(split=split)


class ClipSubset:
  """A random-access view of some records of a source (len + __getitem__), e.g. the clips long enough."""

  def __init__(self, source, indices):
    self.source = source
    self.indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index):
    return self.source[int(self.indices[index])]


def drop_short_clips(source, min_frames: int) -> tuple[ClipSubset, int]:
  """(the records with at least `min_frames` frames, how many were left out): NR-DFERNet's authors keep only
  clips of >= 16 frames in train and test lists (refs.md §1.4). Reads every record once."""
  lengths = np.array([int(source[i]['num_frames']) for i in range(len(source))], np.int64)
  keep = np.flatnonzero(lengths >= min_frames)
  if len(keep) == 0:
    raise ValueError(f'config.dataset.min_frames={min_frames} leaves none of the {len(source)} clips '
                     f'(the longest has {lengths.max(initial=0)} frames)')
  return ClipSubset(source, keep), len(source) - len(keep)
