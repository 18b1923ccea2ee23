"""The whole trainer against its train step alone (issue 17, item 4): does the input pipeline keep the device fed?

    python scripts/bench_e2e.py --device_json runs/gpu_bench/bf16_b128.json --out runs/gpu_bench/e2e.json  # a GPU
    python scripts/bench_e2e.py --model tiny --out runs/e2e_tiny.json   # a check of this script, ~1 min on 2 CPU cores

1. Data: synthetic DFEW-layout clips (dferjax.data.synthetic: drawn faces, 8-48 frames a clip) written and built
   once as fold 1 (`dfew/fold1`: 112 px JPEG frames, as the real DFEW build) under --root, reused by later runs.
2. The trainer: `python -m dferjax.main --config configs/stt_dfew.py` on that dataset: the paper-size STT from
   random weights (`init_from.backbone=none`) in --dtype at --batch_size, --steps steps as one epoch, then its
   evaluation of the fold's test clips. Its clips/s comes from the train records of metrics.jsonl (one every
   --log_every steps, with their wall time), from the first record, after compilation, to the epoch's last step:
   steps x batch / seconds. That includes the input pipeline, the host-to-device copies and the progress bar's
   per-step sync; it leaves out compilation and evaluation. The epoch summary line's clips/s, which includes
   both, is reported beside it.
3. Device only: bench_train.py's dferjax train clips/s for the same model, dtype and batch (one uint8 batch
   reused, no input pipeline), read from --device_json (gpu_bench.sh's bf16_b128 stage) or measured here.

Prints one line per trainer run (--num_threads and --num_workers may list several; every pair runs):
`e2e: trainer N clips/s, device-only M clips/s, gap X %` with gap = 1 - trainer / device-only.
The records repeat: the train split's few hundred clips are reshuffled and decoded again on every pass, so
the CPU does a real run's work per clip (JPEG decode of the 16 sampled frames, augmentation) whatever the
dataset's size; like DFEW at 112 px, it sits in the page cache after the first pass.
"""
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

import bench_train  # scripts/: the benchmark's tiny STT and its steps_per_epoch
from dferjax import benchmarking, writers
from dferjax.data import build, synthetic
from tfds_builders import common
from tfds_builders.dfew import Dfew

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Per size: clips per class written (5 folds; fold 1 trains on 4/5 of them), steps, steps between train records.
# 1000 paper steps: bench_train.py's steps_per_epoch too, so the trainer's step is the benchmark's program and
# either can load it from the other's compilation cache.
SIZES = {'paper': dict(clips_per_class=100, steps=bench_train.STEPS_PER_EPOCH, log_every=50),
         'tiny': dict(clips_per_class=10, steps=30, log_every=5)}
EPOCH_LINE = re.compile(r'^epoch \d+ \|.* ([\d.]+) clips/s$')


def define_flags():
  flags.DEFINE_enum('model', 'paper', list(SIZES), "STT's size: paper (configs/stt_dfew.py, 16 x 112 px) or tiny "
                    "(bench_train.py's tiny STT on 32 px: a check of this script on any host).")
  flags.DEFINE_integer('batch_size', 128, 'Global train batch.')
  flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'], 'config.dtype.')
  flags.DEFINE_integer('steps', 0, 'Trainer steps, one epoch (0: 1000 paper, 30 tiny).')
  flags.DEFINE_integer('log_every', 0, 'config.log_every_steps: steps between train records (0: 50 paper, 5 tiny).')
  flags.DEFINE_list('num_threads', ['0'], 'config.input.num_threads, one trainer run each (0: the config\'s, 8).')
  flags.DEFINE_list('num_workers', ['0'], 'config.input.num_workers, one trainer run each with every --num_threads '
                    "(0: threads, the config's default; N: N processes make the batches)."),
  flags.DEFINE_integer('prefetch', 0, 'config.input.prefetch, batches grain reads ahead (0: the config\'s, 4).')
  flags.DEFINE_bool('progress_bar', True, 'config.progress_bar (the default): the bar waits for every step.')
  flags.DEFINE_enum('frame_encoding', '', ['', 'jpeg', 'raw'], "Frame storage of the build ('': the size's "
                    'default, JPEG at 112 px, raw at 32).')
  flags.DEFINE_integer('clips_per_class', 0, 'Synthetic clips per class, all folds (0: 100 paper, 10 tiny).')
  flags.DEFINE_integer('build_workers', 0, 'CPU cores for writing and building the dataset (0: all).')
  flags.DEFINE_string('root', '/tmp/dferjax_e2e', 'Folder for the dataset (kept and reused) and the trainer '
                      'workdirs (replaced each run).')
  flags.DEFINE_string('compilation_cache', '', "The trainer's and bench_train.py's --compilation_cache ('': "
                      "the trainer's default; bench_train.py none).")
  flags.DEFINE_string('device_json', '', 'A bench_train.py report holding the same model, dtype and batch; '
                      'missing or without them: measured here.')
  flags.DEFINE_integer('device_steps', 10, 'Timed steps of the device-only measurement when made here.')
  flags.DEFINE_string('out', '', 'Write the JSON report here (rewritten after every part).')


def resolve_settings() -> dict:
  size = SIZES[FLAGS.model]
  image_size = 112 if FLAGS.model == 'paper' else bench_train.BENCH_MODELS['stt'].tiny_input['image_size']
  frame_encoding = FLAGS.frame_encoding or common.default_frame_encoding(image_size)
  settings = {'model': FLAGS.model, 'batch_size': FLAGS.batch_size, 'dtype': FLAGS.dtype,
              'steps': FLAGS.steps or size['steps'], 'log_every': FLAGS.log_every or size['log_every'],
              'num_threads': [int(n) for n in FLAGS.num_threads],
              'num_workers': [int(n) for n in FLAGS.num_workers], 'prefetch': FLAGS.prefetch,
              'progress_bar': FLAGS.progress_bar, 'image_size': image_size, 'frame_encoding': frame_encoding,
              'dataset': 'dfew/' + Dfew.config_name(image_size=image_size, frame_encoding=frame_encoding, fold=1),
              'clips_per_class': FLAGS.clips_per_class or size['clips_per_class'],
              'build_workers': FLAGS.build_workers or os.cpu_count(), 'root': os.path.abspath(FLAGS.root),
              'compilation_cache': os.path.abspath(FLAGS.compilation_cache) if FLAGS.compilation_cache else ''}
  if settings['steps'] < 3 * settings['log_every']:
    raise ValueError(f"--steps={settings['steps']} gives fewer than three train records (the first interval holds "
                     f"the compilation): raise it or lower --log_every={settings['log_every']}")
  return settings


# ---------------------------------------------------------------------------------------------------------
# The dataset.


def ensure_dataset(settings: dict) -> dict:
  """Writes the synthetic clips and builds the fold-1 config once per (clip count, frame size, encoding)."""
  folder = os.path.join(settings['root'], f"synthetic_{settings['clips_per_class']}")
  manual_dir, data_dir = os.path.join(folder, 'manual'), os.path.join(folder, 'tfds')
  wanted = {'clips_per_class': settings['clips_per_class'], 'seed': 0, 'motions': 'time_reversed'}
  marker = os.path.join(manual_dir, 'synthetic.json')
  info = {'manual_dir': manual_dir, 'data_dir': data_dir, 'clips': 7 * settings['clips_per_class']}
  written = None
  if os.path.isfile(marker):
    with open(marker) as f:
      written = json.load(f)
  if written == wanted:
    info['write_s'] = 0.0
  else:  # absent, or cut short by a kill (the marker comes last): write it all again
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    synthetic.write_dfew(manual_dir, **wanted, workers=settings['build_workers'])
    info['write_s'] = time.perf_counter() - start
    with open(marker, 'w') as f:
      json.dump(wanted, f)
  start = time.perf_counter()
  [report] = build.build('dfew', manual_dir, data_dir, [settings['dataset'].split('/')[1]],
                         workers=settings['build_workers'], show_progress=False)
  info.update(build_s=time.perf_counter() - start, build_status=report.status,
              splits={split: sum(per_class.values()) for split, per_class in report.splits.items()})
  print(f"e2e: dataset {settings['dataset']} ({info['splits']} clips) under {data_dir}: written in "
        f"{info['write_s']:.1f} s, {report.status} in {info['build_s']:.1f} s on {settings['build_workers']} "
        'workers', flush=True)
  return info


# ---------------------------------------------------------------------------------------------------------
# The trainer.


def trainer_command(settings: dict, data_dir: str, workdir: str, num_threads: int, num_workers: int = 0) -> list[str]:
  """`python -m dferjax.main` on the paper STT config, with the benchmark's sizes as overrides."""
  command = [sys.executable, '-m', 'dferjax.main', '--config=configs/stt_dfew.py', f'--workdir={workdir}']
  if settings['compilation_cache']:
    command.append(f"--compilation_cache={settings['compilation_cache']}")
  overrides = {'dataset.name': settings['dataset'], 'dataset.data_dir': data_dir, 'init_from.backbone': 'none',
               'dtype': settings['dtype'], 'batch_size': settings['batch_size'],
               'steps_per_epoch': settings['steps'], 'num_epochs': 1, 'log_every_steps': settings['log_every'],
               'progress_bar': settings['progress_bar'], 'input.image_size': settings['image_size']}
  if num_threads:
    overrides['input.num_threads'] = num_threads
  if num_workers:
    overrides['input.num_workers'] = num_workers
  if settings['prefetch']:
    overrides['input.prefetch'] = settings['prefetch']
  if settings['model'] == 'tiny':
    tiny = bench_train.BENCH_MODELS['stt']
    overrides.update({f'model.{name}': value for name, value in tiny.tiny_model.items()})
    overrides.update({f'input.sampler.{name}': value for name, value in tiny.tiny_input['sampler'].items()})
  return command + [f'--config.{name}={value}' for name, value in overrides.items()]


def trainer_throughput(records: list[dict], batch_size: int) -> dict:
  """clips/s from the first train record (the steps before it hold the compilation) to the last (the epoch's
  end, written before the evaluation), and the spread over the intervals between records."""
  train = [record for record in records if record['split'] == 'train']
  if len(train) < 3:
    raise ValueError(f'{len(train)} train records: need three (the first interval holds the compilation)')
  first, last = train[0], train[-1]
  seconds = last['wall_time'] - first['wall_time']
  intervals = [(b['step'] - a['step']) * batch_size / (b['wall_time'] - a['wall_time'])
               for a, b in zip(train, train[1:])]
  return {'clips_per_s': (last['step'] - first['step']) * batch_size / seconds, 'from_step': first['step'],
          'to_step': last['step'], 'seconds': seconds, 'interval_clips_per_s': {
              'min': min(intervals), 'median': statistics.median(intervals), 'max': max(intervals)}}


def run_trainer(settings: dict, data_dir: str, num_threads: int, num_workers: int = 0) -> dict:
  """One trainer run in a fresh workdir: its clips/s, the epoch line's, and the CPU time it and its input workers
  used."""
  workdir = os.path.join(settings['root'], f'run_threads{num_threads or "default"}_workers{num_workers}')
  shutil.rmtree(workdir, ignore_errors=True)  # a workdir with a checkpoint would resume, not train
  command = trainer_command(settings, data_dir, workdir, num_threads, num_workers)
  print('e2e command: ' + ' '.join(command), flush=True)
  result = {'num_threads': num_threads or 'config default', 'num_workers': num_workers, 'command': command,
            'workdir': workdir}
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True, bufsize=1) as process:
    for line in process.stdout:  # stderr (the progress bar) goes straight to ours
      print(line, end='', flush=True)
      if match := EPOCH_LINE.match(line.strip()):
        result['epoch_line_clips_per_s'] = float(match[1])
  result['wall_s'] = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  result['cpu_s'] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  if process.returncode != 0:
    result['error'] = f'the trainer exited with code {process.returncode} (its output is above)'
    return result
  result.update(trainer_throughput(writers.read_records(workdir), settings['batch_size']))
  return result


# ---------------------------------------------------------------------------------------------------------
# The device-only figure.


def device_figure(report: dict, settings: dict) -> tuple[float | None, str]:
  """The dferjax train clips/s of a bench_train.py report for this model, dtype and batch, or why it has none."""
  ran = report['settings']
  if (ran['model_name'], ran['model']) != ('stt', settings['model']):
    return None, f"it measured {ran['model_name']} ({ran['model']})"
  if changed := [name for name, value in bench_train.IMPL_DEFAULTS.items() if ran.get(name, value) != value]:
    return None, f'it ran with non-default {changed}'
  for result in report['results']:
    if (result['dtype'], result['batch_size']) == (settings['dtype'], settings['batch_size']):
      train_figures = result['dferjax'].get('train', {})
      if 'clips_per_s' in train_figures:
        return train_figures['clips_per_s'], ''
  return None, f"it has no dferjax {settings['dtype']} batch {settings['batch_size']} train figure"


def device_only(settings: dict, device_json: str, measured_json: str) -> dict:
  """From `device_json` if it holds the figure, else from a bench_train.py run written to `measured_json`."""
  if device_json and os.path.isfile(device_json):
    with open(device_json) as f:
      clips_per_s, why_not = device_figure(json.load(f), settings)
    if clips_per_s:
      return {'clips_per_s': clips_per_s, 'source': device_json}
    print(f'e2e: not using {device_json}: {why_not}; measuring device-only here', flush=True)
  command = [sys.executable, os.path.join(REPO, 'scripts', 'bench_train.py'), '--model_name=stt',
             f"--model={settings['model']}", f"--dtypes={settings['dtype']}", f"--batch_sizes={settings['batch_size']}",
             '--torch=none', '--nomax_batch', f'--steps={FLAGS.device_steps}', '--warmup=2', '--window=5',
             f'--out={measured_json}']
  if settings['compilation_cache']:
    command.append(f"--compilation_cache={settings['compilation_cache']}")
  print('e2e command: ' + ' '.join(command), flush=True)
  process = subprocess.run(command, cwd=REPO, check=False)
  if process.returncode != 0 or not os.path.isfile(measured_json):
    return {'error': f'bench_train.py exited with code {process.returncode}'}
  with open(measured_json) as f:
    clips_per_s, why_not = device_figure(json.load(f), settings)
  return {'clips_per_s': clips_per_s, 'source': measured_json} if clips_per_s else {'error': why_not}


# ---------------------------------------------------------------------------------------------------------


def run_line(run: dict, settings: dict, device: dict | None) -> str:
  reader = (f"input.num_workers={run['num_workers']} processes" if run.get('num_workers')
            else f"input.num_threads={run['num_threads']}")
  options = (f"{reader}, prefetch={settings['prefetch'] or 'config default'}, "
             f"progress bar {'on' if settings['progress_bar'] else 'off'}, {settings['frame_encoding']} frames")
  if 'error' in run:
    return f"e2e: trainer failed ({options}): {run['error']}"
  epoch = f", epoch line {run['epoch_line_clips_per_s']:.1f} clips/s" if 'epoch_line_clips_per_s' in run else ''
  details = (f"{options}; steps {run['from_step']}-{run['to_step']} in {run['seconds']:.1f} s{epoch}; "
             f"{run['cpu_s'] / run['wall_s']:.1f} cores busy on average over the trainer's {run['wall_s']:.0f} s, "
             'compilation included')
  if not device or 'clips_per_s' not in device:
    return f"e2e: trainer {run['clips_per_s']:.1f} clips/s ({details})"
  gap = 100 * (1 - run['clips_per_s'] / device['clips_per_s'])
  return (f"e2e: trainer {run['clips_per_s']:.1f} clips/s, device-only {device['clips_per_s']:.1f} clips/s, "
          f'gap {gap:.1f} % ({details})')


def main(argv):
  del argv
  settings = resolve_settings()
  machine = benchmarking.machine_info()
  print(f"e2e: host {machine['cpu_model']}, {machine['cpu_count']} CPUs ({machine['cores_visible']} usable); "
        f"trainer input.num_threads {settings['num_threads']} (0: config default 8), input.num_workers "
        f"{settings['num_workers']} (0: threads), prefetch "
        f"{settings['prefetch'] or 'config default 4'}", flush=True)
  report = {'machine': machine, 'versions': benchmarking.package_versions(('jax', 'jaxlib', 'flax', 'grain')),
            'settings': settings, 'runs': [],
            'definitions': {'trainer clips_per_s': 'steps x batch / seconds between the first train record of '
                                                   'metrics.jsonl (after compilation) and the last (the end of the '
                                                   'epoch, before evaluation)',
                            'gap': '1 - trainer clips_per_s / device-only clips_per_s'}}

  def save():
    if FLAGS.out:
      benchmarking.write_json(FLAGS.out, report)

  report['dataset'] = ensure_dataset(settings)
  save()
  for num_workers in settings['num_workers']:
    for num_threads in settings['num_threads']:
      run = run_trainer(settings, report['dataset']['data_dir'], num_threads, num_workers)
      report['runs'].append(run)
      save()
      print(run_line(run, settings, None), flush=True)  # kept if the device-only part runs out of time
  measured_json = (os.path.splitext(FLAGS.out)[0] + '_device.json' if FLAGS.out
                   else os.path.join(settings['root'], 'device.json'))
  report['device_only'] = device_only(settings, FLAGS.device_json, measured_json)
  save()
  for run in report['runs']:
    print(run_line(run, settings, report['device_only']), flush=True)
  if 'error' in report['device_only']:
    print(f"e2e: no device-only figure: {report['device_only']['error']}", flush=True)
  if FLAGS.out:
    print(f'wrote {FLAGS.out}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
