"""Checkpoints damaged after they were written (issue 16): resume falls back to the newest intact checkpoint with a
warning naming the damaged step; a damaged best checkpoint is set aside and the best intact one takes its place."""
import os
import shutil

import jax
import numpy as np
import pytest

from dferjax import checkpoint as checkpoint_lib
from dferjax import train
from test_train import data_dir, final_params, tiny_config  # noqa: F401  (data_dir is a fixture)


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
