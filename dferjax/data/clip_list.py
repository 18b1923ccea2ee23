"""Clips as folders of frames, listed in text files: the annotation lists that Former-DFER, STT, NR-DFERNet and AEN
read (refs.md §1.0), or a dataset of one's own with its own classes (MAFW's 11, say), through the same grain
pipeline, samplers and augmentations as a TFDS build, with no build step.

    config.dataset.name = 'clip_list'
    config.dataset.clip_lists = {'train': 'annotation/set_1_train.txt', 'test': 'annotation/set_1_test.txt'}
    config.dataset.clip_root = ''   # relative clip folders start here; '': each list file's folder
    config.class_names = (...)      # what labels 0, 1, ... are; default DFEW's seven (CLASS_NAMES)
    config.num_classes = len(config.class_names)

A line is `<clip folder> <frame count> <label>` (the public code's lists, e.g. `/data/DFEW_Face/02522 66 5`) or
`<clip folder> <label>`; blank lines and `#` comments are skipped. A label is 0-based in `config.class_names`
order (DFEW's, AFEW's and FERV39K's public lists use CLASS_NAMES' order: 0 happy ... 6 fear) or a class name
(any case; for the seven default classes also Anger, Happiness, Sadness). A clip's frames are its folder's image
files in natural order (2.jpg before 10.jpg), as the TFDS builders read them; each is resized to
config.input.image_size as it is read, so face crops of any size work (non-square ones are squeezed square;
frames of one clip at different sizes, a face detector's crops, are first resized to its first sampled frame's).

Before training starts every listed folder is read once: a missing or empty folder, a frame count that is not
the folder's, an unknown label or a clip listed twice fails naming the list line, so no clip is silently dropped
or mislabelled. Frames are read and decoded in the pipeline's workers, only those the sampler picks.
"""
from __future__ import annotations

import collections
import os
import pathlib

import numpy as np

from dferjax.data import image_list
from tfds_builders.labels import CLASS_NAMES

NAME = 'clip_list'  # config.dataset.name; no '/', so it never reads as a TFDS '<dataset>/<config>' name
CONFIG_FIELDS = ('clip_lists', 'clip_root')


def label_map(class_names) -> dict[str, int]:
  """Label text -> class index: '0'.., the names in lower case (and, for the default classes, the other spellings
  the builders accept: tfds_builders.common.EMOTION_LABELS)."""
  names = [str(name).lower() for name in class_names]
  if len(set(names)) != len(names):
    raise ValueError(f'config.class_names={tuple(class_names)} names a class twice')
  mapping = {**{str(i): i for i in range(len(names))}, **{name: i for i, name in enumerate(names)}}
  if tuple(names) == CLASS_NAMES:
    from tfds_builders import common  # pylint: disable=import-outside-toplevel  # imports tfds
    mapping.update(common.EMOTION_LABELS)
  return mapping


def parse_line(text: str, where: str, labels: dict[str, int]) -> tuple[str, int | None, int] | None:
  """(clip folder, listed frame count or None, label) of one list line; None for a blank or `#` line."""
  text = text.strip()
  if not text or text.startswith('#'):
    return None
  columns = text.split()
  if len(columns) not in (2, 3):
    raise ValueError(f'{where}: expected "<clip folder> <frame count> <label>" or "<clip folder> <label>", got '
                     f'{len(columns)} columns: {text!r} (a folder name with spaces is not supported)')
  if len(columns) == 3 and not columns[1].isdigit():
    raise ValueError(f'{where}: the middle column is a frame count, got {columns[1]!r}')
  if (label := labels.get(columns[-1].lower())) is None:
    known = sorted({name for name in labels if not name.isdigit()})
    raise ValueError(f'{where}: label {columns[-1]!r} is neither 0..{max(labels.values())} nor a class of '
                     f'config.class_names ({", ".join(known)})')
  return columns[0], (int(columns[1]) if len(columns) == 3 else None), label


def read_list(list_file: str, labels: dict[str, int]) -> list[tuple[int, str, int | None, int]]:
  """(line number, clip folder as written, listed frame count or None, label) of every clip line."""
  return image_list.parsed_lines(list_file, lambda text, where: parse_line(text, where, labels), 'clip')


class FrameFiles:
  """A clip's frames as a sequence of encoded images, each file read when it is indexed (the pipeline indexes
  only the sampled frames)."""

  def __init__(self, folder: str, names: list[str]):
    self.folder, self.names = folder, names

  def __len__(self) -> int:
    return len(self.names)

  def __getitem__(self, index: int | slice) -> bytes | list[bytes]:
    if isinstance(index, slice):
      return [self[i] for i in range(len(self))[index]]
    path = os.path.join(self.folder, self.names[int(index)])
    try:
      with open(path, 'rb') as f:
        return f.read()
    except OSError as error:
      raise OSError(f'cannot read frame {path}: {error.strerror or error}') from error


class ClipListSource:
  """Random-access source (len + __getitem__) of the clips of one list: records of docs/contracts.md, {'frames':
  FrameFiles, 'label', 'clip_id': the folder as listed, 'num_frames'}. Holds the folders' frame names (joined per
  clip, so that it pickles into grain's worker processes quickly)."""

  def __init__(self, list_file: str, clip_root: str = '', class_names=CLASS_NAMES):
    from tfds_builders import common  # pylint: disable=import-outside-toplevel  # the builders' frame order
    self.list_file = os.fspath(list_file)
    self.clip_root = os.fspath(clip_root) or os.path.dirname(self.list_file)
    entries = read_list(self.list_file, label_map(class_names))
    self.line_numbers = np.array([entry[0] for entry in entries], np.int64)
    self.listed_folders = [entry[1] for entry in entries]
    self.labels = np.array([entry[3] for entry in entries], np.int64)
    self._frame_names = []
    problems = collections.defaultdict(list)  # kind -> [message per clip]
    first_line = {}
    for index, (_, folder, listed_count, _) in enumerate(entries):
      path = self.folder(index)
      frames, reason = common.clip_frames(pathlib.Path(path))  # the builders' reasons and frame order
      names = [os.path.basename(frame) for frame in frames]
      if reason:
        problems[reason].append(f'{self.where(index)}: {path}')
      elif listed_count is not None and listed_count != len(names):
        problems['frame count'].append(f'{self.where(index)}: lists {listed_count} frames, {path} holds '
                                       f'{len(names)}')
      first_line.setdefault(folder, index)
      if first_line[folder] != index:
        problems['listed twice'].append(f'{self.where(index)}: clip {folder} is listed again (first at line '
                                        f'{int(self.line_numbers[first_line[folder]])})')
      self._frame_names.append('\0'.join(names))
    if problems:
      raise ValueError(f'clip list {self.list_file} ({len(self)} clips; relative folders start at {self.clip_root}, '
                       'config.dataset.clip_root):\n  ' + '\n  '.join(
                           f'{len(messages)} x {kind}, first: {messages[0]}' for kind, messages in problems.items()))

  def folder(self, index: int) -> str:
    return os.path.join(self.clip_root, self.listed_folders[index])

  def where(self, index: int) -> str:
    return f'{self.list_file}:{int(self.line_numbers[index])}'

  def __len__(self) -> int:
    return len(self.listed_folders)

  def __getitem__(self, index):
    index = int(index)
    frames = FrameFiles(self.folder(index), self._frame_names[index].split('\0'))
    return {'frames': frames, 'label': self.labels[index], 'clip_id': self.listed_folders[index].encode(),
            'num_frames': len(frames)}

  def __repr__(self) -> str:
    return f'ClipListSource({self.list_file!r}, {len(self)} clips, root {self.clip_root!r})'


def shared_clips(train: ClipListSource, test: ClipListSource) -> list[str]:
  """The test list's clip folders that the train list also names (after joining each to its root)."""
  trained = {os.path.normpath(train.folder(i)) for i in range(len(train))}
  return [test.folder(i) for i in range(len(test)) if os.path.normpath(test.folder(i)) in trained]


def split_source(config, split: str) -> ClipListSource:
  """The source of `split` for `config.dataset` named 'clip_list' (fields: CONFIG_FIELDS), labelled by
  config.class_names."""
  if missing := [field for field in CONFIG_FIELDS if field not in config.dataset]:
    raise ValueError(f"config.dataset.name={NAME!r} needs config.dataset.{', config.dataset.'.join(missing)} "
                     f'(see dferjax/data/clip_list.py)')
  clip_lists = dict(config.dataset.clip_lists)
  if split not in clip_lists:
    raise ValueError(f'split {split!r} is not a key of config.dataset.clip_lists (it has {sorted(clip_lists)}): '
                     f'config.dataset.train_split and eval_split name its keys')
  return ClipListSource(clip_lists[split], config.dataset.clip_root, tuple(config.class_names))
