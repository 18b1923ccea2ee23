"""dferjax.compare: per-clip files of several runs -> each run's table, the probability-averaging ensemble and
McNemar's exact test per pair, checked against numpy and scipy; files of different splits refused."""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from dferjax import compare, evaluate, metrics  # noqa: F401  # both, as in one pytest process: no flag clash

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ('calm', 'tense', 'amused')


def write_run(root, name, labels, probabilities, class_names=NAMES, clip_ids=None):
  (root / name).mkdir()
  (root / name / 'config.json').write_text(json.dumps({'class_names': list(class_names)}))
  path = root / name / 'clips_test_step10.jsonl'
  clip_ids = clip_ids or [f'{i:05d}' for i in range(len(labels))]
  path.write_text(''.join(json.dumps({'clip_id': clip_id, 'label': int(label), 'prediction': int(p.argmax()),
                                      'probabilities': p.tolist()}) + '\n'
                          for clip_id, label, p in zip(clip_ids, labels, probabilities)))
  return str(path)


def test_mcnemar_exact_against_the_binomial_test():
  scipy_stats = pytest.importorskip('scipy.stats')
  assert compare.mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 1024)  # the textbook case, n = 10
  assert compare.mcnemar_exact(0, 0) == 1.0 and compare.mcnemar_exact(5, 5) == 1.0
  for only_first, only_second in ((3, 12), (12, 3), (40, 25), (0, 7)):
    reference = scipy_stats.binomtest(only_first, only_first + only_second, 0.5).pvalue
    assert compare.mcnemar_exact(only_first, only_second) == pytest.approx(reference, rel=1e-12)


def test_tables_ensemble_and_pairs_against_numpy(tmp_path):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 60)
  runs = [rng.dirichlet(np.ones(3), 60) + 0.8 * np.eye(3)[labels] * (rng.random((60, 1)) < skill)
          for skill in (0.7, 0.4)]
  runs = [p / p.sum(-1, keepdims=True) for p in runs]
  paths = [write_run(tmp_path, name, labels, p) for name, p in zip(('a', 'b'), runs)]
  text = compare.compare(paths)

  def expected_row(name, probabilities):
    confusion = np.zeros((3, 3), np.int64)
    np.add.at(confusion, (labels, probabilities.argmax(-1)), 1)
    result = metrics.recall_metrics(confusion, NAMES)
    cells = [f'{100 * result["per_class"][c]:.2f}' for c in NAMES] + [f'{100 * result["uar"]:.2f}',
                                                                        f'{100 * result["war"]:.2f}']
    return [name, *cells]

  rows = [[cell.strip() for cell in line.strip('|').split('|')] for line in text.splitlines() if line.startswith('| ')]
  assert rows[0] == ['', *NAMES, 'UAR', 'WAR', 'UAR 95 %', 'WAR 95 %']
  columns = len(NAMES) + 3
  assert rows[1][:columns] == expected_row('a clips_test_step10', runs[0])
  assert rows[2][:columns] == expected_row('b clips_test_step10', runs[1])
  assert rows[3][:columns] == expected_row('ensemble (mean of 2)', (runs[0] + runs[1]) / 2)
  right = [p.argmax(-1) == labels for p in runs]
  only_a, only_b = int(np.sum(right[0] & ~right[1])), int(np.sum(~right[0] & right[1]))
  assert (f'a clips_test_step10 vs b clips_test_step10: right only in the first {only_a} clips, only in the '
          f'second {only_b}; exact McNemar p = {compare.mcnemar_exact(only_a, only_b):.3g}') in text
  assert text.startswith('60 clips, 2 models:')
  plain = compare.compare(paths, bootstrap=0)  # no intervals: the papers' columns and McNemar alone
  assert [row[:columns] for row in rows] == [
      [cell.strip() for cell in line.strip('|').split('|')] for line in plain.splitlines() if line.startswith('| ')]
  assert plain.splitlines()[-1].endswith(f'p = {compare.mcnemar_exact(only_a, only_b):.3g}')


def test_bootstrap_resamples_score_as_their_confusion_matrices():
  """Every resample's UAR and WAR (one weighted product per chunk) equal metrics.recall_metrics on the confusion
  matrix of that resample's clips, drawn with replacement; a class a resample leaves out is left out of its UAR."""
  rng = np.random.default_rng(2)
  labels = np.concatenate([rng.integers(0, 2, 40), [2]])  # class 2 has one clip: some resamples miss it
  right = {'a': rng.random(41) < 0.7, 'b': rng.random(41) < 0.5}
  values = compare.bootstrap_scores(labels, right, 3, resamples=450, seed=7)  # 3 chunks, the last partial
  draws = np.concatenate(list(compare.bootstrap_draws(41, 450, seed=7)))
  assert draws.shape == (450, 41) and len({tuple(row) for row in draws}) == 450
  missing_class = 0
  for name, correct in right.items():
    assert values[name].shape == (450, 2)
    for resample, positions in enumerate(draws):
      predictions = np.where(correct[positions], labels[positions], (labels[positions] + 1) % 3)
      confusion = np.zeros((3, 3), np.int64)
      np.add.at(confusion, (labels[positions], predictions), 1)
      with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        expected = metrics.recall_metrics(confusion, NAMES, allow_empty=True)
      missing_class += not confusion[2].sum()
      np.testing.assert_allclose(values[name][resample], [expected['uar'], expected['war']], rtol=1e-12)
  assert 0 < missing_class < 2 * 450  # both cases met


def test_bootstrap_intervals_have_the_binomial_width_and_pairs_share_resamples(tmp_path):
  """WAR over n clips is a binomial proportion: the bootstrap's 95 % interval spans about 2 x 1.96 x
  sqrt(p (1 - p) / n) around it. A model against itself differs by exactly 0 in every resample; the ensemble of a
  model with itself is that model; the intervals depend on the seed, not on the files' clip order."""
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 3, 2000)
  probabilities = np.eye(3)[np.where(rng.random(2000) < 0.7, labels, (labels + 1) % 3)] * 0.5 + 0.5 / 3
  a = write_run(tmp_path, 'a', labels, probabilities)
  same = write_run(tmp_path, 'same', labels[::-1], probabilities[::-1],
                   clip_ids=[f'{i:05d}' for i in range(2000)][::-1])
  text = compare.compare([a, same], bootstrap=2000, seed=1)
  rows = {line.split('|')[1].strip(): [cell.strip() for cell in line.strip('|').split('|')]
          for line in text.splitlines() if line.startswith('| ')}
  war = float(rows['a clips_test_step10'][-3]) / 100
  low, high = (float(bound) / 100 for bound in rows['a clips_test_step10'][-1].split('-'))
  assert low < war < high
  assert high - low == pytest.approx(2 * 1.96 * np.sqrt(war * (1 - war) / 2000), rel=0.1)
  assert rows['same clips_test_step10'][1:] == rows['a clips_test_step10'][1:]  # same clips after sorting by id
  assert rows['ensemble (mean of 2)'][1:] == rows['a clips_test_step10'][1:]
  assert text.splitlines()[-1].endswith('first minus second: UAR +0.00 (95 % +0.00 to +0.00), WAR +0.00 (95 % '
                                        '+0.00 to +0.00)')
  other_seed = compare.compare([a, same], bootstrap=2000, seed=2)
  assert other_seed != text and other_seed.splitlines()[-1] == text.splitlines()[-1]
  one = compare.compare([a], bootstrap=2000, seed=1)  # one model: its row and intervals alone
  assert one.startswith('2000 clips, 1 model:') and 'ensemble' not in one and ' vs ' not in one
  cells = lambda text: [[cell.strip() for cell in line.strip('|').split('|')] for line in text.splitlines()
                         if line.startswith('| a ')]
  assert cells(one) == cells(text)


def test_files_of_different_splits_or_classes_are_refused(tmp_path):
  labels, probabilities = np.array([0, 1, 2]), np.eye(3)
  a = write_run(tmp_path, 'a', labels, probabilities)
  with pytest.raises(ValueError, match=r"b/clips_test_step10.jsonl lacks 1 clips of .*a/clips_test_step10.jsonl "
                                       r"\(first: '00001'\): compare files of one split"):
    compare.compare([a, write_run(tmp_path, 'b', labels, probabilities, clip_ids=['00000', '00009', '00002'])])
  with pytest.raises(ValueError, match=r"c/clips_test_step10.jsonl holds 1 clips more than .* \(first: '00003'\)"):
    compare.compare([a, write_run(tmp_path, 'c', [*labels, 0], np.eye(3)[[0, 1, 2, 0]])])
  with pytest.raises(ValueError, match=r"clip '00002' is labelled 1 in .*f/clips_test_step10.jsonl, 2 in"):
    compare.compare([a, write_run(tmp_path, 'f', [0, 1, 1], probabilities)])
  # Another order of the same clips is the same comparison.
  shuffled = write_run(tmp_path, 'g', labels[::-1], probabilities[::-1], clip_ids=['00002', '00001', '00000'])
  assert 'right only in the first 0 clips, only in the second 0; exact McNemar p = 1' in compare.compare([a, shuffled])
  with pytest.raises(ValueError, match='the runs were trained with different classes'):
    compare.compare([a, write_run(tmp_path, 'd', labels, probabilities, class_names=('x', 'y', 'z'))])
  with pytest.raises(ValueError, match='one or more per-clip files'):
    compare.compare([])
  with pytest.raises(ValueError, match='--bootstrap -1: give a number of resamples >= 0'):
    compare.compare([a], bootstrap=-1)
  with pytest.raises(ValueError, match='a file is given twice'):
    compare.compare([a, a])
  with pytest.raises(FileNotFoundError, match='nope.jsonl does not exist'):
    compare.compare([a, str(tmp_path / 'nope.jsonl')])
  # The command: the table, or one line for an expected error.
  e = write_run(tmp_path, 'e', labels, probabilities[[1, 1, 2]])
  done = subprocess.run([sys.executable, '-m', 'dferjax.compare', a, e], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 0 and 'right only in the first 1 clips, only in the second 0; exact McNemar p = 1' in done.stdout
  as_latex = subprocess.run([sys.executable, '-m', 'dferjax.compare', a, e, '--latex'], cwd=REPO, capture_output=True,
                            text=True, timeout=120).stdout
  assert as_latex.startswith('% 3 clips, 2 models:\n\\begin{tabular}{l') and '\n% a clips_test_step10 vs ' in as_latex
  done = subprocess.run([sys.executable, '-m', 'dferjax.compare', a, '--bootstrap', '-5'], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 1 and done.stderr.strip().splitlines() == [
      'error: --bootstrap -5: give a number of resamples >= 0 (0: no intervals)'], done.stderr


def test_a_model_may_join_its_folds_files(tmp_path):
  """Five folds' test files per model, joined with commas: the comparison over every clip once."""
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 3, 50)
  a_probabilities, b_probabilities = rng.dirichlet(np.ones(3), 50), rng.dirichlet(np.ones(3), 50)
  ids = [f'{i:05d}' for i in range(50)]
  folds = np.arange(50) % 5
  joined = {}
  for model, probabilities in (('a', a_probabilities), ('b', b_probabilities)):
    joined[model] = ','.join(write_run(tmp_path, f'{model}_fold{k + 1}', labels[folds == k], probabilities[folds == k],
                                       clip_ids=[i for i, f in zip(ids, folds) if f == k]) for k in range(5))
  whole = compare.compare([write_run(tmp_path, 'a', labels, a_probabilities, clip_ids=ids),
                           write_run(tmp_path, 'b', labels, b_probabilities, clip_ids=ids)])
  by_folds = compare.compare([joined['a'], joined['b']])
  numbers = lambda text: [[cell.strip() for cell in line.strip('|').split('|')[1:]] for line in text.splitlines()
                           if line.startswith('| ')]
  assert numbers(by_folds) == numbers(whole)  # every row's per-class, UAR and WAR
  assert by_folds.splitlines()[3].startswith('| a_fold1 clips_test_step10 +4 files ')
  assert by_folds.splitlines()[-1].split(': ')[1:] == whole.splitlines()[-1].split(': ')[1:]  # McNemar's counts, p
  first = joined['a'].split(',')[0]
  with pytest.raises(ValueError, match=r"clip '00000' is in both .*a_fold1/clips_test_step10.jsonl and .*a_fold1/"):
    compare.compare([f'{first},{first}', joined['b']])
