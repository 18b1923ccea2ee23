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
the extra flags becomes each fold's number.
"""
import argparse
import signal
import subprocess
import sys


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


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True,
                      help='a config that takes fold=k, e.g. configs/stt_dfew.py (or with arguments: ...py:oversample)')
  parser.add_argument('--workdir', required=True, help='prefix: fold k runs in <workdir>_fold<k>')
  parser.add_argument('--folds', default='1,2,3,4,5')
  parser.add_argument('--collect_only', action='store_true', help='do not train; only print the table')
  parser.add_argument('--select_by', default='war', choices=['war', 'uar'])
  parser.add_argument('overrides', nargs='*', help='extra flags for dferjax.main, after --')
  args = parser.parse_args()
  folds = [int(k) for k in args.folds.split(',')]
  workdirs = [f'{args.workdir}_fold{k}' for k in folds]
  if not args.collect_only:
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
