"""Clip augmentations of the papers' PyTorch loaders, on uint8 numpy clips with OpenCV.

A clip is uint8 [frames, height, width, 3] RGB (or a list of [height, width, 3] frames of one size). Unless a
paper says otherwise every frame of a clip gets the same random draw (the `Group*` transforms of
Former-DFER's `video_transform.py`). Recipes (refs.md §1.0, §1.4, §1.5):
  'none'        resize to size x size (test time for every model; CEFLNet/EST train too: no augmentation)
  'stt'         GroupRandomSizedCrop + GroupRandomHorizontalFlip (Former-DFER, STT)
  'nr_dfernet'  'stt', then ColorJitter(brightness=0.6) and RandomRotation(4), one draw for the clip
  'aen'         'stt', then GroupRandomAffine (p=0.5, one angle in {-5, -4.5, ..., 5.5} deg) and
                GroupRandomColor_jitter (p=0.5 per clip, then ColorJitter(0.1, 0.1, 0.1, 0.1) drawn per frame)

Speed: crop is a view, each frame is resized once straight into a preallocated output, the flip is one cv2.flip
of the whole clip, no float conversion on the 'stt' path.

Resampling: the loaders use PIL bilinear, which antialiases when it shrinks. interpolation='antialias' (default)
uses cv2.INTER_LINEAR when a crop is enlarged (equals PIL up to rounding) and cv2.INTER_AREA when it is shrunk
in both directions (closest cv2 filter to PIL's; mean |diff| ~2/255 vs ~6/255 for INTER_LINEAR at 200->112).
interpolation='linear' always uses cv2.INTER_LINEAR. With frames stored at the output size (px112 datasets) every
crop is enlarged and the two are the same. Brightness/rotation act on uint8 here, on float tensors in the
original: values differ by rounding (<= 0.5/255).
"""
import math

import cv2
import numpy as np

RECIPES = ('none', 'stt', 'nr_dfernet', 'aen')
INTERPOLATIONS = ('antialias', 'linear')

_cv2_single_threaded = False


def use_single_thread_cv2():
  """cv2's own thread pool fights grain's reader threads for the cores: one cv2 thread per caller."""
  global _cv2_single_threaded
  if not _cv2_single_threaded:
    cv2.setNumThreads(1)
    _cv2_single_threaded = True


def _frame_shape(frames) -> tuple[int, int]:
  height, width = frames[0].shape[:2]
  return height, width


def _cv2_interpolation(crop_height, crop_width, size, interpolation):
  if interpolation == 'antialias' and crop_height >= size and crop_width >= size:
    return cv2.INTER_AREA
  return cv2.INTER_LINEAR


def resize_clip(frames, size: int, *, box=None, interpolation: str = 'antialias') -> np.ndarray:
  """Crops each frame to box = (top, left, height, width) (default: whole frame), resizes to size x size.

  frames: [frames, height, width, 3] uint8 or a list of such frames. Returns [frames, size, size, 3] uint8: the
  input array itself when there is nothing to crop or resize.
  """
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f'interpolation {interpolation!r} not in {INTERPOLATIONS}')
  height, width = _frame_shape(frames)
  top, left, crop_height, crop_width = box if box is not None else (0, 0, height, width)
  if (top, left, crop_height, crop_width) == (0, 0, height, width) == (0, 0, size, size):
    return np.asarray(frames)
  out = np.empty((len(frames), size, size, 3), np.uint8)
  if crop_height == size and crop_width == size:  # nothing to resample: one copy
    for i, frame in enumerate(frames):
      out[i] = frame[top:top + size, left:left + size]
    return out
  flag = _cv2_interpolation(crop_height, crop_width, size, interpolation)
  for i, frame in enumerate(frames):
    cv2.resize(frame[top:top + crop_height, left:left + crop_width], (size, size), dst=out[i],
               interpolation=flag)
  return out


def random_sized_crop_box(height: int, width: int, rng: np.random.Generator):
  """GroupRandomSizedCrop's box (top, left, crop_height, crop_width), or None when all 10 tries fail.

  Inception crop: area U(0.08, 1) of the frame, aspect U(3/4, 4/3), w = round(sqrt(area * aspect)),
  h = round(sqrt(area / aspect)), then w and h swapped with p = 0.5; corner uniform, both ends included.
  """
  area = height * width
  for _ in range(10):
    target_area = rng.uniform(0.08, 1.0) * area
    aspect_ratio = rng.uniform(3. / 4, 4. / 3)
    crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
    crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
    if rng.random() < 0.5:
      crop_width, crop_height = crop_height, crop_width
    if crop_width <= width and crop_height <= height:
      left = int(rng.integers(0, width - crop_width + 1))
      top = int(rng.integers(0, height - crop_height + 1))
      return top, left, crop_height, crop_width
  return None


def random_sized_crop(frames, size: int, rng: np.random.Generator, interpolation: str = 'antialias'):
  """GroupRandomSizedCrop(size), one box for all frames: [frames, size, size, 3] uint8."""
  height, width = _frame_shape(frames)
  box = random_sized_crop_box(height, width, rng)
  if box is not None:
    return resize_clip(frames, size, box=box, interpolation=interpolation)
  # Fallback: GroupScale(size) (shorter side to size, torchvision's int() for the longer) + GroupRandomCrop(size).
  if width < height:
    scaled_width, scaled_height = size, int(size * height / width)
  else:
    scaled_width, scaled_height = int(size * width / height), size
  out = np.empty((len(frames), scaled_height, scaled_width, 3), np.uint8)
  flag = _cv2_interpolation(height, width, min(scaled_height, scaled_width), interpolation)
  for i, frame in enumerate(frames):
    cv2.resize(frame, (scaled_width, scaled_height), dst=out[i], interpolation=flag)
  left = int(rng.integers(0, scaled_width - size + 1))
  top = int(rng.integers(0, scaled_height - size + 1))
  return out[:, top:top + size, left:left + size]


def flip_clip(clip: np.ndarray) -> np.ndarray:
  """Mirrors every frame: [frames, height, width, 3] -> same shape, contiguous.

  One cv2.flip of the clip seen as a [frames * height, width, 3] image: ~30x faster than copying the numpy
  view clip[:, :, ::-1] (negative strides over 3-byte pixels).
  """
  clip = np.ascontiguousarray(clip)
  frames, height, width, channels = clip.shape
  return cv2.flip(clip.reshape(frames * height, width, channels), 1).reshape(clip.shape)


def random_horizontal_flip(clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """GroupRandomHorizontalFlip: all frames flipped with p = 0.5: [frames, height, width, 3]."""
  return flip_clip(clip) if rng.random() < 0.5 else clip


def _lookup(clip: np.ndarray, table: np.ndarray) -> np.ndarray:
  """table[clip] by one cv2.LUT over the clip as a [frames * height, width, 3] image (~8x numpy's take)."""
  clip = np.ascontiguousarray(clip)
  frames, height, width, channels = clip.shape
  return cv2.LUT(clip.reshape(frames * height, width, channels), table).reshape(clip.shape)


def adjust_brightness(clip: np.ndarray, factor: float) -> np.ndarray:
  """torchvision adjust_brightness: x * factor, clipped (uint8 in, uint8 out, rounded)."""
  table = np.clip(np.rint(np.arange(256) * factor), 0, 255).astype(np.uint8)
  return _lookup(clip, table)


def _rotate_frames(clip: np.ndarray, angle_counterclockwise: float) -> np.ndarray:
  """Rotation about the frame centre, nearest neighbour, zero fill (torchvision's defaults)."""
  clip = np.ascontiguousarray(clip)
  height, width = clip.shape[1:3]
  matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), angle_counterclockwise, 1.0)
  out = np.empty_like(clip)
  for i, frame in enumerate(clip):
    cv2.warpAffine(frame, matrix, (width, height), dst=out[i], flags=cv2.INTER_NEAREST,
                   borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
  return out


def random_brightness_rotation(clip: np.ndarray, rng: np.random.Generator, brightness: float = 0.6,
                               degrees: float = 4.0) -> np.ndarray:
  """NR-DFERNet: ColorJitter(brightness=0.6) then RandomRotation(4) on the stacked clip (one draw each)."""
  factor = rng.uniform(max(0.0, 1 - brightness), 1 + brightness)
  angle = rng.uniform(-degrees, degrees)  # torchvision rotate: counter-clockwise
  return _rotate_frames(adjust_brightness(clip, factor), angle)


AEN_AFFINE_DEGREES = np.arange(-5, 6, 0.5)  # {-5, -4.5, ..., 5.5}, as in GroupRandomAffine


def random_affine_rotation(clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """AEN GroupRandomAffine: p = 0.5, one angle for all frames; RandomAffine turns clockwise."""
  if rng.random() >= 0.5:
    return clip
  angle_clockwise = float(rng.choice(AEN_AFFINE_DEGREES))
  return _rotate_frames(clip, -angle_clockwise)


def color_jitter_frame(frame: np.ndarray, rng: np.random.Generator, strength: float = 0.1) -> np.ndarray:
  """torchvision ColorJitter(strength x 4) on one RGB uint8 frame: random op order, PIL's formulas.

  brightness x*b; contrast m + c(x - m) with m the rounded mean of the grey image; saturation g + s(x - g) with g
  the grey image; hue: H of HSV (0..255) shifted by int(h * 255), wrapping. Grey = ITU-R 601 luma (PIL 'L').
  """
  order = rng.permutation(4)
  brightness = rng.uniform(1 - strength, 1 + strength)
  contrast = rng.uniform(1 - strength, 1 + strength)
  saturation = rng.uniform(1 - strength, 1 + strength)
  hue = rng.uniform(-strength, strength)
  frame = np.ascontiguousarray(frame)
  for op in order:
    if op == 0:
      frame = cv2.LUT(frame, np.clip(np.rint(np.arange(256) * brightness), 0, 255).astype(np.uint8))
    elif op == 1:
      mean = int(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY).mean() + 0.5)
      table = np.clip(np.rint(mean + contrast * (np.arange(256) - mean)), 0, 255).astype(np.uint8)
      frame = cv2.LUT(frame, table)
    elif op == 2:
      grey = cv2.cvtColor(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
      frame = cv2.addWeighted(frame, saturation, grey, 1 - saturation, 0.0)
    else:
      hsv = cv2.cvtColor(frame, cv2.COLOR_RGB2HSV_FULL)
      hsv[..., 0] += np.uint8(int(hue * 255) % 256)  # uint8 arithmetic wraps, as PIL's hue does
      frame = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)
  return frame


def random_color_jitter(clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """AEN GroupRandomColor_jitter: p = 0.5 per clip, then an independent ColorJitter per frame."""
  if rng.random() >= 0.5:
    return clip
  return np.stack([color_jitter_frame(frame, rng) for frame in clip])


def augment_clip(frames, recipe: str, size: int, rng: np.random.Generator | None = None, *,
                 interpolation: str = 'antialias') -> np.ndarray:
  """One recipe of RECIPES on a clip: frames [frames, height, width, 3] uint8 -> [frames, size, size, 3] uint8.

  'none' needs no rng. The result may be a view (the rare crop fallback); np.stack copies it.
  """
  if recipe not in RECIPES:
    raise ValueError(f'augmentation recipe {recipe!r} not in {RECIPES}')
  if recipe == 'none':
    return resize_clip(frames, size, interpolation=interpolation)
  if rng is None:
    raise ValueError(f'augmentation recipe {recipe!r} is random: pass rng')
  clip = random_horizontal_flip(random_sized_crop(frames, size, rng, interpolation), rng)
  if recipe == 'nr_dfernet':
    clip = random_brightness_rotation(clip, rng)
  elif recipe == 'aen':
    clip = random_color_jitter(random_affine_rotation(clip, rng), rng)
  return clip
