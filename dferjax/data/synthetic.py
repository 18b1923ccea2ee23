"""Deterministic synthetic DFER clips written in the real on-disk layouts of DFEW, AFEW and FERV39K.

Each clip is a cv2-drawn face whose expression changes over time. Two sets of motions (`motions`):
- 'time_reversed' (default): two pairs of classes are exact time-reverses of each other (happy: a smile forms /
  sad: a smile fades; surprise: mouth and brows open / fear: they close), so a model that ignores frame order
  tops out near 5/7 accuracy; one that reads order can separate all seven.
- 'order_free': sad and fear get motions of their own (sad: the mouth corners drop and the inner brows rise;
  fear: the mouth opens a little under frowning brows and wide eyes), so every class reaches an expression no
  other class shows: the classes differ in the set of frames, and an order-blind model (CEFLNet) can separate
  them. The other five classes and every nuisance draw are the same as in 'time_reversed'.
The cues (mouth, brows, eyes) are large so they survive resizing to 32-48 px. Nuisances per clip: face position and size,
skin, background colour and gradient, noise level, onset/offset timing and amplitude; per frame: small jitter
and noise. Same seed => byte-identical files.

Run:
  python -m dferjax.data.synthetic --out /tmp/dfew_synth --clips-per-class 40 --seed 0
  python -m dferjax.data.synthetic --layout afew --out /tmp/afew_synth --clips-per-class 10
  python -m dferjax.data.synthetic --motions order_free --out /tmp/dfew_synth_order_free
then build with `python scripts/build_dataset.py --dataset dfew --manual_dir /tmp/dfew_synth ...`.
"""
import argparse
import concurrent.futures
import dataclasses
import json
import os
import pathlib

import cv2
import numpy as np

from tfds_builders.labels import CLASS_NAMES

FRAME_SIZE = 224  # DFEW's clip_224x224
JPEG_QUALITY = 90
NUM_FOLDS = 5
# Official label names: DFEW CSV labels are 1 + index here; AFEW/FERV39K use them as folder names.
EMOTION_NAMES = tuple(name.capitalize() for name in CLASS_NAMES)
FERV39K_SCENES = ('Action', 'Argue', 'Business', 'Conflict', 'Contest', 'Crime', 'Crisis', 'DailyLife',
                  'ElegantArt', 'Experiment', 'History', 'Interview', 'Liveshow', 'Medicine', 'OfficialEvent',
                  'ScholarReport', 'School', 'Social', 'Speech', 'Talkshow', 'Terror', 'War')

# Expression parameters, in units of the face half-width where they are lengths.
NEUTRAL = {'smile': 0.0, 'mouth_open': 0.0, 'brow_raise': 0.0, 'brow_frown': 0.0, 'eye_open': 1.0}
# class -> {parameter: (value at onset, value at offset)}; unnamed parameters stay at NEUTRAL.
MOTIONS = {
    'happy': {'smile': (0.0, 1.0)},
    'sad': {'smile': (1.0, 0.0)},  # happy reversed in time
    'neutral': {},
    'angry': {'brow_frown': (0.0, 1.0), 'eye_open': (1.0, 0.75)},
    'surprise': {'mouth_open': (0.0, 1.0), 'brow_raise': (0.0, 1.0), 'eye_open': (1.0, 1.35)},
    'disgust': {'smile': (0.0, -1.0), 'eye_open': (1.0, 0.45)},
    'fear': {'mouth_open': (1.0, 0.0), 'brow_raise': (1.0, 0.0), 'eye_open': (1.35, 1.0)},  # surprise reversed
}
TIME_REVERSED_PAIRS = (('happy', 'sad'), ('surprise', 'fear'))
# Sad and fear without a time-reversed twin: each ends on an expression of its own (a negative brow_frown lifts
# the inner brow ends). The other classes are MOTIONS'.
ORDER_FREE_MOTIONS = {
    **MOTIONS,
    'sad': {'smile': (0.0, -0.7), 'brow_frown': (0.0, -0.9)},
    'fear': {'mouth_open': (0.0, 0.5), 'brow_frown': (0.0, 0.8), 'eye_open': (1.0, 1.4)},
}
MOTION_SETS = {'time_reversed': MOTIONS, 'order_free': ORDER_FREE_MOTIONS}
MOUTH_INTERIOR_RGB = (30, 12, 28)  # darker than anything else drawn: the opening is countable in pixels
TEETH_RGB = (250, 250, 245)


def smoothstep(x):
  x = np.clip(x, 0.0, 1.0)
  return x * x * (3.0 - 2.0 * x)


def motion_set(motions: str) -> dict:
  if motions not in MOTION_SETS:
    raise ValueError(f'motions={motions!r} not in {sorted(MOTION_SETS)}')
  return MOTION_SETS[motions]


def expression(class_name: str, t, amplitude: float = 1.0, onset: float = 0.0, offset: float = 1.0, *,
               motions: str = 'time_reversed'):
  """Expression parameters at times t in [0, 1]: {name: [len(t)] float64}.

  The move runs from `onset` to `offset` (smoothstep), scaled by `amplitude` around NEUTRAL. Because
  smoothstep(1 - x) = 1 - smoothstep(x), in the 'time_reversed' set
  expression('sad', t, a, t0, t1) == expression('happy', 1 - t, a, 1 - t1, 1 - t0).
  """
  t = np.asarray(t, np.float64)
  progress = smoothstep((t - onset) / max(offset - onset, 1e-6))
  params = {}
  for name, rest in NEUTRAL.items():
    start, end = motion_set(motions)[class_name].get(name, (rest, rest))
    params[name] = rest + amplitude * (start + (end - start) * progress - rest)
  return params


@dataclasses.dataclass(frozen=True)
class FaceStyle:
  """Per-clip nuisance: where the face is, its colours, the timing of the move."""
  center: tuple[float, float]  # (x, y) pixels
  radius: float  # face half-width, pixels
  skin: tuple[int, int, int]  # RGB
  background: tuple[int, int, int]
  gradient: tuple[float, float]  # background brightness ramp per pixel along (x, y)
  brow: tuple[int, int, int]
  noise_std: float
  amplitude: float
  onset: float
  offset: float
  wobble_phase: float  # tiny motion shared by all classes, so "neutral" is not a still image


def sample_style(rng: np.random.Generator, size: int = FRAME_SIZE) -> FaceStyle:
  light, dark = np.array([236, 198, 170]), np.array([150, 105, 80])
  skin = light + rng.uniform(0, 1) * (dark - light) + rng.uniform(-12, 12, size=3)
  while True:  # background far enough from the skin that the face outline is visible
    background = rng.uniform(70, 240, size=3)
    if np.abs(background - skin).sum() > 90:
      break
  return FaceStyle(
      center=(size / 2 + rng.uniform(-0.06, 0.06) * size, size / 2 + rng.uniform(-0.03, 0.03) * size),
      radius=rng.uniform(0.31, 0.37) * size,
      skin=tuple(int(v) for v in np.clip(skin, 80, 255)),
      background=tuple(int(v) for v in background),
      gradient=tuple(rng.uniform(-0.12, 0.12, size=2) * 224 / size),
      brow=tuple(int(v) for v in rng.uniform(40, 85, size=3)),
      noise_std=rng.uniform(2.0, 6.0),
      amplitude=rng.uniform(0.75, 1.0),
      onset=rng.uniform(0.0, 0.3),
      offset=rng.uniform(0.7, 1.0),
      wobble_phase=rng.uniform(0, 2 * np.pi))


_SHIFT = 4  # cv2 sub-pixel drawing: coordinates carry 4 fractional bits
_SCALE = 1 << _SHIFT


def _points(xy):
  return np.round(np.asarray(xy) * _SCALE).astype(np.int32)


def render_face(params: dict, style: FaceStyle, background: np.ndarray, shift=(0.0, 0.0)) -> np.ndarray:
  """One RGB uint8 frame [size, size, 3] (no noise) for scalar expression `params`, drawn over `background`."""
  image = background.copy()
  radius = style.radius
  cx, cy = style.center[0] + shift[0], style.center[1] + shift[1]
  skin = np.array(style.skin)
  aa = cv2.LINE_AA
  cv2.ellipse(image, _points((cx, cy)), _points((radius, 1.28 * radius)), 0, 0, 360,
              tuple(int(v) for v in skin), -1, aa, _SHIFT)
  nose = tuple(int(v) for v in skin * 0.8)
  cv2.polylines(image, [_points([(cx, cy - 0.05 * radius), (cx - 0.09 * radius, cy + 0.22 * radius),
                                 (cx + 0.06 * radius, cy + 0.25 * radius)])], False, nose,
                max(1, round(0.04 * radius)), aa, _SHIFT)
  eye_y = cy - 0.22 * radius
  eye_height = 0.11 * radius * params['eye_open']
  for side in (-1, 1):
    eye_x = cx + side * 0.4 * radius
    cv2.ellipse(image, _points((eye_x, eye_y)), _points((0.2 * radius, eye_height)), 0, 0, 360,
                (245, 245, 240), -1, aa, _SHIFT)
    cv2.circle(image, _points((eye_x, eye_y)), int(min(0.075 * radius, eye_height) * _SCALE),
               (50, 35, 30), -1, aa, _SHIFT)
    cv2.ellipse(image, _points((eye_x, eye_y)), _points((0.2 * radius, eye_height)), 0, 0, 360,
                (70, 50, 45), max(1, round(0.025 * radius)), aa, _SHIFT)
    brow_y = eye_y - 0.3 * radius - 0.32 * radius * params['brow_raise']
    inner = (cx + side * 0.13 * radius, brow_y + 0.3 * radius * params['brow_frown'])
    outer = (cx + side * 0.62 * radius, brow_y - 0.05 * radius - 0.06 * radius * params['brow_frown'])
    cv2.line(image, _points(inner), _points(outer), style.brow, max(2, round(0.13 * radius)), aa, _SHIFT)
  # Mouth: a lip curve bent by the smile; a grin parts the lips over white teeth, surprise opens them dark.
  mouth_y = cy + 0.6 * radius
  half_width = 0.5 * radius * (1 + 0.2 * params['smile'])
  grin = 0.55 * max(params['smile'], 0.0)
  u = np.linspace(-1.0, 1.0, 17)
  base = mouth_y - 0.35 * radius * params['smile'] * u**2
  opening = (params['mouth_open'] + grin) * (1 - u**2)
  upper = np.stack([cx + half_width * u, base - 0.12 * radius * opening], axis=1)
  lower = np.stack([cx + half_width * u, base + 0.5 * radius * opening], axis=1)
  outline = _points(np.concatenate([upper, lower[::-1]]))
  interior = TEETH_RGB if grin > params['mouth_open'] else MOUTH_INTERIOR_RGB
  cv2.fillPoly(image, [outline], interior, aa, _SHIFT)
  lips = tuple(int(v) for v in np.clip(skin * np.array([0.85, 0.55, 0.55]), 0, 255))
  cv2.polylines(image, [outline], True, lips, max(2, round(0.07 * radius)), aa, _SHIFT)
  return image


def render_clip(class_name: str, num_frames: int, rng: np.random.Generator, size: int = FRAME_SIZE, *,
                motions: str = 'time_reversed'):
  """RGB uint8 frames [num_frames, size, size, 3], the expression parameters per frame, and the style."""
  style = sample_style(rng, size)
  t = np.linspace(0.0, 1.0, num_frames)
  params = expression(class_name, t, style.amplitude, style.onset, style.offset, motions=motions)
  wobble = 0.05 * np.sin(2 * np.pi * 1.3 * t + style.wobble_phase)
  params['smile'] = params['smile'] + wobble
  params['brow_raise'] = params['brow_raise'] + wobble
  jitter = np.clip(np.cumsum(rng.normal(0, 0.8, size=(num_frames, 2)), axis=0), -2.5, 2.5) * size / 224
  y, x = np.mgrid[0:size, 0:size].astype(np.float32)
  ramp = style.gradient[0] * (x - size / 2) + style.gradient[1] * (y - size / 2)
  background = np.clip(np.array(style.background, np.float32) + ramp[..., None], 0, 255).astype(np.uint8)
  # Per-frame noise = a random window of one per-clip noise field (drawing fresh noise per frame is 20x slower).
  pad = 32
  noise = np.round(rng.standard_normal((size + pad, size + pad, 3), dtype=np.float32) * style.noise_std)
  noise = noise.astype(np.int16)
  offsets = rng.integers(0, pad + 1, size=(num_frames, 2))
  frames = np.empty((num_frames, size, size, 3), np.uint8)
  for i in range(num_frames):
    face = render_face({k: v[i] for k, v in params.items()}, style, background, shift=jitter[i])
    window = noise[offsets[i, 0]:offsets[i, 0] + size, offsets[i, 1]:offsets[i, 1] + size]
    frames[i] = np.clip(face.astype(np.int16) + window, 0, 255).astype(np.uint8)
  return frames, params, style


def sample_num_frames(rng: np.random.Generator) -> int:
  """8..15 frames for ~15% of clips (exercises the short-clip fallback of 16-frame sampling), else 16..48."""
  return int(rng.integers(8, 16)) if rng.uniform() < 0.15 else int(rng.integers(16, 49))


def clip_rng(seed: int, layout: str, split: str, label: int, index: int) -> np.random.Generator:
  """Independent stream per clip, so clip k is the same whatever the clip count."""
  return np.random.default_rng([seed, sum(map(ord, layout)), sum(map(ord, split)), label, index])


def write_frames(folder: pathlib.Path, frames, name_of) -> None:
  """JPEG-encode RGB frames into folder/name_of(i) with i = 1, 2, ... (frame numbers start at 1)."""
  folder.mkdir(parents=True, exist_ok=True)
  for i, frame in enumerate(frames, start=1):
    ok, encoded = cv2.imencode('.jpg', cv2.cvtColor(frame, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
      raise RuntimeError(f'cv2.imencode failed for {folder / name_of(i)}')
    (folder / name_of(i)).write_bytes(encoded.tobytes())


def _write_clip(folder, layout, split, label, index, seed, name_of, motions) -> int:
  rng = clip_rng(seed, layout, split, label, index)
  frames, _, _ = render_clip(CLASS_NAMES[label], sample_num_frames(rng), rng, motions=motions)
  write_frames(folder, frames, name_of)
  return len(frames)


def dfew_folds(labels, seed: int, num_folds: int = NUM_FOLDS) -> np.ndarray:
  """Test fold 0..num_folds-1 per clip: each class dealt round-robin after a shuffle (stratified, disjoint)."""
  labels = np.asarray(labels)
  rng = np.random.default_rng([seed, 5])
  folds = np.empty(len(labels), np.int64)
  dealt = 0
  for label in range(len(CLASS_NAMES)):
    members = rng.permutation(np.flatnonzero(labels == label))
    folds[members] = (dealt + np.arange(len(members))) % num_folds  # continue the deal: folds stay balanced
    dealt += len(members)
  return folds


def write_dfew(out, clips_per_class: int = 20, seed: int = 0, *, split_folder_spelling: str = 'single-labeled',
               motions: str = 'time_reversed', workers: int = 1) -> list[dict]:
  """DFEW layout under `out`; returns one dict per clip (clip_id, label 0..6, num_frames, test_fold 1..5).

  out/Clip/clip_224x224/<00001>/<00001>_<00001>.jpg ...
  out/EmoLabel_DataSplit/{train,test}(<spelling>)/set_{1..5}.csv   rows `video_name,label` (label 1..7)
  workers: clips drawn and encoded on this many threads (cv2 releases the GIL); the files do not change.
  """
  if split_folder_spelling not in ('single-labeled', 'single_labeled'):
    raise ValueError(f'split_folder_spelling {split_folder_spelling!r} not in (single-labeled, single_labeled)')
  motion_set(motions)  # fails before anything is written
  out = pathlib.Path(out)
  labels = np.repeat(np.arange(len(CLASS_NAMES)), clips_per_class)
  ids = np.random.default_rng([seed, 4]).permutation(len(labels)) + 1  # ids do not give away the class
  folds = dfew_folds(labels, seed)
  clip_ids = [f'{clip_number:05d}' for clip_number in ids]

  def write(k):
    return _write_clip(out / 'Clip' / 'clip_224x224' / clip_ids[k], 'dfew', 'all', int(labels[k]),
                       k % clips_per_class, seed, lambda i: f'{clip_ids[k]}_{i:05d}.jpg', motions)

  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    num_frames = list(pool.map(write, range(len(labels))))
  clips = [{'clip_id': clip_ids[k], 'label': int(labels[k]), 'num_frames': num_frames[k],
            'test_fold': int(folds[k]) + 1} for k in range(len(labels))]
  clips.sort(key=lambda clip: clip['clip_id'])
  for split in ('train', 'test'):
    folder = out / 'EmoLabel_DataSplit' / f'{split}({split_folder_spelling})'
    folder.mkdir(parents=True, exist_ok=True)
    for fold in range(1, NUM_FOLDS + 1):
      rows = [f"{int(c['clip_id'])},{c['label'] + 1}" for c in clips if (c['test_fold'] == fold) == (split == 'test')]
      (folder / f'set_{fold}.csv').write_text('video_name,label\n' + ''.join(row + '\n' for row in rows))
  return clips


def write_afew(out, clips_per_class: int = 10, seed: int = 0, *, val_clips_per_class: int | None = None,
               motions: str = 'time_reversed') -> list[dict]:
  """AFEW layout with frames already extracted (as the builder expects after the ffmpeg step):

  out/Train_AFEW/<Emotion>/<9-digit video id>/<00001>.jpg ...,  out/Val_AFEW/<Emotion>/<video id>/...
  """
  motion_set(motions)
  out = pathlib.Path(out)
  counts = {'Train': clips_per_class, 'Val': clips_per_class if val_clips_per_class is None else val_clips_per_class}
  id_rng = np.random.default_rng([seed, 6])
  video_ids = id_rng.choice(10**9 - 10**6, size=sum(counts.values()) * len(CLASS_NAMES), replace=False) + 10**6
  clips = []
  for split, count in counts.items():
    for label, emotion in enumerate(EMOTION_NAMES):
      for index in range(count):
        video_id = f'{video_ids[len(clips)]:09d}'
        num_frames = _write_clip(out / f'{split}_AFEW' / emotion / video_id, 'afew', split, label, index, seed,
                                 lambda i: f'{i:05d}.jpg', motions)
        clips.append({'clip_id': f'{split}/{emotion}/{video_id}', 'label': label, 'num_frames': num_frames,
                      'split': split})
  return clips


def write_ferv39k(out, clips_per_class: int = 10, seed: int = 0, *, test_clips_per_class: int | None = None,
                  motions: str = 'time_reversed') -> list[dict]:
  """FERV39K layout:

  out/2_ClipsforFaceCrop/<Scene>/<Emotion>/<4-digit clip>/<00001>.jpg ...
  out/4_setups/All_scenes/{train,test}_All.csv   lines `Scene/Emotion/clip Emotion` (space-separated, no header)
  """
  motion_set(motions)
  out = pathlib.Path(out)
  counts = {'train': clips_per_class, 'test': clips_per_class if test_clips_per_class is None else test_clips_per_class}
  rng = np.random.default_rng([seed, 7])
  next_number = {}
  clips = []
  for split, count in counts.items():
    for label, emotion in enumerate(EMOTION_NAMES):
      for index in range(count):
        scene = FERV39K_SCENES[rng.integers(len(FERV39K_SCENES))]
        number = next_number.get((scene, emotion), int(rng.integers(1, 500)))
        next_number[(scene, emotion)] = number + int(rng.integers(1, 4))
        clip_id = f'{scene}/{emotion}/{number:04d}'
        num_frames = _write_clip(out / '2_ClipsforFaceCrop' / clip_id, 'ferv39k', split, label, index, seed,
                                 lambda i: f'{i:05d}.jpg', motions)
        clips.append({'clip_id': clip_id, 'label': label, 'num_frames': num_frames, 'split': split})
  setups = out / '4_setups' / 'All_scenes'
  setups.mkdir(parents=True, exist_ok=True)
  for split in counts:
    lines = [f"{c['clip_id']} {EMOTION_NAMES[c['label']]}\n" for c in clips if c['split'] == split]
    (setups / f'{split}_All.csv').write_text(''.join(lines))
  return clips


def ensure_built(name: str, data_dir: str, *, manual_dir: str = '', clips_per_class: int = 40, seed: int = 0,
                 motions: str = 'time_reversed'):
  """Writes the synthetic DFEW-layout clips (once) and builds the TFDS dataset `name` (e.g. 'dfew/fold1_px48')
  from them if it is missing: the demo config's first run. A folder written with other settings (seed, clip
  count, motion set) is refused: the build under data_dir would be the other set's, so each set needs its own
  data_dir (the demo gives the order-free set one)."""
  from dferjax.data import build  # pylint: disable=import-outside-toplevel  # tfds only when building
  manual_dir = manual_dir or os.path.join(data_dir, 'manual', 'synthetic_dfew')
  motion_set(motions)
  wanted = {'clips_per_class': clips_per_class, 'seed': seed, 'motions': motions}
  marker = os.path.join(manual_dir, 'synthetic.json')
  if os.path.isfile(marker):
    with open(marker) as f:
      written = {'motions': 'time_reversed', **json.load(f)}  # markers older than `motions` hold the default set
    if written != wanted:
      raise ValueError(f'{manual_dir} holds a synthetic dataset written with {written}, but the config asks for '
                       f'{wanted}: give another config.dataset.data_dir, or delete {data_dir}')
  else:
    print(f'writing the synthetic DFEW-layout dataset to {manual_dir}', flush=True)
    write_dfew(manual_dir, **wanted)
    with open(marker, 'w') as f:
      json.dump(wanted, f)
  builder_name, builder_config = name.split('/')
  build.build(builder_name, manual_dir=manual_dir, data_dir=data_dir, configs=[builder_config])


WRITERS = {'dfew': write_dfew, 'afew': write_afew, 'ferv39k': write_ferv39k}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', required=True, help='root directory to write (the builder\'s --manual_dir)')
  parser.add_argument('--layout', choices=sorted(WRITERS), default='dfew')
  parser.add_argument('--clips-per-class', type=int, default=20,
                      help='DFEW: clips per class in total (5 folds); AFEW/FERV39K: per class and split')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--motions', choices=sorted(MOTION_SETS), default='time_reversed',
                      help="'order_free': no class is another's time-reverse (module docstring)")
  args = parser.parse_args(argv)
  if os.path.exists(args.out) and os.listdir(args.out):
    parser.error(f'--out {args.out} exists and is not empty; a mix of two seeds would not be deterministic')
  clips = WRITERS[args.layout](args.out, args.clips_per_class, args.seed, motions=args.motions)
  print(f'wrote {len(clips)} {args.layout} clips ({sum(c["num_frames"] for c in clips)} frames, {args.motions} '
        f'motions) to {args.out}')


if __name__ == '__main__':
  main()
