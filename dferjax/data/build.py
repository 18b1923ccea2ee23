"""Build DFEW / AFEW / FERV39K TFDS datasets (array_record) without `tfds build`, which needs Apache Beam.

  python scripts/build_dataset.py --dataset dfew --manual_dir /data/DFEW --data_dir ~/tensorflow_datasets
  build('dfew', manual_dir, data_dir, ['fold1_px48'])   # in-process, e.g. from a demo

Configs build in a process pool (spawned, so a parent that already imported JAX is safe), and each build decodes
and resizes frames on threads. A build writes into TFDS' `incomplete.*` directory and renames it only when
every split is written, so an interrupted or failed build never looks complete to a reader. Each build also
records what it was built from (`dferjax_build.json`: records per split, a fingerprint of the split lists and
clip folders, frame size and storage), so a later "already built" is checked against the manual dir as it is now.
"""
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import pathlib
import queue as queue_lib
import sys
import threading
import time

import tqdm

from dferjax.data import datasets
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
  warnings: list[str] = dataclasses.field(default_factory=list)


def resolve_configs(dataset: str, configs=None, image_size: int | None = None) -> list[str]:
  """Canonical config names: all predefined ones by default; `image_size` sets the size of every config
  (DFEW: fold1..fold5 at that size when `configs` is None)."""
  cls = datasets.builder_class(dataset)
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
                            f'{datasets.builder_class(dataset).MANUAL_DOWNLOAD_INSTRUCTIONS}')
  return manual_dir


# A split that loses more than this share of its listed clips (missing or empty folders) is announced loudly.
SKIPPED_WARNING_FRACTION = 0.03


def build_record(scan, config) -> dict:
  """What a build is made from: records per split, a fingerprint of every listed clip (split, id, label, frame
  count; skipped ones with their reason), the frame size and storage."""
  digest = hashlib.sha256()
  for split in sorted(scan.splits):
    for clip in scan.splits[split]:
      digest.update(f'{split}\t{clip.clip_id}\t{clip.label}\t{len(clip.frames)}\n'.encode())
  for split, clip_id, reason in sorted(scan.skipped):
    digest.update(f'skipped\t{split}\t{clip_id}\t{reason}\n'.encode())
  return {'records': {split: len(clips) for split, clips in sorted(scan.splits.items())},
          'fingerprint': digest.hexdigest()[:16], 'image_size': config.image_size,
          'frame_encoding': config.frame_encoding}


def write_build_record(builder, record: dict) -> None:
  """The record, with the sizes of the files just written (`datasets.check_files` compares them at every read)."""
  with open(builder.data_path / datasets.BUILD_RECORD, 'w') as f:
    json.dump({**record, 'files': datasets.data_files(builder.data_path)}, f, indent=2)


def check_unchanged(builder, record: dict, name: str, manual_dir) -> None:
  """Refuses an "already built" config whose stored records, or recorded input, differ from the manual dir now:
  a build from a half-copied tree must not pass as the full dataset."""
  stored = {split: info.num_examples for split, info in builder.info.splits.items()}
  differences = [f'{split}: {stored.get(split, 0)} records stored, {record["records"].get(split, 0)} clips in '
                 'the manual dir' for split in sorted({*stored, *record['records']})
                 if stored.get(split, 0) != record['records'].get(split, 0)]
  path = builder.data_path / datasets.BUILD_RECORD
  if path.is_file():
    recorded = json.loads(path.read_text())
    what = {'fingerprint': 'fingerprint of the split lists (clip ids, labels, frame counts, skipped clips)',
            'image_size': 'frame size', 'frame_encoding': 'frame storage'}
    differences += [f'{what[key]}: built from {recorded.get(key)!r}, the manual dir gives {record[key]!r}'
                    for key in what if recorded.get(key) != record[key] and not (key == 'fingerprint' and differences)]
  if differences:
    raise ValueError(f'{name} in {builder.data_path} was built from other input than {manual_dir} holds now:\n  '
                     + '\n  '.join(differences)
                     + '\nRebuild it with --overwrite (build(..., overwrite=True)), or give another --data_dir.')


def skipped_warnings(name: str, scan) -> list[str]:
  """One warning per split that skips more than SKIPPED_WARNING_FRACTION of its listed clips."""
  lines = []
  for split, clips in scan.splits.items():
    skipped = sum(s == split for s, _, _ in scan.skipped)
    listed = len(clips) + skipped
    if listed and skipped / listed > SKIPPED_WARNING_FRACTION:
      lines.append(f'warning: {name} {split}: {skipped} of {listed} listed clips ({100 * skipped / listed:.1f} %) '
                   'skipped (missing or empty clip folders): is the manual dir complete?')
  return lines


def is_built(builder) -> bool:
  """TFDS' own completeness test (dataset_info.json in the final, renamed directory)."""
  return builder.data_path.is_dir() and builder.is_prepared()  # is_prepared alone logs a warning when absent


_progress_queue = None  # set in each worker process


def _exit_with_parent(parent_pid: int) -> None:
  """A worker whose parent is gone (killed: no chance to stop the pool) exits instead of building on."""
  while os.getppid() == parent_pid:
    time.sleep(0.5)
  os._exit(1)  # pylint: disable=protected-access


def _init_worker(progress_queue, parent_pid: int):
  global _progress_queue
  _progress_queue = progress_queue
  threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
  sys.stdout = open(os.devnull, 'w')  # TFDS prints per build; the parent shows one bar and one summary
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.display_progress_bar(False)


def _build_one(dataset: str, name: str, manual_dir: str, data_dir: str, threads: int, overwrite: bool,
               progress=None) -> float:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if progress is None and _progress_queue is not None:
    progress = lambda num_frames: _progress_queue.put(1)
  start = time.perf_counter()
  builder = datasets.builder_class(dataset)(config=name, data_dir=data_dir, threads=threads, progress=progress)
  modes = tfds.download.GenerateMode
  mode = modes.FORCE_REDOWNLOAD if overwrite else modes.REUSE_DATASET_IF_EXISTS
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, download_mode=mode))
  scan = getattr(builder, 'last_scan', None) or builder.scan(pathlib.Path(manual_dir))
  write_build_record(builder, build_record(scan, builder.builder_config))
  return time.perf_counter() - start


def build(dataset: str, manual_dir, data_dir, configs=None, *, image_size: int | None = None,
          workers: int | None = None, overwrite: bool = False, show_progress: bool = True) -> list[ConfigReport]:
  """Builds every requested config of `dataset` ('dfew' | 'afew' | 'ferv39k') into `data_dir`.

  configs: names ('fold1_px48'), a comma-separated string, or None for all predefined configs.
  workers: CPU cores to use (default all): configs run in min(workers, #configs) processes, frames on the rest.
  Configs already built are left alone unless `overwrite`, after checking that they were built from what the
  manual dir holds now (else ValueError naming the difference). Raises the first failure (with the config named).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  cls = datasets.builder_class(dataset)
  names = resolve_configs(dataset, configs, image_size)
  manual_dir = check_manual_dir(dataset, manual_dir)
  data_dir = pathlib.Path(data_dir).expanduser()
  workers = max(1, workers or os.cpu_count() or 1)
  reports, to_build = {}, []
  for name in names:  # scan first: a bad CSV fails before any decoding
    builder = cls(config=name, data_dir=os.fspath(data_dir))
    scan = builder.scan(manual_dir)
    done = is_built(builder) and not overwrite
    if done:
      check_unchanged(builder, build_record(scan, builder.builder_config), f'{dataset}/{name}', manual_dir)
      datasets.check_files(f'{dataset}/{name}', builder.data_path)
    reports[name] = ConfigReport(f'{dataset}/{name}', os.fspath(builder.data_path),
                                 'already built' if done else 'built', **scan.summary(),
                                 warnings=skipped_warnings(f'{dataset}/{name}', scan))
    for line in reports[name].warnings:
      print(line, file=sys.stderr, flush=True)
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
                                              initargs=(progress_queue, os.getpid())) as pool:
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
    lines.extend(f'  {line}' for line in report.warnings)
  return '\n'.join(lines)
