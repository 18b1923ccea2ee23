"""Runs (or resumes, or just collects) DFEW's five folds and prints the table in the papers' layout.

    python scripts/run_folds.py --config configs/stt_dfew.py --workdir runs/stt_dfew [--folds 1,2,3,4,5]
        [--collect_only] [-- --config.batch_size=64 ...]
    python scripts/run_folds.py --config configs/nr_dfernet_dfew.py:oversample --workdir runs/nr_dfernet_over
    python scripts/run_folds.py --config configs/aen_dfew.py --workdir runs/aen_dfew \
        -- --config.init_from.guide=runs/aen_frame_dfew_fold{fold}

Fold k trains in `<workdir>_fold<k>` with `configs/...:fold=k` (after the config's other arguments); a fold whose run is complete is only collected
(the trainer resumes, finds no step left to train and only evaluates the last checkpoint). Per fold the table shows the epoch
with the best test metric, the protocol of every public DFER repository (refs.md §6.12), then the mean; runs with a
validation hold-out (config.validation) add the table of the checkpoints selected on it. `{fold}` in
the extra flags becomes each fold's number. With `--gpus 0,1,2,3,4` the folds train at once, one per GPU, each
writing its output to <workdir>_fold<k>/run_folds.log; the table follows when all are done.
"""
import argparse
import collections
import os
import signal
import subprocess
import sys
import time


def fold_command(config: str, fold: int, workdir: str, overrides: list[str]) -> list[str]:
  """dferjax.main's command line for one fold; `{fold}` in an override becomes the fold number (AEN's guides:
  --config.init_from.guide=runs/aen_frame_dfew_fold{fold})."""
  config_arg = f'{config},fold={fold}' if ':' in config else f'{config}:fold={fold}'
  return [sys.executable, '-m', 'dferjax.main', f'--config={config_arg}', f'--workdir={workdir}',
          *(override.replace('{fold}', str(fold)) for override in overrides)]


def run_fold(command: list[str]) -> int:
  """Runs one fold's trainer and returns its exit status. A SIGTERM to this script (Kubernetes signals only a
  container's first process) is passed on, so the fold saves its step and stops (status 143) as it would alone;
  Ctrl-C reaches the fold from the terminal by itself."""
  process = subprocess.Popen(command)
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signal.SIGTERM))
  try:
    while True:
      try:
        return process.wait()
      except KeyboardInterrupt:  # the fold got it too: wait for it to stop and say where
        continue
  finally:
    signal.signal(signal.SIGTERM, previous)


def last_line(path: str) -> str:
  with open(path, errors='replace') as file:
    lines = [line.strip() for line in file.read().splitlines()[-20:] if line.strip()]
  return lines[-1] if lines else '(no output)'


def run_in_parallel(folds: list[int], workdirs: list[str], commands: list[list[str]], gpus: list[str]) -> int:
  """Each fold on one GPU of `gpus` (CUDA_VISIBLE_DEVICES), as many folds at once as `gpus` has entries: a GPU
  listed k times runs k folds, each held to 0.9 / k of its memory (XLA_PYTHON_CLIENT_MEM_FRACTION, unless set).
  A fold's output goes to <workdir>/run_folds.log. A fold that fails leaves the others running; SIGTERM and Ctrl-C
  reach the running folds (each saves or names its checkpoint) and start no more. Returns 0, or the status to
  exit with."""
  shares = collections.Counter(gpus)
  free, pending, running, failed = list(gpus), list(zip(folds, workdirs, commands)), [], []
  stop = {'status': 0}

  def on_sigterm(signum, frame):
    del frame
    stop['status'] = 128 + signum
    for _, _, process, _ in running:
      process.send_signal(signal.SIGTERM)

  previous = signal.signal(signal.SIGTERM, on_sigterm)
  try:
    while pending or running:
      while pending and free and not stop['status']:
        (fold, workdir, command), gpu = pending.pop(0), free.pop(0)
        os.makedirs(workdir, exist_ok=True)
        log_path = os.path.join(workdir, 'run_folds.log')
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu)
        if shares[gpu] > 1:
          env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', f'{0.9 / shares[gpu]:.2f}')
        with open(log_path, 'a') as log:  # a resumed fold's output follows its earlier one
          running.append((fold, gpu, subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT),
                          log_path))
        print(f'fold {fold}: started on GPU {gpu}, output in {log_path}', flush=True)
      try:
        time.sleep(0.5)
      except KeyboardInterrupt:  # the folds got it too, from the terminal: wait for them to stop
        stop['status'] = stop['status'] or 130
      for entry in [entry for entry in running if entry[2].poll() is not None]:
        fold, gpu, process, log_path = entry
        running.remove(entry)
        free.append(gpu)
        print(f'fold {fold}: {"done" if process.returncode == 0 else f"stopped (exit status {process.returncode})"}'
              f': {last_line(log_path)}', flush=True)
        if process.returncode != 0:
          failed.append((fold, process.returncode))
  finally:
    signal.signal(signal.SIGTERM, previous)
  not_started = [fold for fold, _, _ in pending]
  if failed or not_started:
    sys.stderr.write(f'run_folds: fold(s) {", ".join(str(fold) for fold, _ in failed) or "none"} stopped'
                     f'{f", fold(s) {not_started} not started" if not_started else ""}. Run the same command to resume '
                     'them (finished folds are only collected).\n')
  return stop['status'] or (failed[0][1] if failed else 0)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True,
                      help='a config that takes fold=k, e.g. configs/stt_dfew.py (or with arguments: ...py:oversample)')
  parser.add_argument('--workdir', required=True, help='prefix: fold k runs in <workdir>_fold<k>')
  parser.add_argument('--folds', default='1,2,3,4,5')
  parser.add_argument('--collect_only', action='store_true', help='do not train; only print the table')
  parser.add_argument('--select_by', default='war', choices=['war', 'uar'])
  parser.add_argument('--gpus', default='', help='e.g. 0,1,2,3,4: the folds at once, each on its GPU (a GPU listed '
                      'twice runs two folds with 0.45 of its memory each); default: one after another, on every GPU')
  parser.add_argument('overrides', nargs='*', help='extra flags for dferjax.main, after --')
  args = parser.parse_args()
  folds = [int(k) for k in args.folds.split(',')]
  workdirs = [f'{args.workdir}_fold{k}' for k in folds]
  if not args.collect_only and args.gpus:
    commands = [fold_command(args.config, fold, workdir, args.overrides) for fold, workdir in zip(folds, workdirs)]
    if status := run_in_parallel(folds, workdirs, commands, [gpu.strip() for gpu in args.gpus.split(',')]):
      sys.exit(status)
  elif not args.collect_only:
    for fold, workdir in zip(folds, workdirs):
      command = fold_command(args.config, fold, workdir, args.overrides)
      print('+', ' '.join(command), flush=True)
      if (status := run_fold(command)) != 0:  # the fold said why (one line); the same command resumes it
        sys.stderr.write(f'run_folds: fold {fold} stopped (exit status {status}); folds after it not started. Run the '
                         'same command to resume it and go on (finished folds are only collected).\n')
        sys.exit(status)
  from dferjax import reports  # pylint: disable=import-outside-toplevel
  from tfds_builders.labels import CLASS_NAMES  # pylint: disable=import-outside-toplevel
  print(reports.fold_report(workdirs, CLASS_NAMES, select_by=args.select_by,
                            fold_names=[f'fold{k}' for k in folds]))  # fold k is <workdir>_fold<k>, wherever listed


if __name__ == '__main__':
  main()
