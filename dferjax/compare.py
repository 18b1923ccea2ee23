"""Compares models clip by clip on one split, from the per-clip files `dferjax.evaluate` writes
(<workdir>/clips_<split>_step<N>.jsonl): each model's table, the ensemble that averages their class
probabilities, and for each pair McNemar's exact test, which asks whether the clips only one of the two gets
right lean to one side more than chance allows (the test for two classifiers on one test set).

    python -m dferjax.evaluate --workdir runs/stt_dfew_fold1     # writes runs/stt_dfew_fold1/clips_test_step<N>.jsonl
    python -m dferjax.evaluate --workdir runs/est_dfew_fold1
    python -m dferjax.compare runs/stt_dfew_fold1/clips_test_step*.jsonl runs/est_dfew_fold1/clips_test_step*.jsonl
    # all five folds' test clips (the whole of DFEW) per model: each model's files joined by commas
    python -m dferjax.compare $(ls runs/stt_dfew_fold?/clips_test_step*.jsonl | paste -sd,) \
                              $(ls runs/est_dfew_fold?/clips_test_step*.jsonl | paste -sd,)

The files must hold the same clips (in any order) with the same labels: the same split of the same dataset. The
class names come from the runs' configs beside the files.

How sure each number is: a percentile bootstrap over the clips (`--bootstrap`, 1000 resamples by default) gives
every row's UAR and WAR a 95 % interval, and each pair the interval of its UAR and WAR differences, from the
same resamples for both models (paired), so that a gap in UAR, which McNemar's test does not address, has its
own interval. One file alone gives its table with the intervals.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os

import numpy as np

from dferjax import cli


def read_clips(path: str) -> list[dict]:
  """The rows of one per-clip file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} does not exist (python -m dferjax.evaluate --workdir <run> writes '
                            '<run>/clips_<split>_step<N>.jsonl)')
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  if not rows:
    raise ValueError(f'{path} holds no clips')
  if missing := {'clip_id', 'label', 'prediction', 'probabilities'} - set(rows[0]):
    raise ValueError(f'{path}: rows lack {sorted(missing)} (a file written before evaluate wrote every model\'s '
                     'probabilities? evaluate the run again)')
  return rows


def read_model(spec: str) -> list[dict]:
  """One model's rows: a per-clip file, or several joined by commas (one run per DFEW fold: each clip is in one
  fold's test split, so the five test files together cover the dataset)."""
  rows, source = [], {}
  for path in spec.split(','):
    for row in read_clips(path):
      if row['clip_id'] in source:
        raise ValueError(f'clip {row["clip_id"]!r} is in both {source[row["clip_id"]]} and {path}: join files of '
                         'disjoint splits (the folds\' test splits)')
      source[row['clip_id']] = path
      rows.append(row)
  return rows


def aligned(files: dict[str, list[dict]]) -> dict[str, list[dict]]:
  """Every file's rows in the first file's clip order; the files must hold the same clips with the same labels
  (any order: a file of each run of one split)."""
  (first_path, first), *_ = files.items()
  result = {}
  for path, rows in files.items():
    by_id = {}
    for line, row in enumerate(rows, 1):
      if row['clip_id'] in by_id:
        raise ValueError(f'{path}:{line}: clip {row["clip_id"]!r} is listed twice')
      by_id[row['clip_id']] = row
    if missing := [row['clip_id'] for row in first if row['clip_id'] not in by_id]:
      raise ValueError(f'{path} lacks {len(missing)} clips of {first_path} (first: {missing[0]!r}): compare files '
                       'of one split')
    if len(by_id) != len(first):
      extra = next(clip_id for clip_id in by_id if clip_id not in {row['clip_id'] for row in first})
      raise ValueError(f'{path} holds {len(by_id) - len(first)} clips more than {first_path} (first: {extra!r}): '
                       'compare files of one split')
    for row in first:
      if by_id[row['clip_id']]['label'] != row['label']:
        raise ValueError(f'clip {row["clip_id"]!r} is labelled {by_id[row["clip_id"]]["label"]} in {path}, '
                         f'{row["label"]} in {first_path}: compare files of one split of one dataset')
    result[path] = [by_id[row['clip_id']] for row in first]
  return result


def mcnemar_exact(only_first: int, only_second: int) -> float:
  """Two-sided exact McNemar p-value: of the n clips exactly one model gets right, `only_first` went to the
  first; under the null each such clip is a fair coin, so p = 2 P(Binomial(n, 1/2) <= min), at most 1."""
  n = only_first + only_second
  if n == 0:
    return 1.0
  tail = sum(math.comb(n, k) for k in range(min(only_first, only_second) + 1)) / 2 ** n
  return min(1.0, 2 * tail)


def bootstrap_draws(num_clips: int, resamples: int, seed: int, chunk: int = 200):
  """The bootstrap's resamples, `chunk` at a time: int [<= chunk, num_clips] arrays of clip positions, each row
  num_clips draws with replacement."""
  rng = np.random.default_rng(seed)
  for start in range(0, resamples, chunk):
    yield rng.integers(0, num_clips, (min(chunk, resamples - start), num_clips))


def bootstrap_scores(labels: np.ndarray, right: dict[str, np.ndarray], num_classes: int, *, resamples: int,
                     seed: int) -> dict[str, np.ndarray]:
  """{name: [resamples, 2] UAR and WAR (fractions)} of each model on the same resamples of the clips
  (bootstrap_draws; `right[name]`: which clips it gets right). A class that a resample happens to leave out is
  left out of its UAR, as in the table of a split without it. The draws are positions: the caller fixes the
  clips' order (compare sorts them by id)."""
  num_clips = len(labels)
  one_hot = np.eye(num_classes)[labels]
  values = {name: np.empty((resamples, 2)) for name in right}
  start = 0
  for draws in bootstrap_draws(num_clips, resamples, seed):
    count = len(draws)
    # times each clip is drawn, per resample: [count, num_clips]
    weights = np.bincount((draws + num_clips * np.arange(count)[:, None]).ravel(),
                          minlength=count * num_clips).reshape(count, num_clips).astype(np.float64)
    support = weights @ one_hot
    for name, correct_clips in right.items():
      correct = weights @ (one_hot * correct_clips[:, None])
      with np.errstate(invalid='ignore'):
        recall = np.where(support > 0, correct / support, np.nan)
      values[name][start:start + count, 0] = np.nanmean(recall, axis=1)
      values[name][start:start + count, 1] = correct.sum(axis=1) / num_clips
    start += count
  return values


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
  """The percentile interval holding `level` of the values."""
  low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
  return float(low), float(high)


def scores(labels: np.ndarray, predictions: np.ndarray, class_names) -> dict:
  from dferjax import metrics  # pylint: disable=import-outside-toplevel
  confusion = np.zeros((len(class_names),) * 2, np.int64)
  np.add.at(confusion, (labels, predictions), 1)
  return metrics.recall_metrics(confusion, class_names, allow_empty=True)


def row_name(path: str) -> str:
  """'stt_dfew_fold1 clips_test_step840' for runs/stt_dfew_fold1/clips_test_step840.jsonl."""
  run = os.path.basename(os.path.dirname(os.path.abspath(path)))
  return f'{run} {os.path.splitext(os.path.basename(path))[0]}'


def compare(paths: list[str], *, bootstrap: int = 1000, seed: int = 0, latex: bool = False) -> str:
  """The comparison's text: the table (each model, then the ensemble) and McNemar's test per pair; with
  `bootstrap` resamples (0: none) 95 % intervals of every row's UAR and WAR and of each pair's differences. A path
  may join several files with commas (`read_model`); one path gives its table alone."""
  from dferjax import reports  # pylint: disable=import-outside-toplevel
  if not paths:
    raise ValueError('give one or more per-clip files')
  if bootstrap < 0:
    raise ValueError(f'--bootstrap {bootstrap}: give a number of resamples >= 0 (0: no intervals)')
  if len(set(paths)) < len(paths):
    raise ValueError(f'a file is given twice: {" ".join(paths)}')
  files = aligned({path: read_model(path) for path in paths})
  # One clip order for any file order or fold split (the bootstrap's draws follow it).
  order = np.argsort([row['clip_id'] for row in files[paths[0]]], kind='stable')
  files = {path: [rows[i] for i in order] for path, rows in files.items()}
  class_names = reports.class_names_of(sorted({os.path.dirname(os.path.abspath(file)) for path in paths
                                               for file in path.split(',')}))
  labels = np.array([row['label'] for row in files[paths[0]]])
  probabilities = {path: np.array([row['probabilities'] for row in rows]) for path, rows in files.items()}
  for path, values in probabilities.items():
    if values.shape != (len(labels), len(class_names)):
      raise ValueError(f'{path}: probabilities of shape {values.shape}, expected {len(labels)} clips x '
                       f'{len(class_names)} classes {class_names}')
  names = {path: row_name(path.split(',')[0]) + (f' +{path.count(",")} files' if ',' in path else '')
           for path in paths}
  if len(set(names.values())) < len(paths):
    names = {path: path for path in paths}
  # Each model by its own predictions (the logits' argmax, as its evaluation counted them), the ensemble by the
  # argmax of the mean probabilities.
  predictions = {path: np.array([row['prediction'] for row in rows]) for path, rows in files.items()}
  rows = {names[path]: predictions[path] for path in paths}
  if len(paths) > 1:
    rows[f'ensemble (mean of {len(paths)})'] = np.mean(list(probabilities.values()), axis=0).argmax(-1)
  table = {name: scores(labels, predicted, class_names) for name, predicted in rows.items()}
  right = {name: predicted == labels for name, predicted in rows.items()}
  extra_columns = None
  if bootstrap:
    resampled = bootstrap_scores(labels, right, len(class_names), resamples=bootstrap, seed=seed)
    span = lambda values: '{:.2f}-{:.2f}'.format(*(100 * bound for bound in interval(values)))
    extra_columns = {'UAR 95 %': [span(resampled[name][:, 0]) for name in rows],
                     'WAR 95 %': [span(resampled[name][:, 1]) for name in rows]}
  lines = [f'{len(labels)} clips, {len(paths)} model{"s" * (len(paths) > 1)}:',
           reports.format_results_table(table, class_names, with_mean=False, extra_columns=extra_columns,
                                        latex=latex)]
  if bootstrap:
    lines.append(f'95 % intervals: percentile bootstrap over the clips, {bootstrap} resamples (seed {seed})'
                 + ('; the pairs\' differences from the same resamples' if len(paths) > 1 else ''))
  if len(paths) > 1:
    lines.append('')
  for first, second in itertools.combinations([names[path] for path in paths], 2):
    only_first = int(np.sum(right[first] & ~right[second]))
    only_second = int(np.sum(~right[first] & right[second]))
    line = (f'{first} vs {second}: right only in the first {only_first} clips, only in the second {only_second}; '
            f'exact McNemar p = {mcnemar_exact(only_first, only_second):.3g}')
    if bootstrap:
      gap = {metric: 100 * (table[first][metric] - table[second][metric]) for metric in ('uar', 'war')}
      spans = {metric: interval(100 * (resampled[first][:, column] - resampled[second][:, column]))
               for column, metric in enumerate(('uar', 'war'))}
      line += '; first minus second: ' + ', '.join(
          f'{metric.upper()} {gap[metric]:+.2f} (95 % {spans[metric][0]:+.2f} to {spans[metric][1]:+.2f})'
          for metric in ('uar', 'war'))
    lines.append(line)
  return reports.latex_comments('\n'.join(lines)) if latex else '\n'.join(lines)


def main(argv=None):
  # argparse, not absl flags: importing this module next to dferjax.evaluate (which defines --verbose) stays legal.
  parser = argparse.ArgumentParser(prog='python -m dferjax.compare', description=__doc__.split('\n\n')[0])
  parser.add_argument('files', nargs='+', help='per-clip files (clips_<split>_step<N>.jsonl); a model\'s several '
                      'files joined by commas')
  parser.add_argument('--bootstrap', type=int, default=1000, help='resamples of the clips for the 95 %% '
                      'intervals (0: none)')
  parser.add_argument('--seed', type=int, default=0, help='seed of the bootstrap\'s draws')
  parser.add_argument('--latex', action='store_true', help='the table as a LaTeX (booktabs) tabular, the other '
                      'lines as comments')
  parser.add_argument('--verbose', action='store_true', help='the traceback of an expected error (else one line)')
  args = parser.parse_args(argv)
  cli.run(lambda: print(compare(args.files, bootstrap=args.bootstrap, seed=args.seed, latex=args.latex)),
          verbose=args.verbose)


if __name__ == '__main__':
  main()
