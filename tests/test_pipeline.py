"""Augmentations and grain pipelines on in-memory sources (JPEG-bytes and raw frames), tiny sizes."""
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import cv2
import grain
import numpy as np
import pytest
from etils import epath

from dferjax import cli
from dferjax.data import augment, pipeline, sampling

SIZE = 24  # stored frame size of the test sources


def smooth_frame(rng, size=SIZE, low=20, high=200):
  """A smooth random RGB image (JPEG-friendly), values in [low, high]."""
  coarse = rng.uniform(low, high, (4, 4, 3)).astype(np.float32)
  return np.clip(cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC), low, high).astype(np.uint8)


def jpeg(frame):
  return cv2.imencode('.jpg', cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def make_sources(num_clips=12, seed=0, lengths=None, labels=None):
  """(jpeg_source, raw_source): the same clips, raw frames = the decoded JPEGs."""
  rng = np.random.default_rng(seed)
  jpeg_source, raw_source = [], []
  for i in range(num_clips):
    num_frames = lengths[i] if lengths is not None else int(rng.integers(3, 40))
    base = smooth_frame(rng)
    frames = [jpeg(np.roll(base, k, axis=1)) for k in range(num_frames)]
    decoded = np.stack([cv2.imdecode(np.frombuffer(f, np.uint8), cv2.IMREAD_COLOR_RGB) for f in frames])
    label = int(labels[i]) if labels is not None else i % 7
    record = {'label': label, 'clip_id': f'{i:05d}'.encode(), 'num_frames': num_frames}
    jpeg_source.append({**record, 'frames': frames})
    raw_source.append({**record, 'frames': decoded})
  return jpeg_source, raw_source


def id_source(num_clips, num_frames=4, size=8):
  """Raw clips whose every pixel holds the record index + 1: a batch row says which record it is."""
  return [{'frames': np.full((num_frames, size, size, 3), i + 1, np.uint8), 'label': i % 7,
           'clip_id': str(i), 'num_frames': num_frames} for i in range(num_clips)]


def take(dataset, num_batches):
  it = iter(dataset)
  return [next(it) for _ in range(num_batches)]


def assert_batches_equal(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ---------------------------------------------------------------------------------------------------------
# Augmentations.


def test_stt_crop_and_flip_are_the_same_for_every_frame():
  rng = np.random.default_rng(0)
  base = smooth_frame(rng, size=40, low=20, high=150)
  clip = np.stack([base + np.uint8(10 * k) for k in range(6)])  # intensity-shifted copies, no clipping
  for seed in range(20):
    out = augment.augment_clip(clip, 'stt', 16, np.random.default_rng(seed), interpolation='linear')
    assert out.shape == (6, 16, 16, 3) and out.dtype == np.uint8
    replay = np.random.default_rng(seed)
    top, left, height, width = augment.random_sized_crop_box(40, 40, replay)  # 40x40 never falls back here
    flip = replay.random() < 0.5
    for k, frame in enumerate(clip):
      want = cv2.resize(frame[top:top + height, left:left + width], (16, 16), interpolation=cv2.INTER_LINEAR)
      np.testing.assert_array_equal(out[k], want[:, ::-1] if flip else want)
      # Frame k is frame 0 + 10k, so its output is too (up to the resize's rounding).
      assert np.abs(out[k].astype(int) - out[0] - 10 * k).max() <= 1


def test_random_sized_crop_box_distribution():
  rng = np.random.default_rng(0)
  boxes = np.array([augment.random_sized_crop_box(112, 112, rng) for _ in range(2000)])
  top, left, height, width = boxes.T
  assert (top >= 0).all() and (left >= 0).all() and (top + height <= 112).all() and (left + width <= 112).all()
  area = height * width / 112 ** 2
  assert 0.075 < area.min() and area.max() <= 1.0
  aspect = width / height
  assert (aspect > 0.7).all() and (aspect < 1.4).all()
  assert 0.45 < (aspect > 1).mean() < 0.55  # w/h swapped with p = 0.5


def test_random_sized_crop_fallback_scales_then_crops():
  # A 2-pixel-high frame never fits a crop (its shorter side is >= 3): GroupScale(size) + GroupRandomCrop(size).
  frames = np.tile(np.arange(64, dtype=np.uint8)[None, None, :, None], (2, 2, 1, 3))  # [2, 2, 64, 3]
  assert all(augment.random_sized_crop_box(2, 64, np.random.default_rng(s)) is None for s in range(20))
  out = augment.random_sized_crop(frames, 8, np.random.default_rng(0))
  scaled = cv2.resize(frames[0], (256, 8), interpolation=cv2.INTER_LINEAR)  # shorter side 2 -> 8
  replay = np.random.default_rng(0)
  augment.random_sized_crop_box(2, 64, replay)
  left = int(replay.integers(0, 256 - 8 + 1))
  assert out.shape == (2, 8, 8, 3)
  np.testing.assert_array_equal(out[0], scaled[:, left:left + 8])


def test_flip_probability():
  clip = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
  flips = [augment.random_horizontal_flip(clip, np.random.default_rng(s))[0, 0, 0, 0] != clip[0, 0, 0, 0]
           for s in range(2000)]
  assert 0.46 < np.mean(flips) < 0.54  # 2000 draws: sd 0.011


def reference_rotate(frame, angle_counterclockwise):
  """float64 nearest-neighbour rotation about the frame centre, zero fill (torchvision rotate semantics)."""
  height, width = frame.shape[:2]
  cy, cx = (height - 1) / 2, (width - 1) / 2
  theta = np.deg2rad(angle_counterclockwise)
  y, x = np.mgrid[0:height, 0:width].astype(np.float64)
  dx, dy = x - cx, y - cy  # output pixel -> source pixel: the inverse (clockwise on screen) rotation
  source_x = cx + dx * np.cos(theta) - dy * np.sin(theta)
  source_y = cy + dx * np.sin(theta) + dy * np.cos(theta)
  sx, sy = np.rint(source_x).astype(int), np.rint(source_y).astype(int)
  inside = (sx >= 0) & (sx < width) & (sy >= 0) & (sy < height)
  out = np.zeros_like(frame)
  out[inside] = frame[sy[inside], sx[inside]]
  return out


def test_nr_dfernet_brightness_and_rotation_match_reference():
  rng = np.random.default_rng(3)
  clip = np.stack([smooth_frame(rng, size=32) for _ in range(3)])
  for seed in range(4):
    out = augment.random_brightness_rotation(clip, np.random.default_rng(seed))
    replay = np.random.default_rng(seed)
    factor, angle = replay.uniform(0.4, 1.6), replay.uniform(-4, 4)  # one draw for the whole clip
    for k in range(3):
      bright = np.clip(np.rint(clip[k].astype(np.float64) * factor), 0, 255).astype(np.uint8)
      want = reference_rotate(bright, angle)
      # Nearest-neighbour ties round differently (cv2 fixed point); nearly every pixel must agree.
      assert (out[k] == want).all(axis=-1).mean() > 0.97, (seed, k)


def test_aen_affine_turns_clockwise():
  rng = np.random.default_rng(4)
  clip = np.stack([smooth_frame(rng, size=32)] * 2)
  applied = 0
  for seed in range(10):
    out = augment.random_affine_rotation(clip, np.random.default_rng(seed))
    replay = np.random.default_rng(seed)
    if replay.random() >= 0.5:
      assert out is clip
      continue
    applied += 1
    angle_clockwise = replay.choice(np.arange(-5, 6, 0.5))
    for k in range(2):
      assert (out[k] == reference_rotate(clip[k], -angle_clockwise)).all(axis=-1).mean() > 0.97
  assert 0 < applied < 10


def reference_color_jitter(frame, order, brightness, contrast, saturation, hue):
  """float64 PIL-formula ColorJitter: blend with black / grey mean / grey image, hue shift in HSV."""
  x = frame.astype(np.float64)
  for op in order:
    luma = x @ np.array([0.299, 0.587, 0.114])
    if op == 0:
      x = np.clip(x * brightness, 0, 255)
    elif op == 1:
      mean = np.floor(luma.mean() + 0.5)
      x = np.clip(mean + contrast * (x - mean), 0, 255)
    elif op == 2:
      x = np.clip(luma[..., None] + saturation * (x - luma[..., None]), 0, 255)
    else:
      maximum, minimum = x.max(-1), x.min(-1)
      chroma = maximum - minimum
      r, g, b = np.moveaxis(x, -1, 0)
      safe = np.where(chroma == 0, 1, chroma)
      h = np.select([maximum == r, maximum == g], [((g - b) / safe) % 6, (b - r) / safe + 2], (r - g) / safe + 4)
      h = np.where(chroma == 0, 0, h) / 6 + hue  # fraction of a turn
      k = lambda n: (n + h * 6) % 6  # noqa: E731
      channel = lambda n: maximum - chroma * np.clip(np.minimum(k(n), 4 - k(n)), 0, 1)  # noqa: E731
      x = np.stack([channel(5), channel(3), channel(1)], -1)
  return x


def test_aen_color_jitter_matches_reference_per_frame():
  rng = np.random.default_rng(5)
  frame = smooth_frame(rng, size=16, low=30, high=220)
  for seed in range(8):
    out = augment.color_jitter_frame(frame, np.random.default_rng(seed))
    replay = np.random.default_rng(seed)
    order = replay.permutation(4)
    factors = replay.uniform(0.9, 1.1, size=3)
    hue = replay.uniform(-0.1, 0.1)
    want = reference_color_jitter(frame, order, *factors, int(hue * 255) / 256)
    # uint8 rounding between ops and cv2's 8-bit HSV: a few levels.
    assert np.abs(out.astype(np.float64) - want).max() <= 6, seed
    assert np.abs(out.astype(np.float64) - want).mean() <= 1.5, seed
  # Identical frames: 'stt' and 'nr_dfernet' keep them identical, 'aen' jitters frames independently.
  clip = np.stack([frame] * 4)
  for recipe in ('stt', 'nr_dfernet'):
    out = augment.augment_clip(clip, recipe, 12, np.random.default_rng(0))
    assert (out == out[:1]).all()
  differs = [not (out == out[:1]).all() for out in
             (augment.augment_clip(clip, 'aen', 12, np.random.default_rng(s)) for s in range(12))]
  assert 0 < sum(differs) < 12  # p = 0.5 per clip


def test_test_time_resize_equals_cv2_resize():
  jpeg_source, _ = make_sources(num_clips=3, lengths=[20, 20, 20])
  sampler = sampling.SegmentSampler(4, 2)
  for interpolation, flag in (('linear', cv2.INTER_LINEAR), ('antialias', cv2.INTER_AREA)):  # 24 -> 16 shrinks
    batch, = list(pipeline.eval_batches(jpeg_source, sampler=sampler, image_size=16, batch_size=3,
                                        interpolation=interpolation, num_threads=0))
    for i, record in enumerate(jpeg_source):
      for j, frame_index in enumerate(sampler(20)):
        frame = cv2.imdecode(np.frombuffer(record['frames'][frame_index], np.uint8), cv2.IMREAD_COLOR_RGB)
        np.testing.assert_array_equal(batch['video'][i, j], cv2.resize(frame, (16, 16), interpolation=flag))
  with pytest.raises(ValueError, match='recipe'):
    augment.augment_clip(np.zeros((1, 4, 4, 3), np.uint8), 'mixup', 4)


# ---------------------------------------------------------------------------------------------------------
# Pipelines.


def test_train_batches_shapes_and_determinism():
  jpeg_source, _ = make_sources()
  kwargs = dict(sampler='segments', augment='stt', image_size=16, batch_size=4, num_threads=2)
  batches = take(pipeline.train_dataset(jpeg_source, seed=0, **kwargs), 4)
  for batch in batches:
    assert batch['video'].shape == (4, 16, 16, 16, 3) and batch['video'].dtype == np.uint8
    assert batch['label'].shape == (4,) and batch['label'].dtype == np.int32
    assert batch['mask'].dtype == np.bool_ and batch['mask'].all()
  assert_batches_equal(batches, take(pipeline.train_dataset(jpeg_source, seed=0, **dict(kwargs, num_threads=0)), 4))
  other = take(pipeline.train_dataset(jpeg_source, seed=1, **kwargs), 4)
  assert not all(np.array_equal(a['video'], b['video']) for a, b in zip(batches, other))
  snippets = take(pipeline.train_dataset(jpeg_source, seed=0, **dict(kwargs, sampler='snippets', augment='aen')), 1)
  assert snippets[0]['video'].shape == (4, 35, 16, 16, 3)


def test_worker_processes_make_the_same_batches():
  """num_workers > 0: whole batches made in spawned processes, read round-robin: the threads' batches, from any
  start batch; a worker's error reaches the caller as itself; close() ends the processes."""
  jpeg_source, _ = make_sources(num_clips=7, lengths=[20, 3, 30, 9, 16, 25, 12])
  kwargs = dict(sampler='segments', augment='nr_dfernet', image_size=16, batch_size=3, seed=4, num_threads=2,
                prefetch=2, transforms={'draw_permutation': {'num_permutations': 10}})
  threads = take(pipeline.train_dataset(jpeg_source, **kwargs), 5)
  workers = pipeline.train_iterator(jpeg_source, num_workers=2, start_batch=2, **kwargs)
  assert_batches_equal(threads[2:], [next(workers) for _ in range(3)])
  assert json.loads(workers.get_state()) == {'next_index': 15}
  assert multiprocessing.active_children()
  workers.close()
  assert not multiprocessing.active_children()
  with pytest.raises(ValueError, match='num_workers=-1'):
    pipeline.train_dataset(jpeg_source, num_workers=-1, **kwargs)
  corrupt = [dict(record, frames=[b'not a jpeg'] * record['num_frames']) if i == 3 else record
             for i, record in enumerate(jpeg_source)]
  failing = pipeline.train_iterator(corrupt, num_workers=2, **kwargs)
  with pytest.raises(ValueError, match="clip '00003'.*not a decodable image"):
    for _ in range(5):
      next(failing)
  failing.close()



def signal_each_worker_as_it_starts(count: int):
  """A thread that sends SIGTERM and SIGINT to each of the next `count` multiprocessing children the moment it
  appears, while its interpreter is still starting (seconds before grain runs its worker_init_fn)."""

  def watch():
    signalled, deadline = set(), time.time() + 60
    while len(signalled) < count and time.time() < deadline:
      for child in multiprocessing.active_children():
        if child.pid not in signalled:
          os.kill(child.pid, signal.SIGTERM)
          os.kill(child.pid, signal.SIGINT)
          signalled.add(child.pid)
      time.sleep(0.001)

  watcher = threading.Thread(target=watch, daemon=True)
  watcher.start()
  return watcher


def test_workers_signalled_while_starting_leave_the_signals_to_the_trainer():
  """SLURM's SIGTERM reaches every process of the job step, Ctrl-C the terminal's group: a worker reached while it
  starts must not die of it (it used to, and the run failed instead of saving), for training and evaluation."""
  jpeg_source, _ = make_sources(num_clips=7, lengths=[20, 3, 30, 9, 16, 25, 12])
  kwargs = dict(sampler='segments', image_size=16, batch_size=2, num_threads=2)
  expected_train = take(pipeline.train_dataset(jpeg_source, augment='none', seed=0, **kwargs), 2)
  expected_eval = list(pipeline.eval_batches(jpeg_source, **kwargs))
  watcher = signal_each_worker_as_it_starts(4)
  train = pipeline.train_iterator(jpeg_source, augment='none', seed=0, num_workers=2, **kwargs)
  assert_batches_equal(expected_train, [next(train) for _ in range(2)])
  evaluation = pipeline.EvalReader(jpeg_source, num_workers=2, **kwargs)
  assert_batches_equal(expected_eval, list(evaluation))
  watcher.join()
  workers = multiprocessing.active_children()
  assert len(workers) == 4 and all(worker.is_alive() for worker in workers)
  for status in (open(f'/proc/{worker.pid}/status').read() for worker in workers if os.path.exists('/proc')):
    ignored = int(re.search(r'SigIgn:\s*(\w+)', status)[1], 16)
    assert ignored & (1 << (signal.SIGTERM - 1)) and ignored & (1 << (signal.SIGINT - 1))
  # This thread has its signals back.
  assert not signal.pthread_sigmask(signal.SIG_BLOCK, []) & {signal.SIGINT, signal.SIGTERM}
  train.close()
  evaluation.close()
  assert not multiprocessing.active_children()


def test_eval_reader_keeps_its_workers_and_repeats_the_same_pass():
  """EvalReader: each `for` is one pass, the batches of eval_batches (padding rows, clip transforms); with
  workers, the same processes serve every pass, and a pass left unfinished does not shift the next."""
  jpeg_source, _ = make_sources(num_clips=7, lengths=[20, 3, 30, 9, 16, 25, 12])
  kwargs = dict(sampler='segments', image_size=16, batch_size=2, shard_index=1, shard_count=2, num_threads=2,
                transforms={'draw_permutation': {'num_permutations': 10}})
  expected = list(pipeline.eval_batches(jpeg_source, **kwargs))
  assert len(expected) == 2 and not expected[-1]['mask'][-1]  # host 1 has 3 of the 7 clips
  threads = pipeline.EvalReader(jpeg_source, **kwargs)
  assert_batches_equal(expected, list(threads))
  assert_batches_equal(expected, list(threads))
  workers = pipeline.EvalReader(jpeg_source, num_workers=2, **kwargs)
  assert not multiprocessing.active_children()  # they start with the first pass
  assert_batches_equal(expected, list(workers))
  processes = set(multiprocessing.active_children())
  assert len(processes) == 2
  for batch in workers:  # an evaluation stopped after one batch
    break
  assert_batches_equal(expected, list(workers))
  assert_batches_equal(expected, list(workers))
  assert set(multiprocessing.active_children()) == processes
  workers.close()
  assert not multiprocessing.active_children()
  empty = pipeline.EvalReader([], num_workers=2, **kwargs)
  assert list(empty) == [] and not multiprocessing.active_children()


def test_a_killed_worker_is_named_in_one_line():
  """A worker process killed (the out-of-memory killer's SIGKILL): grain's RuntimeError becomes a
  ChildProcessError (an OSError: one line from the command-line tools) saying which batch, how, and what to do."""
  jpeg_source, _ = make_sources(num_clips=7)
  workers = pipeline.train_iterator(jpeg_source, sampler='segments', augment='none', image_size=16, batch_size=2,
                                    seed=0, prefetch=2, num_workers=2)
  next(workers)
  os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)
  with pytest.raises(ChildProcessError) as raised:
    for _ in range(20):  # the batches that worker made before are read first
      next(workers)
  message = str(raised.value)
  assert message.startswith('an input worker process died making batch ') and 'killed by SIGKILL' in message
  assert 'out-of-memory killer' in message and 'config.input.num_workers' in message
  assert cli.error_message(raised.value) == message  # no "disk" wording, no exception type prefix
  workers.close()


SHARED_MEMORY_SCRIPT = """
import os, sys
import numpy as np
from dferjax import cli
from dferjax.data import pipeline


def main():
  source = [{'frames': np.full((20, 32, 32, 3), i, np.uint8), 'label': i % 7, 'clip_id': str(i), 'num_frames': 20}
            for i in range(8)]
  kwargs = dict(augment='none', batch_size=4, seed=0, num_workers=2, prefetch=2)
  try:  # 4 x 16 x 112 x 112 x 3 bytes a batch, 10 at a time: 23 MiB
    pipeline.train_dataset(source, image_size=112, **kwargs)
  except OSError as error:
    print('REFUSED', error)
  # 300 KB left: the workers start, and one dies of SIGBUS writing a 196 KB batch; none left: they cannot start.
  for leave_free in (300_000, 0):
    iterator = pipeline.train_iterator(source, image_size=32, **kwargs)  # fits
    with open('/dev/shm/filler', 'wb') as f:  # then something else fills /dev/shm before the workers start
      f.write(b'x' * (os.statvfs('/dev/shm').f_bavail * os.statvfs('/dev/shm').f_frsize - leave_free))
    try:
      next(iterator)
    except OSError as error:
      print(f'FAILED{leave_free}', cli.error_message(error))  # what the command-line tools print
    iterator.close()
    os.remove('/dev/shm/filler')


if __name__ == '__main__':  # the workers are spawned: they import this file
  main()
"""


def test_workers_name_a_full_shared_memory(tmp_path):
  """Worker processes hand batches over in /dev/shm; one that writes past its end dies of SIGBUS. Run with a
  private 8 MiB /dev/shm (a mount namespace): too small for the batches, or filled after the check."""
  if not shutil.which('unshare') or subprocess.run(['unshare', '-m', 'true'], capture_output=True).returncode:
    pytest.skip('needs unshare -m (root in a container or user namespaces)')
  script = tmp_path / 'shm.py'
  script.write_text(SHARED_MEMORY_SCRIPT)
  result = subprocess.run(['unshare', '-m', 'sh', '-c', f'mount -t tmpfs -o size=8m tmpfs /dev/shm && '
                           f'{sys.executable} {script}'], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if 'mount:' in result.stderr:
    pytest.skip(f'cannot mount a tmpfs: {result.stderr.strip()}')
  lines = {line.split(' ', 1)[0]: line for line in result.stdout.splitlines()}
  assert 'up to 10 batches at a time' in lines['REFUSED'] and 'about 23 MiB' in lines['REFUSED']
  assert '8 MiB free' in lines['REFUSED'] and '--shm-size' in lines['REFUSED']
  assert 'config.input.num_workers' in lines['REFUSED']
  # With no room at all the workers usually cannot make their semaphores (ENOSPC); when a little comes free after
  # the filler measured it (the previous workers' memory released late; 1 run in 3 here), they start and one dies
  # of SIGBUS instead. Either way the message says /dev/shm is full.
  for name, causes in (('FAILED300000', ('exit code -7',)), ('FAILED0', ('No space left on device', 'exit code -7'))):
    assert 'failed making batch 0: /dev/shm is full' in lines.get(name, ''), result.stdout + result.stderr
    assert any(cause in lines[name] for cause in causes), lines[name]
    assert '--shm-size' in lines[name] and 'disk refused' not in lines[name]


def test_every_record_appears_once_per_epoch():
  source = id_source(10)
  batches = take(pipeline.train_dataset(source, augment='none', image_size=8, batch_size=5, seed=0,
                                        sampler=sampling.SegmentSampler(2, 1), num_threads=1), 4)
  ids = [int(b['video'][i, 0, 0, 0, 0]) - 1 for b in batches for i in range(5)]
  assert sorted(ids[:10]) == list(range(10)) and sorted(ids[10:]) == list(range(10))
  assert ids[:10] != ids[10:]  # reshuffled each epoch


def test_both_frame_storages_give_the_same_batch():
  jpeg_source, raw_source = make_sources()
  kwargs = dict(augment='nr_dfernet', image_size=16, batch_size=3, seed=5, num_threads=1)
  assert_batches_equal(take(pipeline.train_dataset(jpeg_source, **kwargs), 2),
                       take(pipeline.train_dataset(raw_source, **kwargs), 2))
  kwargs = dict(image_size=20, batch_size=5, num_threads=1)
  assert_batches_equal(list(pipeline.eval_batches(jpeg_source, **kwargs)),
                       list(pipeline.eval_batches(raw_source, **kwargs)))


@pytest.mark.parametrize('shard_count', [1, 3])
def test_eval_covers_every_record_once_with_padding(shard_count):
  num_records, batch_size = 11, 3
  source = id_source(num_records)
  seen, num_batches = [], set()
  for shard_index in range(shard_count):
    batches = list(pipeline.eval_batches(source, sampler=sampling.SegmentSampler(2, 2), image_size=8,
                                         batch_size=batch_size, shard_index=shard_index,
                                         shard_count=shard_count, num_threads=2))
    num_batches.add(len(batches))
    for batch in batches:
      assert batch['video'].shape == (batch_size, 4, 8, 8, 3)
      for video, label, mask in zip(batch['video'], batch['label'], batch['mask']):
        if mask:
          seen.append(int(video[0, 0, 0, 0]) - 1)
          assert label == seen[-1] % 7
        else:
          assert not video.any() and label == 0
  assert num_batches == {pipeline.num_eval_batches(num_records, batch_size, shard_count)}  # same on every host
  assert sorted(seen) == list(range(num_records))
  # 2 hosts, 3 records, batch 2: host 0 has 2 records, host 1 one; both yield one batch.
  assert [len(list(pipeline.eval_batches(id_source(3), image_size=8, batch_size=2, shard_index=i, shard_count=2)))
          for i in range(2)] == [1, 1]
  # More hosts than records: the idle host yields the padding batch too.
  idle, = list(pipeline.eval_batches(id_source(2), image_size=8, batch_size=2, shard_index=2, shard_count=3))
  assert not idle['mask'].any()


@pytest.mark.parametrize('class_balanced', [False, True])
def test_hosts_read_disjoint_slices_of_the_same_global_batches(class_balanced):
  """Issue 16: the global batch is the same clips, augmented alike, whether 1, 2 or 3 hosts read it; each host
  its slice; an iterator derived from a batch index continues there, for any host count."""
  source = id_source(9)
  kwargs = dict(augment='stt', image_size=8, batch_size=6, seed=0, sampler=sampling.SegmentSampler(2, 1),
                num_threads=0, class_balanced=class_balanced, labels=np.arange(9) % 3)
  one = take(pipeline.train_dataset(source, **kwargs), 4)  # 24 clips: more than two epochs
  for hosts in (2, 3):
    local = dict(kwargs, batch_size=6 // hosts, shard_count=hosts)
    slices = [take(pipeline.train_dataset(source, shard_index=i, **local), 4) for i in range(hosts)]
    for step, global_batch in enumerate(one):
      for field in global_batch:
        np.testing.assert_array_equal(np.concatenate([host[step][field] for host in slices]), global_batch[field])
    later = next(pipeline.train_iterator(source, shard_index=1, start_batch=3, **local))
    np.testing.assert_array_equal(later['video'], slices[1][3]['video'])
  if not class_balanced:  # each epoch of 9 records read once, in a new order
    ids = [int(v) - 1 for b in one for v in b['video'][:, 0, 0, 0, 0]]
    assert sorted(ids[:9]) == sorted(ids[9:18]) == list(range(9)) and ids[:9] != ids[9:18]


def test_resume_from_iterator_state_gives_the_same_next_batches(tmp_path):
  jpeg_source, _ = make_sources()
  dataset = pipeline.train_dataset(jpeg_source, augment='aen', image_size=16, batch_size=3, seed=2, num_threads=2)
  it = iter(dataset)
  for _ in range(5):  # past the first epoch (12 records)
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what grain's orbax handler writes
  grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(it))
  want = [next(it) for _ in range(3)]
  fresh = iter(dataset)
  fresh.set_state(state)
  assert_batches_equal([next(fresh) for _ in range(3)], want)
  restored = grain.checkpoint.CheckpointHandler().restore(
      epath.Path(tmp_path), args=grain.checkpoint.CheckpointRestore(iter(dataset)))
  assert_batches_equal([next(restored) for _ in range(3)], want)


def test_class_balanced_draws_are_roughly_balanced():
  labels = np.array([0] * 14 + [1] * 4 + [2] * 2 + [3] * 1)
  source = [{**record, 'label': int(label)} for record, label in zip(id_source(len(labels)), labels)]
  kwargs = dict(augment='none', image_size=8, batch_size=16, seed=0, sampler=sampling.SegmentSampler(1, 1),
                class_balanced=True, num_threads=1)
  batches = take(pipeline.train_dataset(source, **kwargs), 50)  # 800 draws
  drawn = np.concatenate([b['label'] for b in batches])
  np.testing.assert_allclose(np.bincount(drawn, minlength=4) / len(drawn), 0.25, atol=0.05)
  ids = np.concatenate([b['video'][:, 0, 0, 0, 0] for b in batches]).astype(int) - 1
  np.testing.assert_array_equal(labels[ids], drawn)
  # Precomputed labels give the same draws without reading the source for them.
  assert_batches_equal(take(pipeline.train_dataset(source, labels=labels, **kwargs), 2), batches[:2])
  with pytest.raises(ValueError, match='one per record'):
    pipeline.train_dataset(source, labels=labels[:3], **kwargs)


def test_short_clip_uses_the_fallback():
  jpeg_source, _ = make_sources(num_clips=2, lengths=[3, 1])
  batch, = take(pipeline.train_dataset(jpeg_source, image_size=16, batch_size=2, seed=0, num_threads=0), 1)
  assert batch['video'].shape == (2, 16, 16, 16, 3)
  batch, = list(pipeline.eval_batches(jpeg_source, image_size=16, batch_size=2))
  assert batch['mask'].all()


def test_corrupt_jpeg_names_clip_and_frame():
  jpeg_source, _ = make_sources(num_clips=2, lengths=[16, 16])
  jpeg_source[1]['frames'][7] = b'\xff\xd8 not a jpeg'
  # 8 x 2 test offsets on 16 frames read every frame.
  with pytest.raises(ValueError, match=r"clip '00001': frame 7 is not a decodable image") as raised:
    list(pipeline.eval_batches(jpeg_source, image_size=16, batch_size=2, num_threads=2))
  # What the command-line tools print: the one line, without grain's note about the traceback they do not show.
  assert cli.error_message(raised.value) == "clip '00001': frame 7 is not a decodable image (13 bytes)"
  with pytest.raises(ValueError, match=r"clip '00000'.*num_frames=15 but it has 16 frames"):
    list(pipeline.eval_batches([{**jpeg_source[0], 'num_frames': 15}], image_size=16, batch_size=1))
  with pytest.raises(ValueError, match=r"lacks \['label'\]"):
    list(pipeline.eval_batches([{'frames': [], 'clip_id': 'x'}], image_size=16, batch_size=1))


def test_make_sampler_from_config_fields():
  config = {'name': 'segments', 'num_segments': 4, 'frames_per_segment': 3, 'short_clip_fallback': 'edge'}
  assert sampling.make_sampler(config) == sampling.SegmentSampler(4, 3, 'edge')
  assert sampling.make_sampler({'name': 'snippets', 'frames_per_snippet': 2}) == sampling.SnippetSampler(
      frames_per_snippet=2)
  with pytest.raises(ValueError, match=r"\['num_segments'\] are not fields of the 'snippets' sampler"):
    sampling.make_sampler({'name': 'snippets', 'num_segments': 4})


def test_shuffle_snippets_permutes_whole_snippets_and_adds_the_index():
  video = np.repeat(np.arange(14, dtype=np.uint8), 4).reshape(14, 1, 2, 2)  # 7 snippets x 2 frames, frame k = k
  transform, = pipeline.make_clip_transforms({'shuffle_snippets': {}})
  element = {'video': video, 'label': np.int32(3), 'mask': np.bool_(True)}
  drawn = set()
  for seed in range(40):
    out = transform.random_map(element, np.random.default_rng(seed))
    order = sampling.EST_PERMUTATIONS[int(out['permutation'])]
    want = np.concatenate([video[2 * k:2 * k + 2] for k in order])
    np.testing.assert_array_equal(out['video'], want)
    assert out['label'] == 3 and out['permutation'].dtype == np.int32
    drawn.add(int(out['permutation']))
  assert len(drawn) > 5  # uniform over the 10 orders
  with pytest.raises(ValueError, match='not a clip transform'):
    pipeline.make_clip_transforms({'shuffle': {}})
  with pytest.raises(ValueError, match=r"\['count'\] are not ShuffleSnippets fields"):
    pipeline.make_clip_transforms({'shuffle_snippets': {'count': 3}})


def test_clip_transform_fields_reach_train_and_eval_batches_with_resumable_state():
  source, _ = make_sources(num_clips=5, lengths=[30, 40, 50, 60, 70])
  sampler = {'name': 'snippets', 'frames_per_snippet': 1}
  transforms = {'shuffle_snippets': {}}
  dataset = pipeline.train_dataset(source, sampler=sampler, augment='none', image_size=16, batch_size=2, seed=0,
                                   num_threads=0, transforms=transforms)
  iterator = iter(dataset)
  next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(2)]
  restored = iter(dataset)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    assert set(got) == {'video', 'label', 'mask', 'permutation'}
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  assert expected[0]['video'].shape == (2, 7, 16, 16, 3) and expected[0]['permutation'].shape == (2,)
  evaluations = [list(pipeline.eval_batches(source, sampler=sampler, image_size=16, batch_size=4, num_threads=0,
                                            transforms=transforms)) for _ in range(2)]
  assert [b['mask'].tolist() for b in evaluations[0]] == [[True] * 4, [True, False, False, False]]
  for first, again in zip(*evaluations):  # every evaluation scores the same shuffles
    np.testing.assert_array_equal(first['permutation'], again['permutation'])
    np.testing.assert_array_equal(first['video'], again['video'])
  # Seeded by the record, not the host's position: record 4 alone on the second of two hosts is shuffled alike.
  second_host = list(pipeline.eval_batches(source, sampler=sampler, image_size=16, batch_size=4, num_threads=0,
                                           transforms=transforms, shard_index=1, shard_count=2))
  assert second_host[0]['permutation'][1] == evaluations[0][0]['permutation'][3]


def test_bench_input_quick_runs(tmp_path):
  out = tmp_path / 'bench.json'
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, os.path.join(root, 'scripts', 'bench_input.py'), '--quick', '--sizes=16',
                  '--num_clips=4', '--batch_size=2', '--seconds=0.2', '--readers=threads:2,workers:2', '--eval_clips=5',
                  '--eval_batch_size=2', '--eval_pause=0.1', f'--out={out}'],
                 check=True, cwd=root, capture_output=True, text=True, timeout=120)
  report = json.loads(out.read_text())
  assert {row['image_size'] for row in report['results']} == {16}
  assert all(row['frames_per_s_one_thread'] > 0 for row in report['results'])
  assert all(row['readers']['workers:2']['median'] > 0 for row in report['results'])
  passes = report['results'][0]['eval_passes']  # the first recipe's; every pass counted the 5 clips
  assert passes['workers:2']['first_pass_s'] > 0 and len(passes['threads:2']['paused_pass_s']) == 1
