"""dferjax.predict on a video file written through OpenCV from synthetic faces: the JSON's structure, windows and
times, probabilities that sum to 1 with the video's the mean of the windows', each window's probabilities equal to
the model applied to the same frames as evaluation samples them (every model), a folder of frames in natural
order, face boxes held and smoothed across frames, the Haar cascade on a drawn face (where this OpenCV ships
it), and one-line errors."""
from functools import partial
import json
import re
import shutil

import cv2
import jax
import numpy as np
import pytest

from dferjax import models, predict
from dferjax.data import pipeline, sampling, synthetic
import workdir_helpers
from workdir_helpers import fails_in_one_line, tiny_workdir  # noqa: F401  (a fixture)

FPS = 10.0
NUM_FRAMES = 30  # 3 s: windows of 2 s every 1 s are frames [0, 20) and [10, 30)


def _has_cascade() -> bool:
  try:
    predict.haar_face_detector()
  except ValueError:
    return False
  return True


def _face_frames(num_frames=NUM_FRAMES, size=96, seed=0):
  frames, _, style = synthetic.render_clip('happy', num_frames, np.random.default_rng(seed), size=size)
  return frames, style


def _write_video(path, frames, fps=FPS):
  """An MJPG .avi (this OpenCV writes and reads back MJPG, mp4v, XVID and FFV1; MJPG is in every build)."""
  height, width = frames.shape[1:3]
  writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*'MJPG'), fps, (width, height))
  assert writer.isOpened(), f'OpenCV {cv2.__version__} cannot write MJPG'
  for frame in frames:
    writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
  writer.release()
  return str(path)


def _decode(path):
  """The video's frames as OpenCV decodes them (RGB): the lossy codec's output, what predict reads too."""
  capture, frames = cv2.VideoCapture(str(path)), []
  while (read := capture.read())[0]:
    frames.append(cv2.cvtColor(read[1], cv2.COLOR_BGR2RGB))
  return np.stack(frames)


@pytest.fixture(scope='module')
def video(tmp_path_factory):
  frames, _ = _face_frames()
  return _write_video(tmp_path_factory.mktemp('video') / 'happy.avi', frames)


def _resized(frames, size):
  """Face-crop frames resized as the dataset builders do (square already, INTER_AREA)."""
  return np.stack([cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA) for frame in frames])


def _expected_probabilities(run, frames, bounds):
  """Each window through the evaluation rules by hand: the test sampler's frames, the clip transforms drawing from
  a generator seeded by the record index (here: the window's), the model in eval mode, softmax."""
  sampler = sampling.make_sampler(run.config.input.sampler.to_dict())
  transforms = pipeline.make_clip_transforms(run.config.input.transforms.to_dict())
  apply = jax.jit(partial(run.steps.model.apply, train=False))
  variables = {'params': run.state.params, 'batch_stats': run.state.batch_stats}
  rows = []
  for index, (start, end) in enumerate(bounds):
    clip = frames[start:end][sampler(end - start)]
    fields = {'video': clip, 'label': np.int32(0), 'mask': np.bool_(True)}
    for transform in transforms:
      fields = transform.random_map(fields, np.random.default_rng([index + 1]))
    inputs = {name: np.asarray(fields[name])[None] for name in run.steps.model.model_inputs}
    logits, _ = apply(variables, clip[None].astype(np.float32) / 255, **inputs)
    rows.append(np.asarray(jax.nn.softmax(logits[0])))
  return np.stack(rows)


def _check_record(record, run, bounds, fps):
  class_names = list(run.config.class_names)
  assert record['class_names'] == class_names and record['model_name'] == run.config.model_name
  assert record['step'] == 3 and record['fps'] == fps
  assert [(w['start_frame'], w['end_frame']) for w in record['windows']] == bounds
  for window in record['windows']:
    assert window['start_time'] == pytest.approx(window['start_frame'] / fps)
    assert window['end_time'] == pytest.approx(window['end_frame'] / fps)
    assert list(window['probabilities']) == class_names
    assert sum(window['probabilities'].values()) == pytest.approx(1, abs=1e-5)
    assert window['prediction'] == max(window['probabilities'], key=window['probabilities'].get)
  windows = np.array([list(w['probabilities'].values()) for w in record['windows']])
  np.testing.assert_allclose(list(record['video']['probabilities'].values()), windows.mean(axis=0), rtol=1e-6)
  assert sum(record['video']['probabilities'].values()) == pytest.approx(1, abs=1e-5)
  return windows


@pytest.mark.parametrize('model_name', sorted(workdir_helpers.TINY_RUNS))
def test_video_windows_equal_the_model_on_the_same_frames(tmp_path, tiny_workdir, video, model_name):
  workdir = tiny_workdir(model_name)
  record = predict.main(['--workdir', workdir, '--video', video, '--no_detect', '--out', str(tmp_path)])
  assert json.loads((tmp_path / 'predictions.json').read_text()) == record
  assert (tmp_path / 'timeline.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert record['num_frames'] == NUM_FRAMES and record['frames_with_face'] is None
  run = predict.load_run(workdir)
  bounds = [(0, 20), (10, 30)]
  windows = _check_record(record, run, bounds, FPS)
  want = _expected_probabilities(run, _resized(_decode(video), run.config.input.image_size), bounds)
  np.testing.assert_allclose(windows, want, atol=1e-5)
  assert np.abs(np.diff(want, axis=0)).max() > 1e-4  # the two windows differ: the check can tell them apart


def test_frame_folder_in_natural_order(tmp_path, tiny_workdir):
  """'2.png' before '10.png'; lossless frames, so the check is exact to float error; a short input is one window."""
  frames, _ = _face_frames(num_frames=12, size=32)
  for number, frame in enumerate(frames, start=1):
    cv2.imwrite(str(tmp_path / f'{number}.png'), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
  workdir = tiny_workdir('stt')
  record = predict.main(['--workdir', workdir, '--frames', str(tmp_path), '--no_detect', '--fps', '5',
                         '--window', '4', '--out', str(tmp_path / 'out')])
  run = predict.load_run(workdir)
  windows = _check_record(record, run, [(0, 12)], 5.0)
  np.testing.assert_allclose(windows, _expected_probabilities(run, frames, [(0, 12)]), atol=1e-5)
  assert not np.allclose(windows, _expected_probabilities(run, frames[::-1], [(0, 12)]), atol=1e-4)


def test_window_bounds_cover_the_video():
  assert predict.window_bounds(5, 20, 10) == [(0, 5)]  # shorter than a window: one window
  assert predict.window_bounds(20, 20, 10) == [(0, 20)]
  assert predict.window_bounds(30, 20, 10) == [(0, 20), (10, 30)]
  assert predict.window_bounds(35, 20, 10) == [(0, 20), (10, 30), (15, 35)]  # a last window ends at the end
  with pytest.raises(ValueError, match='at least one frame'):
    predict.window_bounds(30, 0, 10)


def test_boxes_are_held_smoothed_and_back_filled():
  detections = [None, (10, 10, 20, 20), None, (20, 10, 20, 20), None]
  boxes = predict.smooth_boxes(detections, smoothing=0.5)
  assert boxes[0] == boxes[1] == (10, 10, 20, 20)  # before the first detection: the first detection
  assert boxes[2] == boxes[1]  # a miss holds the last box
  assert boxes[3] == boxes[4] == (15, 10, 20, 20)  # half way to the new detection
  with pytest.raises(ValueError, match='no face found'):
    predict.smooth_boxes([None, None], smoothing=0.5)


def test_square_crop_is_centred_and_padded_black():
  frame = np.zeros((60, 80, 3), np.uint8)
  frame[20:40, 50:60] = 255  # a 10 x 20 "face"
  crop = predict.crop_square(frame, (50, 20, 10, 20), margin=0.0, size=20)
  np.testing.assert_array_equal(crop[:, 5:15], 255)  # the box in the middle of a 20 x 20 square
  np.testing.assert_array_equal(crop[:, :5], 0)
  corner = predict.crop_square(frame, (-10, -10, 20, 20), margin=0.0, size=20)  # half outside the frame
  np.testing.assert_array_equal(corner[:10], 0)
  assert corner.shape == (20, 20, 3)


def test_injected_detector_crops_the_found_face(tmp_path, tiny_workdir):
  """The detection path end to end with a stand-in detector that finds the face on every third frame only."""
  frames, style = _face_frames(num_frames=NUM_FRAMES, size=96)
  canvas = np.full((NUM_FRAMES, 120, 200, 3), 90, np.uint8)
  canvas[:, 10:106, 90:186] = frames  # the face off-centre in a wider frame
  path = _write_video(tmp_path / 'wide.avi', canvas)
  face = (90 + style.center[0] - style.radius, 10 + style.center[1] - 1.28 * style.radius, 2 * style.radius,
          2.56 * style.radius)
  calls = []

  def every_third(frame):
    calls.append(frame.shape)
    return [face] if len(calls) % 3 == 1 else []

  record = predict.predict(tiny_workdir('stt'), video=path, out=str(tmp_path / 'out'), detector=every_third,
                           margin=0.0)
  assert record['frames_with_face'] == NUM_FRAMES // 3 and record['face_detection'] == predict.CASCADE
  assert calls[0] == (120, 200, 3)
  crops, found = predict.face_crops(predict.open_video(path, FPS), 32, detector=every_third, margin=0.0)
  assert found == NUM_FRAMES // 3 and crops.shape == (NUM_FRAMES, 32, 32, 3)
  grey = np.abs(crops.astype(int) - 90).max(axis=-1) <= 12  # the canvas colour, beside the face
  assert grey[:, :, :2].mean() < 0.5 and grey[:, 14:18, 14:18].mean() == 0  # the square sits on the face


@pytest.mark.skipif(not _has_cascade(), reason=f'opencv {cv2.__version__} ships no Haar cascade (OpenCV 5 dropped them)')
def test_haar_cascade_finds_the_drawn_face():
  """OpenCV's bundled cascade on a synthetic face pasted off-centre in a wider frame."""
  detect = predict.haar_face_detector()
  hits = 0
  for seed in range(4):
    frames, style = _face_frames(num_frames=3, size=160, seed=seed)
    canvas = np.full((200, 320, 3), 120, np.uint8)
    canvas[20:180, 150:310] = frames[0]
    box = predict.largest(detect(canvas))
    if box is not None:
      hits += 1
      x, y, width, height = box
      assert abs(x + width / 2 - (150 + style.center[0])) < 0.5 * style.radius
      assert abs(y + height / 2 - (20 + style.center[1])) < 0.6 * style.radius
  assert hits >= 2, f'the cascade found {hits} of 4 drawn faces'


@pytest.mark.skipif(not _has_cascade(), reason=f'opencv {cv2.__version__} ships no Haar cascade (OpenCV 5 dropped them)')
def test_haar_cascade_end_to_end(tmp_path, capsys, tiny_workdir):
  """The command with OpenCV's cascade: a drawn face off-centre in a wider video is found; a faceless video fails."""
  frames, _ = _face_frames(num_frames=12, size=160)
  canvas = np.full((12, 200, 320, 3), 120, np.uint8)
  canvas[:, 20:180, 150:310] = frames
  record = predict.main(['--workdir', tiny_workdir('stt'), '--video', _write_video(tmp_path / 'wide.avi', canvas),
                         '--out', str(tmp_path / 'out')])
  assert record['frames_with_face'] >= 3 and record['face_detection'] == predict.CASCADE
  assert sum(record['video']['probabilities'].values()) == pytest.approx(1, abs=1e-5)
  blank = _write_video(tmp_path / 'blank.avi', np.full((12, 120, 160, 3), 128, np.uint8))
  error = fails_in_one_line(capsys, predict.main, ['--workdir', tiny_workdir('stt'), '--video', blank])
  assert re.match(r'error: no face found in any of the 12 frames of .*blank\.avi: .*--no_detect', error), error


def test_without_a_cascade_detection_fails_naming_the_fix(tmp_path, capsys, monkeypatch, video, tiny_workdir):
  monkeypatch.delattr(cv2, 'CascadeClassifier', raising=False)
  error = fails_in_one_line(capsys, predict.main, ['--workdir', tiny_workdir('stt'), '--video', video])
  assert re.match(r'error: face detection needs OpenCV.*opencv-python-headless<5.*--no_detect', error), error


def test_errors_are_one_line(tmp_path, capsys, video, tiny_workdir):
  workdir = tiny_workdir('stt')
  bad = tmp_path / 'bad.avi'
  bad.write_bytes(b'not a video at all' * 100)
  cases = [
      (['--video', str(bad), '--no_detect'], r'^error: --video .*bad\.avi: OpenCV decodes no frame from it'),
      (['--video', str(tmp_path / 'missing.mp4'), '--no_detect'], r'^error: --video .*missing\.mp4: no such file'),
      (['--frames', str(tmp_path / 'empty'), '--no_detect'], r'^error: --frames .*empty: no such directory'),
      (['--video', video, '--frames', str(tmp_path), '--no_detect'], r'^error: give exactly one of --video and'),
      (['--video', video, '--no_detect', '--step', '7'], r'^error: --step 7: .* holds steps \[3\]'),
      # evaluate's choice of a checkpoint: 'selected' reads the run's records, which this one has not
      (['--video', video, '--no_detect', '--step', 'selected'], r'^error: .*metrics\.jsonl: no such metrics file'),
      (['--video', video, '--no_detect', '--step', 'first'], r"^error: --step 'first': expected 'best', 'selected'"),
  ]
  no_checkpoint = tmp_path / 'run'
  shutil.copytree(workdir, no_checkpoint, ignore=shutil.ignore_patterns('checkpoints'))
  cases += [
      (['--workdir', str(no_checkpoint), '--video', video, '--no_detect'], r'^error: .*run holds no checkpoint'),
      (['--workdir', str(tmp_path / 'nothing'), '--video', video, '--no_detect'],
       r'^error: .*config\.json does not exist'),
  ]
  for arguments, message in cases:
    error = fails_in_one_line(capsys, predict.main, ['--workdir', workdir, '--out', str(tmp_path / 'out'), *arguments])
    assert re.match(message, error), error
  with pytest.raises(ValueError, match=r'^no face found in any of the 30 frames of .*happy\.avi: .*--no_detect'):
    predict.predict(workdir, video=video, detector=lambda frame: [])


def test_every_registered_model_has_a_tiny_run():
  """predict is generic over the registry: a model added to it needs only its entry in TINY_RUNS to be tested."""
  assert set(workdir_helpers.TINY_RUNS) == set(models.MODELS), \
      'add the new model to tests/workdir_helpers.TINY_RUNS (its smallest fields, sampler, frame size, transforms)'

