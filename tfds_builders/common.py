"""What the DFEW, AFEW and FERV39K builders share: config, features, clip listing, frame loading.

A record (docs/contracts.md): 'frames' (all frames in time order, resized once here to the config's square size;
JPEG bytes per frame or a raw uint8 [num_frames, size, size, 3] array, RGB), 'label' (0..6 in DFEW's order),
'clip_id' (Text), 'num_frames' (int32). No TensorFlow is needed to build or to read (array_record +
`as_data_source`).
"""
import collections
import concurrent.futures
import dataclasses
import os
import pathlib
import re
from typing import Callable, Iterable, Iterator

import cv2
import numpy as np
import tensorflow_datasets as tfds

from tfds_builders.labels import CLASS_NAMES

JPEG_QUALITY = 90
FRAME_ENCODINGS = ('jpeg', 'raw')
# Measured (README, "Frame storage"): at 32-48 px raw reads up to 2-4x faster than JPEG for a few KiB more per
# frame; at 112/224 px raw is 6-7x bigger and no faster, as every read inflates the whole clip.
RAW_MAX_IMAGE_SIZE = 64
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp')
# Folder/CSV emotion names -> label; the official names plus the spellings of Former-DFER's AFEW lists.
_ALIASES = {'happiness': 'happy', 'sadness': 'sad', 'anger': 'angry'}
EMOTION_LABELS = {**{name: label for label, name in enumerate(CLASS_NAMES)},
                  **{alias: CLASS_NAMES.index(name) for alias, name in _ALIASES.items()}}
EMOTION_NAMES_HELP = 'Angry, Disgust, Fear, Happy, Neutral, Sad, Surprise (Anger, Happiness, Sadness accepted)'
MISSING_FOLDER = 'missing clip folder'
EMPTY_FOLDER = 'empty clip folder (no image files)'
NESTED_FOLDER = 'frames one folder deeper (<clip>/<clip>/*.jpg: unpacked one level too deep?)'


def default_frame_encoding(image_size: int) -> str:
  return 'raw' if image_size <= RAW_MAX_IMAGE_SIZE else 'jpeg'


def encoding_suffix(image_size: int, frame_encoding: str) -> str:
  """'' for the size's default encoding, else '_jpeg' / '_raw' (config names stay short)."""
  return '' if frame_encoding == default_frame_encoding(image_size) else f'_{frame_encoding}'


@dataclasses.dataclass(eq=False, kw_only=True)
class ClipConfig(tfds.core.BuilderConfig):
  """image_size: square frame side after the build-time resize; frame_encoding: 'jpeg' (re-encoded, quality 90)
  or 'raw' (uint8 array). fold: DFEW's 5-fold protocol (1..5); None for AFEW/FERV39K."""
  image_size: int = 112
  frame_encoding: str = 'jpeg'
  fold: int | None = None


def clip_features(image_size: int, frame_encoding: str) -> tfds.features.FeaturesDict:
  if frame_encoding == 'jpeg':  # one JPEG per frame: a reader decodes only the frames it samples
    frames = tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_))
  elif frame_encoding == 'raw':  # Encoding.BYTES: one buffer, read back with np.frombuffer (never plain int64 lists)
    frames = tfds.features.Tensor(shape=(None, image_size, image_size, 3), dtype=np.uint8,
                                  encoding=tfds.features.Encoding.BYTES)
  else:
    raise ValueError(f'frame_encoding {frame_encoding!r} not in {FRAME_ENCODINGS}')
  return tfds.features.FeaturesDict({
      'frames': frames,
      'label': tfds.features.ClassLabel(names=CLASS_NAMES),
      'clip_id': tfds.features.Text(),
      'num_frames': tfds.features.Scalar(dtype=np.int32),
  })


@dataclasses.dataclass(frozen=True)
class ClipRef:
  """A clip found on disk: frames are the image paths in time order."""
  clip_id: str
  label: int
  frames: tuple[str, ...]


@dataclasses.dataclass
class Scan:
  """What a build will write (clips per split) and what it leaves out: (split, clip_id, reason)."""
  splits: dict[str, list[ClipRef]]
  skipped: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)

  def add(self, split: str, clip_id: str, label: int, folder: pathlib.Path) -> None:
    """Append the clip in `folder`, or record it as skipped when the folder is missing or holds no images."""
    frames, reason = clip_frames(folder)
    if reason:
      self.skipped.append((split, clip_id, reason))
      return
    self.splits.setdefault(split, []).append(ClipRef(clip_id, label, tuple(frames)))

  def check_not_empty(self, source: str, clip_root: pathlib.Path | None = None) -> None:
    """A split without clips stops the build, saying why they were skipped; when every one was missing, also what
    `clip_root` (where the clip folders should be) holds instead, e.g. a folder of the same name one level down."""
    for split, clips in self.splits.items():
      if not clips:
        reasons = collections.Counter(reason for s, _, reason in self.skipped if s == split)
        example = next((clip_id for s, clip_id, _ in self.skipped if s == split), None)
        holds = ''
        if clip_root is not None and set(reasons) == {MISSING_FOLDER}:
          names = sorted(entry.name + ('/' if entry.is_dir() else '') for entry in os.scandir(clip_root))
          holds = (f'; expected e.g. {clip_root / example}, but {clip_root} holds '
                   f'{", ".join(names[:5]) + (f", ... ({len(names)} entries)" if len(names) > 5 else "") or "nothing"}')
        raise ValueError(f'split {split!r} has no usable clips ({source}); skipped: {dict(reasons) or "none listed"}'
                         f'{holds}')

  def summary(self) -> dict:
    """{'splits': {split: {class name: clips}}, 'skipped': {reason: count}, 'skipped_examples': {reason: ids}}."""
    splits = {split: {name: sum(c.label == label for c in clips) for label, name in enumerate(CLASS_NAMES)}
              for split, clips in self.splits.items()}
    skipped = collections.Counter(reason for _, _, reason in self.skipped)
    examples = {reason: [f'{s}:{c}' for s, c, r in self.skipped if r == reason][:5] for reason in skipped}
    return {'splits': splits, 'skipped': dict(skipped), 'skipped_examples': examples}


def _natural_key(name: str):
  """'2.jpg' < '10.jpg' (DFEW's 16f variant numbers frames without padding)."""
  return [int(part) if part.isdigit() else part for part in re.split(r'(\d+)', name)]


def list_frames(folder: pathlib.Path) -> list[str]:
  """The image files in `folder`, in frame order. Hidden files are left out: macOS writes `._<name>.jpg` beside
  each file it copies to a FAT/exFAT disk or a network share (its metadata, not an image)."""
  names = [e.name for e in os.scandir(folder)
           if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES) and not e.name.startswith('.')]
  return [os.path.join(folder, name) for name in sorted(names, key=_natural_key)]


def clip_frames(folder: pathlib.Path) -> tuple[list[str], str | None]:
  """(the clip's frame paths, None), or ([], why there are none: MISSING_FOLDER, EMPTY_FOLDER, NESTED_FOLDER)."""
  if not folder.is_dir():
    return [], MISSING_FOLDER
  if frames := list_frames(folder):
    return frames, None
  inner = [entry for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith('.')]
  nested = len(inner) == 1 and list_frames(pathlib.Path(inner[0].path))
  return [], NESTED_FOLDER if nested else EMPTY_FOLDER


def require_dir(path: pathlib.Path, what: str, layout: str) -> None:
  if not path.is_dir():
    raise FileNotFoundError(f'{what} not found: expected the directory {path}. Expected layout:\n{layout}')


def require_file(path: pathlib.Path, what: str, layout: str) -> None:
  if not path.is_file():
    raise FileNotFoundError(f'{what} not found: expected the file {path}. Expected layout:\n{layout}')


def emotion_label(name: str) -> int | None:
  return EMOTION_LABELS.get(name.strip().lower())


def read_frame(path: str, image_size: int) -> np.ndarray:
  """BGR uint8 [image_size, image_size, 3]: centre square crop if not square, then INTER_AREA resize."""
  data = pathlib.Path(path).read_bytes()
  image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
  if image is None:
    raise ValueError(f'cannot decode frame {path} ({len(data)} bytes): not a readable image')
  if data[:2] == b'\xff\xd8' and b'\xff\xd9' not in data[-64:]:  # libjpeg decodes a cut file to grey, silently
    raise ValueError(f'cannot decode frame {path} ({len(data)} bytes): truncated JPEG (no end-of-image marker)')
  height, width = image.shape[:2]
  if height != width:  # full video frames: keep the aspect, as the papers' face crops are square
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    image = image[top:top + side, left:left + side]
  if image.shape[0] != image_size:
    image = cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_AREA)
  return image


def encode_jpeg(image: np.ndarray, path: str) -> bytes:
  """Always re-encoded (even at the source size): every stored frame is a plain 3-channel baseline JPEG."""
  ok, encoded = cv2.imencode('.jpg', image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
  if not ok:
    raise ValueError(f'cv2.imencode failed for frame {path}')
  return encoded.tobytes()


def load_example(clip: ClipRef, image_size: int, frame_encoding: str) -> dict:
  """The record of one clip (docs/contracts.md); JPEG frames decode to RGB with PIL, to BGR with cv2."""
  if frame_encoding == 'jpeg':
    frames = [encode_jpeg(read_frame(path, image_size), path) for path in clip.frames]
  else:
    frames = np.stack([cv2.cvtColor(read_frame(path, image_size), cv2.COLOR_BGR2RGB) for path in clip.frames])
  return {'frames': frames, 'label': clip.label, 'clip_id': clip.clip_id, 'num_frames': len(clip.frames)}


def ordered_map(fn: Callable, items: Iterable, threads: int) -> Iterator:
  """map(fn, items) on `threads` threads (cv2 decode/resize/encode release the GIL), in order, a bounded
  window ahead so memory stays flat."""
  if threads <= 1:
    yield from map(fn, items)
    return
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    pending = collections.deque()
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) >= 2 * threads:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


class ClipBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the three builders. Subclasses set VERSION, MANUAL_DOWNLOAD_INSTRUCTIONS, LAYOUT, BUILDER_CONFIGS and
  define `scan`; DFEW also overrides the config-name grammar (`parse_config_name`, `config_name`).

  threads: decode+resize threads per build; progress: called with each written clip's number of frames.
  """
  LAYOUT = ''  # the expected tree, quoted by errors
  DESCRIPTION = ''
  HOMEPAGE = ''
  CITATION = ''

  def __init__(self, *, threads: int = 1, progress: Callable[[int], None] | None = None, **kwargs):
    self._threads = threads
    self._progress = progress
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  # --- configs: any `..._px{size}[_{jpeg|raw}]` name is constructible, not only BUILDER_CONFIGS -----------------
  @classmethod
  def parse_config_name(cls, name: str) -> dict:
    """Config fields from a name (here `px{size}[_jpeg|_raw]`; DFEW adds the fold); ValueError names the grammar."""
    match = re.fullmatch(r'px(\d+)(?:_(jpeg|raw))?', name)
    if not match:
      raise ValueError(f'{cls.name} config {name!r}: expected px{{size}}[_jpeg|_raw], e.g. px112, px224, px48')
    return {'image_size': int(match[1]), 'frame_encoding': match[2]}

  @classmethod
  def config_name(cls, *, image_size: int, frame_encoding: str, fold: int | None = None) -> str:
    """The canonical name: the default encoding for the size is left out."""
    if fold is not None:
      raise ValueError(f'{cls.name} has no folds')
    return f'px{image_size}{encoding_suffix(image_size, frame_encoding)}'

  @classmethod
  def make_config(cls, *, image_size: int, frame_encoding: str | None = None, fold: int | None = None) -> ClipConfig:
    if not 8 <= image_size <= 1024:
      raise ValueError(f'image_size {image_size} outside 8..1024')
    frame_encoding = frame_encoding or default_frame_encoding(image_size)
    if frame_encoding not in FRAME_ENCODINGS:
      raise ValueError(f'frame_encoding {frame_encoding!r} not in {FRAME_ENCODINGS}')
    name = cls.config_name(image_size=image_size, frame_encoding=frame_encoding, fold=fold)
    where = f'fold {fold}, ' if fold else ''
    return ClipConfig(name=name, image_size=image_size, frame_encoding=frame_encoding, fold=fold,
                      description=f'{where}{image_size}x{image_size} frames stored as {frame_encoding}')

  @classmethod
  def config_from_name(cls, name: str) -> ClipConfig:
    """'fold1_px48' -> a config; the same object every time (TFDS rejects two configs of one name)."""
    fields = cls.parse_config_name(name)
    fields.setdefault('frame_encoding', None)
    config = cls.make_config(**fields)
    known = super().get_builder_config(config.name)
    if known is not None:
      return known
    return _CUSTOM_CONFIGS.setdefault((cls.name, config.name), config)

  @classmethod
  def get_builder_config(cls, name: str, version=None):
    """TFDS' lookup, extended to any parseable name (so `tfds.builder('dfew/fold1_px48')` works too)."""
    known = super().get_builder_config(name, version)
    if known is not None:
      return known
    try:
      return cls.config_from_name(name)
    except ValueError:
      return None

  # --- TFDS hooks ------------------------------------------------------------------------------------------------
  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION, homepage=self.HOMEPAGE, citation=self.CITATION,
        features=clip_features(config.image_size, config.frame_encoding))

  def scan(self, manual_dir) -> Scan:
    """Clips per split from the manual dir (the builder's config picks e.g. the DFEW fold)."""
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    try:
      manual_dir = dl_manager.manual_dir
    except AssertionError as error:  # TFDS' message names the directory and quotes MANUAL_DOWNLOAD_INSTRUCTIONS
      raise FileNotFoundError(str(error)) from error
    scan = self.last_scan = self.scan(manual_dir)  # what this build is made from (dferjax.data.build records it)
    return {split: self._generate_examples(clips) for split, clips in scan.splits.items()}

  def _generate_examples(self, clips):
    config = self.builder_config
    load = lambda clip: load_example(clip, config.image_size, config.frame_encoding)
    for example in ordered_map(load, clips, self._threads):
      if self._progress is not None:
        self._progress(example['num_frames'])
      yield example['clip_id'], example


_CUSTOM_CONFIGS: dict[tuple[str, str], ClipConfig] = {}
