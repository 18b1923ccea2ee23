"""Trains one recipe at every combination of a few config values and prints the runs side by side, the
combination chosen on the validation hold-out marked, so that the test split picks nothing.

    python scripts/sweep.py --config configs/stt_ferv39k.py --workdir runs/stt_ferv39k_lr \
        --grid optimizer.learning_rate=0.01,0.003,0.001 --grid optimizer.weight_decay=0,1e-4 \
        [--gpus 0,1,2,3] [--collect_only] [--select_by uar] \
        -- --config.validation.fraction=0.1 --config.init_from.backbone=weights/resnet18_ms1m

Each combination trains in <workdir>/<field>=<value>,... (e.g. runs/stt_ferv39k_lr/optimizer.learning_rate=0.003,
optimizer.weight_decay=0.0001) with `--config.<field>=<value>` after the flags given after `--`; the same
command resumes the unfinished ones and only collects the finished. With `--gpus` the runs train at once, one
per listed GPU, each writing its output to <its workdir>/run_folds.log (scripts/run_folds.py's runner).

The table gives per combination the checkpoint selected on the hold-out (config.validation: its hold-out and
test UAR/WAR and epoch) and, apart, the best test epoch (the papers' protocol). The combination marked `*` has
the best hold-out `--select_by`; its test numbers are the ones to report. Without a hold-out the table says
that choosing among the rows by their test numbers selects on test.
"""
import argparse
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_folds  # noqa: E402  pylint: disable=wrong-import-position


def parse_grid(grid: list[str]) -> list[tuple[str, list[str]]]:
  """['optimizer.learning_rate=0.01,0.001', ...] -> [('optimizer.learning_rate', ['0.01', '0.001']), ...]."""
  axes, seen = [], set()
  for spec in grid:
    field, sep, values = spec.partition('=')
    field = field.strip().removeprefix('config.')
    listed = [value.strip() for value in values.split(',')]
    if not sep or not field or not all(listed):
      raise ValueError(f'--grid {spec!r}: expected <config field>=<value>,<value>,... (e.g. '
                       'optimizer.learning_rate=0.01,0.001)')
    if field in seen:
      raise ValueError(f'--grid names {field} twice: give all its values in one --grid')
    if len(set(listed)) < len(listed):
      raise ValueError(f'--grid {spec!r} lists a value twice')
    seen.add(field)
    axes.append((field, listed))
  if not axes:
    raise ValueError('give at least one --grid <config field>=<value>,<value>,...')
  return axes


def combinations(axes: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
  """Every combination, the last axis varying fastest: [{field: value, ...}, ...]."""
  fields = [field for field, _ in axes]
  return [dict(zip(fields, values)) for values in itertools.product(*(values for _, values in axes))]


def run_name(combination: dict[str, str]) -> str:
  """'optimizer.learning_rate=0.003,optimizer.weight_decay=0.0001': the combination's workdir name."""
  name = ','.join(f'{field}={value}' for field, value in combination.items())
  if '/' in name or name.startswith('.'):
    raise ValueError(f'--grid values may not contain "/" or start the name with "." (a folder name): {name!r}')
  return name


def run_command(config: str, workdir: str, combination: dict[str, str], overrides: list[str]) -> list[str]:
  """dferjax.main's command line for one combination: the shared flags, then the combination's."""
  return [sys.executable, '-m', 'dferjax.main', f'--config={config}', f'--workdir={workdir}', *overrides,
          *(f'--config.{field}={value}' for field, value in combination.items())]


def _percent(value) -> str:
  return '-' if value is None else f'{100 * value:.2f}'


def sweep_table(workdirs: dict[str, str], select_by: str = 'war', latex: bool = False) -> str:
  """The runs side by side (module docstring): a Markdown table (`latex`: a booktabs tabular, the other lines as
  comments), then which combination the hold-out chose."""
  from dferjax import reports  # pylint: disable=import-outside-toplevel
  rows, problems = [], []
  for name, workdir in workdirs.items():
    config_path = os.path.join(workdir, 'config.json')
    if not os.path.isfile(os.path.join(workdir, 'metrics.jsonl')) or not os.path.isfile(config_path):
      problems.append(f'{name}: no results in {workdir}')
      continue
    with open(config_path) as f:
      split = json.load(f)['dataset']['eval_split']
    both = reports.protocols(workdir, select_by, split)
    rows.append((name, split, both['validation'], both['papers']))
  if problems:
    raise FileNotFoundError('runs without results (train them: the same command without --collect_only):\n  '
                            + '\n  '.join(problems))
  with_holdout = [row for row in rows if row[2] is not None]
  header = ['combination', 'hold-out UAR', 'hold-out WAR', 'test UAR', 'test WAR', 'epoch', 'best test UAR',
            'best test WAR', 'best epoch']
  chosen = max(with_holdout, key=lambda row: row[2]['selected_on'][select_by])[0] if with_holdout else None
  cells = []
  for name, _, selected, best in rows:
    selected = selected or {}
    on_holdout = selected.get('selected_on', {})
    cells.append([('* ' if name == chosen else '') + name, _percent(on_holdout.get('uar')),
                  _percent(on_holdout.get('war')), _percent(selected.get('uar')), _percent(selected.get('war')),
                  str(selected.get('epoch', '-')), _percent(best and best['uar']), _percent(best and best['war']),
                  str(best['epoch'] if best else '-')])
  lines = [f'{len(rows)} runs; test = each run\'s evaluation split ({", ".join(sorted({row[1] for row in rows}))})',
           reports.latex_tabular(header, cells) if latex else reports.markdown_table(header, cells)]
  if chosen:
    lines.append(f'* chosen on the hold-out ({select_by.upper()}): {chosen}; report its test UAR/WAR. The best test '
                 'columns select on test (the papers\' protocol) and are optimistic.')
  else:
    lines.append('No run has a validation hold-out, so choosing among these rows by their test numbers selects on '
                 'test: add --config.validation.fraction=0.1 after -- (and rerun in new workdirs).')
  return reports.latex_comments('\n'.join(lines)) if latex else '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True, help='a config file, with its arguments if any')
  parser.add_argument('--workdir', required=True, help='each combination runs in <workdir>/<field>=<value>,...')
  parser.add_argument('--grid', action='append', default=[], help='<config field>=<value>,<value>,...; repeat for '
                      'more fields (every combination of their values runs)')
  parser.add_argument('--collect_only', action='store_true', help='do not train; only print the table')
  parser.add_argument('--select_by', default='war', choices=['war', 'uar'])
  parser.add_argument('--latex', action='store_true', help='the table as a LaTeX (booktabs) tabular')
  parser.add_argument('--gpus', default='', help='e.g. 0,1,2,3: the runs at once, each on its GPU; default: one '
                      'after another, on every GPU')
  parser.add_argument('overrides', nargs='*', help='flags for every run of dferjax.main, after --')
  args = parser.parse_args(argv)
  try:
    runs = {run_name(combination): combination for combination in combinations(parse_grid(args.grid))}
  except ValueError as error:
    parser.exit(1, f'error: {error}\n')
  workdirs = {name: os.path.join(args.workdir, name) for name in runs}
  if not args.collect_only:
    commands = [run_command(args.config, workdirs[name], combination, args.overrides)
                for name, combination in runs.items()]
    gpus = [gpu.strip() for gpu in args.gpus.split(',')] if args.gpus else None
    if status := run_folds.run_folds(list(runs), list(workdirs.values()), commands, gpus, noun='run'):
      sys.exit(status)
  try:
    print(sweep_table(workdirs, args.select_by, args.latex))
  except FileNotFoundError as error:
    parser.exit(1, f'error: {error}\n')


if __name__ == '__main__':
  main()
