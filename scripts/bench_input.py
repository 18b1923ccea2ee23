"""Training input pipeline throughput: frames/s per CPU core at 112 and 224 px, with and without augmentation.

Runs without a built dataset (default: an in-memory source of synthetic JPEG clips made here, stored at the output
size like the px112/px224 builds), or on a built one:
  python scripts/bench_input.py --out runs/bench_input.json
  python scripts/bench_input.py --data_dir data/tfds --dataset dfew/fold1 --split train --sizes 112
  python scripts/bench_input.py --clip_list lists/set_1_train.txt --clip_root /data/DFEW --sizes 112  # no build
  python scripts/bench_input.py --quick            # < 1 minute
For each (size, recipe) it measures
  loop       the pipeline's transforms in a plain single-threaded loop (+ np.stack batching): one core's work;
  grain x1   train_dataset(num_threads=1): frames per wall second and per CPU second of the process;
  grain xN   train_dataset(num_threads=N): the whole machine;
  readers    with --readers (e.g. threads:2,threads:8,workers:2): frames per wall second of each reader, threads
             against worker processes (train_dataset's num_workers) at the same batches;
  eval       with --readers and --eval_clips: seconds per pass of an EvalReader over that many clips (test
             sampling, resize only, --eval_batch_size), as the trainer evaluates: the first pass (worker start
             included), then passes after --eval_pause seconds idle, the time a training epoch gives workers to
             read ahead;
and a per-stage timing run (read, sample, decode, crop/resize, flip, batch) in microseconds per frame.
"""
import json
import os
import platform
import time

from absl import app
from absl import flags
import cv2
import grain
import numpy as np

from dferjax.data import augment
from dferjax.data import pipeline
from dferjax.data import sampling

FLAGS = flags.FLAGS
flags.DEFINE_list('sizes', ['112', '224'], 'Output image sizes (synthetic frames are stored at this size).')
flags.DEFINE_list('recipes', ['stt', 'none'], f'Augmentation recipes of {augment.RECIPES}.')
flags.DEFINE_string('sampler', 'segments', 'segments (8 x 2) or snippets (7 x 5).')
flags.DEFINE_integer('batch_size', 32, 'Clips per batch.')
flags.DEFINE_float('seconds', 3.0, 'Seconds per throughput measurement.')
flags.DEFINE_integer('threads', 0, 'Reader threads of the multi-threaded run (0: all CPUs of this process).')
flags.DEFINE_integer('num_clips', 64, 'Synthetic clips per size.')
flags.DEFINE_integer('frames_per_clip', 48, 'Frames per synthetic clip (only the 16 sampled ones are decoded).')
flags.DEFINE_integer('jpeg_quality', 90, 'JPEG quality of the synthetic frames.')
flags.DEFINE_string('data_dir', '', 'TFDS data dir of a built dataset (else synthetic clips).')
flags.DEFINE_string('dataset', 'dfew/fold1', 'Built dataset name, with --data_dir.')
flags.DEFINE_string('split', 'train', 'Split of the built dataset.')
flags.DEFINE_string('clip_list', '', 'A clip list file (dferjax/data/clip_list.py) to read instead: frame folders.')
flags.DEFINE_string('clip_root', '', "With --clip_list: where its relative folders start ('': the list's folder).")
flags.DEFINE_list('readers', [], 'Readers to compare, each threads:N (num_threads=N in this process) or '
                  'workers:N (num_workers=N processes); measured in turn, --repeats times.')
flags.DEFINE_integer('eval_clips', 0, 'With --readers: clips of an evaluation split to time passes over (DFEW '
                     'fold: 2341; 0: none).')
flags.DEFINE_integer('eval_batch_size', 64, 'Clips per evaluation batch (config.eval_batch_size).')
flags.DEFINE_float('eval_pause', 5.0, 'Seconds between evaluation passes (the training between evaluations).')
flags.DEFINE_integer('repeats', 1, 'Rounds over --readers (the report keeps every figure and the median).')
flags.DEFINE_bool('quick', False, 'Short run (< 1 minute): 1 s per measurement, 16 clips, no xN run on 1 CPU.')
flags.DEFINE_string('out', '', 'Write the JSON report here.')


class RepeatedSource:
  """`num_clips` distinct clips seen as a source of `length` records (clip i % num_clips).

  A DFEW-sized index range keeps grain's shuffle at its real cost: its index_shuffle takes ~1 ms per index for
  a 16-record dataset but ~5 us for 10k records.
  """

  def __init__(self, clips, length: int):
    self.clips, self.length = clips, length

  def __len__(self):
    return self.length

  def __getitem__(self, index):
    return self.clips[index % len(self.clips)]


def synthetic_source(size: int, num_clips: int, frames_per_clip: int, quality: int, seed: int = 0):
  """Face-like clips: a smooth random field with blobs, moving by a pixel a frame, mild noise, JPEG-encoded."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:size, 0:size] / size
  source = []
  for i in range(num_clips):
    coarse = rng.uniform(40, 220, (6, 6, 3)).astype(np.float32)
    base = cv2.resize(coarse, (size + frames_per_clip, size), interpolation=cv2.INTER_CUBIC)
    for _ in range(4):  # eyes/mouth-like blobs
      cy, cx, radius = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.04, 0.12)
      blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * radius ** 2))[..., None]
      base[:, :size] -= 80 * blob
    frames = []
    for k in range(frames_per_clip):
      frame = base[:, k:k + size] + rng.normal(0, 3, (size, size, 3))
      frame = np.clip(frame, 0, 255).astype(np.uint8)
      frames.append(cv2.imencode('.jpg', frame, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes())
    source.append({'frames': frames, 'label': i % 7, 'clip_id': f'{i:05d}', 'num_frames': frames_per_clip})
  return RepeatedSource(source, length=9358)  # about a DFEW train fold: 11,697 clips x 4/5


def loop_throughput(source, sampler, recipe, size, batch_size, seconds):
  """Single-threaded transforms + batching: (frames per wall second, frames per CPU second)."""
  read, sample, decode = pipeline.ReadRecord(source), pipeline.SampleFrames(sampler), pipeline.DecodeFrames()
  aug, fields = pipeline.Augment(recipe, size), pipeline.ToBatchFields()
  augment.use_single_thread_cv2()
  frames = clips = 0
  wall, cpu = time.perf_counter(), time.process_time()
  while time.perf_counter() - wall < seconds:
    batch = []
    for _ in range(batch_size):
      rng = np.random.default_rng(clips)
      element = fields.map(aug.random_map(decode.map(sample.random_map(read.map(clips % len(source)), rng)), rng))
      batch.append(element)
      clips += 1
    video = np.stack([element['video'] for element in batch])
    frames += video.shape[0] * video.shape[1]
  return frames / (time.perf_counter() - wall), frames / (time.process_time() - cpu)


def grain_throughput(source, sampler, recipe, size, batch_size, seconds, num_threads, num_workers=0):
  """train_dataset(num_threads, num_workers): (frames per wall second, frames per CPU second of this process: the
  workers' time is not in it) after one warm-up batch (which waits for the workers to start)."""
  dataset = pipeline.train_dataset(source, sampler=sampler, augment=recipe, image_size=size, batch_size=batch_size,
                                   seed=0, num_threads=num_threads, prefetch=4, num_workers=num_workers)
  it = iter(dataset)
  next(it)
  frames = 0
  wall, cpu = time.perf_counter(), time.process_time()
  while time.perf_counter() - wall < seconds:
    video = next(it)['video']
    frames += video.shape[0] * video.shape[1]
  result = frames / (time.perf_counter() - wall), frames / (time.process_time() - cpu)
  it.close()
  return result


def compare_readers(source, sampler, recipe, size, batch_size, seconds) -> dict:
  """{reader: {'frames_per_s': [one per round], 'median': ...}} for each of --readers, rounds interleaved so that a
  change in the machine's load touches every reader alike."""
  readers = {name: {**reader, 'frames_per_s': []} for name, reader in parse_readers().items()}
  for _ in range(FLAGS.repeats):
    for name, reader in readers.items():
      frames_per_s, _ = grain_throughput(source, sampler, recipe, size, batch_size, seconds, reader['num_threads'],
                                         reader['num_workers'])
      reader['frames_per_s'].append(frames_per_s)
  for name, reader in readers.items():
    reader['median'] = float(np.median(reader['frames_per_s']))
    print(f"{size:>4}px {recipe:<10} {name:<11} {reader['median']:7.0f} f/s = "
          f"{reader['median'] / sampler.num_output_frames:6.0f} clips/s (batch {batch_size}; "
          + ', '.join(f'{value:.0f}' for value in reader['frames_per_s']) + ')', flush=True)
  return readers


def parse_readers() -> dict:
  """--readers -> {name: {'num_threads', 'num_workers'}}."""
  readers = {}
  for name in FLAGS.readers:
    kind, _, count = name.partition(':')
    if kind not in ('threads', 'workers') or not count.isdigit():
      raise ValueError(f'--readers entry {name!r}: expected threads:N or workers:N')
    readers[name] = {'num_threads': int(count) if kind == 'threads' else 0,
                     'num_workers': int(count) if kind == 'workers' else 0}
  return readers


def eval_passes(source, sampler, size, readers: dict) -> dict:
  """{reader: {'first_pass_s', 'paused_pass_s': [one per repeat], 'median'}}: EvalReader passes over --eval_clips
  clips, the first one cold, each later one after --eval_pause idle seconds."""
  split = RepeatedSource(source.clips, length=FLAGS.eval_clips)
  results = {}
  for name, reader in readers.items():
    eval_reader = pipeline.EvalReader(split, sampler=sampler, image_size=size, batch_size=FLAGS.eval_batch_size,
                                      num_threads=reader['num_threads'], num_workers=reader['num_workers'])
    timings = []
    for repeat in range(1 + FLAGS.repeats):
      if repeat:
        time.sleep(FLAGS.eval_pause)  # the training between two evaluations
      start = time.perf_counter()
      clips = sum(int(batch['mask'].sum()) for batch in eval_reader)
      timings.append(time.perf_counter() - start)
      assert clips == FLAGS.eval_clips, clips
    eval_reader.close()
    results[name] = {'first_pass_s': timings[0], 'paused_pass_s': timings[1:],
                     'median': float(np.median(timings[1:]))}
    print(f"{size:>4}px eval pass {name:<11} {results[name]['median']:6.2f} s = "
          f"{FLAGS.eval_clips / results[name]['median']:6.0f} clips/s after {FLAGS.eval_pause:.0f} s idle "
          f"(first pass {timings[0]:.2f} s; {FLAGS.eval_clips} clips, batch {FLAGS.eval_batch_size})", flush=True)
  return results


def stage_breakdown(source, sampler, recipe, size, batch_size, num_batches):
  """Microseconds per output frame in each stage, timed one stage at a time on one thread."""
  totals = dict.fromkeys(['read', 'sample', 'decode', 'crop_resize', 'flip', 'other_augment', 'batch'], 0.0)
  augment.use_single_thread_cv2()
  frames = 0
  clip = 0
  for _ in range(num_batches):
    videos = []
    for _ in range(batch_size):
      rng = np.random.default_rng(clip)
      t0 = time.perf_counter()
      record = source[clip % len(source)]
      t1 = time.perf_counter()
      index = sampler(len(record['frames']), rng)
      encoded = [record['frames'][i] for i in index] if not isinstance(record['frames'], np.ndarray) \
          else record['frames'][index]
      t2 = time.perf_counter()
      video = pipeline.decode_frames(encoded, index, record['clip_id'])
      t3 = time.perf_counter()
      if recipe == 'none':
        video = augment.resize_clip(video, size)
        t4 = t5 = t6 = time.perf_counter()
      else:
        video = augment.random_sized_crop(video, size, rng)
        t4 = time.perf_counter()
        video = augment.random_horizontal_flip(video, rng)
        t5 = time.perf_counter()
        if recipe == 'nr_dfernet':
          video = augment.random_brightness_rotation(video, rng)
        elif recipe == 'aen':
          video = augment.random_color_jitter(augment.random_affine_rotation(video, rng), rng)
        t6 = time.perf_counter()
      videos.append(video)
      for key, seconds in zip(['read', 'sample', 'decode', 'crop_resize', 'flip', 'other_augment'],
                              [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5]):
        totals[key] += seconds
      clip += 1
    t0 = time.perf_counter()
    batch = np.stack(videos)  # copies the flipped views
    totals['batch'] += time.perf_counter() - t0
    frames += batch.shape[0] * batch.shape[1]
  per_frame = {key: 1e6 * value / frames for key, value in totals.items()}
  per_frame['total'] = sum(per_frame.values())
  return per_frame


def machine_info():
  model = platform.processor()
  try:
    with open('/proc/cpuinfo') as f:
      model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return {'platform': platform.platform(), 'cpu': model, 'cpu_count': os.cpu_count(),
          'cpus_for_process': len(os.sched_getaffinity(0)), 'load_average': os.getloadavg()}


def main(argv):
  del argv
  load_at_start = os.getloadavg()
  seconds = 1.0 if FLAGS.quick and FLAGS['seconds'].using_default_value else FLAGS.seconds
  num_clips = 16 if FLAGS.quick and FLAGS['num_clips'].using_default_value else FLAGS.num_clips
  cpus = len(os.sched_getaffinity(0))
  threads = FLAGS.threads or cpus
  sampler = sampling.make_sampler(FLAGS.sampler)
  results = []
  for size in map(int, FLAGS.sizes):
    if FLAGS.clip_list:
      from dferjax.data import clip_list  # pylint: disable=import-outside-toplevel
      source = clip_list.ClipListSource(FLAGS.clip_list, FLAGS.clip_root)
      source_name = f'clip list {FLAGS.clip_list} ({len(source)} clips)'
    elif FLAGS.data_dir:
      from dferjax.data import datasets  # pylint: disable=import-outside-toplevel
      source = datasets.data_source(FLAGS.dataset, FLAGS.split, FLAGS.data_dir)
      source_name = f'{FLAGS.dataset}:{FLAGS.split} ({FLAGS.data_dir})'
    else:
      source = synthetic_source(size, num_clips, FLAGS.frames_per_clip, FLAGS.jpeg_quality)
      source_name = (f'synthetic JPEG q{FLAGS.jpeg_quality}, {num_clips} clips x {FLAGS.frames_per_clip} frames, '
                     f'indexed as {len(source)} records')
    first = source[0]['frames']
    stored = pipeline.decode_frames(first[:1], [0], 'first').shape[1:3]
    bytes_per_frame = float(np.mean([len(f) for f in first])) if not isinstance(first, np.ndarray) else None
    for recipe in FLAGS.recipes:
      row = {'image_size': size, 'recipe': recipe, 'stored_frame_size': list(stored),
             'jpeg_bytes_per_frame': bytes_per_frame}
      row['frames_per_s_one_thread'], row['frames_per_cpu_s_one_thread'] = loop_throughput(
          source, sampler, recipe, size, FLAGS.batch_size, seconds)
      row['frames_per_s_grain_1'], row['frames_per_cpu_s_grain_1'] = grain_throughput(
          source, sampler, recipe, size, FLAGS.batch_size, seconds, 1)
      if threads > 1 and not (FLAGS.quick and cpus == 1):
        row[f'frames_per_s_grain_{threads}'], row[f'frames_per_cpu_s_grain_{threads}'] = grain_throughput(
            source, sampler, recipe, size, FLAGS.batch_size, seconds, threads)
      if FLAGS.readers:
        row['readers'] = compare_readers(source, sampler, recipe, size, FLAGS.batch_size, seconds)
      if FLAGS.readers and FLAGS.eval_clips and not (FLAGS.data_dir or FLAGS.clip_list) and recipe == FLAGS.recipes[0]:
        row['eval_passes'] = eval_passes(source, sampler, size, parse_readers())
      row['us_per_frame'] = stage_breakdown(source, sampler, recipe, size, FLAGS.batch_size,
                                            num_batches=2 if FLAGS.quick else 8)
      results.append(row)
      print_row(row, threads)
  report = {
      'machine': {**machine_info(), 'load_average_at_start': load_at_start},
      'versions': {'python': platform.python_version(), 'numpy': np.__version__, 'opencv': cv2.__version__,
                   'grain': getattr(grain, '__version__', '?')},
      'settings': {'source': source_name, 'sampler': repr(sampler), 'batch_size': FLAGS.batch_size,
                   'readers': FLAGS.readers, 'repeats': FLAGS.repeats, 'eval_clips': FLAGS.eval_clips,
                   'eval_batch_size': FLAGS.eval_batch_size, 'eval_pause_s': FLAGS.eval_pause,
                   'seconds_per_measurement': seconds, 'threads': threads, 'quick': FLAGS.quick},
      'results': results,
  }
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, 'w') as f:
      json.dump(report, f, indent=1)
    print(f'wrote {FLAGS.out}')


def print_row(row, threads):
  stages = row['us_per_frame']
  multi = row.get(f'frames_per_s_grain_{threads}')
  print(f"{row['image_size']:>4}px {row['recipe']:<10} loop {row['frames_per_s_one_thread']:7.0f} f/s "
        f"({row['frames_per_cpu_s_one_thread']:7.0f}/cpu-s) | grain x1 {row['frames_per_s_grain_1']:7.0f} f/s "
        f"({row['frames_per_cpu_s_grain_1']:7.0f}/cpu-s)"
        + (f' | grain x{threads} {multi:7.0f} f/s' if multi else ''))
  print('       us/frame: ' + '  '.join(f'{key} {value:.1f}' for key, value in stages.items()))


if __name__ == '__main__':
  app.run(main)
