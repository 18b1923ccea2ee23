"""Single face images listed in text files, read as one-frame clips: AEN's frame-level guide network is pre-trained
on RAF-DB this way (refs.md §1.5, §2.4), through the same grain pipeline, samplers and augmentations as videos.

    config.dataset.name = 'image_list'
    config.dataset.image_lists = {'train': 'RAF/train.txt', 'test': 'RAF/validation.txt'}  # split -> list file
    config.dataset.image_root = ''          # relative image paths start here; '': each list file's folder
    config.dataset.label_order = 'dfew'     # or 'raf_official'

A list has one image per line, `<image path> <label>` or `<image path> 1 <label>` (AEN's lists, whose middle
column is Former-DFER's frame count); blank lines and `#` comments are skipped. `label_order='dfew'`: labels 0..6
in tfds_builders.labels.CLASS_NAMES order (AEN's lists); `'raf_official'`: RAF-DB's 1..7 (1 Surprise, 2 Fear,
3 Disgust, 4 Happiness, 5 Sadness, 6 Anger, 7 Neutral), mapped to that order. Labels and the images' existence
are checked when the source is built, so a typo fails before training starts; images are read and decoded in
__getitem__.
"""
from __future__ import annotations

import os

import cv2
import numpy as np

from tfds_builders.labels import CLASS_NAMES

NAME = 'image_list'  # config.dataset.name; no '/', so it never reads as a TFDS '<dataset>/<config>' name
CONFIG_FIELDS = ('image_lists', 'image_root', 'label_order')
# RAF-DB's official basic labels 1..7 (refs.md §2.4), by class name.
RAF_OFFICIAL_NAMES = ('surprise', 'fear', 'disgust', 'happy', 'sad', 'angry', 'neutral')
LABEL_MAPS = {
    'dfew': {str(label): label for label in range(len(CLASS_NAMES))},
    'raf_official': {str(official): CLASS_NAMES.index(name) for official, name in enumerate(RAF_OFFICIAL_NAMES, 1)},
}


def parse_line(text: str, where: str, label_order: str) -> tuple[str, int] | None:
  """(image path, label in CLASS_NAMES order) of one list line, None for a blank or `#` line; `where` is
  'file:line' for the error."""
  text = text.strip()
  if not text or text.startswith('#'):
    return None
  columns = text.split()
  if len(columns) not in (2, 3):
    raise ValueError(f'{where}: expected "<image path> <label>" or "<image path> 1 <label>", got {len(columns)} '
                     f'columns: {text!r}')
  if len(columns) == 3 and columns[1] != '1':
    raise ValueError(f'{where}: the middle column is a frame count and must be 1 for a single image, got '
                     f'{columns[1]!r} (a video list?)')
  label_map = LABEL_MAPS[label_order]
  if columns[-1] not in label_map:
    raise ValueError(f'{where}: label {columns[-1]!r} is not one of {sorted(label_map, key=int)} '
                     f'(config.dataset.label_order={label_order!r})')
  return columns[0], label_map[columns[-1]]


def parsed_lines(list_file: str, parse, kind: str) -> list[tuple]:
  """(line number, *parse(text, 'file:line')) of every line of a list file that `parse` does not skip (None for a
  blank or comment line); `kind` ('image', 'clip') names what is listed in the errors. UTF-8, with or without a
  byte-order mark (a list saved by a Windows editor)."""
  if not os.path.isfile(list_file):
    raise FileNotFoundError(f'{kind} list {list_file} does not exist')
  entries = []
  with open(list_file, 'rb') as f:
    for number, line in enumerate(f, 1):
      try:
        text = line.decode('utf-8-sig' if number == 1 else 'utf-8')
      except UnicodeDecodeError as error:
        raise ValueError(f'{list_file}:{number}: not UTF-8 text ({error.reason}); save the {kind} list as '
                         'UTF-8') from None
      if parsed := parse(text, f'{list_file}:{number}'):
        entries.append((number, *parsed))
  if not entries:
    raise ValueError(f'{kind} list {list_file} lists no {kind}s')
  return entries


def read_list(list_file: str, label_order: str) -> list[tuple[int, str, int]]:
  """(line number, image path as written, label) of every image line of `list_file`."""
  if label_order not in LABEL_MAPS:
    raise ValueError(f'config.dataset.label_order={label_order!r} not in {sorted(LABEL_MAPS)}')
  return parsed_lines(list_file, lambda text, where: parse_line(text, where, label_order), 'image')


class ImageListSource:
  """Random-access source (len + __getitem__) of the images of one list: records of docs/contracts.md, each a
  one-frame clip {'frames': uint8 [1, height, width, 3] RGB, 'label', 'clip_id': the path as listed,
  'num_frames': 1}. Holds only paths and labels, so it pickles into grain's worker processes."""

  def __init__(self, list_file: str, image_root: str = '', label_order: str = 'dfew'):
    self.list_file = os.fspath(list_file)
    self.image_root = os.fspath(image_root) or os.path.dirname(self.list_file)
    entries = read_list(self.list_file, label_order)
    self.line_numbers = np.array([line_number for line_number, _, _ in entries], np.int64)
    self.listed_paths = [path for _, path, _ in entries]
    self.labels = np.array([label for _, _, label in entries], np.int64)
    self._check_images_exist()

  def image_path(self, index: int) -> str:
    return os.path.join(self.image_root, self.listed_paths[index])

  def where(self, index: int) -> str:
    return f'{self.list_file}:{int(self.line_numbers[index])}'

  def _check_images_exist(self):
    missing = [i for i in range(len(self)) if not os.path.isfile(self.image_path(i))]
    if missing:
      raise FileNotFoundError(
          f'{self.where(missing[0])}: image {self.image_path(missing[0])} does not exist ({len(missing)} of '
          f'{len(self)} listed images are missing; relative paths start at {self.image_root}, '
          f'config.dataset.image_root)')

  def __len__(self) -> int:
    return len(self.listed_paths)

  def __getitem__(self, index):
    index = int(index)
    return {'frames': self.read_image(index)[None], 'label': self.labels[index],
            'clip_id': self.listed_paths[index].encode(), 'num_frames': 1}

  def read_image(self, index: int) -> np.ndarray:
    """uint8 [height, width, 3] RGB of any format cv2 decodes (JPEG, PNG; gray and alpha made RGB)."""
    path = self.image_path(index)
    try:
      with open(path, 'rb') as f:
        encoded = f.read()
    except OSError as error:
      raise OSError(f'{self.where(index)}: cannot read image {path}: {error.strerror or error}') from error
    image = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR_RGB) if encoded else None
    if image is None:
      raise ValueError(f'{self.where(index)}: image {path} is not a decodable image ({len(encoded)} bytes)')
    return image

  def __repr__(self) -> str:
    return f'ImageListSource({self.list_file!r}, {len(self)} images, root {self.image_root!r})'


def split_source(dataset_config, split: str) -> ImageListSource:
  """The source of `split` for `config.dataset` named 'image_list' (fields: CONFIG_FIELDS)."""
  if missing := [field for field in CONFIG_FIELDS if field not in dataset_config]:
    raise ValueError(f"config.dataset.name={NAME!r} needs config.dataset.{', config.dataset.'.join(missing)} "
                     f'(see dferjax/data/image_list.py)')
  image_lists = dict(dataset_config.image_lists)
  if split not in image_lists:
    raise ValueError(f'split {split!r} is not a key of config.dataset.image_lists (it has {sorted(image_lists)}): '
                     f'config.dataset.train_split and eval_split name its keys')
  return ImageListSource(image_lists[split], dataset_config.image_root, dataset_config.label_order)
