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

from dferjax import configlib, writers
from tfds_builders.labels import CLASS_NAMES


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
                         digits: int = 2, extra_columns: Mapping[str, Sequence[str]] | None = None,
                         latex: bool = False) -> str:
  """A Markdown table in the papers' layout: per-class accuracy (= recall), UAR, WAR in %, one row per fold
  (`latex`: the same cells as a booktabs `tabular`, for a paper).

  `rows`: row name (fold1..fold5) -> {'uar', 'war', 'per_class'} as fractions. With `with_mean`, 'mean' and
  'std' rows over the given rows follow. Columns keep `class_names`' order (canonical: happy, sad, neutral,
  angry, surprise, disgust, fear, as in the papers' tables). A model's metric heads that every row has (nested
  {'uar', 'war'} results) add '<head> UAR' and '<head> WAR' columns. `extra_columns` (title -> one text per
  row, e.g. the seeds) come last, blank in the mean and std rows.
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
  for title, texts in (extra_columns or {}).items():
    header.append(title)
    for i, line in enumerate(cells):
      line.append(str(texts[i]) if i < len(rows) else '')
  if latex:
    return latex_tabular(header, cells, rule_before=len(rows) if with_mean else None)
  return markdown_table(header, cells)


def markdown_table(header: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
  """A Markdown table, its columns padded to one width: the first left-aligned, the others right."""
  widths = [max(len(str(line[column])) for line in [header, *cells]) for column in range(len(header))]
  format_line = lambda line: '| ' + ' | '.join(
      str(cell).ljust(width) if column == 0 else str(cell).rjust(width)
      for column, (cell, width) in enumerate(zip(line, widths))) + ' |'
  separator = '|' + '|'.join('-' * (width + 1) + (':' if column else '-')
                             for column, width in enumerate(widths)) + '|'
  return '\n'.join([format_line(header), separator, *map(format_line, cells)])


_LATEX_SPECIAL = {'\\': r'\textbackslash{}', '&': r'\&', '%': r'\%', '$': r'\$', '#': r'\#', '_': r'\_',
                  '{': r'\{', '}': r'\}', '~': r'\textasciitilde{}', '^': r'\textasciicircum{}'}


def latex_escape(text: str) -> str:
  """`text` as LaTeX typesets it literally (a run name's underscores, '95 %')."""
  return ''.join(_LATEX_SPECIAL.get(character, character) for character in str(text))


def latex_tabular(header: Sequence[str], cells: Sequence[Sequence[str]], rule_before: int | None = None) -> str:
  """A booktabs `tabular` of the header and rows: the first column left-aligned, the others right; a midrule
  before row `rule_before` (the mean and std under the folds)."""
  line = lambda row: ' & '.join(latex_escape(cell) for cell in row) + r' \\'
  body = [line(row) for row in cells]
  if rule_before is not None and 0 < rule_before < len(body):
    body.insert(rule_before, r'\midrule')
  return '\n'.join([r'\begin{tabular}{l' + 'r' * (len(header) - 1) + '}', r'\toprule', line(header), r'\midrule',
                    *body, r'\bottomrule', r'\end{tabular}'])


def latex_comments(text: str) -> str:
  """Every line of `text` that is not part of a tabular (nor a comment already) as a LaTeX comment, so the whole
  output pastes."""
  inside, lines = False, []
  for line in text.splitlines():
    inside = inside or line.startswith(r'\begin{tabular}')
    lines.append(line if inside or not line.strip() or line.startswith('%') else f'% {line}')
    inside = inside and not line.startswith(r'\end{tabular}')
  return '\n'.join(lines)


DFEW_FOLDS = (1, 2, 3, 4, 5)


def run_fold(workdir: str | os.PathLike) -> int | None:
  """The fold a run trained on, from its `config.json` (`dataset.name` 'dfew/fold3_px112' -> 3, or a clip list's
  `dataset.fold`); None if none."""
  path = pathlib.Path(workdir) / 'config.json'
  if not path.is_file():
    raise FileNotFoundError(f'{path} does not exist: is {str(workdir)!r} a dferjax workdir?')
  dataset = json.loads(path.read_text()).get('dataset', {})
  if dataset.get('fold'):
    return int(dataset['fold'])
  match = re.search(r'/fold(\d+)', dataset.get('name', ''))
  return int(match[1]) if match else None


def class_names_of(workdirs: Sequence[str | os.PathLike]) -> tuple[str, ...]:
  """The class names the runs were trained with (`config.class_names`: DFEW's seven unless a clip list named
  others); fails when the runs differ."""
  found = {}
  for workdir in workdirs:
    path = pathlib.Path(workdir) / 'config.json'
    if not path.is_file():
      raise FileNotFoundError(f'{path} does not exist: is {str(workdir)!r} a dferjax workdir?')
    found[str(workdir)] = tuple(json.loads(path.read_text()).get('class_names', CLASS_NAMES))
  if len(set(found.values())) > 1:
    raise ValueError('the runs were trained with different classes: '
                     + '; '.join(f'{workdir}: {names}' for workdir, names in found.items()))
  return next(iter(found.values()))


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


HELDOUT_SPLIT = 'heldout'  # dferjax.data.validation.SPLIT (no tfds import here)
PROTOCOLS = {'papers': "best epoch on test (papers' protocol)", 'validation': 'selected on validation'}


def select_record(records: Sequence[Mapping], metric: str, select_by: str, split: str) -> Mapping | None:
  """One eval record of `split` from a run's records, or None if there is none to choose.

  metric='best': the highest `select_by` on `split` itself, the earliest on ties (the papers' protocol).
  metric='last': the final evaluation of `split`. metric='selected': the `split` evaluation of the checkpoint
  with the highest `select_by` on the validation hold-out, the latest on ties (the honest protocol: test decides
  nothing).
  """
  evals = [r for r in records if r.get('split') == split and r.get(select_by) is not None]
  if metric == 'best':
    return max(evals, key=lambda record: record[select_by]) if evals else None
  if metric == 'last':
    return evals[-1] if evals else None
  heldout = [r for r in records if r.get('split') == HELDOUT_SPLIT and r.get(select_by) is not None]
  if not heldout:
    return None
  chosen = max(reversed(heldout), key=lambda record: record[select_by])  # the latest on ties, as Orbax's BestN keeps
  at_step = [r for r in evals if r['step'] == chosen['step']]
  if not at_step:
    raise ValueError(f"no '{split}' evaluation at step {chosen['step']}, the checkpoint selected on the hold-out")
  return {**at_step[-1], 'selected_on': {key: chosen[key] for key in ('uar', 'war')}}


def _run_config(workdir) -> dict:
  path = pathlib.Path(workdir) / 'config.json'
  return json.loads(path.read_text()) if path.is_file() else {}


def run_seeds(workdir) -> dict:
  """{'seed', 'validation_fraction', 'validation_seed'} of a run, from its config.json (the fold table's columns)."""
  config = _run_config(workdir)
  held = config.get('validation') or {}
  return {'seed': config.get('seed'), 'validation_fraction': held.get('fraction', 0.0),
          'validation_seed': held.get('seed')}


def collect_fold_results(workdirs: Sequence[str | os.PathLike], metric: str = 'best', select_by: str = 'war', *,
                         split: str = 'test', fold_names: Sequence[str] | None = None) -> dict[str, dict]:
  """Reads each fold's `metrics.jsonl` and picks one eval record per fold.

  metric='best' takes, per fold, the epoch with the highest `select_by` ('war' or 'uar') on `split`, the
  earliest on ties. That is selection on the test fold: DFEW's folds have no validation split, the public
  DFER code we read keeps the best test epoch and the papers say nothing else (refs.md §6, item 12), so
  this is what reproduces "paper numbers"; it is optimistic. metric='last' takes the final evaluation,
  the number without selection on test. metric='selected' takes the `split` evaluation of the epoch best on
  the run's validation hold-out (config.validation; dferjax/data/validation.py), the honest protocol.

  Returns fold name (`fold_names`, default fold1..foldN in `workdirs` order) -> {'uar', 'war',
  'per_class' (None -> nan), 'confusion' int64 [C, C], 'num_clips', 'epoch', 'step', 'workdir', the run's
  seeds (`run_seeds`), and each metric head's nested result under its name}.
  Raises FileNotFoundError listing every workdir without results.
  """
  if metric not in ('best', 'last', 'selected'):
    raise ValueError(f"metric must be 'best', 'last' or 'selected', got {metric!r}")
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
    chosen = select_record(writers.read_records(path), metric, select_by, split)
    if chosen is None:
      problems.append(f"{fold_name} ({workdir}): {path.name} has no '{split}' eval records" if metric != 'selected'
                      else f'{fold_name} ({workdir}): no validation hold-out records (config.validation.fraction=0)')
      continue
    results[fold_name] = {
        'uar': chosen['uar'], 'war': chosen['war'],
        'per_class': {name: math.nan if recall is None else recall for name, recall in chosen['per_class'].items()},
        'confusion': np.asarray(chosen['confusion'], np.int64), 'num_clips': chosen['num_clips'],
        'epoch': chosen['epoch'], 'step': chosen['step'], 'workdir': str(workdir), **run_seeds(workdir),
        **{head: chosen[head] for head in head_names({fold_name: chosen})},
    }
  if problems:
    raise FileNotFoundError('fold workdirs without results:\n  ' + '\n  '.join(problems))
  return results


def _summary(record: Mapping) -> dict:
  keys = [key for key in ('uar', 'war', 'per_class', 'epoch', 'step', 'selected_on') if key in record]
  return {**{key: record[key] for key in keys}, **{k: v for k, v in record.items() if writers.is_head_result(v)}}


def protocols(workdir, best_metric: str = 'war', split: str = 'test') -> dict:
  """Both protocols of one run: 'papers' (the best `split` epoch) and 'validation' (the `split` evaluation of the
  checkpoint best on the hold-out; None without one)."""
  records = writers.read_records(pathlib.Path(workdir) / writers.METRICS_FILENAME)
  best, selected = (select_record(records, metric, best_metric, split) for metric in ('best', 'selected'))
  return {'select_by': best_metric, 'papers': _summary(best) if best else None,
          'validation': _summary(selected) if selected else None}


def add_protocols(workdir, best_metric: str = 'war', split: str = 'test') -> dict:
  """Adds `protocols` and the run's seeds to `workdir/results.json` (written by the trainer's final reports)."""
  path = pathlib.Path(workdir) / 'results.json'
  results = json.loads(path.read_text()) if path.is_file() else {}
  results.update(protocols=protocols(workdir, best_metric, split), seeds=run_seeds(workdir))
  path.write_text(json.dumps(results, indent=2))
  return results


# Fields that may differ between the folds of one table: the seed, and what a resumed run may change but how long
# it trains (where the data is, how a run logs, evaluates, saves and reads).
_NOT_RECIPE = ('seed', *(name for name in configlib.RESUMABLE_FIELDS if name != 'num_epochs'))


def recipe_differences(workdirs: Sequence[str | os.PathLike]) -> list[str]:
  """How each run's config differs from the first run's, the fold number aside ('fold3' in the dataset name or an
  AEN guide's workdir; a clip list's fold and the fold's number in its list paths): a fold trained with another
  recipe (an earlier attempt left in place) would be averaged with the others without a word."""
  recipes, folds = [], [run_fold(workdir) for workdir in workdirs]
  for workdir in workdirs:
    flat = configlib.flatten_config(json.loads((pathlib.Path(workdir) / 'config.json').read_text()))
    recipes.append({name: re.sub(r'fold\d+', 'fold*', value) if isinstance(value, str) else value
                    for name, value in flat.items() if name not in _NOT_RECIPE and name != 'dataset.fold'})

  def same(name, value, fold, first_value, first_fold):
    if value == first_value:
      return True
    if not (name.startswith(('dataset.clip_lists.', 'dataset.clip_root')) and isinstance(value, str)
            and isinstance(first_value, str) and fold is not None and first_fold is not None):
      return False
    # A clip list's paths may differ exactly where each holds its own fold number (set_3_train.txt, set_1_...).
    parts, first_parts = (re.split(r'(?<!\d)(\d+)(?!\d)', text) for text in (value, first_value))
    return len(parts) == len(first_parts) and all(
        part == first_part or (i % 2 and (part, first_part) == (str(fold), str(first_fold)))
        for i, (part, first_part) in enumerate(zip(parts, first_parts)))

  lines = []
  for workdir, recipe, fold in zip(workdirs[1:], recipes[1:], folds[1:]):
    differing = [f'{name}={recipe.get(name)!r} (there: {recipes[0].get(name)!r})'
                 for name in sorted({*recipe, *recipes[0]})
                 if not same(name, recipe.get(name), fold, recipes[0].get(name), folds[0])]
    if differing:
      lines.append(f'{workdir} differs from {workdirs[0]}: {", ".join(differing)}')
  return lines


def fold_report(workdirs: Sequence[str | os.PathLike], class_names: Sequence[str], *, select_by: str = 'war',
                last: bool = False, fold_names: Sequence[str] | None = None, latex: bool = False) -> str:
  """Both protocols' fold tables, one under the other, each with the runs' seeds: the papers' (best test epoch,
  or the last epoch with `last`) and, when the runs hold out a validation part, the honest one. `latex`: the
  tables as booktabs tabulars and the other lines as LaTeX comments."""
  order = lambda results: dict(sorted(results.items(), key=lambda item: int(re.sub(r'\D', '', item[0]) or 0)))

  def table(results, with_holdout):
    seeds = {'seed': [row['seed'] for row in results.values()]}
    if with_holdout:
      seeds['hold-out'] = [f"{100 * row['validation_fraction']:g} %, seed {row['validation_seed']}"
                           for row in results.values()]
    return format_results_table(results, class_names, extra_columns=seeds, latex=latex)

  first = order(collect_fold_results(workdirs, 'last' if last else 'best', select_by, fold_names=fold_names))
  title = 'last epoch (no selection)' if last else f"{PROTOCOLS['papers']}, by {select_by.upper()}"
  lines = [f'warning: the runs were not trained with one recipe; {line}' for line in recipe_differences(workdirs)]
  lines += [f'{title}:', table(first, with_holdout=False), '']
  held = [str(w) for w in workdirs if run_seeds(w)['validation_fraction']]
  if len(held) == len(workdirs):
    second = order(collect_fold_results(workdirs, 'selected', select_by, fold_names=fold_names))
    lines += [f"{PROTOCOLS['validation']}, by hold-out {select_by.upper()} (test evaluated on that checkpoint):",
              table(second, with_holdout=True)]
  else:
    lines.append(f"{PROTOCOLS['validation']}: not available, "
                 + ('no run holds out' if not held else f'only {", ".join(held)} hold out')
                 + ' a validation part (--config.validation.fraction=0.1 turns it on)')
  return latex_comments('\n'.join(lines)) if latex else '\n'.join(lines)
