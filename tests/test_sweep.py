"""scripts/sweep.py: the grid's combinations and workdir names, the table from the trainer's own records (the
combination with the best hold-out score marked, its test numbers at the selected epoch, the best test epoch
apart), and two tiny STT runs at once through the command, collected again with --collect_only."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dferjax import writers
from test_train import REPO, TEST_COMPILATION_CACHE, TINY_CONFIG, data_dir  # noqa: F401  (a fixture)

_spec = importlib.util.spec_from_file_location('sweep', os.path.join(REPO, 'scripts', 'sweep.py'))
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def test_grid_combinations_and_names():
  axes = sweep.parse_grid(['optimizer.learning_rate=0.01, 0.001', 'config.seed=0,1,2'])
  assert axes == [('optimizer.learning_rate', ['0.01', '0.001']), ('seed', ['0', '1', '2'])]
  runs = sweep.combinations(axes)
  assert len(runs) == 6 and runs[1] == {'optimizer.learning_rate': '0.01', 'seed': '1'}
  assert sweep.run_name(runs[1]) == 'optimizer.learning_rate=0.01,seed=1'
  assert sweep.run_command('configs/x.py:fold=2', 'runs/s/a', runs[1], ['--config.num_epochs=3'])[3:] == [
      '--config=configs/x.py:fold=2', '--workdir=runs/s/a', '--config.num_epochs=3',
      '--config.optimizer.learning_rate=0.01', '--config.seed=1']
  for bad, message in ((['optimizer.learning_rate'], 'expected <config field>=<value>'),
                       (['seed=1,,2'], 'expected <config field>=<value>'),
                       (['seed=1', 'seed=2'], 'names seed twice'), (['seed=1,1'], 'lists a value twice'),
                       ([], 'at least one --grid')):
    with pytest.raises(ValueError, match=message):
      sweep.parse_grid(bad)
  with pytest.raises(ValueError, match='may not contain "/"'):
    sweep.run_name({'dataset.name': 'dfew/fold1'})


def write_run(workdir, test_wars, heldout_wars=None, eval_split='test'):
  """A run's config.json and metrics.jsonl through the trainer's writer: one evaluation per epoch of a 2-class
  split of 100 clips, right on the given share of each class."""
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump({'dataset': {'eval_split': eval_split}, 'class_names': ['a', 'b']}, f)

  def confusion(war):
    right = round(50 * war)
    return np.array([[right, 50 - right], [50 - right, right]])

  with writers.MetricWriter(workdir, tensorboard=False) as writer:
    for epoch, war in enumerate(test_wars, 1):
      writer.write_eval(10 * epoch, epoch, confusion(war), ('a', 'b'), split=eval_split)
      if heldout_wars:
        writer.write_eval(10 * epoch, epoch, confusion(heldout_wars[epoch - 1]), ('a', 'b'), split='heldout')
  return str(workdir)


def table_rows(text):
  return {line.split('|')[1].strip(): [cell.strip() for cell in line.strip('|').split('|')[1:]]
          for line in text.splitlines() if line.startswith('| ') and 'combination' not in line}


def test_table_marks_the_hold_out_choice_and_keeps_the_best_test_epoch_apart(tmp_path):
  workdirs = {'lr=0.1': write_run(tmp_path / 'a', [0.6, 0.9, 0.7], heldout_wars=[0.5, 0.6, 0.8]),
              'lr=0.01': write_run(tmp_path / 'b', [0.8, 0.7, 0.74], heldout_wars=[0.7, 0.86, 0.6])}
  text = sweep.sweep_table(workdirs)
  rows = table_rows(text)
  # lr=0.01 is best on the hold-out (86 % at epoch 2): its test number there, 70 %, is the one to report, though
  # lr=0.1 reached 90 % on test at its epoch 2.
  assert rows['* lr=0.01'] == ['86.00', '86.00', '70.00', '70.00', '2', '80.00', '80.00', '1']
  assert rows['lr=0.1'] == ['80.00', '80.00', '70.00', '70.00', '3', '90.00', '90.00', '2']
  assert 'chosen on the hold-out (WAR): lr=0.01; report its test UAR/WAR' in text
  as_latex = sweep.sweep_table(workdirs, latex=True)
  assert '\n* lr=0.01 & 86.00 & 86.00 & 70.00 & 70.00 & 2 & 80.00 & 80.00 & 1 \\\\\n' in as_latex
  assert as_latex.startswith('% 2 runs; ') and '\n% * chosen on the hold-out (WAR): lr=0.01' in as_latex
  by_uar = table_rows(sweep.sweep_table(workdirs, 'uar'))
  assert '* lr=0.01' in by_uar  # UAR = WAR on these balanced splits
  # AFEW-style runs report their validation split as "test"; without a hold-out the table says what choosing means.
  plain = sweep.sweep_table({'x': write_run(tmp_path / 'c', [0.5, 0.6], eval_split='validation')})
  assert table_rows(plain)['x'] == ['-', '-', '-', '-', '-', '60.00', '60.00', '2']
  assert "evaluation split (validation)" in plain and 'selects on test' in plain
  with pytest.raises(FileNotFoundError, match=r'missing: no results in .*nope'):
    sweep.sweep_table({'missing': str(tmp_path / 'nope')})


def test_two_runs_at_once_then_collected(tmp_path, data_dir):  # noqa: F811
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1', 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_PYTHON_CLIENT_MEM_FRACTION', None)
  command = [sys.executable, os.path.join(REPO, 'scripts', 'sweep.py'), f'--config={TINY_CONFIG}:epochs=1',
             f'--workdir={tmp_path / "sweep"}', '--grid', 'optimizer.learning_rate=0.01,0.0']
  flags = ['--', f'--config.dataset.data_dir={data_dir}', '--config.validation.fraction=0.25',
           f'--compilation_cache={TEST_COMPILATION_CACHE}']
  done = subprocess.run([*command, '--gpus', '0,0', *flags], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stdout + done.stderr
  table = done.stdout[done.stdout.index('2 runs; '):]
  names = list(table_rows(table))
  assert sorted(name.removeprefix('* ') for name in names) == ['optimizer.learning_rate=0.0',
                                                               'optimizer.learning_rate=0.01']
  assert sum(name.startswith('* ') for name in names) == 1 and 'chosen on the hold-out (WAR)' in table
  for name, rate in (('optimizer.learning_rate=0.01', 0.01), ('optimizer.learning_rate=0.0', 0.0)):
    run_config = json.loads((tmp_path / 'sweep' / name / 'config.json').read_text())
    assert run_config['optimizer']['learning_rate'] == rate and run_config['validation']['fraction'] == 0.25
  collected = subprocess.run([*command, '--collect_only'], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
  assert collected.returncode == 0 and collected.stdout.strip() == table.strip(), collected.stderr
  missing = subprocess.run([*command[:-1], 'optimizer.learning_rate=0.5', '--collect_only'], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
  assert missing.returncode == 1 and missing.stderr.startswith('error: runs without results'), missing.stderr
