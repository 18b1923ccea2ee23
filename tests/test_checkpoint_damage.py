"""Checkpoints damaged after they were written (issue 16): resume falls back to the newest intact checkpoint with a
warning naming the damaged step; a damaged best checkpoint is set aside and the best intact one takes its place;
evaluate skips a damaged checkpoint it chooses and refuses one named by step; a save the disk refuses stops the run
with the earlier checkpoints intact."""
import os
import re
import shutil

import jax
import numpy as np
import pytest

from dferjax import checkpoint as checkpoint_lib
from dferjax import evaluate, train, writers
from test_train import TEST_COMPILATION_CACHE, data_dir, final_params, run_main, tiny_config  # noqa: F401  (a fixture)


def _largest_file(step_directory) -> str:
  files = checkpoint_lib.checkpoint_files(str(step_directory))
  return os.path.join(str(step_directory), max(files, key=files.get))


@pytest.fixture(scope='module')
def straight(tmp_path_factory, data_dir):  # noqa: F811
  """An uninterrupted 3-epoch run keeping all three checkpoints (3, 6, 9): copied, then damaged, by each test."""
  workdir = tmp_path_factory.mktemp('straight')
  train.train_and_evaluate(tiny_config(data_dir, 'epochs=3', keep_checkpoints=3), str(workdir))
  assert sorted(os.listdir(workdir / 'checkpoint_files')) == ['3.json', '6.json', '9.json']
  return workdir


def test_a_damaged_latest_checkpoint_resumes_from_the_one_before(tmp_path, data_dir, straight, capsys):  # noqa: F811
  shutil.copytree(straight, tmp_path, dirs_exist_ok=True)
  victim = _largest_file(tmp_path / 'checkpoints' / '9')
  with open(victim, 'r+b') as f:
    f.truncate(os.path.getsize(victim) // 2)
  capsys.readouterr()
  train.train_and_evaluate(tiny_config(data_dir, 'epochs=3', keep_checkpoints=3), str(tmp_path))
  output = capsys.readouterr()
  assert f'warning: checkpoint {tmp_path / "checkpoints"}/9 is damaged (state/' in output.err, output.err
  assert 'bytes): set aside as' in output.err and 'resuming from step 6' in output.err, output.err
  assert f'resumed from {tmp_path / "checkpoints"} at step 6' in output.out, output.out
  assert os.path.isdir(tmp_path / 'checkpoints' / '9.damaged')
  (step_a, expected), (step_b, resumed) = final_params(straight), final_params(tmp_path)
  assert step_a == step_b == 9
  jax.tree.map(np.testing.assert_array_equal, expected['params'], resumed['params'])


def test_a_damaged_best_checkpoint_is_set_aside_for_the_best_intact_one(tmp_path, straight, capsys):
  shutil.copytree(straight, tmp_path, dirs_exist_ok=True)
  checkpoints = checkpoint_lib.Checkpoints(str(tmp_path), read_only=True)
  best = checkpoints.best_step()
  checkpoints.close()
  os.remove(_largest_file(tmp_path / 'checkpoints' / str(best)))
  capsys.readouterr()
  checkpoints = checkpoint_lib.Checkpoints(str(tmp_path), keep=3)
  assert f'checkpoint {tmp_path / "checkpoints"}/{best} is damaged (state/' in capsys.readouterr().err
  assert checkpoints.best_step() not in (None, best) and best not in checkpoints.all_steps()
  checkpoints.restore_arrays(checkpoints.best_step())  # the new best reads
  checkpoints.close()


def test_evaluate_skips_a_damaged_checkpoint_it_chooses_and_refuses_one_named_by_step(tmp_path, straight, capsys):
  shutil.copytree(straight, tmp_path, dirs_exist_ok=True)
  directory = tmp_path / 'checkpoints'
  os.remove(_largest_file(directory / '9'))
  files = checkpoint_lib.checkpoint_files(str(directory))
  capsys.readouterr()
  assert evaluate.evaluate_checkpoint(str(tmp_path), 'latest')['step'] == 6
  warning = capsys.readouterr().err
  assert f'warning: checkpoint {directory}/9 (latest) is damaged (state/' in warning, warning
  assert 'is missing): evaluating step 6, the newest intact one' in warning, warning
  assert checkpoint_lib.checkpoint_files(str(directory)) == files  # read-only: nothing set aside or removed

  checkpoints = checkpoint_lib.Checkpoints(str(tmp_path), read_only=True)
  best = checkpoints.best_step()  # Orbax's, from the saved metrics: blind to damage
  if best != 9:
    victim = _largest_file(directory / str(best))
    with open(victim, 'r+b') as f:
      f.truncate(os.path.getsize(victim) // 2)
  config = evaluate.load_run_config(str(tmp_path))
  wars = {record['step']: record['war'] for record in writers.read_records(tmp_path, 'test')}
  best_intact = max((wars[step], step) for step in (3, 6) if step != best)[1]  # the latest on ties, as Orbax's
  assert evaluate.choose_step(checkpoints, 'best', config, str(tmp_path)) == best_intact
  warning = capsys.readouterr().err
  assert f'warning: checkpoint {directory}/{best} (best) is damaged (state/' in warning, warning
  assert f': evaluating step {best_intact}, the best intact one by war' in warning, warning

  intact = ', '.join(str(step) for step in (3, 6) if step != best)
  with pytest.raises(ValueError, match=rf'^--step 9: checkpoint {re.escape(str(directory))}/9 is damaged '
                     rf'\(state/\S+ is missing\); the intact steps are \[{intact}\]$'):
    evaluate.choose_step(checkpoints, '9', config, str(tmp_path))
  checkpoints.close()


def test_a_refused_save_stops_the_run_with_its_checkpoints_intact(tmp_path, data_dir, straight, capsys):  # noqa: F811
  """A real failed write, as on a full disk: under a 20 KiB file-size limit (writes past it fail with EFBIG, in
  tensorstore's threads too) the resumed run writes its logs but not checkpoint 10 (every checkpoint has larger
  files: the arrays and their metadata). It stops with one message naming that checkpoint and what to do;
  checkpoints 3, 6, 9 stay intact, and the same run without the limit resumes from 9 (Orbax's half-written
  directory of step 10 removed)."""
  workdir, directory = tmp_path / 'run', tmp_path / 'run' / 'checkpoints'
  shutil.copytree(straight, workdir)
  cache = tmp_path / 'xla_cache'  # a copy of the tests' cache: JAX would keep an entry that the limit cut short
  if os.path.isdir(TEST_COMPILATION_CACHE):
    shutil.copytree(TEST_COMPILATION_CACHE, cache)
  # no evaluation (no image to write) before the failed save of step 10 surfaces, at step 12's log or save
  code, output = run_main(workdir, data_dir, '--config.num_epochs=5', '--config.keep_checkpoints=3',
                          '--config.checkpoint_every_steps=10', '--config.eval_every_epochs=5',
                          file_size_limit_kib=20, compilation_cache=cache)
  assert code == 1 and 'Traceback' not in output, output
  errors = [line for line in output.splitlines() if line.startswith('error: ')]
  assert errors == [f'error: the disk refused a write ({directory / "10"}): File too large; stopped, the last '
                    f'checkpoint is {directory / "9"} (the same command resumes from it). Free some space (or raise '
                    'the file-size limit, ulimit -f) and rerun.'], output
  assert [name for name in os.listdir(directory) if name.startswith('10.')]  # Orbax's temporary directory
  assert sorted(os.listdir(workdir / 'checkpoint_files')) == ['3.json', '6.json', '9.json']
  checkpoints = checkpoint_lib.Checkpoints(str(workdir), read_only=True)
  assert checkpoints.all_steps() == [3, 6, 9] and checkpoints.damaged_steps() == {}
  for step in (3, 6):  # 9: the resume below
    checkpoints.restore_arrays(step)
  checkpoints.close()
  capsys.readouterr()
  train.train_and_evaluate(tiny_config(data_dir, 'epochs=4', keep_checkpoints=3), str(workdir))
  assert f'resumed from {directory} at step 9' in capsys.readouterr().out
  assert final_params(workdir)[0] == 12 and not [name for name in os.listdir(directory) if not name.isdigit()]
