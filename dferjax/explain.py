"""Which frames, and which pixels in them, a trained run's prediction for a clip rests on: integrated gradients
(Sundararajan, Taly and Yan, ICML 2017) of one class logit with respect to the clip the model sees.

    python -m dferjax.explain --workdir runs/stt_dfew_fold1 --clips 00042,00107
    python -m dferjax.explain --workdir runs/stt_dfew_fold1 --wrong 8      # the 8 most confident mistakes
    python -m dferjax.explain --workdir runs/stt_dfew_fold1 --clips 00042 --baseline still --target label
    python -m dferjax.explain --workdir runs/stt_dfew_fold1 --per_class 20 --baseline still
    python -m dferjax.explain --workdir runs/stt_dfew_fold1 --video clip.mp4   # windows of a video of your own

The clip is the one evaluation gives the model (the split's clip, the test sampler's frames, the clip transforms'
evaluation draws), with the checkpoint evaluation uses (`--step`, best by default), in float32. For input value
x_i and a baseline clip b, the attribution is (x_i - b_i) times the mean of d logit / d x_i over the straight
path from b to x, taken at the midpoints of `--steps` equal intervals. The attributions add up to logit(x) -
logit(b) (completeness); each clip's record gives both sides, and a gap of more than a few % asks for more steps.

Baselines: 'black' (zeros) asks what in the clip makes the logit; 'still' (every sampled frame replaced by the
clip's mean frame) asks what in its change over time does: the expression dynamics that DFER models exist for.
`--target`: 'predicted' (default), 'label', or a class name.

Writes to `--out` (default <workdir>/explain_<split>_step<N>): `<clip id>.png` (the frames, the heat of each
pixel's attribution over them, each frame's share of the total), and `attributions.jsonl`, one line per clip:
clip id, label, prediction, probabilities, target, the clip frames the sampler took, each frame's attribution
(signed sum) and share (of the absolute attributions), and the completeness check. `--wrong N` and
`--per_class N` read the per-clip file that `python -m dferjax.evaluate` wrote for the same split and step; the
latter explains each class's logit on the N clips of it the model is surest of, and averages each frame's share
per class (`class_profiles.json` and `.png`): where in time the evidence for each class lies.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import sys

import numpy as np

from dferjax import cli

BASELINES = ('black', 'still')
FRAMES_PER_ROW = 12


class ExplainError(ValueError):
  """A problem with the command's input, told in one line."""


def integrated_gradients(gradient, video, baseline, *, steps: int, chunk: int = 8):
  """Attributions [frames, height, width, 3] at `video` against `baseline` by the midpoint rule on `steps`
  intervals. `gradient(video, baseline, alphas [k], weights [k])` sums weights_j * d logit / d x at the path points
  baseline + alphas_j (video - baseline) (`path_gradient`); it is called with `chunk` points at a time, the last
  call padded with zero-weight points, so that one shape compiles once."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  if steps < 1:
    raise ExplainError(f'--steps {steps}: give at least 1')
  if chunk < 1:
    raise ExplainError(f'--chunk {chunk}: give at least 1')
  video, baseline = jnp.asarray(video, jnp.float32), jnp.asarray(baseline, jnp.float32)
  alphas = (np.arange(steps) + 0.5) / steps
  chunk = min(chunk, steps)
  total = jnp.zeros_like(video)
  for start in range(0, steps, chunk):
    points = alphas[start:start + chunk]
    weights = np.zeros(chunk, np.float32)
    weights[:len(points)] = 1
    points = np.pad(points, (0, chunk - len(points)), constant_values=1.0).astype(np.float32)
    total = total + gradient(video, baseline, jnp.asarray(points), jnp.asarray(weights))
  return (video - baseline) * total / steps


def path_points(video, baseline, alphas):
  """[k, frames, height, width, 3]: baseline + alphas_j (video - baseline) for each of the k alphas."""
  return baseline[None] + alphas[:, None, None, None, None] * (video - baseline)[None]


def path_gradient(logit_fn):
  """The `gradient` of integrated_gradients for `logit_fn` (float [n, frames, height, width, 3] -> [n]), jitted."""
  import jax  # pylint: disable=import-outside-toplevel

  @jax.jit
  def gradient(video, baseline, alphas, weights):
    points = path_points(video, baseline, alphas)
    return jax.grad(lambda points: (logit_fn(points) * weights).sum())(points).sum(axis=0)
  return gradient


def make_baseline(video: np.ndarray, name: str) -> np.ndarray:
  """The baseline clip for `video` [frames, height, width, 3] in [0, 1]."""
  if name == 'black':
    return np.zeros_like(video)
  if name == 'still':
    return np.broadcast_to(video.mean(axis=0, keepdims=True), video.shape).copy()
  raise ExplainError(f'--baseline {name!r}: expected one of {BASELINES}')


class ModelLogits:
  """The run's model in eval mode and float32, as (compiled once) functions of the clip's batch fields: its
  logits and the ones attributed for a batch of videos, and the path gradient of one class's attributed logit
  (integrated_gradients). The attributed logits are the logits, or the aux output a model names in its
  `attribution_output` where its logits pass through a decision rule (NR-DFERNet's snippet filter). `fields`:
  the clip's batch fields other than video, label and mask (EST's permutation), [1, ...], repeated per video."""

  def __init__(self, run):
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from dferjax import train  # pylint: disable=import-outside-toplevel
    model = run.steps.model
    if 'dtype' in getattr(model, '__dataclass_fields__', {}):
      model = model.clone(dtype=jnp.float32)
    self._variables = {'params': run.state.params, 'batch_stats': run.state.batch_stats}
    self.attributed = getattr(type(model), 'attribution_output', None) or 'logits'

    def outputs(variables, fields, videos):
      count = videos.shape[0]
      inputs = train.model_inputs(model, {name: jnp.broadcast_to(value, (count, *value.shape[1:]))
                                          for name, value in fields.items()})
      logits, aux = model.apply(variables, videos, **inputs, train=False)
      return logits, logits if self.attributed == 'logits' else aux[self.attributed]

    def gradient(variables, fields, target, video, baseline, alphas, weights):
      weighted = lambda points: (outputs(variables, fields, points)[1][:, target] * weights).sum()
      return jax.grad(weighted)(path_points(video, baseline, alphas)).sum(axis=0)

    self._outputs, self._gradient = jax.jit(outputs), jax.jit(gradient)

  def logits(self, fields: dict, videos) -> tuple[np.ndarray, np.ndarray]:
    """(logits, attributed logits), each [n, num_classes]."""
    logits, attributed = self._outputs(self._variables, fields, videos)
    return np.asarray(logits), np.asarray(attributed)

  def gradient(self, fields: dict, target: int):
    return functools.partial(self._gradient, self._variables, fields, np.int32(target))


def clips_file(workdir: str, split: str, step: int) -> str:
  """The per-clip file `python -m dferjax.evaluate` writes for the run's own split at a step."""
  from dferjax import evaluate  # pylint: disable=import-outside-toplevel
  return evaluate.clips_stem(workdir, evaluate.evaluation_name(split), step) + '.jsonl'


def choose_clips(source, workdir: str, split: str, step: int, *, clip_ids: list[str], wrong: int = 0,
                 per_class: int = 0) -> list[tuple[int, str]]:
  """(position in the split, clip id) of the clips to explain: those named (found through the per-clip file of
  this split and step when there is one, else by reading the split's clip ids), the `wrong` most confident
  mistakes of that file, or for each class the `per_class` clips of it to which the model gives that class the
  highest probability (class by class)."""
  from dferjax.data import pipeline  # pylint: disable=import-outside-toplevel
  path = clips_file(workdir, split, step)
  rows = None
  if os.path.isfile(path):
    with open(path) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    if len(rows) != len(source):
      rows = None  # another evaluation's file (the split changed): read the ids from the split itself
  if (wrong or per_class) and rows is None:
    raise ExplainError(f'--{"wrong" if wrong else "per_class"} needs {path}, the per-clip file of step {step} on '
                       f'{split}: run python -m dferjax.evaluate --workdir {workdir} --step {step}'
                       + (f' --split {split}' if split != 'test' else '') + ' first')
  if per_class:
    chosen = []
    for label in sorted({row['label'] for row in rows}):
      of_class = [i for i, row in enumerate(rows) if row['label'] == label]
      of_class.sort(key=lambda i: -rows[i]['probabilities'][label])
      chosen += [(i, rows[i]['clip_id']) for i in of_class[:per_class]]
    return chosen
  if wrong:
    mistakes = [i for i, row in enumerate(rows) if row['prediction'] != row['label']]
    mistakes.sort(key=lambda i: -max(rows[i]['probabilities']))
    if not mistakes:
      raise ExplainError(f'{path}: every clip is predicted right; name clips with --clips')
    return [(i, rows[i]['clip_id']) for i in mistakes[:wrong]]
  if rows is not None:
    ids = [row['clip_id'] for row in rows]
  else:
    ids = [pipeline.clip_name(source[i]) for i in range(len(source))]
  positions = {clip_id: i for i, clip_id in enumerate(ids)}
  if missing := [clip_id for clip_id in clip_ids if clip_id not in positions]:
    raise ExplainError(f'{len(missing)} of the clips are not in the {split} split (first: {missing[0]!r}; its '
                       f'clips are named like {ids[0]!r})')
  return [(positions[clip_id], clip_id) for clip_id in clip_ids]


def explain(workdir: str, *, clips: str = '', wrong: int = 0, per_class: int = 0, video: str | None = None,
            frames: str | None = None, split: str | None = None, step: str = 'best', target: str = 'predicted',
            baseline: str = 'black', steps: int = 32, chunk: int = 8, data_dir: str | None = None,
            out: str | None = None, detect: bool = True, window_seconds: float = 2.0, stride_seconds: float = 1.0,
            fps: float = 25.0, detector=None) -> list[dict]:
  """The command: one record per clip (also written to `out`/attributions.jsonl) and its PNG; with `per_class`,
  also each class's mean frame shares (`class_profiles`). `video` or `frames`: a user's video, cut into the
  windows of `dferjax.predict` (its face crops; `detector` replaces the Haar cascade, for tests), each a clip."""
  from dferjax import evaluate, predict  # pylint: disable=import-outside-toplevel
  from dferjax.data import inputs, pipeline  # pylint: disable=import-outside-toplevel
  if sum(map(bool, (clips, wrong, per_class, video or frames))) != 1:
    raise ExplainError('give one of --clips ID[,ID...], --wrong N, --per_class N and --video/--frames')
  for name, count in (('wrong', wrong), ('per_class', per_class)):
    if count < 0:
      raise ExplainError(f'--{name} {count}: give a number of clips >= 1')
  if per_class and target != 'predicted':
    raise ExplainError(f'--target {target}: --per_class explains each clip\'s own class (its label); leave --target '
                       'out')
  if (video or frames) and target == 'label':
    raise ExplainError('--target label: a video of your own has no label; give predicted or a class name')
  if baseline not in BASELINES:
    raise ExplainError(f'--baseline {baseline!r}: expected one of {BASELINES}')
  run = predict.load_run(workdir, step)
  config = run.config
  if data_dir:
    config.dataset.data_dir = data_dir
  class_names = list(config.class_names)
  if target not in ('predicted', 'label', *class_names):
    raise ExplainError(f"--target {target!r}: expected 'predicted', 'label' or a class name of {class_names}")
  if video or frames:  # predict's windows of the video's face crops, each a clip
    if video and frames:
      raise ExplainError('give --video or --frames, not both')
    frame_source = predict.open_video(video, fps) if video else predict.open_frame_folder(frames, fps)
    if detect and detector is None:
      detector = predict.haar_face_detector()
    crops, _ = predict.face_crops(frame_source, config.input.image_size, detector=detector if detect else None)
    bounds = predict.window_bounds(len(crops), max(1, round(window_seconds * frame_source.fps)),
                                   max(1, round(stride_seconds * frame_source.fps)))
    source = predict.window_records(crops, bounds)
    chosen = [(i, record['clip_id']) for i, record in enumerate(source)]
    offsets = [start for start, _ in bounds]
    default_out = os.path.join(workdir, 'explain', os.path.basename(frame_source.path.rstrip('/')))
  else:
    split = split or config.dataset.eval_split
    source = inputs.split_source(config, split)
    chosen = choose_clips(source, workdir, split, run.step, clip_ids=[c for c in clips.split(',') if c],
                          wrong=wrong, per_class=per_class)
    offsets = None
    default_out = os.path.join(workdir, f'explain_{evaluate.evaluation_name(split)}_step{run.step}')
    for position, clip_id in chosen:
      if (held := pipeline.clip_name(source[position])) != clip_id:  # a per-clip file of another split version
        raise ExplainError(f'{clips_file(workdir, split, run.step)} lists {clip_id!r} where the {split} split now '
                           f'holds {held!r}: evaluate the run again (python -m dferjax.evaluate --workdir '
                           f'{workdir} --step {run.step})')
  if per_class:
    if 'shuffle_snippets' in config.input.transforms:
      raise ExplainError('--per_class averages frames by their place in time, but config.input.transforms.'
                         'shuffle_snippets reorders them')
    target = 'label'
  out = out or default_out
  os.makedirs(out, exist_ok=True)
  records = explain_clips(run, source, chosen, target=target, baseline=baseline, steps=steps, chunk=chunk, out=out,
                          labelled=offsets is None, frame_offsets=offsets)
  with open(os.path.join(out, 'attributions.jsonl'), 'w') as f:
    f.writelines(json.dumps(record) + '\n' for record in records)
  if per_class:
    profiles = class_profiles(records, class_names)
    with open(os.path.join(out, 'class_profiles.json'), 'w') as f:
      json.dump(profiles, f, indent=2)
    plot_class_profiles(profiles, baseline, os.path.join(out, 'class_profiles.png'))
  return records


def explain_clips(run, source, chosen: list[tuple[int, str]], *, target: str, baseline: str, steps: int,
                  chunk: int, out: str, labelled: bool = True, frame_offsets: list[int] | None = None) -> list[dict]:
  """One record and PNG per chosen (position, clip id) of `source`, through the evaluation path. `labelled`:
  the records' labels are real (not a video's placeholder); `frame_offsets`: where each record's frames start in
  the video they were cut from (the frame numbers then count from the video's start)."""
  from dferjax.data import pipeline, sampling  # pylint: disable=import-outside-toplevel
  config = run.config
  class_names = list(config.class_names)
  sampler = sampling.make_sampler(config.input.sampler.to_dict())
  clip_of = pipeline.EvalClip(source, np.asarray([position for position, _ in chosen], np.int64), sampler,
                              config.input.image_size,
                              transforms=pipeline.make_clip_transforms(config.input.transforms.to_dict()))
  placed = 'shuffle_snippets' not in config.input.transforms  # else the model's slots are not in time order
  model = ModelLogits(run)
  records = []
  for k, (position, clip_id) in enumerate(chosen):
    record = source[position]
    fields = clip_of.map(k)
    video = np.asarray(fields['video'], np.float32) / 255
    extra = {name: np.asarray(value)[None] for name, value in fields.items()
             if name not in ('video', 'label', 'mask')}
    start = make_baseline(video, baseline)
    both, attributed = model.logits(extra, np.stack([video, start]))
    logits = both[0]
    probabilities = np.exp(logits - logits.max())  # a class a decision rule suppressed (-inf) gets 0
    probabilities /= probabilities.sum()
    prediction, label = int(logits.argmax()), int(fields['label'])
    target_class = {'predicted': prediction, 'label': label}.get(target)
    if target_class is None:
      target_class = class_names.index(target)
    attributions = np.asarray(integrated_gradients(model.gradient(extra, target_class), video, start, steps=steps,
                                                   chunk=chunk))
    difference = float(attributed[0, target_class] - attributed[1, target_class])
    per_frame = attributions.reshape(len(video), -1)
    magnitude = np.abs(per_frame).sum(axis=1)
    frames = None
    if placed:
      frames = np.asarray(sampler(int(record['num_frames']), None)).reshape(-1)
      frames = (frames + (frame_offsets[k] if frame_offsets else 0)).tolist()
    result = {
        'clip_id': clip_id, 'label': class_names[label] if labelled else None,
        'prediction': class_names[prediction],
        'probabilities': {name: float(p) for name, p in zip(class_names, probabilities)},
        'target': class_names[target_class], 'attributed': model.attributed, 'baseline': baseline, 'steps': steps,
        'frames': frames,
        'frame_attribution': per_frame.sum(axis=1).tolist(),
        'frame_share': (magnitude / max(magnitude.sum(), 1e-30)).tolist(),
        'completeness': {'attributions_sum': float(attributions.sum()), 'logit_difference': difference},
    }
    result['png'] = plot_attributions(result, video, attributions, os.path.join(out, f'{_file_name(result)}.png'))
    records.append(result)
  return records


def class_profiles(records: list[dict], class_names: list[str]) -> dict:
  """{class: {'clips', 'right', 'mean_share' per sampled frame, 'later_half'}} over the records of each class
  (their own class's logit); 'later_half' is the mean share of the later half of the frames (the middle one
  halved)."""
  profiles = {}
  for name in class_names:
    of_class = [record for record in records if record['label'] == name]
    if not of_class:
      continue
    share = np.mean([record['frame_share'] for record in of_class], axis=0)
    half = len(share) / 2
    weights = np.clip(np.arange(len(share)) + 1 - half, 0, 1)  # 0 before the middle, 1 after, 0.5 on it
    profiles[name] = {'clips': [record['clip_id'] for record in of_class],
                      'right': sum(record['prediction'] == name for record in of_class),
                      'mean_share': share.tolist(), 'later_half': float(share @ weights)}
  return profiles


def plot_class_profiles(profiles: dict, baseline: str, path: str) -> str:
  """Each class's mean share per sampled frame (in time order), against the even share."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  from dferjax import plots  # pylint: disable=import-outside-toplevel
  figure = Figure(figsize=(7, 4), dpi=plots.DPI)
  FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  num_frames = len(next(iter(profiles.values()))['mean_share'])
  slots = np.arange(1, num_frames + 1)
  for name, profile in profiles.items():
    axes.plot(slots, 100 * np.asarray(profile['mean_share']), marker='o', markersize=3,
              label=f'{name} ({len(profile["clips"])} clips, {profile["right"]} right)')
  axes.axhline(100 / num_frames, color='gray', linestyle='--', linewidth=1, label='even')
  axes.set_xlabel('sampled frame, in time order')
  axes.set_ylabel('share of the attributions, %')
  axes.set_title(f"each class's logit on its own clips, from a {baseline} clip", fontsize=9)
  axes.legend(fontsize=7)
  figure.tight_layout()
  return str(plots._save(figure, path))  # pylint: disable=protected-access


def frame_names(result: dict) -> list[str]:
  """'frame 12' (1-based, as DFEW numbers its files) for each sampled frame, or 'slot k' where the clip transforms
  reorder the frames."""
  if result['frames']:
    return [f'frame {index + 1}' for index in result['frames']]
  return [f'slot {t + 1}' for t in range(len(result['frame_share']))]


def _file_name(result: dict) -> str:
  return re.sub(r'[^\w.-]', '_', result['clip_id'])


def plot_attributions(result: dict, video: np.ndarray, attributions: np.ndarray, path: str) -> str:
  """The PNG of one clip: each frame, under it the frame in grey with the heat of |attribution| summed over the
  colour channels (one scale for the whole clip: its 99.5th percentile), and a bar per frame of its share."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  from dferjax import plots  # pylint: disable=import-outside-toplevel
  num_frames = len(video)
  columns = min(num_frames, FRAMES_PER_ROW)
  rows = math.ceil(num_frames / columns)
  heat = np.abs(attributions.sum(axis=-1))
  scale = max(float(np.percentile(heat, 99.5)), 1e-30)
  figure = Figure(figsize=(1.3 * columns + 0.6, 2.7 * rows + 1.8), dpi=plots.DPI)
  FigureCanvasAgg(figure)
  grid = figure.add_gridspec(2 * rows + 1, columns, height_ratios=[1] * (2 * rows) + [0.9])
  names = frame_names(result)
  for t in range(num_frames):
    row, column = divmod(t, columns)
    top = figure.add_subplot(grid[2 * row, column])
    top.imshow(video[t])
    top.set_title(names[t], fontsize=7)
    bottom = figure.add_subplot(grid[2 * row + 1, column])
    bottom.imshow(video[t].mean(axis=-1), cmap='gray', vmin=0, vmax=1)
    bottom.imshow(np.clip(heat[t] / scale, 0, 1), cmap='inferno', alpha=0.6, vmin=0, vmax=1)
    for axes in (top, bottom):
      axes.set_xticks([])
      axes.set_yticks([])
  bars = figure.add_subplot(grid[2 * rows, :])
  bars.bar(np.arange(1, num_frames + 1), 100 * np.asarray(result['frame_share']), color='tab:orange')
  bars.set_xlim(0.5, num_frames + 0.5)
  bars.set_xticks(np.arange(1, num_frames + 1), [name.split()[-1] for name in names], fontsize=7)
  bars.set_xlabel('frame of the clip' if result['frames'] else "slot of the model's input")
  bars.set_ylabel('share, %')
  check = result['completeness']
  labelled = f'label {result["label"]}, ' if result['label'] else ''
  figure.suptitle(f'{result["clip_id"]}: {labelled}predicted {result["prediction"]} '
                  f'({100 * result["probabilities"][result["prediction"]]:.1f} %); attributions to the '
                  f'{result["target"]} logit from a {result["baseline"]} clip (sum {check["attributions_sum"]:.3g}, '
                  f'logit difference {check["logit_difference"]:.3g})', fontsize=8)
  figure.tight_layout()
  return str(plots._save(figure, path))  # pylint: disable=protected-access


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(prog='python -m dferjax.explain', description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True, help='a dferjax run directory')
  parser.add_argument('--clips', default='', help='clip ids of the split, joined by commas')
  parser.add_argument('--wrong', type=int, default=0, help='explain the N most confident mistakes of the per-clip '
                      'file of `python -m dferjax.evaluate` (same split and step)')
  parser.add_argument('--per_class', type=int, default=0, help='for each class, its N clips with the highest '
                      'probability of it, their own class\'s logit, and the mean share per frame '
                      '(class_profiles.json and .png)')
  parser.add_argument('--video', help='a video of your own (any OpenCV reads), cut into windows as '
                      '`dferjax.predict` does; each window is explained')
  parser.add_argument('--frames', help='a folder of frame images instead of --video, read in natural order')
  parser.add_argument('--no_detect', action='store_true', help='--video/--frames are face crops already')
  parser.add_argument('--window', type=float, default=2.0, help='--video/--frames: window length, seconds')
  parser.add_argument('--stride', type=float, default=1.0, help='--video/--frames: between window starts, seconds')
  parser.add_argument('--fps', type=float, default=25.0, help='frame rate of --frames (and of a video without one)')
  parser.add_argument('--split', help="the run's split (default: its evaluation split)")
  parser.add_argument('--step', default='best', help="'best', 'selected', 'latest' or a step number")
  parser.add_argument('--target', default='predicted', help="'predicted', 'label' or a class name")
  parser.add_argument('--baseline', default='black', help=f'one of {BASELINES}')
  parser.add_argument('--steps', type=int, default=32, help='intervals of the path integral')
  parser.add_argument('--chunk', type=int, default=8, help='path points per model call (memory)')
  parser.add_argument('--data_dir', help='where the dataset is built, if not where the run read it')
  parser.add_argument('--out', help='output directory (default: WORKDIR/explain_<split>_step<N>)')
  parser.add_argument('--verbose', action='store_true', help='the traceback of an expected error (else one line)')
  args = parser.parse_args(argv)
  records = cli.run(lambda: explain(
      args.workdir, clips=args.clips, wrong=args.wrong, per_class=args.per_class, video=args.video,
      frames=args.frames, split=args.split, step=args.step, target=args.target, baseline=args.baseline,
      steps=args.steps, chunk=args.chunk, data_dir=args.data_dir, out=args.out, detect=not args.no_detect,
      window_seconds=args.window, stride_seconds=args.stride, fps=args.fps), verbose=args.verbose)
  if args.per_class:  # the profiles explain() wrote
    out = os.path.dirname(records[0]['png'])
    with open(os.path.join(out, 'class_profiles.json')) as f:
      profiles = json.load(f)
    for name, profile in profiles.items():
      print(f'{name}: {len(profile["clips"])} clips ({profile["right"]} predicted right); the later half of the '
            f'frames carries {100 * profile["later_half"]:.0f} % of the {name} logit')
    print(f'-> {os.path.join(out, "class_profiles.png")}')
    return records
  for record in records:
    share = np.asarray(record['frame_share'])
    top = np.argsort(-share)[:3]
    names = [frame_names(record)[t] for t in top]
    labelled = f'label {record["label"]}, ' if record['label'] else ''
    print(f'{record["clip_id"]}: {labelled}predicted {record["prediction"]}; '
          f'most of the {record["target"]} logit from ' + ', '.join(
              f'{name} ({100 * share[t]:.0f} %)' for name, t in zip(names, top)) + f' -> {record["png"]}')
  return records


if __name__ == '__main__':
  main(sys.argv[1:])
