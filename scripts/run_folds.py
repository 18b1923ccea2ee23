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


def last_line(path: str) -> str:
  with open(path, errors='replace') as file:
    lines = [line.strip() for line in file.read().splitlines()[-20:] if line.strip()]
  return lines[-1] if lines else '(no output)'


def run_folds(folds: list, workdirs: list[str], commands: list[list[str]], gpus: list[str] | None,
              noun: str = 'fold') -> int:
  """Trains the folds (or, for scripts/sweep.py, the runs named `folds`, each called a `noun` in the messages) and
  returns 0, or the status to exit with.

  gpus None: one fold after another, its output here, on every device. gpus ['0', '1', ...]: each fold on one GPU
  (CUDA_VISIBLE_DEVICES), as many at once as `gpus` has entries; a GPU listed k times runs k folds, each held to
  0.9 / k of its memory (XLA_PYTHON_CLIENT_MEM_FRACTION, unless set); a fold's output goes to
  <workdir>/run_folds.log. After a fold fails no other starts (the running ones finish). SIGTERM is passed on to
  the running folds (Kubernetes signals only a container's first process), Ctrl-C reaches them from the terminal:
  each saves or names its checkpoint, and no other starts.
  """
  slots = list(gpus) if gpus else [None]
  shares = collections.Counter(slots)
  pending, running, failed = list(zip(folds, workdirs, commands)), [], []
  stop = {'status': 0}

  def on_sigterm(signum, frame):
    del frame
    stop['status'] = 128 + signum
    for _, _, process, _ in running:
      process.send_signal(signal.SIGTERM)

  previous = signal.signal(signal.SIGTERM, on_sigterm)
  try:
    while running or (pending and not stop['status'] and not failed):
      while pending and slots and not stop['status'] and not failed:
        (fold, workdir, command), gpu = pending.pop(0), slots.pop(0)
        env, log_path, output = None, None, None
        if gpu is not None:
          os.makedirs(workdir, exist_ok=True)
          log_path = os.path.join(workdir, 'run_folds.log')
          env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu)
          if shares[gpu] > 1:
            env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', f'{0.9 / shares[gpu]:.2f}')
          output = open(log_path, 'a')  # pylint: disable=consider-using-with  # a resumed fold's output follows
        print(f'{noun} {fold}: started' + (f' on GPU {gpu}, output in {log_path}' if gpu is not None else '') + ': '
              + ' '.join(command), flush=True)
        try:
          process = subprocess.Popen(command, env=env, stdout=output,
                                     stderr=None if output is None else subprocess.STDOUT)
        finally:
          if output is not None:
            output.close()
        running.append((fold, gpu, process, log_path))
        if stop['status']:  # a SIGTERM while it started
          process.send_signal(signal.SIGTERM)
      try:
        time.sleep(0.5)
      except KeyboardInterrupt:
        stop['status'] = stop['status'] or 130
      for entry in [entry for entry in running if entry[2].poll() is not None]:
        fold, gpu, process, log_path = entry
        running.remove(entry)
        slots.append(gpu)
        ending = 'done' if process.returncode == 0 else f'stopped (exit status {process.returncode})'
        print(f'{noun} {fold}: {ending}' + (f': {last_line(log_path)}' if log_path else ''), flush=True)
        if process.returncode != 0:
          failed.append((fold, process.returncode))
  finally:
    signal.signal(signal.SIGTERM, previous)
  if failed or pending:
    stopped = ', '.join(str(fold) for fold, _ in failed) or 'none'
    not_started = f', {noun}(s) {", ".join(str(fold) for fold, _, _ in pending)} not started' if pending else ''
    script = os.path.splitext(os.path.basename(sys.argv[0]))[0]
    sys.stderr.write(f'{script}: {noun}(s) {stopped} stopped{not_started}. Run the same command to resume '
                     f'(finished {noun}s are only collected).\n')
  return stop['status'] or (failed[0][1] if failed else 0)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True,
                      help='a config that takes fold=k, e.g. configs/stt_dfew.py (or with arguments: ...py:oversample)')
  parser.add_argument('--workdir', required=True, help='prefix: fold k runs in <workdir>_fold<k>')
  parser.add_argument('--folds', default='1,2,3,4,5')
  parser.add_argument('--collect_only', action='store_true', help='do not train; only print the table')
  parser.add_argument('--select_by', default='war', choices=['war', 'uar'])
  parser.add_argument('--latex', action='store_true', help='the tables as LaTeX (booktabs) tabulars')
  parser.add_argument('--gpus', default='', help='e.g. 0,1,2,3,4: the folds at once, each on its GPU (a GPU listed '
                      'twice runs two folds with 0.45 of its memory each); default: one after another, on every GPU')
  parser.add_argument('overrides', nargs='*', help='extra flags for dferjax.main, after --')
  args = parser.parse_args()
  folds = [int(k) for k in args.folds.split(',')]
  workdirs = [f'{args.workdir}_fold{k}' for k in folds]
  if not args.collect_only:
    commands = [fold_command(args.config, fold, workdir, args.overrides) for fold, workdir in zip(folds, workdirs)]
    gpus = [gpu.strip() for gpu in args.gpus.split(',')] if args.gpus else None
    if status := run_folds(folds, workdirs, commands, gpus):
      sys.exit(status)
  from dferjax import reports  # pylint: disable=import-outside-toplevel
  print(reports.fold_report(workdirs, reports.class_names_of(workdirs), select_by=args.select_by,
                            fold_names=[f'fold{k}' for k in folds],  # fold k is <workdir>_fold<k>, wherever listed
                            latex=args.latex))


if __name__ == '__main__':
  main()
