"""Fold tables against numpy, best-epoch selection from metrics.jsonl, folds read from the runs' configs."""
import json

import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from dferjax import reports
from dferjax import writers
from tfds_builders.labels import CLASS_NAMES


def random_confusion(rng, num_clips=200, accuracy=0.6):
  labels = rng.integers(0, 7, size=num_clips)
  predictions = np.where(rng.random(num_clips) < accuracy, labels, rng.integers(0, 7, size=num_clips))
  return sk_metrics.confusion_matrix(labels, predictions, labels=range(7))


def random_fold_results(seed, num_folds=5):
  rng = np.random.default_rng(seed)
  return {f'fold{i + 1}': {'uar': rng.random(), 'war': rng.random(),
                           'per_class': {name: rng.random() for name in CLASS_NAMES}} for i in range(num_folds)}


def test_fold_mean_std_and_table_against_numpy():
  results = random_fold_results(2)
  per_class = np.array([[r['per_class'][name] for name in CLASS_NAMES] for r in results.values()])  # [5, 7]
  uar, war = (np.array([r[key] for r in results.values()]) for key in ('uar', 'war'))
  mean, std = reports.fold_mean(results), reports.fold_std(results, CLASS_NAMES)
  np.testing.assert_allclose([mean['per_class'][name] for name in CLASS_NAMES], per_class.mean(axis=0), rtol=1e-12)
  np.testing.assert_allclose([mean['uar'], mean['war']], [uar.mean(), war.mean()], rtol=1e-12)
  np.testing.assert_allclose([std['per_class'][name] for name in CLASS_NAMES], per_class.std(axis=0), rtol=1e-12)
  np.testing.assert_allclose([std['uar'], std['war']], [uar.std(), war.std()], rtol=1e-12)

  table = reports.format_results_table(results, CLASS_NAMES)
  lines = table.splitlines()
  assert len(lines) == 2 + 5 + 2
  header = [cell.strip() for cell in lines[0].strip('|').split('|')]
  assert header == ['', *CLASS_NAMES, 'UAR', 'WAR']
  assert set(lines[1]) <= set('|-:')
  cells = {line.strip('|').split('|')[0].strip(): [float(c) for c in line.strip('|').split('|')[1:]]
           for line in lines[2:]}
  assert list(cells) == ['fold1', 'fold2', 'fold3', 'fold4', 'fold5', 'mean', 'std']
  want = np.concatenate([per_class, uar[:, None], war[:, None]], axis=1) * 100  # [5, 9] in %
  np.testing.assert_allclose([cells[f'fold{i + 1}'] for i in range(5)], want, atol=0.005 + 1e-9)
  np.testing.assert_allclose(cells['mean'], want.mean(axis=0), atol=0.005 + 1e-9)
  np.testing.assert_allclose(cells['std'], want.std(axis=0), atol=0.005 + 1e-9)
  assert len(reports.format_results_table(results, CLASS_NAMES, with_mean=False).splitlines()) == 7

  del results['fold3']['per_class']['fear']
  with pytest.raises(ValueError, match=r"'fold3': per_class lacks \['fear'\]"):
    reports.format_results_table(results, CLASS_NAMES)
  with pytest.raises(ValueError, match=r"'fold2' lack \['war'\]"):
    reports.fold_mean({'fold2': {'uar': 0.5, 'per_class': {}}})


def test_latex_tables_hold_the_markdown_cells():
  """--latex (run_folds, evaluate, compare): the same cells as the Markdown table in a booktabs tabular, LaTeX's
  special characters escaped, the mean and std ruled off, and the lines around the tables as comments."""
  results = random_fold_results(3, num_folds=3)
  extra = {'hold-out': ['10 %, seed 0'] * 3}
  markdown = reports.format_results_table(results, CLASS_NAMES, extra_columns=extra)
  latex = reports.format_results_table(results, CLASS_NAMES, extra_columns=extra, latex=True).splitlines()
  assert latex[:2] == [r'\begin{tabular}{l' + 'r' * (len(CLASS_NAMES) + 3) + '}', r'\toprule']
  assert latex[3] == latex[7] == r'\midrule' and latex[-2:] == [r'\bottomrule', r'\end{tabular}']
  unescape = lambda cell: cell.replace(r'\%', '%').replace(r'\_', '_')
  latex_rows = [[unescape(cell.strip()) for cell in line.removesuffix(r'\\').split(' & ')]
                for line in latex if line.endswith(r'\\')]
  markdown_rows = [[cell.strip() for cell in line.strip('|').split('|')] for line in markdown.splitlines()
                   if not set(line) <= set('|-:')]
  assert latex_rows == markdown_rows and latex_rows[-1][0] == 'std'
  assert reports.latex_escape('stt_dfew fold#1 {a} 95 % & $x$') == r'stt\_dfew fold\#1 \{a\} 95 \% \& \$x\$'
  text = reports.latex_comments('title:\n' + '\n'.join(latex) + '\n\n95 % intervals')
  assert text.splitlines()[0] == '% title:' and text.splitlines()[-1] == '% 95 % intervals'
  assert '\n'.join(latex) in text and reports.latex_comments(text) == text  # twice is once


def test_fold_mean_skips_empty_classes():
  results = random_fold_results(3, num_folds=3)
  results['fold2']['per_class']['disgust'] = None  # as read from JSON: a fold without disgust clips
  mean = reports.fold_mean(results, CLASS_NAMES)
  assert mean['per_class']['disgust'] == pytest.approx(
      np.mean([results[f]['per_class']['disgust'] for f in ('fold1', 'fold3')]))
  rows = [[cell.strip() for cell in line.strip('|').split('|')]
          for line in reports.format_results_table(results, CLASS_NAMES).splitlines()[2:]]
  disgust = 1 + CLASS_NAMES.index('disgust')
  percent = lambda fold: f"{100 * results[fold]['per_class']['disgust']:.2f}"
  assert [row[disgust] for row in rows[:3]] == [percent('fold1'), '-', percent('fold3')]
  assert float(rows[3][disgust]) == pytest.approx(100 * mean['per_class']['disgust'], abs=0.005)


def write_fold(workdir, eval_confusions, rng):
  with writers.MetricWriter(workdir, enabled=True, tensorboard=False) as writer:
    for epoch, confusion in enumerate(eval_confusions, start=1):
      writer.write('train', epoch * 100, epoch, {'loss': rng.random()})
      writer.write_eval(epoch * 100, epoch, confusion, CLASS_NAMES)


def test_collect_fold_results_best_and_last(tmp_path):
  rng = np.random.default_rng(4)
  workdirs, confusions = [], []
  for fold in range(1, 4):
    fold_confusions = [random_confusion(rng, accuracy=a) for a in rng.uniform(0.2, 0.8, size=6)]
    write_fold(tmp_path / f'run{fold}', fold_confusions, rng)
    workdirs.append(str(tmp_path / f'run{fold}'))
    confusions.append(fold_confusions)

  for select_by in ('war', 'uar'):
    best = reports.collect_fold_results(workdirs, 'best', select_by)
    assert list(best) == ['fold1', 'fold2', 'fold3']
    for fold_confusions, result in zip(confusions, best.values()):
      scores = [np.trace(c) / c.sum() if select_by == 'war' else np.mean(np.diag(c) / c.sum(axis=1))
                for c in fold_confusions]
      best_epoch = int(np.argmax(scores)) + 1
      assert result['epoch'] == best_epoch and result['step'] == best_epoch * 100
      np.testing.assert_array_equal(result['confusion'], fold_confusions[best_epoch - 1])
      assert result[select_by] == pytest.approx(max(scores), rel=1e-12)
  last = reports.collect_fold_results(workdirs, 'last', fold_names=['a', 'b', 'c'])
  assert [r['epoch'] for r in last.values()] == [6, 6, 6] and list(last) == ['a', 'b', 'c']
  np.testing.assert_array_equal(last['b']['confusion'], confusions[1][-1])

  table = reports.format_results_table(best, CLASS_NAMES)
  mean_war = float(table.splitlines()[-2].strip('|').split('|')[-1])
  assert mean_war == pytest.approx(100 * np.mean([r['war'] for r in best.values()]), abs=0.005)


def test_collect_fold_results_ties_and_missing(tmp_path):
  rng = np.random.default_rng(5)
  good, worse = random_confusion(rng, accuracy=0.9), random_confusion(rng, accuracy=0.1)
  write_fold(tmp_path / 'tie', [worse, good, good], rng)
  assert reports.collect_fold_results([tmp_path / 'tie'])['fold1']['epoch'] == 2  # earliest best, as `acc > best`

  (tmp_path / 'no_eval').mkdir()
  (tmp_path / 'no_eval' / 'metrics.jsonl').write_text('{"split": "train", "step": 1, "epoch": 0, "loss": 1}\n')
  workdirs = [tmp_path / 'tie', tmp_path / 'missing', tmp_path / 'no_eval']
  with pytest.raises(FileNotFoundError) as error:
    reports.collect_fold_results(workdirs)
  message = str(error.value)
  assert 'fold2' in message and 'missing' in message and 'no metrics.jsonl' in message
  assert 'fold3' in message and "no 'test' eval records" in message and 'fold1' not in message
  with pytest.raises(ValueError, match="'best', 'last' or 'selected'"):
    reports.collect_fold_results(workdirs, metric='mean')
  with pytest.raises(ValueError, match="'war' or 'uar'"):
    reports.collect_fold_results(workdirs, select_by='loss')


def _fold_run(workdir, dataset_name):
  workdir.mkdir()
  (workdir / 'config.json').write_text(json.dumps({'dataset': {'name': dataset_name}}))
  return str(workdir)


def test_fold_names_come_from_each_runs_config_not_its_position(tmp_path):
  """Two fold-1 runs must not be averaged as fold1/fold2 (issue 18)."""
  runs = [_fold_run(tmp_path / f'run{k}', f'dfew/fold{fold}_px112') for k, fold in enumerate((3, 1, 2, 5, 4))]
  assert reports.fold_names_from_configs(runs) == ['fold3', 'fold1', 'fold2', 'fold5', 'fold4']
  twice = [*runs[:4], _fold_run(tmp_path / 'again', 'dfew/fold1')]
  with pytest.raises(ValueError, match='fold 1 is given twice: .*run1, .*again') as error:
    reports.fold_names_from_configs(twice)
  assert 'fold(s) 4 missing' in str(error.value)
  with pytest.raises(ValueError, match='afew.*names no fold'):
    reports.fold_names_from_configs([*runs[:4], _fold_run(tmp_path / 'afew', 'afew/px112')])
  assert reports.fold_names_from_configs(runs[1:3], folds=(1, 2)) == ['fold1', 'fold2']


def test_runs_trained_with_another_recipe_are_named_above_the_table(tmp_path):
  """An earlier attempt left as fold 3 (another learning rate) would be averaged with the others silently."""
  def run(name, fold, **changes):
    config = {'seed': fold, 'dataset': {'name': f'dfew/fold{fold}_px112', 'data_dir': f'/data{fold}'},
              'optimizer': {'learning_rate': 0.01, 'name': 'sgd'}, 'num_epochs': 100, 'log_every_steps': fold,
              'init_from': {'guide': f'runs/aen_frame_dfew_fold{fold}'}}
    for dotted, value in changes.items():
      block, field = dotted.split('.')
      config[block][field] = value
    (tmp_path / name).mkdir()
    (tmp_path / name / 'config.json').write_text(json.dumps(config))
    return str(tmp_path / name)

  same = [run(f'fold{fold}', fold) for fold in (1, 2)]  # seeds, data dirs, logging and fold numbers apart
  assert reports.recipe_differences(same) == []
  other = run('fold3', 3, **{'optimizer.learning_rate': 0.001})
  assert reports.recipe_differences([*same, other]) == [
      f"{other} differs from {same[0]}: optimizer.learning_rate=0.001 (there: 0.01)"]



def test_clip_list_folds_differ_only_by_their_fold_in_the_list_paths(tmp_path):
  """configs/clip_list.py's `{fold}` paths: set_1_train.txt and set_2_train.txt are one recipe, fold aside."""
  def run(name, fold, train):
    config = {'seed': 0, 'class_names': ['calm', 'tense'],
              'dataset': {'name': 'clip_list', 'fold': fold, 'clip_root': f'/data/dfew{fold}x',
                          'clip_lists': {'train': train, 'test': f'/lists2/set_{fold}_test.txt'}}}
    (tmp_path / name).mkdir()
    (tmp_path / name / 'config.json').write_text(json.dumps(config))
    return str(tmp_path / name)

  runs = [run(f'f{fold}', fold, f'/lists2/set_{fold}_train.txt') for fold in (1, 2)]
  assert reports.recipe_differences(runs) == [] and reports.fold_names_from_configs(runs, folds=(1, 2)) == [
      'fold1', 'fold2']
  assert reports.class_names_of(runs) == ('calm', 'tense')
  other = run('f3', 3, '/lists2/set_3_train_v2.txt')
  assert reports.recipe_differences([runs[0], other]) == [
      f"{other} differs from {runs[0]}: dataset.clip_lists.train='/lists2/set_3_train_v2.txt' "
      "(there: '/lists2/set_1_train.txt')"]
