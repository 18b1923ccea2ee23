"""Grain input pipelines: a random-access source of clip records -> batches (docs/contracts.md).

Record in: {'frames': JPEG bytes per frame or uint8 [num_frames, size, size, 3], 'label', 'clip_id', 'num_frames'}.
Batch out: {'video': uint8 [batch, frames, height, width, 3], 'label': int32 [batch], 'mask': bool [batch]}, plus
the fields that clip transforms add (e.g. ShuffleSnippets' 'permutation' int32 [batch]); the trainer shards every
field along the batch axis.

Stages (each a grain transform, usable alone): ReadRecord (index -> record) -> SampleFrames (frame indices, keeps
only the sampled frames, still encoded) -> DecodeFrames (JPEG -> uint8 RGB, only those frames) -> Augment
(recipe of dferjax.data.augment) -> ToBatchFields -> clip transforms (CLIP_TRANSFORMS, configured by
`config.input.transforms`, which may add batch fields). Random stages draw from grain's per-position generators, so
a seed and a step always give the same batch, whatever the thread or worker process count, and a batch index
(start_batch) gives the exact batches from there on.

    it = iter(train_dataset(source, sampler={'name': 'segments'}, augment='stt', image_size=112, batch_size=32, seed=0))
    it = train_iterator(source, ..., batch_size=32, num_workers=8, start_batch=k)  # from batch k, in 8 processes
    for batch in eval_batches(source, image_size=112, batch_size=64): ...  # 'mask' False on padding rows
    reader = EvalReader(source, image_size=112, batch_size=64, num_workers=8)  # for batch in reader: one pass
"""
import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import shutil
import signal
import sys
from multiprocessing import resource_tracker
from typing import Any

from absl import flags
import cv2
import grain
import numpy as np

from dferjax.data import augment as augment_lib
from dferjax.data import sampling

Sampler = sampling.SegmentSampler | sampling.SnippetSampler
RECORD_KEYS = ('frames', 'label', 'clip_id')


def clip_name(record) -> str:
  clip_id = record.get('clip_id', '?')
  return clip_id.decode() if isinstance(clip_id, bytes) else str(clip_id)


# ---------------------------------------------------------------------------------------------------------
# Transforms.


@dataclasses.dataclass(frozen=True, eq=False)
class ReadRecord(grain.transforms.Map):
  """Record index -> record dict of the source (tfds data source, list of dicts, ...)."""
  source: Any

  def map(self, index):
    record = self.source[int(index)]
    if missing := [key for key in RECORD_KEYS if key not in record]:
      raise ValueError(f'record {int(index)} (clip {clip_name(record)!r}) lacks {missing}; it has {sorted(record)}')
    return record


@dataclasses.dataclass(frozen=True)
class SampleFrames(grain.transforms.RandomMap):
  """Record -> {'frames': the sampled frames (still encoded) [F], 'frame_index' [F], 'label', 'clip_id'}."""
  sampler: Sampler = sampling.SegmentSampler()
  train: bool = True  # False: the sampler's deterministic test offsets

  def random_map(self, record, rng: np.random.Generator):
    frames = record['frames']
    num_frames = len(frames)
    if 'num_frames' in record and int(record['num_frames']) != num_frames:
      raise ValueError(f'clip {clip_name(record)!r}: num_frames={int(record["num_frames"])} but it has '
                       f'{num_frames} frames')
    if num_frames == 0:
      raise ValueError(f'clip {clip_name(record)!r} has no frames')
    index = self.sampler(num_frames, rng if self.train else None)
    if isinstance(frames, np.ndarray):
      sampled = frames[index]
    else:
      sampled = [frames[i] for i in index]
    return {'frames': sampled, 'frame_index': index, 'label': record['label'], 'clip_id': record['clip_id']}


def decode_frames(frames, frame_index, clip_id) -> np.ndarray:
  """JPEG bytes or uint8 frames -> uint8 RGB [F, height, width, 3]; errors name the clip and frame index. A frame
  of another size than the first (a face detector's crops, read from a clip list) is resized to the first's."""
  if isinstance(frames, np.ndarray) and frames.dtype == np.uint8:
    if frames.ndim != 4 or frames.shape[-1] != 3:
      raise ValueError(f'clip {clip_id!r}: raw frames must be uint8 [frames, height, width, 3], got {frames.shape}')
    return frames
  video = None
  for i, frame in enumerate(frames):
    if isinstance(frame, (bytes, np.bytes_)):
      image = cv2.imdecode(np.frombuffer(frame, np.uint8), cv2.IMREAD_COLOR_RGB) if len(frame) else None
      if image is None:
        raise ValueError(f'clip {clip_id!r}: frame {int(frame_index[i])} is not a decodable image '
                         f'({len(frame)} bytes)')
    elif isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.ndim == 3:
      image = frame
    else:
      raise ValueError(f'clip {clip_id!r}: frame {int(frame_index[i])} is a {type(frame).__name__} '
                       f'{getattr(frame, "dtype", "")}; expected JPEG bytes or a uint8 [height, width, 3] array')
    if video is None:
      video = np.empty((len(frames),) + image.shape, np.uint8)
    if image.shape[2:] == video.shape[3:] and image.shape != video.shape[1:]:
      image = cv2.resize(image, (video.shape[2], video.shape[1]), interpolation=cv2.INTER_AREA)
    if image.shape != video.shape[1:]:
      raise ValueError(f'clip {clip_id!r}: frame {int(frame_index[i])} has shape {image.shape}, frame '
                       f'{int(frame_index[0])} {video.shape[1:]}')
    video[i] = image
  return video


@dataclasses.dataclass(frozen=True)
class DecodeFrames(grain.transforms.Map):
  """{'frames'} -> {'video': uint8 [F, height, width, 3] RGB}: only the sampled frames are decoded."""

  def map(self, element):
    augment_lib.use_single_thread_cv2()
    element = dict(element)
    frames = element.pop('frames')
    element['video'] = decode_frames(frames, element['frame_index'], clip_name(element))
    return element


@dataclasses.dataclass(frozen=True)
class Augment(grain.transforms.RandomMap):
  """{'video'} -> {'video': uint8 [F, image_size, image_size, 3]} by a recipe of augment.RECIPES."""
  recipe: str = 'stt'
  image_size: int = 112
  interpolation: str = 'antialias'

  def __post_init__(self):
    if self.recipe not in augment_lib.RECIPES:
      raise ValueError(f'augment recipe {self.recipe!r} not in {augment_lib.RECIPES}')
    if self.interpolation not in augment_lib.INTERPOLATIONS:
      raise ValueError(f'interpolation {self.interpolation!r} not in {augment_lib.INTERPOLATIONS}')

  def random_map(self, element, rng: np.random.Generator):
    augment_lib.use_single_thread_cv2()
    video = augment_lib.augment_clip(element['video'], self.recipe, self.image_size, rng,
                                     interpolation=self.interpolation)
    return {**element, 'video': video}


@dataclasses.dataclass(frozen=True)
class ToBatchFields(grain.transforms.Map):
  """Keeps the batch contract's fields: video uint8 [F, H, W, 3], label int32 [], mask bool [] (True)."""

  def map(self, element):
    return {'video': element['video'], 'label': np.int32(element['label']), 'mask': np.bool_(True)}


@dataclasses.dataclass(frozen=True)
class ShuffleSnippets(grain.transforms.RandomMap):
  """Reorders a snippet-sampled clip's snippets by one of a fixed set of permutations and adds the permutation's
  index as the batch field 'permutation' int32 [] (EST's self-supervised snippet-order task, refs.md §1.7).

  Slot j of the output holds snippet permutations[k][j] of the input, k uniform per clip. In evaluation the
  generator is seeded by the record's index (EvalClip), so a split is scored on the same shuffles every time.
  """
  num_snippets: int = 7
  permutations: tuple = sampling.EST_PERMUTATIONS

  def __post_init__(self):
    table = np.asarray(self.permutations)
    if table.ndim != 2 or table.shape[1] != self.num_snippets or \
        (np.sort(table, axis=1) != np.arange(self.num_snippets)).any():
      raise ValueError(f'ShuffleSnippets: permutations must be rows of a permutation of range({self.num_snippets}), '
                       f'got shape {table.shape}')

  def random_map(self, element, rng: np.random.Generator):
    video = element['video']
    if len(video) % self.num_snippets:
      raise ValueError(f'ShuffleSnippets: {len(video)} frames do not split into num_snippets={self.num_snippets}')
    index = int(rng.integers(len(self.permutations)))
    snippets = video.reshape(self.num_snippets, -1, *video.shape[1:])
    shuffled = snippets[np.asarray(self.permutations[index])].reshape(video.shape)
    return {**element, 'video': shuffled, 'permutation': np.int32(index)}


@dataclasses.dataclass(frozen=True)
class DrawPermutation(grain.transforms.RandomMap):
  """Adds a uniformly drawn index into a table of `num_permutations` snippet orders as the batch field
  'permutation' int32 [] and leaves the video in order: for a model that shuffles its snippet features itself
  (EST, which scores the emotion on the ordered clip and the order on the shuffled one in one pass of the
  backbone)."""
  num_permutations: int = len(sampling.EST_PERMUTATIONS)

  def random_map(self, element, rng: np.random.Generator):
    return {**element, 'permutation': np.int32(rng.integers(self.num_permutations))}


# Clip transforms a config may name (`config.input.transforms = {name: {field: value}}`), applied in that order
# to each clip's batch fields, after augmentation.
CLIP_TRANSFORMS = {'shuffle_snippets': ShuffleSnippets, 'draw_permutation': DrawPermutation}


def make_clip_transforms(spec) -> tuple:
  """Transforms from `config.input.transforms` ({name: {fields}}), validated against each transform's fields."""
  transforms = []
  for name, fields in dict(spec or {}).items():
    if name not in CLIP_TRANSFORMS:
      raise ValueError(f'config.input.transforms.{name}: not a clip transform; valid: {sorted(CLIP_TRANSFORMS)}')
    cls = CLIP_TRANSFORMS[name]
    valid = sorted(field.name for field in dataclasses.fields(cls))
    fields = dict(fields or {})
    if unknown := sorted(set(fields) - set(valid)):
      raise ValueError(f'config.input.transforms.{name}: {unknown} are not {cls.__name__} fields; valid: {valid}')
    transforms.append(cls(**{key: _frozen(value) for key, value in fields.items()}))
  return tuple(transforms)


def _frozen(value):
  """Lists (as a config holds them) -> tuples, so transforms stay hashable frozen dataclasses."""
  return tuple(_frozen(item) for item in value) if isinstance(value, (list, tuple)) else value


@dataclasses.dataclass(frozen=True, eq=False)
class DrawClassBalanced(grain.transforms.RandomMap):
  """Ignores its input; draws a record index with probability proportional to 1 / (its class's count).

  A class uniformly among the classes present, then a record uniformly within it: i.i.d. draws with
  replacement, as torchsampler's ImbalancedDatasetSampler (NR-DFERNet's oversampled variant).
  """
  records_by_class: tuple  # (int64 [count_c] record indices, ...) of the classes present

  @classmethod
  def from_labels(cls, labels: np.ndarray, record_indices: np.ndarray):
    labels = np.asarray(labels)
    return cls(tuple(np.asarray(record_indices)[labels == c] for c in np.unique(labels)))

  def random_map(self, element, rng: np.random.Generator):
    del element
    members = self.records_by_class[rng.integers(len(self.records_by_class))]
    return int(members[rng.integers(len(members))])


# ---------------------------------------------------------------------------------------------------------
# Datasets.


def read_labels(source) -> np.ndarray:
  """Labels of every record: int64 [len(source)]. Reads each record once in full (for a tfds array_record source
  of JPEG frames ~0.3 ms each, ~3 s for DFEW's 9.4k train clips); pass `labels=` to train_dataset to skip it."""
  return np.array([int(source[i]['label']) for i in range(len(source))], np.int64)


def _check_sharding(shard_index, shard_count):
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index={shard_index} must be in [0, shard_count={shard_count})')


def _train_stages(records: grain.MapDataset, source, sampler: Sampler, recipe: str, image_size: int,
                  interpolation: str, transforms: tuple) -> grain.MapDataset:
  """Record indices -> batch-field dicts, with random offsets, augmentation and the clip transforms."""
  clips = (records.map(ReadRecord(source))
           .random_map(SampleFrames(sampler, train=True))
           .map(DecodeFrames())
           .random_map(Augment(recipe, image_size, interpolation))
           .map(ToBatchFields()))
  for transform in transforms:
    clips = clips.random_map(transform)
  return clips


def train_dataset(source, *, sampler='segments', augment: str = 'stt', image_size: int = 112, batch_size: int,
                  seed: int, shard_index: int = 0, shard_count: int = 1, class_balanced: bool = False,
                  labels=None, interpolation: str = 'antialias', num_threads: int = 8,
                  prefetch: int = 4, transforms=None, num_workers: int = 0, start_batch: int = 0) -> grain.IterDataset:
  """Infinite training batches, this host's slice of each global batch: uint8 video [batch_size, F, image_size,
  image_size, 3].

  One global order of clips, whatever the host count: every record shuffled anew each epoch (or class-balanced
  draws), with random offsets and `augment` drawn per global position. Global batch k is positions
  k * G .. (k + 1) * G - 1, G = batch_size * shard_count; host `shard_index` (jax.process_index) reads its
  consecutive `batch_size` of them. So the global batches, and the model trained, do not depend on the number
  of hosts, and after k batches a host of any count resumes at batch k (start_batch=k).
  sampler: a sampler, its name, or `{name, **fields}` (sampling.make_sampler).
  class_balanced: labels [len(source)] if given, else read once from the source (see read_labels).
  transforms: clip transforms, or their config `{name: {fields}}` (make_clip_transforms).
  num_threads: grain reader threads (cv2 releases the GIL); prefetch: batches buffered ahead.
  num_workers: > 0 makes whole batches in that many processes instead (see read_batches); the same batches.
  start_batch: the first batch is global batch `start_batch` (a resumed run's step; TrainIterator keeps count).
  """
  _check_sharding(shard_index, shard_count)
  sampler = sampling.make_sampler(sampler)
  transforms = _as_transforms(transforms)
  if len(source) == 0:
    raise ValueError('the training source has no records')
  order_seed = int(np.random.SeedSequence([seed, 0]).generate_state(1)[0])  # one host's seed before issue 16
  records = grain.MapDataset.range(len(source)).seed(order_seed)
  if class_balanced:
    labels = read_labels(source) if labels is None else np.asarray(labels)
    if labels.shape != (len(source),):
      raise ValueError(f'labels has shape {labels.shape}, expected ({len(source)},): one per record')
    records = records.repeat(None).random_map(DrawClassBalanced.from_labels(labels, np.arange(len(source))))
  else:
    records = records.shuffle().repeat(None)
  clips = _train_stages(records, source, sampler, augment, image_size, interpolation, transforms)
  if start_batch < 0:
    raise ValueError(f'start_batch={start_batch} must be >= 0')
  positions = grain.MapDataset.range(start_batch * batch_size, _ENDLESS)
  host_clips = positions.map(HostSlice(clips, batch_size, shard_index, shard_count))
  return read_batches(host_clips, batch_size, num_threads=num_threads, prefetch=prefetch, num_workers=num_workers)


def read_batches(clips: grain.MapDataset, batch_size: int, *, num_threads: int, prefetch: int,
                 num_workers: int = 0) -> grain.IterDataset:
  """Consecutive clips -> batches of `batch_size`, made in this process or in `num_workers` processes.

  Threads (num_workers=0): `num_threads` threads read clips; the decode and resize release the GIL, but the
  Python between them does not, so threads stop scaling once that Python fills one core. Processes: each of the
  `num_workers` spawned processes makes whole batches in turn (batches k, k + W, ...; grain's mp_prefetch reads
  them round-robin, in order) and hands them over in shared memory (/dev/shm). Either way batch k holds the same
  clips, so a run may change the reader between restarts. `prefetch`: batches buffered ahead, in all.
  """
  if num_workers < 0:
    raise ValueError(f'num_workers={num_workers} must be >= 0 (0: threads in this process)')
  if not num_workers:
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch * batch_size)
    return clips.to_iter_dataset(read_options).batch(batch_size, drop_remainder=True)
  if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app they keep their defaults
    flags.FLAGS.mark_as_parsed()
  buffered = max(1, -(-prefetch // num_workers))
  # Measured in /dev/shm: 2 * buffered + 2 batches per worker (the batch it is putting, its queue, and this
  # process's reading thread's buffer and the batch in its hand), and up to two that the caller still holds.
  check_shared_memory(clips[0], batch_size, batches_at_once=num_workers * (2 * buffered + 2) + 2)
  _start_quiet_resource_tracker()
  options = grain.multiprocessing.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=buffered)
  batches = clips.batch(batch_size, drop_remainder=True)
  return batches.to_iter_dataset(grain.ReadOptions(num_threads=0)).mp_prefetch(
      options, worker_init_fn=_leave_signals_to_the_trainer)


def _start_quiet_resource_tracker():
  """Workers stopped by Ctrl-C or an error leave batches in shared memory; Python's resource tracker (one process
  for the run and its workers) frees them at exit, and would also warn "There appear to be N leaked
  shared_memory objects". It is started here, if no one has yet, with that warning filtered out."""
  quiet = 'ignore::UserWarning:multiprocessing.resource_tracker'
  sys.warnoptions.append(quiet)  # the tracker starts with this interpreter's -W options
  try:
    resource_tracker.ensure_running()
  finally:
    sys.warnoptions.remove(quiet)


def _leave_signals_to_the_trainer(worker_index: int, worker_count: int):
  """Ctrl-C reaches every process of the terminal's group, and SLURM's SIGTERM every process of the job step: the
  trainer stops (after saving, for SIGTERM) and closes its reader, which ends the workers. A worker that SIGTERM
  ended would stop the trainer before its save; one that Ctrl-C ended would print a KeyboardInterrupt traceback."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


SHARED_MEMORY = '/dev/shm'  # where Python's shared memory (shm_open) lives on Linux
_SHARED_MEMORY_ADVICE = (f'Give {SHARED_MEMORY} more room (docker run --shm-size=16g; on Kubernetes an emptyDir of '
                         f'medium Memory mounted at {SHARED_MEMORY}), or use fewer workers (config.input.num_workers; '
                         '0 reads with threads in this process).')


def check_shared_memory(clip: dict, batch_size: int, batches_at_once: int):
  """Refuses worker processes whose batches would not fit in /dev/shm: a worker writing past its end is killed
  (SIGBUS) without a word. `batches_at_once`: what the workers and the reader hold at most (read_batches)."""
  if not os.path.isdir(SHARED_MEMORY):
    return
  needed = batches_at_once * batch_size * sum(np.asarray(value).nbytes for value in clip.values())
  free = shutil.disk_usage(SHARED_MEMORY).free
  if needed > free:
    raise OSError(f'the input worker processes hand over up to {batches_at_once} batches at a time in shared '
                  f'memory, about {needed / 2**20:.0f} MiB, but {SHARED_MEMORY} has {free / 2**20:.0f} MiB free. '
                  + _SHARED_MEMORY_ADVICE)


_ENDLESS = 2 ** 62  # host positions: more than any run reads


@dataclasses.dataclass(frozen=True, eq=False)
class HostSlice(grain.transforms.Map):
  """Host position -> the clip at the global position it stands for: position q is item q % b of this host's
  slice of global batch q // b (b = batch_size per host). Clips draw their randomness by global position."""
  clips: Any  # grain.MapDataset of batch-field dicts, in global order
  batch_size: int
  shard_index: int
  shard_count: int

  def map(self, position):
    batch, item = divmod(int(position), self.batch_size)
    return self.clips[(batch * self.shard_count + self.shard_index) * self.batch_size + item]


def train_iterator(source, *, batch_size: int, start_batch: int = 0, **kwargs) -> 'TrainIterator':
  """iter(train_dataset(source, batch_size=..., start_batch=..., **kwargs)), counting its position."""
  dataset = train_dataset(source, batch_size=batch_size, start_batch=start_batch, **kwargs)
  return TrainIterator(dataset, start_batch, batch_size)


class TrainIterator:
  """Training batches from global batch `start_batch` on (train_dataset(..., start_batch=start_batch)): the step
  alone says where to continue, so a resumed run may change its host count or reader. Its state, saved in every
  checkpoint as a record (the trainer does not read it back), is this host's position: {'next_index': batches
  read * batch_size}, the same whatever the reader."""

  def __init__(self, dataset: grain.IterDataset, start_batch: int, batch_size: int):
    self._iterator = iter(dataset)
    self._started = False
    self._next_batch = start_batch
    self._batch_size = batch_size

  def __iter__(self):
    return self

  def __next__(self):
    batch = next_batch(self._iterator, f'batch {self._next_batch}', first=not self._started)
    self._started = True
    self._next_batch += 1
    return batch

  def get_state(self) -> bytes:
    """JSON, as grain's checkpoint handler takes it from an iterator that is not one of grain's datasets'."""
    return json.dumps({'next_index': self._next_batch * self._batch_size}).encode()

  def close(self):
    """Stops the reader's threads or worker processes."""
    close = getattr(self._iterator, 'close', None)
    if close is not None:
      close()


_WORKER_DIED = re.compile(r'Worker process was terminated unexpectedly with exit code (-?\d+)')


_SIGNALS_LEFT_TO_THE_TRAINER = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _signals_held(hold: bool):
  """While grain starts the worker processes (on the first next(), from threads it makes then): SIGINT and SIGTERM
  blocked in this thread, so in those threads, so in the workers from their first instruction (a signal mask
  survives fork and exec). A worker leaves both to the trainer (_leave_signals_to_the_trainer) only once its
  interpreter has started, seconds after the spawn; one reached before that by SLURM's SIGTERM to every process
  of the job step, or Ctrl-C to the terminal's group, would die of it and fail the run where the trainer saves.
  Blocked, the signal waits in the worker until it is ignored. This thread has its mask back after the batch; a
  signal for the trainer meanwhile is taken by another thread or on the way out of here, not lost."""
  if not hold or not hasattr(signal, 'pthread_sigmask'):
    yield
    return
  mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS_LEFT_TO_THE_TRAINER)
  try:
    yield
  finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def next_batch(iterator, description: str, *, first: bool = False):
  """next(iterator), saying in one line why when an input worker process died or could not start for it.
  `first`: the iterator's first batch, for which its worker processes (if any) start (_signals_held)."""
  try:
    with _signals_held(first):
      return next(iterator)
  except (RuntimeError, OSError) as error:
    died = _WORKER_DIED.search(str(error))
    # A worker that wrote past the end of a full /dev/shm dies of SIGBUS (exit code -7); with no room left at
    # all, starting the workers fails to make their semaphores there (ENOSPC, no file named).
    if (died and int(died[1]) == -signal.SIGBUS) or (isinstance(error, OSError) and error.errno == errno.ENOSPC
                                                     and error.filename is None):
      raise OSError(f'the input worker processes failed making {description}: {SHARED_MEMORY} is full '
                    f'({error}). ' + _SHARED_MEMORY_ADVICE) from None  # not "disk full" (cli.os_error)
    if not died:
      raise
    code = int(died[1])
    how = f'exit code {code}'
    if code < 0:
      name = signal.Signals(-code).name if -code in signal.valid_signals() else f'signal {-code}'
      how = f'killed by {name}' + ('; on Linux usually the out-of-memory killer: see dmesg'
                                   if -code == signal.SIGKILL else '')
    raise ChildProcessError(  # an OSError: the command-line tools print it in one line
        f'an input worker process died making {description} ({how}). Each worker is a process of about 240 MB '
        'plus its batches: use fewer (config.input.num_workers; 0 reads with threads) or give the host more '
        'memory, and rerun the same command (a training run resumes from its last checkpoint).') from None


def _as_transforms(transforms) -> tuple:
  if transforms is None or isinstance(transforms, tuple):
    return transforms or ()
  return make_clip_transforms(transforms)


def num_eval_batches(num_records: int, batch_size: int, shard_count: int = 1) -> int:
  """Batches every host yields in eval_batches: ceil(ceil(num_records / shard_count) / batch_size)."""
  return math.ceil(math.ceil(num_records / shard_count) / batch_size)


@dataclasses.dataclass(frozen=True, eq=False)
class EvalClip(grain.transforms.Map):
  """Position -> batch fields of record records[position] (test offsets, resize only, the clip transforms drawing
  from a generator seeded by the record index), or a padding clip (zero video, label 0, mask False) past the
  end: the same stages as training, chained by hand."""
  source: Any
  records: np.ndarray  # int64 [num_records_of_this_host]
  sampler: Sampler
  image_size: int
  interpolation: str = 'antialias'
  transforms: tuple = ()

  def map(self, position):
    if position >= len(self.records):
      shape = (self.sampler.num_output_frames, self.image_size, self.image_size, 3)
      element = {'video': np.zeros(shape, np.uint8), 'label': np.int32(0), 'mask': np.bool_(False)}
      seed = -1
    else:
      seed = int(self.records[position])
      record = ReadRecord(self.source).map(self.records[position])
      element = SampleFrames(self.sampler, train=False).random_map(record, None)
      element = DecodeFrames().map(element)
      element = Augment('none', self.image_size, self.interpolation).random_map(element, None)
      element = ToBatchFields().map(element)
    for transform in self.transforms:  # padding rows get every field too
      element = transform.random_map(element, np.random.default_rng([seed + 1]))
    return element


def _eval_clips(source, *, sampler, image_size: int, batch_size: int, shard_index: int, shard_count: int,
                interpolation: str, transforms) -> grain.MapDataset:
  """This host's clips of one pass over `source`, padded to num_eval_batches(...) whole batches."""
  _check_sharding(shard_index, shard_count)
  records = np.arange(shard_index, len(source), shard_count)
  num_clips = num_eval_batches(len(source), batch_size, shard_count) * batch_size
  return grain.MapDataset.range(num_clips).map(EvalClip(source, records, sampling.make_sampler(sampler), image_size,
                                                         interpolation, _as_transforms(transforms)))


def eval_batches(source, *, sampler='segments', image_size: int = 112, batch_size: int, shard_index: int = 0,
                 shard_count: int = 1, interpolation: str = 'antialias', num_threads: int = 8,
                 prefetch: int = 2, transforms=None) -> grain.IterDataset:
  """Every record exactly once over all hosts, test offsets, resize only; iterate it once per evaluation.

  Host `shard_index` reads records shard_index::shard_count. Every host yields num_eval_batches(len(source),
  batch_size, shard_count) batches (the global batch is assembled from all hosts); padding rows have zero
  video, label 0 and mask False. `sampler` and `transforms` as in train_dataset. Read with threads; EvalReader
  reads passes with worker processes too.
  """
  clips = _eval_clips(source, sampler=sampler, image_size=image_size, batch_size=batch_size,
                      shard_index=shard_index, shard_count=shard_count, interpolation=interpolation,
                      transforms=transforms)
  return read_batches(clips, batch_size, num_threads=num_threads, prefetch=prefetch)


class EvalReader:
  """Passes over an eval split, one per `for batch in reader:`, each the batches of eval_batches(source, ...).

  With worker processes (num_workers > 0), one set of processes serves every pass: they read the split over and
  over, so between two evaluations (while the model trains) they make the next pass's first batches and then
  wait, holding them in shared memory. An evaluation in training then starts with batches made, and the
  processes start once per run, not once per evaluation. With threads, each pass reads afresh.
  """

  def __init__(self, source, *, sampler='segments', image_size: int = 112, batch_size: int, shard_index: int = 0,
               shard_count: int = 1, interpolation: str = 'antialias', num_threads: int = 8, prefetch: int = 2,
               transforms=None, num_workers: int = 0):
    self.source = source
    self.batch_size = batch_size
    self.num_batches = num_eval_batches(len(source), batch_size, shard_count)
    self._clips = _eval_clips(source, sampler=sampler, image_size=image_size, batch_size=batch_size,
                              shard_index=shard_index, shard_count=shard_count, interpolation=interpolation,
                              transforms=transforms)
    self._num_threads, self._prefetch = num_threads, prefetch
    self._workers = None
    self._batches_read = 0  # by the workers' iterator, over all passes
    if num_workers and self.num_batches:
      self._workers = iter(read_batches(self._clips.repeat(None), batch_size, num_threads=0, prefetch=prefetch,
                                        num_workers=num_workers))

  def __iter__(self):
    if self._workers is None:  # the threads of eval_batches, afresh each pass
      yield from read_batches(self._clips, self.batch_size, num_threads=self._num_threads, prefetch=self._prefetch)
      return
    for _ in range(-self._batches_read % self.num_batches):  # the rest of a pass that was left unfinished
      self._next_from_workers()
    for _ in range(self.num_batches):
      yield self._next_from_workers()

  def _next_from_workers(self):
    index = self._batches_read % self.num_batches
    batch = next_batch(self._workers, f'evaluation batch {index + 1} of {self.num_batches}',
                       first=not self._batches_read)
    self._batches_read += 1
    return batch

  def close(self):
    """Stops the worker processes, if any."""
    if self._workers is not None:
      self._workers.close()
