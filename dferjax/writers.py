"""Metric writers without TensorFlow: JSON lines for tools, TensorBoard events for eyes, a tqdm bar.

`workdir/metrics.jsonl` holds one JSON object per line, appended and flushed as it happens:

  every record   'split': str ('train', 'test', ...), 'step': int (global optimiser step), 'epoch': number
                 (int at epoch ends; train records may carry fractional epochs), 'wall_time': unix seconds.
  train records  scalar metrics, e.g. 'loss', 'learning_rate', 'clips_per_second'.
  eval records   'uar', 'war' (fractions), 'per_class' {class name: recall, null for a class with no clips},
                 'confusion' [[int]] (rows = true class, columns = predicted), 'num_clips', optionally 'loss'
                 and 'seconds' (the trainer's wall time for the pass, the eval step's compilation included the
                 first time); and for each metric head of the model (metrics.MetricHead), '<head>': the same
                 fields for that head's classes (EST's 'order', AEN's emotion groups).

`MetricWriter.write_eval` builds eval records from a confusion matrix, so every producer agrees on this
layout and `reports.collect_fold_results` can rely on it. TensorBoard events go to `workdir/tensorboard`:
scalars as '{split}/{name}', per-class recall as '{split}/recall/{class}', the confusion matrix as the
image '{split}/confusion'; a metric head's as '{split}/{head}/{name}', '{split}/{head}/recall/{class}' and
'{split}/{head}/confusion'.

Restarts: a run killed after its last checkpoint has logged steps that the resumed run logs again.
`truncate_after(step)` (or `resume_step=`) drops JSONL records past the restored step and makes TensorBoard
purge its events past it, and `read_records` also lets a later record replace earlier ones of the same
split at a greater or equal step, so readers never see duplicated or out-of-order steps.
"""
from collections.abc import Iterable, Mapping, Sequence
import contextlib
import json
import logging
import math
import numbers
import os
import pathlib
import time
from typing import Any

import jax
import numpy as np
import tqdm

from dferjax import metrics as metrics_lib

METRICS_FILENAME = 'metrics.jsonl'
TENSORBOARD_DIRNAME = 'tensorboard'
_RESERVED_KEYS = ('split', 'step', 'epoch', 'wall_time')


def _to_json(value):
  """numpy/jax values -> plain JSON values; nan/inf -> null (strict JSON has no NaN)."""
  if isinstance(value, Mapping):
    return {str(key): _to_json(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_json(item) for item in value]
  if isinstance(value, (str, bool)) or value is None:
    return value
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    return _to_json(np.asarray(value).tolist())
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, numbers.Real):
    return float(value) if math.isfinite(value) else None
  raise TypeError(f'cannot write {type(value).__name__} value {value!r} to {METRICS_FILENAME}')


def _is_scalar(value) -> bool:
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    return np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.number)
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_head_result(value) -> bool:
  """A metric head's nested eval result ({'uar', 'war', 'per_class', ...}) inside an eval record."""
  return isinstance(value, Mapping) and 'war' in value and 'per_class' in value


def _drop_torn_tail(path: pathlib.Path) -> None:
  """Removes a last line without its newline (a process killed mid-write), so appends start clean."""
  with open(path, 'rb+') as file:
    size = file.seek(0, os.SEEK_END)
    if size == 0:
      return
    file.seek(size - 1)
    if file.read(1) == b'\n':
      return
    file.seek(0)
    keep = file.read().rfind(b'\n') + 1
    logging.warning('%s: dropping a torn last line (%d bytes) left by a killed run', path, size - keep)
    file.truncate(keep)


def read_records(path: str | os.PathLike, split: str | None = None) -> list[dict]:
  """The records of a metrics.jsonl (or of `workdir/metrics.jsonl`), in file order.

  A record replaces the earlier records of its split whose step is >= its own (a restarted run that was not
  truncated), and a torn last line is skipped, so steps increase within each split.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / METRICS_FILENAME
  if not path.is_file():
    raise FileNotFoundError(f'{path}: no such metrics file (written by dferjax.writers.MetricWriter)')
  lines = path.read_bytes().split(b'\n')
  kept_by_split: dict[str, list[tuple[int, dict]]] = {}
  for line_number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as error:
      if line_number == len(lines):  # no newline after it: a write cut short by a kill
        logging.warning('%s: skipping torn last line %d', path, line_number)
        continue
      raise ValueError(f'{path}:{line_number}: not a JSON record ({error})') from error
    if not isinstance(record, dict) or not all(key in record for key in ('split', 'step', 'epoch')):
      raise ValueError(f"{path}:{line_number}: a record needs 'split', 'step' and 'epoch', got {line[:200]!r}")
    kept = kept_by_split.setdefault(record['split'], [])
    while kept and kept[-1][1]['step'] >= record['step']:
      kept.pop()
    kept.append((line_number, record))
  records = sorted((item for kept in kept_by_split.values() for item in kept), key=lambda item: item[0])
  return [record for _, record in records if split is None or record['split'] == split]


@contextlib.contextmanager
def _naming_the_file(path):
  try:
    yield
  except OSError as error:
    if error.filename is not None or error.errno is None:
      raise
    raise OSError(error.errno, error.strerror, str(path)) from error


class EventFile:
  """A TensorBoard event file written in the caller's thread (tensorboardX's summaries and record format).

  tensorboardX's SummaryWriter writes from a thread of its own: when a write fails (a full disk), that thread
  prints a traceback and dies, and the next flush waits for it forever, so the run hangs instead of stopping. Here
  the write raises OSError (naming the file) where the trainer stops with one line.
  """

  def __init__(self, directory: str | os.PathLike, purge_step: int | None = None):
    # pylint: disable=g-import-not-at-top  # only the writing process needs tensorboardX
    from tensorboardX import event_file_writer, summary
    from tensorboardX.proto import event_pb2
    self._summary, self._event_pb2 = summary, event_pb2
    os.makedirs(directory, exist_ok=True)
    with _naming_the_file(directory):
      self._events = event_file_writer.EventsWriter(os.path.join(directory, 'events'))  # events.out.tfevents.<t>.<host>
    self.path = self._events._file_name  # pylint: disable=protected-access
    if purge_step is not None:  # TensorBoard drops the events of earlier files with step >= purge_step
      self._write(event_pb2.Event(step=purge_step, file_version='brain.Event:2'))
      self._write(event_pb2.Event(step=purge_step, session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    self._write_summary(self._summary.scalar(tag, float(value)), step)

  def add_image(self, tag: str, rgb: np.ndarray, step: int) -> None:
    """rgb: uint8 [height, width, 3]."""
    self._write_summary(self._summary.image(tag, rgb, dataformats='HWC'), step)

  def _write_summary(self, summary_proto, step: int) -> None:
    self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_proto))

  def _write(self, event) -> None:
    with _naming_the_file(self.path):
      self._events.write_event(event)

  def flush(self) -> None:
    with _naming_the_file(self.path):
      self._events.flush()

  def close(self) -> None:
    with _naming_the_file(self.path):
      self._events.close()


class MetricWriter:
  """Appends metric records to `workdir/metrics.jsonl` and TensorBoard events to `workdir/tensorboard`.

  Only one process should write: `enabled` defaults to `jax.process_index() == 0`; a disabled writer
  accepts every call and writes nothing. Pass `resume_step` (the restored checkpoint's step) when resuming.
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool | None = None, tensorboard: bool = True,
               confusion_images: bool = True, resume_step: int | None = None):
    self.workdir = pathlib.Path(workdir)
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = self.workdir / METRICS_FILENAME
    self.tensorboard_dir = self.workdir / TENSORBOARD_DIRNAME
    self._use_tensorboard = tensorboard
    self._confusion_images = confusion_images
    self._summary_writer = None  # opened on the first write, so truncate_after can still set purge_step
    self._purge_step = None
    self._file = None
    if not self.enabled:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    if self.path.exists():
      _drop_torn_tail(self.path)
    if resume_step is not None:
      self.truncate_after(resume_step)
    self._file = open(self.path, 'a', encoding='utf-8')

  def truncate_after(self, step: int) -> None:
    """Drops records with a step > `step` and hides TensorBoard events past it (on resume from `step`)."""
    if not self.enabled:
      return
    if self._file is not None:
      self._file.flush()
    if self.path.exists():
      records = read_records(self.path)  # also drops records replaced by a restart
      kept = [record for record in records if record['step'] <= step]
      temporary = self.path.with_name(self.path.name + '.tmp')
      temporary.write_text(''.join(json.dumps(record) + '\n' for record in kept), encoding='utf-8')
      if self._file is not None:
        self._file.close()
      os.replace(temporary, self.path)  # atomic: a kill here leaves the old or the new file
      if self._file is not None:
        self._file = open(self.path, 'a', encoding='utf-8')
      if len(kept) < len(records):
        logging.info('%s: dropped %d records after step %d', self.path, len(records) - len(kept), step)
    self._purge_step = step + 1  # TensorBoard hides events with step >= purge_step
    if self._summary_writer is not None:
      self._summary_writer.close()
      self._summary_writer = None

  def _tensorboard(self) -> 'EventFile':
    if self._summary_writer is None:
      self._summary_writer = EventFile(self.tensorboard_dir, purge_step=self._purge_step)
      self._purge_step = None  # the purge event goes into this event file only
    return self._summary_writer

  def write(self, split: str, step: int, epoch: float, values: Mapping[str, Any]) -> dict:
    """Writes one record: scalars also go to TensorBoard, other values (dicts, lists) to the JSONL only.

    `values` with 'per_class' {name: recall} adds '{split}/recall/{name}' scalars, and with 'confusion' too
    (an eval record, see the module docstring) the image '{split}/confusion'. Returns the record as written
    (plain JSON values).
    """
    if clash := set(values) & set(_RESERVED_KEYS):
      raise ValueError(f'metric names {sorted(clash)} are reserved record fields {_RESERVED_KEYS}')
    record = _to_json({'split': split, 'step': int(step), 'epoch': epoch, 'wall_time': time.time(), **values})
    if not self.enabled:
      return record
    if self._file is None:
      raise ValueError(f'MetricWriter for {self.workdir} is closed')
    with _naming_the_file(self.path):  # a full disk: the file it refused, for the one-line error
      self._file.write(json.dumps(record) + '\n')
      self._file.flush()
    if self._use_tensorboard:
      self._write_tensorboard(split, int(step), values, record)
    return record

  def _write_tensorboard(self, split: str, step: int, values: Mapping[str, Any], record: dict) -> None:
    summary_writer = self._tensorboard()
    self._write_tensorboard_values(summary_writer, split, step, values, record)
    for name, value in values.items():
      if is_head_result(value):  # a model's metric head: its scalars, recalls and confusion under its name
        self._write_tensorboard_values(summary_writer, f'{split}/{name}', step, value, record[name])
    summary_writer.flush()

  def _write_tensorboard_values(self, summary_writer, prefix: str, step: int, values: Mapping[str, Any],
                                record: dict) -> None:
    for name, value in values.items():
      if _is_scalar(value):
        summary_writer.add_scalar(f'{prefix}/{name}', float(value), step)
    per_class = record.get('per_class')
    if isinstance(per_class, dict):
      for name, recall in per_class.items():
        if recall is not None:  # None: a class with no clips
          summary_writer.add_scalar(f'{prefix}/recall/{name}', recall, step)
      if self._confusion_images and record.get('confusion') is not None:
        from dferjax import plots  # pylint: disable=g-import-not-at-top  # matplotlib only when drawing
        figure = plots.confusion_figure(np.asarray(record['confusion']), list(per_class))
        summary_writer.add_image(f'{prefix}/confusion', plots.render_rgb(figure), step)

  def write_eval(self, step: int, epoch: float, confusion, class_names: Sequence[str], *, split: str = 'test',
                 allow_empty: bool = False, **extra_values) -> dict:
    """Writes an eval record (UAR, WAR, per-class recall, confusion) from a split's summed confusion [C, C]."""
    confusion = np.asarray(confusion)
    values = {**metrics_lib.recall_metrics(confusion, class_names, allow_empty=allow_empty),
              'confusion': confusion, **extra_values}
    return self.write(split, step, epoch, values)

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()
    if self._summary_writer is not None:
      self._summary_writer.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._summary_writer is not None:
      self._summary_writer.close()
      self._summary_writer = None

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()


class ProgressBar:
  """A tqdm bar over one epoch's steps showing clips/s and step time.

  JAX dispatches asynchronously: pass the step's output as `update(wait_for=...)` (the bar waits for it) or
  the times measure dispatch, not compute. The first update (compilation) is left out of the means.
  """

  def __init__(self, total: int, batch_size: int, *, initial: int = 0, description: str | None = None,
               enabled: bool | None = None, mininterval: float = 0.1):
    """`total` steps in the epoch, `initial` of them done already (a run resumed mid-epoch)."""
    self.batch_size = batch_size
    enabled = jax.process_index() == 0 if enabled is None else enabled
    self._bar = tqdm.tqdm(total=total, initial=initial, desc=description, unit='step', disable=not enabled,
                          dynamic_ncols=True, leave=False, mininterval=mininterval)
    self._rates: dict[str, str] = {}
    self._postfix: dict[str, str] = {}
    self._last_time = time.perf_counter()
    self._updates = 0
    self._timed_steps = 0
    self._timed_seconds = 0.0
    self.enabled = enabled

  def update(self, num_steps: int = 1, wait_for=None, **postfix) -> None:
    """Advances by `num_steps` once `wait_for` (the step's outputs) is computed, so clips/s counts finished work;
    `postfix` values (e.g. loss=1.23) are shown next to the rates. A disabled bar does not wait."""
    if wait_for is not None and self.enabled:
      jax.block_until_ready(wait_for)
    now = time.perf_counter()
    seconds, self._last_time = now - self._last_time, now
    if self._updates > 0:  # the first update's time is mostly compilation
      self._timed_steps += num_steps
      self._timed_seconds += seconds
    self._updates += 1
    step_seconds = seconds / num_steps
    self._rates = {'clips/s': f'{self.batch_size / step_seconds:.1f}', 'step': f'{1e3 * step_seconds:.0f}ms'}
    self.set_postfix(refresh=False, **postfix)
    self._bar.update(num_steps)

  def set_postfix(self, refresh: bool = True, **values) -> None:
    """Shows `values` (e.g. loss=1.23) after the rates until replaced."""
    self._postfix.update({name: f'{value:.4g}' if _is_scalar(value) else str(value) for name, value in values.items()})
    self._bar.set_postfix({**self._rates, **self._postfix}, refresh=refresh)

  @property
  def mean_step_seconds(self) -> float:
    return self._timed_seconds / self._timed_steps if self._timed_steps else math.nan

  @property
  def clips_per_second(self) -> float:
    return self.batch_size / self.mean_step_seconds if self._timed_steps else math.nan

  def close(self) -> None:
    self._bar.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()


def _format_value(name: str, value) -> str:
  if name in ('uar', 'war'):
    return f'{name.upper()} {100 * float(value):.2f}%'
  if np.issubdtype(np.asarray(value).dtype, np.integer):
    return f'{name} {int(value)}'
  return f'{name} {float(value):.4g}'


def epoch_summary_line(epoch: int, train_metrics: Mapping[str, Any] | None, eval_metrics: Mapping[str, Any] | None,
                       seconds: float, *, eval_split: str = 'test', clips_per_second: float | None = None,
                       eval_seconds: float | None = None, train_steps: tuple[int, int] | None = None) -> str:
  """One line per epoch, e.g. 'epoch 3 | train loss 1.234 learning_rate 0.0001 | test UAR 45.10% WAR 56.70%
  num_clips 2341 | 123.4 s (evaluation 3.2 s), 210.5 clips/s'. Non-scalar values (per_class, confusion) are left
  out; `seconds` is the whole epoch's, evaluation included. `train_steps` (first, last): the train metrics cover
  only these steps (a run resumed mid-epoch), said as 'train (steps 8-9) loss ...'."""

  def scalars(items: Iterable[tuple[str, Any]]) -> str:
    first = ('loss', 'uar', 'war')  # then the rest in given order, the clip count last
    ordered = sorted(items, key=lambda item: (first.index(item[0]) if item[0] in first else len(first),
                                               item[0] == 'num_clips'))
    return ' '.join(_format_value(name, value) for name, value in ordered
                    if _is_scalar(value) and name not in _RESERVED_KEYS)

  parts = [f'epoch {epoch}']
  if train_metrics:
    steps = f'(steps {train_steps[0]}-{train_steps[1]}) ' if train_steps else ''
    parts.append(f'train {steps}' + scalars(train_metrics.items()))
  if eval_metrics:
    heads = [f'{name} ' + scalars((k, v) for k, v in value.items() if k != 'num_clips')
             for name, value in eval_metrics.items() if is_head_result(value)]
    parts.append(' '.join([f'{eval_split} ' + scalars(eval_metrics.items()), *heads]))
  timing = f'{seconds:.1f} s' + (f' (evaluation {eval_seconds:.1f} s)' if eval_seconds is not None else '')
  parts.append(timing + (f', {clips_per_second:.1f} clips/s' if clips_per_second is not None else ''))
  return ' | '.join(parts)
