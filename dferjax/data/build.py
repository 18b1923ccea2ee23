"""Build DFEW / AFEW / FERV39K TFDS datasets (array_record) without `tfds build`, which needs Apache Beam.

  python scripts/build_dataset.py --dataset dfew --manual_dir /data/DFEW --data_dir ~/tensorflow_datasets
  build('dfew', manual_dir, data_dir, ['fold1_px48'])   # in-process, e.g. from a demo

Configs build in a process pool (spawned, so a parent that already imported JAX is safe), and each build decodes
and resizes frames on threads. A build writes into TFDS' `incomplete.*` directory and renames it only when
every split is written, so an interrupted or failed build never looks complete to a reader.
"""
import concurrent.futures
import contextlib
import dataclasses
import multiprocessing
import os
import pathlib
import queue as queue_lib
import sys
import time

import tqdm

from dferjax.data.datasets import builder_class
from tfds_builders.labels import CLASS_NAMES


@dataclasses.dataclass
class ConfigReport:
  """What one config holds after `build`: clips per split and class, skipped clips per reason."""
  name: str  # 'dfew/fold1_px48'
  data_path: str
  status: str  # 'built' | 'already built'
  splits: dict[str, dict[str, int]]
  skipped: dict[str, int]
  skipped_examples: dict[str, list[str]]
  seconds: float = 0.0


def resolve_configs(dataset: str, configs=None, image_size: int | None = None) -> list[str]:
  """Canonical config names: all predefined ones by default; `image_size` sets the size of every config
  (DFEW: fold1..fold5 at that size when `configs` is None)."""
  cls = builder_class(dataset)
  if configs is None:
    if image_size is None:
      return [config.name for config in cls.BUILDER_CONFIGS]
    folds = sorted({config.fold for config in cls.BUILDER_CONFIGS})
    configs = [f'fold{fold}' for fold in folds] if folds != [None] else [f'px{image_size}']
  if isinstance(configs, str):
    configs = [name for name in configs.split(',') if name]
  names = []
  for name in configs:
    fields = cls.parse_config_name(name)
    if image_size is not None and fields['image_size'] != image_size:
      if 'px' in name:
        raise ValueError(f'config {name!r} names a size and image_size={image_size} another; give one of them')
      fields['image_size'] = image_size
    config = cls.make_config(**fields)
    if config.name not in names:
      names.append(cls.config_from_name(config.name).name)
  return names


def check_manual_dir(dataset: str, manual_dir) -> pathlib.Path:
  manual_dir = pathlib.Path(manual_dir).expanduser()
  if not manual_dir.is_dir() or not any(manual_dir.iterdir()):
    raise FileNotFoundError(f'{dataset} manual_dir {manual_dir} does not exist or is empty.\n'
                            f'{builder_class(dataset).MANUAL_DOWNLOAD_INSTRUCTIONS}')
  return manual_dir


def is_built(builder) -> bool:
  """TFDS' own completeness test (dataset_info.json in the final, renamed directory)."""
  return builder.data_path.is_dir() and builder.is_prepared()  # is_prepared alone logs a warning when absent


_progress_queue = None  # set in each worker process


def _init_worker(progress_queue):
  global _progress_queue
  _progress_queue = progress_queue
  sys.stdout = open(os.devnull, 'w')  # TFDS prints per build; the parent shows one bar and one summary
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.display_progress_bar(False)


def _build_one(dataset: str, name: str, manual_dir: str, data_dir: str, threads: int, overwrite: bool,
               progress=None) -> float:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if progress is None and _progress_queue is not None:
    progress = lambda num_frames: _progress_queue.put(1)
  start = time.perf_counter()
  builder = builder_class(dataset)(config=name, data_dir=data_dir, threads=threads, progress=progress)
  modes = tfds.download.GenerateMode
  mode = modes.FORCE_REDOWNLOAD if overwrite else modes.REUSE_DATASET_IF_EXISTS
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, download_mode=mode))
  return time.perf_counter() - start


def build(dataset: str, manual_dir, data_dir, configs=None, *, image_size: int | None = None,
          workers: int | None = None, overwrite: bool = False, show_progress: bool = True) -> list[ConfigReport]:
  """Builds every requested config of `dataset` ('dfew' | 'afew' | 'ferv39k') into `data_dir`.

  configs: names ('fold1_px48'), a comma-separated string, or None for all predefined configs.
  workers: CPU cores to use (default all): configs run in min(workers, #configs) processes, frames on the rest.
  Configs already built are left alone unless `overwrite`. Raises the first failure (with the config named).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  cls = builder_class(dataset)
  names = resolve_configs(dataset, configs, image_size)
  manual_dir = check_manual_dir(dataset, manual_dir)
  data_dir = pathlib.Path(data_dir).expanduser()
  workers = max(1, workers or os.cpu_count() or 1)
  reports, to_build = {}, []
  for name in names:  # scan first: a bad CSV fails before any decoding
    builder = cls(config=name, data_dir=os.fspath(data_dir))
    summary = builder.scan(manual_dir).summary()
    done = is_built(builder) and not overwrite
    reports[name] = ConfigReport(f'{dataset}/{name}', os.fspath(builder.data_path),
                                 'already built' if done else 'built', **summary)
    if not done:
      to_build.append(name)
  total = sum(sum(sum(per_class.values()) for per_class in reports[name].splits.values()) for name in to_build)
  bar = tqdm.tqdm(total=total, unit='clip', desc=f'{dataset}: {len(to_build)} config(s)', disable=not show_progress)
  tfds.display_progress_bar(False)
  try:
    processes = min(workers, len(to_build))
    threads = max(1, workers // max(processes, 1))
    if processes <= 1:
      for name in to_build:
        try:
          reports[name].seconds = _build_one(dataset, name, os.fspath(manual_dir), os.fspath(data_dir), threads,
                                             overwrite, progress=lambda num_frames: bar.update(1))
        except Exception as error:
          error.add_note(f'while building {dataset}/{name}')
          raise
    else:
      _build_in_processes(dataset, to_build, manual_dir, data_dir, processes, threads, overwrite, bar, reports)
  finally:
    tfds.display_progress_bar(True)
    bar.close()
  return [reports[name] for name in names]


def _build_in_processes(dataset, names, manual_dir, data_dir, processes, threads, overwrite, bar, reports):
  context = multiprocessing.get_context('spawn')
  progress_queue = context.Queue()
  failure = None
  with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context, initializer=_init_worker,
                                              initargs=(progress_queue,)) as pool:
    futures = {pool.submit(_build_one, dataset, name, os.fspath(manual_dir), os.fspath(data_dir), threads,
                           overwrite): name for name in names}
    pending = set(futures)
    while pending:
      done, pending = concurrent.futures.wait(pending, timeout=0.2, return_when=concurrent.futures.FIRST_COMPLETED)
      with contextlib.suppress(queue_lib.Empty):
        while True:
          bar.update(progress_queue.get_nowait())
      for future in done:
        if future.cancelled():
          continue
        if future.exception() is not None and failure is None:
          failure = future.exception()
          failure.add_note(f'while building {dataset}/{futures[future]}')
          for other in pending:  # configs not started yet; running ones finish (each is complete or absent)
            other.cancel()
        elif future.exception() is None:
          reports[futures[future]].seconds = future.result()
  if failure is not None:
    raise failure


def format_summary(reports: list[ConfigReport]) -> str:
  """The closing table: clips per split and class, skipped clips and why."""
  lines = []
  for report in reports:
    lines.append(f'{report.name}: {report.status}'
                 + (f' in {report.seconds:.1f} s' if report.status == 'built' else '') + f' -> {report.data_path}')
    for split, per_class in report.splits.items():
      counts = ', '.join(f'{name} {per_class[name]}' for name in CLASS_NAMES)
      lines.append(f'  {split:<10} {sum(per_class.values()):>6} clips  ({counts})')
    for reason, count in report.skipped.items():
      lines.append(f'  skipped {count} clip(s): {reason}, e.g. {", ".join(report.skipped_examples[reason])}')
    if not report.skipped:
      lines.append('  skipped 0 clips')
  return '\n'.join(lines)
