"""Predicts the emotions in a user's own video with a trained run: probabilities per window and for the whole video.

    python -m dferjax.predict --workdir runs/stt_dfew_fold1 --video clip.mp4 [--step best] [--out DIR]
    python -m dferjax.predict --workdir runs/stt_dfew_fold1 --frames face_crops/ --no_detect

Each frame's face is found with OpenCV's bundled Haar cascade (the box smoothed over frames, held where the
cascade misses, padded to a square), cropped and resized to the run's frame size, as the datasets were built.
Overlapping windows of frames then go through the evaluation path of the run (`pipeline.EvalClip`: the config's
test sampler, resize, clip transforms with evaluation draws) and the model in eval mode. Writes
`predictions.json` (per window and whole video, class names with probabilities) and `timeline.png`.
Expected errors are one `error: ...` line on stderr, exit status 1 (`--verbose`: the traceback).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
from typing import Any, Callable, Iterator

import cv2
import numpy as np

from dferjax import cli

CASCADE = 'haarcascade_frontalface_alt2.xml'  # of OpenCV's bundled cascades, the one that finds the most drawn faces
DETECT_SIDE = 480  # frames are searched at most this large: a face of a DFER video is a large part of the frame
Box = tuple[float, float, float, float]  # x, y, width, height in pixels of the full frame


class PredictError(ValueError):
  """A problem with the command's input, told in one line."""


# ---------------------------------------------------------------------------------------------------------
# Frames in: a video file or a folder of images, read twice (find the faces, then crop) so that a long video
# never has to fit in memory at full resolution.


@dataclasses.dataclass(frozen=True)
class FrameSource:
  """RGB uint8 frames [height, width, 3] of a video file (`kind='video'`) or a folder of images, in order."""
  path: str
  kind: str
  fps: float
  num_frames: int
  files: tuple[str, ...] = ()

  def __iter__(self) -> Iterator[np.ndarray]:
    if self.kind == 'video':
      yield from _video_frames(self.path)
    else:
      for file in self.files:
        yield _read_image(file)


def _video_frames(path: str) -> Iterator[np.ndarray]:
  capture = cv2.VideoCapture(path)
  try:
    while True:
      ok, frame = capture.read()
      if not ok:
        return
      yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
  finally:
    capture.release()


def _read_image(path: str) -> np.ndarray:
  image = cv2.imread(path, cv2.IMREAD_COLOR)
  if image is None:
    raise PredictError(f'cannot decode frame {path}: not a readable image')
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def open_video(path: str, default_fps: float) -> FrameSource:
  """A video file OpenCV can decode; `default_fps` where the container does not say its frame rate."""
  if not os.path.isfile(path):
    raise PredictError(f'--video {path}: no such file')
  capture = cv2.VideoCapture(path)
  fps = capture.get(cv2.CAP_PROP_FPS) if capture.isOpened() else 0.0
  capture.release()
  num_frames = sum(1 for _ in _video_frames(path))  # the container's frame count can be wrong or missing
  if num_frames == 0:
    raise PredictError(f'--video {path}: OpenCV decodes no frame from it (not a video, or a codec this OpenCV '
                       'build lacks)')
  return FrameSource(path, 'video', float(fps) if fps and math.isfinite(fps) and fps > 0 else default_fps,
                     num_frames)


def open_frame_folder(path: str, fps: float) -> FrameSource:
  """The images of a folder in natural order ('2.jpg' before '10.jpg'), at `fps`."""
  from tfds_builders.common import list_frames  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(path):
    raise PredictError(f'--frames {path}: no such directory')
  files = tuple(list_frames(pathlib.Path(path)))
  if not files:
    raise PredictError(f'--frames {path}: holds no .jpg/.png images')
  return FrameSource(path, 'frames', fps, len(files), files)


# ---------------------------------------------------------------------------------------------------------
# Faces: boxes per frame, smoothed over time, square crops.


def haar_face_detector() -> Callable[[np.ndarray], list[Box]]:
  """frame RGB -> face boxes, from the Haar cascade that opencv-python ships (cv2.data.haarcascades)."""
  path = os.path.join(getattr(getattr(cv2, 'data', None), 'haarcascades', ''), CASCADE)
  if not hasattr(cv2, 'CascadeClassifier') or not os.path.isfile(path):
    raise PredictError(f'face detection needs OpenCV\'s bundled Haar cascade {CASCADE}, which opencv '
                       f'{cv2.__version__} does not ship (OpenCV 5 dropped the cascades): install '
                       '"opencv-python-headless<5", or crop the faces yourself and pass --no_detect')
  cascade = cv2.CascadeClassifier(path)

  def detect(frame: np.ndarray) -> list[Box]:
    scale = min(1.0, DETECT_SIDE / max(frame.shape[:2]))
    gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    if scale < 1:
      gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    smallest = max(24, min(gray.shape) // 8)
    found = cascade.detectMultiScale(cv2.equalizeHist(gray), scaleFactor=1.1, minNeighbors=3,
                                     minSize=(smallest, smallest))
    return [tuple(float(v) / scale for v in box) for box in np.reshape(found, (-1, 4))]
  return detect


def largest(boxes: list[Box]) -> Box | None:
  return max(boxes, key=lambda box: box[2] * box[3]) if len(boxes) else None


def smooth_boxes(detections: list[Box | None], smoothing: float) -> list[Box]:
  """One box per frame: an exponential moving average of the detections (weight `smoothing` on the past),
  the last box held through frames without a detection, the first detection used before it."""
  first = next((box for box in detections if box is not None), None)
  if first is None:
    raise PredictError('no face found')
  current, boxes = np.asarray(first, np.float64), []
  for box in detections:
    if box is not None:
      current = smoothing * current + (1 - smoothing) * np.asarray(box, np.float64)
    boxes.append(tuple(float(v) for v in current))
  return boxes


def crop_square(frame: np.ndarray, box: Box, margin: float, size: int) -> np.ndarray:
  """The square of side max(width, height) * (1 + margin) centred on `box`, black outside the frame, resized
  to `size` with INTER_AREA as the dataset builders resize: uint8 [size, size, 3]."""
  x, y, width, height = box
  side = max(1, int(round(max(width, height) * (1 + margin))))
  left, top = int(round(x + width / 2 - side / 2)), int(round(y + height / 2 - side / 2))
  frame_height, frame_width = frame.shape[:2]
  pads = (max(0, -top), max(0, top + side - frame_height), max(0, -left), max(0, left + side - frame_width))
  padded = cv2.copyMakeBorder(frame, *pads, cv2.BORDER_CONSTANT, value=(0, 0, 0)) if any(pads) else frame
  crop = padded[top + pads[0]:top + pads[0] + side, left + pads[2]:left + pads[2] + side]
  return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA) if side != size else crop.copy()


def centre_square(frame: np.ndarray, size: int) -> np.ndarray:
  """The builders' rule for a frame that is already a face crop: centre square, then INTER_AREA to `size`."""
  height, width = frame.shape[:2]
  side = min(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  frame = frame[top:top + side, left:left + side]
  return cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA) if side != size else frame.copy()


def face_crops(source: FrameSource, size: int, *, detector: Callable | None, margin: float = 0.25,
               smoothing: float = 0.6) -> tuple[np.ndarray, int]:
  """uint8 [num_frames, size, size, 3] face crops and the number of frames where a face was found;
  detector None: the frames are crops already (centre square, resize)."""
  if detector is None:
    return np.stack([centre_square(frame, size) for frame in source]), source.num_frames
  detections = [largest(detector(frame)) for frame in source]
  found = sum(box is not None for box in detections)
  if not found:
    raise PredictError(f'no face found in any of the {len(detections)} frames of {source.path}: if the frames are '
                       'face crops already, pass --no_detect')
  boxes = smooth_boxes(detections, smoothing)
  return np.stack([crop_square(frame, box, margin, size) for frame, box in zip(source, boxes)]), found


# ---------------------------------------------------------------------------------------------------------
# Windows and the model.


def window_bounds(num_frames: int, window: int, stride: int) -> list[tuple[int, int]]:
  """[start, end) frame ranges of `window` frames every `stride` frames, the last one ending at the video's end;
  a video no longer than a window is one window."""
  if window < 1 or stride < 1:
    raise PredictError(f'window ({window} frames) and stride ({stride} frames) must be at least one frame')
  if num_frames <= window:
    return [(0, num_frames)]
  starts = list(range(0, num_frames - window + 1, stride))
  if starts[-1] + window < num_frames:
    starts.append(num_frames - window)
  return [(start, start + window) for start in starts]


@dataclasses.dataclass
class Run:
  """A workdir's config, evaluation steps and restored parameters at one checkpoint step."""
  workdir: str
  config: Any
  steps: Any
  state: Any
  step: int


def load_run(workdir: str, step: str = 'best') -> Run:
  """The run's model in evaluation form (no optimizer) with the checkpoint's parameters and BN statistics, at the
  step `dferjax.evaluate` would take for `step` ('best', 'selected', 'latest' or a number; a damaged checkpoint
  is passed over as there)."""
  from dferjax import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
  from dferjax import train  # pylint: disable=import-outside-toplevel
  from dferjax.evaluate import choose_step, load_run_config  # pylint: disable=import-outside-toplevel
  config = load_run_config(workdir)
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise PredictError(f'{workdir} holds no checkpoint (no {os.path.join(workdir, "checkpoints")}): train it first')
  checkpoints = checkpoint_lib.Checkpoints(workdir, best_metric=config.best_metric, read_only=True)
  try:
    chosen = choose_step(checkpoints, step, config, workdir)
    steps = train.make_steps(config, steps_per_epoch=None)
    state = checkpoint_lib.restore_for_evaluation(checkpoints, chosen, steps.abstract_state)
  finally:
    checkpoints.close()
  return Run(workdir, config, steps, state, chosen)


def probability_fn(run: Run) -> Callable[[Any, dict], Any]:
  """(state, batch) -> softmax of the eval-mode logits [batch, num_classes], as `train.eval_step` calls the model."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from dferjax import train  # pylint: disable=import-outside-toplevel
  model, dtype = run.steps.model, jnp.dtype(run.config.dtype)

  def probabilities(state, batch):
    video = batch['video'].astype(dtype) / 255
    logits, _ = model.apply({'params': state.params, 'batch_stats': state.batch_stats}, video,
                            **train.model_inputs(model, batch), train=False)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return jax.jit(probabilities)


def window_records(crops: np.ndarray, bounds: list[tuple[int, int]]) -> list[dict]:
  """One record per window, shaped as a built dataset's (docs/contracts.md), so the evaluation path reads it."""
  return [{'frames': crops[start:end], 'label': 0, 'clip_id': f'frames {start}-{end}', 'num_frames': end - start}
          for start, end in bounds]


def predict_windows(run: Run, crops: np.ndarray, bounds: list[tuple[int, int]], batch_size: int = 8) -> np.ndarray:
  """Class probabilities [num_windows, num_classes] of each window, through the run's evaluation pipeline."""
  from dferjax.data import pipeline  # pylint: disable=import-outside-toplevel
  config = run.config
  batches = pipeline.eval_batches(
      window_records(crops, bounds), sampler=config.input.sampler.to_dict(), image_size=config.input.image_size,
      batch_size=batch_size, num_threads=1, transforms=config.input.transforms.to_dict())
  probabilities = probability_fn(run)
  rows = [np.asarray(probabilities(run.state, batch))[np.asarray(batch['mask'])] for batch in batches]
  return np.concatenate(rows)[:len(bounds)]


# ---------------------------------------------------------------------------------------------------------
# Outputs.


def prediction_record(source: FrameSource, run: Run, bounds, probabilities: np.ndarray, *, faces_found: int | None,
                      window: int, stride: int) -> dict:
  """What predictions.json holds: per window ([start_frame, end_frame), seconds) and the whole video (the mean
  of the windows' probabilities)."""
  class_names = list(run.config.class_names)

  def named(p):
    return {name: float(value) for name, value in zip(class_names, p)}

  video_probabilities = probabilities.mean(axis=0)
  windows = [{'start_frame': start, 'end_frame': end, 'start_time': start / source.fps, 'end_time': end / source.fps,
              'probabilities': named(p), 'prediction': class_names[int(np.argmax(p))]}
             for (start, end), p in zip(bounds, probabilities)]
  return {'input': source.path, 'workdir': run.workdir, 'step': run.step, 'model_name': run.config.model_name,
          'fps': source.fps, 'num_frames': source.num_frames, 'window_frames': window, 'stride_frames': stride,
          'face_detection': CASCADE if faces_found is not None else 'off (--no_detect)',
          'frames_with_face': faces_found, 'class_names': class_names,
          'video': {'probabilities': named(video_probabilities),
                    'prediction': class_names[int(np.argmax(video_probabilities))]},
          'windows': windows}


def plot_timeline(record: dict, path: str | os.PathLike) -> pathlib.Path:
  """A PNG of each class's probability over time (one point per window, at its centre)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  figure = Figure(figsize=(10, 4), dpi=100)
  FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  times = [(w['start_time'] + w['end_time']) / 2 for w in record['windows']]
  for name in record['class_names']:
    axes.plot(times, [w['probabilities'][name] for w in record['windows']], marker='.', label=name)
  axes.set(xlabel='time (s, window centre)', ylabel='probability', ylim=(0, 1),
           title=f'{os.path.basename(record["input"].rstrip("/"))}: {record["video"]["prediction"]} '
                 f'({record["model_name"]}, step {record["step"]})')
  axes.grid(alpha=0.3)
  axes.legend(loc='upper left', bbox_to_anchor=(1.01, 1.0))
  figure.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, format='png')
  return path


def predict(workdir: str, *, video: str | None = None, frames: str | None = None, step: str = 'best',
            out: str | None = None, detect: bool = True, window_seconds: float = 2.0, stride_seconds: float = 1.0,
            fps: float = 25.0, margin: float = 0.25, smoothing: float = 0.6, batch_size: int = 8,
            detector: Callable | None = None) -> dict:
  """The command: writes `out`/predictions.json and `out`/timeline.png and returns the JSON record.
  `detector` replaces the Haar cascade (frame -> boxes), for tests."""
  if (video is None) == (frames is None):
    raise PredictError('give exactly one of --video and --frames')
  source = open_video(video, fps) if video is not None else open_frame_folder(frames, fps)
  if detect and detector is None:
    detector = haar_face_detector()
  run = load_run(workdir, step)
  crops, found = face_crops(source, run.config.input.image_size, detector=detector if detect else None,
                            margin=margin, smoothing=smoothing)
  window = max(1, round(window_seconds * source.fps))
  stride = max(1, round(stride_seconds * source.fps))
  bounds = window_bounds(len(crops), window, stride)
  probabilities = predict_windows(run, crops, bounds, batch_size)
  record = prediction_record(source, run, bounds, probabilities, faces_found=found if detect else None,
                             window=window, stride=stride)
  out = out or os.path.join(workdir, 'predictions', pathlib.Path(source.path.rstrip('/')).stem)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'predictions.json'), 'w') as f:
    json.dump(record, f, indent=2)
  plot_timeline(record, os.path.join(out, 'timeline.png'))
  return record


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(prog='python -m dferjax.predict', description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True, help='a dferjax run directory')
  parser.add_argument('--video', help='a video file OpenCV can decode')
  parser.add_argument('--frames', help='a folder of frame images, read in natural order')
  parser.add_argument('--step', default='best', help="'best', 'selected', 'latest' or a step number")
  parser.add_argument('--out', help='output directory (default: WORKDIR/predictions/<input name>)')
  parser.add_argument('--no_detect', action='store_true', help='the frames are face crops already: no detection')
  parser.add_argument('--window', type=float, default=2.0, help='window length, seconds')
  parser.add_argument('--stride', type=float, default=1.0, help='step between window starts, seconds')
  parser.add_argument('--fps', type=float, default=25.0, help='frame rate of --frames (and of a video that has none)')
  parser.add_argument('--margin', type=float, default=0.25, help='face box padding, as a fraction of its side')
  parser.add_argument('--smoothing', type=float, default=0.6, help='weight of the past in the box moving average')
  parser.add_argument('--batch_size', type=int, default=8, help='windows per model call')
  parser.add_argument('--verbose', action='store_true', help='the traceback of an expected error (else one line)')
  args = parser.parse_args(argv)
  record = cli.run(lambda: predict(
      args.workdir, video=args.video, frames=args.frames, step=args.step, out=args.out, detect=not args.no_detect,
      window_seconds=args.window, stride_seconds=args.stride, fps=args.fps, margin=args.margin,
      smoothing=args.smoothing, batch_size=args.batch_size), verbose=args.verbose)
  summary = ', '.join(f'{name} {p:.2f}' for name, p in record['video']['probabilities'].items())
  print(f'{record["input"]}: {record["video"]["prediction"]} ({summary}); {len(record["windows"])} windows')
  return record


if __name__ == '__main__':
  main(sys.argv[1:])
