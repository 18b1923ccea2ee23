"""Reports from finished runs: the papers' fold tables and best-epoch selection from `workdir/metrics.jsonl`.

Metric records come from `writers` (format there); the PNG plots live in `plots`.
"""
from collections.abc import Mapping, Sequence
import json
import math
import os
import pathlib
import re

import numpy as np

from dferjax import writers


def _check_rows(results: Mapping[str, Mapping], class_names: Sequence[str]) -> None:
  if not results:
    raise ValueError('no fold results given')
  for name, result in results.items():
    if missing := [key for key in ('uar', 'war', 'per_class') if key not in result]:
      raise ValueError(f'results for {name!r} lack {missing}')
    if missing := [class_name for class_name in class_names if class_name not in result['per_class']]:
      raise ValueError(f"results for {name!r}: per_class lacks {missing} (has {sorted(result['per_class'])})")


def head_names(results: Mapping[str, Mapping]) -> list[str]:
  """The metric heads (nested {'uar', 'war', ...} results, e.g. EST's 'order') that every row has."""
  rows = list(results.values())
  return [name for name, value in rows[0].items()
          if writers.is_head_result(value) and all(writers.is_head_result(row.get(name)) for row in rows)]


def _per_fold_columns(results: Mapping[str, Mapping], class_names: Sequence[str]) -> dict[str, np.ndarray]:
  """{'per_class/<name>', 'uar', 'war', '<head>/uar', '<head>/war'} -> float64 [folds]; None -> nan."""
  _check_rows(results, class_names)
  as_float = lambda value: math.nan if value is None else float(value)
  columns = {f'per_class/{name}': np.array([as_float(r['per_class'][name]) for r in results.values()])
             for name in class_names}
  columns.update({key: np.array([as_float(r[key]) for r in results.values()]) for key in ('uar', 'war')})
  for head in head_names(results):
    columns.update({f'{head}/{key}': np.array([as_float(r[head][key]) for r in results.values()])
                    for key in ('uar', 'war')})
  return columns


def _reduce_folds(results, class_names, reduce) -> dict:
  class_names = list(class_names) if class_names is not None else list(next(iter(results.values()))['per_class'])
  columns = _per_fold_columns(results, class_names)
  # nan-aware: a fold whose class had no clips (allow_empty) does not count for that class.
  reduced = {key: float(reduce(values[~np.isnan(values)])) if (~np.isnan(values)).any() else math.nan
             for key, values in columns.items()}
  heads = {head: {key: reduced[f'{head}/{key}'] for key in ('uar', 'war')} for head in head_names(results)}
  return {'uar': reduced['uar'], 'war': reduced['war'],
          'per_class': {name: reduced[f'per_class/{name}'] for name in class_names}, **heads}


def fold_mean(results: Mapping[str, Mapping], class_names: Sequence[str] | None = None) -> dict:
  """Mean over folds of UAR, WAR and per-class recall: the papers' "5-fold mean" (not pooled clips).

  `results`: fold name -> {'uar', 'war', 'per_class': {name: recall}} (fractions), e.g. from
  `collect_fold_results`. Returns the same layout.
  """
  return _reduce_folds(results, class_names, np.mean)


def fold_std(results: Mapping[str, Mapping], class_names: Sequence[str] | None = None) -> dict:
  """Population standard deviation (ddof=0) over folds, in `fold_mean`'s layout."""
  return _reduce_folds(results, class_names, np.std)


def format_results_table(rows: Mapping[str, Mapping], class_names: Sequence[str], *, with_mean: bool = True,
                         digits: int = 2) -> str:
  """A Markdown table in the papers' layout: per-class accuracy (= recall), UAR, WAR in %, one row per fold.

  `rows`: row name (fold1..fold5) -> {'uar', 'war', 'per_class'} as fractions. With `with_mean`, 'mean' and
  'std' rows over the given rows follow. Columns keep `class_names`' order (canonical: happy, sad, neutral,
  angry, surprise, disgust, fear, as in the papers' tables). A model's metric heads that every row has (nested
  {'uar', 'war'} results) add '<head> UAR' and '<head> WAR' columns.
  """
  columns = _per_fold_columns(rows, class_names)
  heads = head_names(rows)
  head_keys = [f'{head}/{key}' for head in heads for key in ('uar', 'war')]
  table = [[name, *(columns[f'per_class/{c}'][i] for c in class_names), columns['uar'][i], columns['war'][i],
            *(columns[key][i] for key in head_keys)] for i, name in enumerate(rows)]
  if with_mean:
    for name, reduced in (('mean', fold_mean(rows, class_names)), ('std', fold_std(rows, class_names))):
      table.append([name, *(reduced['per_class'][c] for c in class_names), reduced['uar'], reduced['war'],
                    *(reduced[head][key] for head in heads for key in ('uar', 'war'))])
  header = ['', *class_names, 'UAR', 'WAR', *(f'{head} {key.upper()}' for head in heads for key in ('uar', 'war'))]
  cells = [[row[0], *('-' if math.isnan(value) else f'{100 * value:.{digits}f}' for value in row[1:])]
           for row in table]
  widths = [max(len(str(line[column])) for line in [header, *cells]) for column in range(len(header))]
  format_line = lambda line: '| ' + ' | '.join(
      str(cell).ljust(width) if column == 0 else str(cell).rjust(width)
      for column, (cell, width) in enumerate(zip(line, widths))) + ' |'
  separator = '|' + '|'.join('-' * (width + 1) + (':' if column else '-')
                             for column, width in enumerate(widths)) + '|'
  return '\n'.join([format_line(header), separator, *map(format_line, cells)])


DFEW_FOLDS = (1, 2, 3, 4, 5)


def run_fold(workdir: str | os.PathLike) -> int | None:
  """The fold a run trained on, from its `config.json` (`dataset.name` 'dfew/fold3_px112' -> 3); None if none."""
  path = pathlib.Path(workdir) / 'config.json'
  if not path.is_file():
    raise FileNotFoundError(f'{path} does not exist: is {str(workdir)!r} a dferjax workdir?')
  name = json.loads(path.read_text()).get('dataset', {}).get('name', '')
  match = re.search(r'/fold(\d+)', name)
  return int(match[1]) if match else None


def fold_names_from_configs(workdirs: Sequence[str | os.PathLike], folds: Sequence[int] = DFEW_FOLDS) -> list[str]:
  """'fold<k>' of each run, read from its config rather than its position, so a run can only stand for its own
  fold; fails naming the runs without a fold, the folds given twice and the folds of `folds` that are missing."""
  found = {str(workdir): run_fold(workdir) for workdir in workdirs}
  problems = [f'{workdir}: its config.dataset.name names no fold' for workdir, fold in found.items() if fold is None]
  for fold in sorted({fold for fold in found.values() if fold is not None}):
    if len(runs := [workdir for workdir, other in found.items() if other == fold]) > 1:
      problems.append(f'fold {fold} is given twice: {", ".join(runs)}')
  if missing := sorted(set(folds) - set(found.values())):
    problems.append(f'fold(s) {", ".join(map(str, missing))} missing: no run of them among the workdirs')
  if extra := sorted({fold for fold in found.values() if fold is not None} - set(folds)):
    problems.append(f'fold(s) {", ".join(map(str, extra))} are not among the expected folds {list(folds)}')
  if problems:
    raise ValueError('the fold runs do not make one table:\n  ' + '\n  '.join(problems))
  return [f'fold{fold}' for fold in found.values()]


def collect_fold_results(workdirs: Sequence[str | os.PathLike], metric: str = 'best', select_by: str = 'war', *,
                         split: str = 'test', fold_names: Sequence[str] | None = None) -> dict[str, dict]:
  """Reads each fold's `metrics.jsonl` and picks one eval record per fold.

  metric='best' takes, per fold, the epoch with the highest `select_by` ('war' or 'uar') on `split`, the
  earliest on ties. That is selection on the test fold: DFEW's folds have no validation split, the public
  DFER code we read keeps the best test epoch and the papers say nothing else (refs.md §6, item 12), so
  this is what reproduces "paper numbers"; it is optimistic. metric='last' takes the final evaluation,
  the number without selection on test.

  Returns fold name (`fold_names`, default fold1..foldN in `workdirs` order) -> {'uar', 'war',
  'per_class' (None -> nan), 'confusion' int64 [C, C], 'num_clips', 'epoch', 'step', 'workdir', and each metric
  head's nested result under its name}.
  Raises FileNotFoundError listing every workdir without results.
  """
  if metric not in ('best', 'last'):
    raise ValueError(f"metric must be 'best' or 'last', got {metric!r}")
  if select_by not in ('war', 'uar'):
    raise ValueError(f"select_by must be 'war' or 'uar', got {select_by!r}")
  fold_names = list(fold_names) if fold_names is not None else [f'fold{i + 1}' for i in range(len(workdirs))]
  if len(fold_names) != len(workdirs):
    raise ValueError(f'{len(fold_names)} fold_names for {len(workdirs)} workdirs')
  results, problems = {}, []
  for fold_name, workdir in zip(fold_names, workdirs):
    path = pathlib.Path(workdir) / writers.METRICS_FILENAME
    if not path.is_file():
      problems.append(f'{fold_name} ({workdir}): no {writers.METRICS_FILENAME}')
      continue
    evals = [record for record in writers.read_records(path, split) if record.get(select_by) is not None]
    if not evals:
      problems.append(f"{fold_name} ({workdir}): {path.name} has no '{split}' eval records")
      continue
    chosen = max(evals, key=lambda record: record[select_by]) if metric == 'best' else evals[-1]
    results[fold_name] = {
        'uar': chosen['uar'], 'war': chosen['war'],
        'per_class': {name: math.nan if recall is None else recall for name, recall in chosen['per_class'].items()},
        'confusion': np.asarray(chosen['confusion'], np.int64), 'num_clips': chosen['num_clips'],
        'epoch': chosen['epoch'], 'step': chosen['step'], 'workdir': str(workdir),
        **{head: chosen[head] for head in head_names({fold_name: chosen})},
    }
  if problems:
    raise FileNotFoundError('fold workdirs without results:\n  ' + '\n  '.join(problems))
  return results
