"""Runs stopped and started again: SIGKILL, SIGTERM (a scheduler's preemption) with input workers, Ctrl-C, and
scripts/run_folds.py passing signals on and running folds at once; each restart ends equal to a run never stopped."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dferjax import environment, train
from test_train import (REPO, TEST_COMPILATION_CACHE, TINY_CONFIG, data_dir, eval_records,  # noqa: F401  (a fixture)
                        final_params, run_main)


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory, data_dir):  # noqa: F811
  """The tiny config's 3 epochs of 3 steps, uninterrupted: what an interrupted run must end equal to."""
  workdir = tmp_path_factory.mktemp('straight') / 'run'
  code, output = run_main(workdir, data_dir)
  assert code == 0, output
  return workdir


def assert_same_end(straight, resumed):
  """The same final parameters, and the same evaluations, each epoch once."""
  (step_a, a), (step_b, b) = final_params(straight), final_params(resumed)
  assert step_a == step_b == 9
  for collection in ('params', 'batch_stats'):
    jax.tree.map(np.testing.assert_array_equal, a[collection], b[collection])
  assert [r['epoch'] for r in eval_records(resumed)] == [1, 2, 3]  # no duplicated or lost epochs after the restart
  assert [r['confusion'] for r in eval_records(straight)] == [r['confusion'] for r in eval_records(resumed)]


def input_workers_ignoring_sigterm(pid: int) -> int:
  """How many of `pid`'s multiprocessing children (grain's input workers) have set SIGTERM to be ignored."""
  count = 0
  for entry in os.listdir('/proc'):
    try:
      status = dict(line.split(':\t', 1) for line in open(f'/proc/{entry}/status').read().splitlines())
      command = open(f'/proc/{entry}/cmdline').read()
    except (OSError, ValueError):  # not a process, or gone
      continue
    if status.get('PPid') == str(pid) and 'spawn_main' in command:
      count += bool(int(status['SigIgn'], 16) & (1 << (signal.SIGTERM - 1)))
  return count


def test_killed_then_preempted_then_finished_equals_an_uninterrupted_run(  # noqa: F811
    tmp_path, data_dir, straight_run):
  """SIGKILL mid-epoch after the step-4 checkpoint; the restart reads with two input worker processes and gets a
  scheduler's SIGTERM (SLURM's reaches every process of the job step: the trainer and its workers), saves the step it
  is in and exits 143; the next restart, with threads, ends with the uninterrupted run's parameters and
  evaluations."""
  workdir, every_2 = tmp_path / 'run', '--config.checkpoint_every_steps=2'
  killed = run_main(workdir, data_dir, every_2, wait=False)
  deadline = time.time() + 300
  while not (workdir / 'checkpoints' / '4').is_dir():
    assert killed.poll() is None, killed.communicate()[0]
    assert time.time() < deadline, 'no checkpoint at step 4'
    time.sleep(0.05)
  killed.send_signal(signal.SIGKILL)
  killed.wait()

  preempted = run_main(workdir, data_dir, every_2, '--config.input.num_workers=2', wait=False)
  deadline = time.time() + 120
  while input_workers_ignoring_sigterm(preempted.pid) < 2:  # up and reading: past their start
    assert preempted.poll() is None, preempted.communicate()[0]
    assert time.time() < deadline, 'two input workers ignoring SIGTERM never appeared'
    time.sleep(0.02)
  os.killpg(preempted.pid, signal.SIGTERM)
  output, _ = preempted.communicate(timeout=120)
  assert preempted.returncode == 143 and 'resumed from' in output, output
  saved = max(int(name) for name in os.listdir(workdir / 'checkpoints') if name.isdigit())
  assert 5 <= saved < 9, output  # the step it was in, before the end
  assert output.strip().splitlines()[-1] == (f'stopped by SIGTERM after saving step {saved}: the last checkpoint is '
                                             f'{workdir / "checkpoints" / str(saved)} (the same command resumes '
                                             'from it)')
  assert 'Traceback' not in output and 'tracked_metric' not in output and 'leaked' not in output, output

  code, output = run_main(workdir, data_dir, every_2)
  assert code == 0 and f'at step {saved}' in output, output
  if saved % 3:  # resumed mid-epoch: the epoch line's train means are of the steps since the restart
    epoch = saved // 3 + 1
    assert f'epoch {epoch} | train (steps {saved + 1}-{3 * epoch}) loss' in output, output
  assert_same_end(straight_run, workdir)
  # The trainer reads the next batch while a step runs, but not past a save (a SIGTERM's included): each
  # checkpoint's iterator state is that of the batches its step trained on (4 clips each).
  for name in (name for name in os.listdir(workdir / 'checkpoints') if name.isdigit()):
    state = json.load(open(workdir / 'checkpoints' / name / 'data' / 'process_0-of-1.json'))
    assert state == {'next_index': 4 * int(name)}, name


def run_folds(tmp_path, data_dir, *flags, **popen):  # noqa: F811
  """scripts/run_folds.py on the tiny config, folds 1 and 2, in its own process group (as from a terminal)."""
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1', 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_PYTHON_CLIENT_MEM_FRACTION', None)
  return subprocess.Popen(
      [sys.executable, os.path.join(REPO, 'scripts', 'run_folds.py'), f'--config={TINY_CONFIG}',
       f'--workdir={tmp_path / "stt"}', '--folds=1,2', *flags, '--', f'--config.dataset.data_dir={data_dir}',
       f'--compilation_cache={TEST_COMPILATION_CACHE}'],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **popen)


def sigterm_once_started(process, workdirs) -> str:
  """SIGTERM to run_folds alone (as Kubernetes sends it to a container's first process) once each fold's trainer
  holds its workdir (its SIGTERM handler is set before); returns the output."""
  deadline = time.time() + 300
  while not all((workdir / train.LOCK_FILENAME).exists() for workdir in workdirs):
    assert process.poll() is None, process.communicate()[0]
    assert time.time() < deadline, 'the folds never started'
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 143 and 'Traceback' not in output, output
  return output


def assert_saved_on_sigterm(fold_output: str, workdir):
  saved = re.search(r'stopped by SIGTERM after saving step (\d+): the last checkpoint is ', fold_output)
  assert saved and (workdir / 'checkpoints' / saved[1]).is_dir(), fold_output


def test_run_folds_passes_sigterm_on_then_resumes_the_folds_at_once_each_on_its_gpu(tmp_path, data_dir):  # noqa: F811
  """One fold after another, SIGTERM to run_folds alone: fold 1 saves and stops, fold 2 never starts. The same
  command with --gpus 0,0 then trains both at once on "GPU 0" (CPU JAX ignores the variable; the run records it),
  each with 0.45 of its memory and its output in its workdir, and prints the table of both."""
  workdirs = [tmp_path / f'stt_fold{fold}' for fold in (1, 2)]
  output = sigterm_once_started(run_folds(tmp_path, data_dir), workdirs[:1])
  assert_saved_on_sigterm(output, workdirs[0])
  assert 'fold 1: stopped (exit status 143)' in output, output
  assert 'run_folds: fold(s) 1 stopped, fold(s) 2 not started. Run the same command to resume' in output, output
  assert not workdirs[1].exists(), output

  process = run_folds(tmp_path, data_dir, '--gpus=0,0')
  output, _ = process.communicate(timeout=600)
  assert process.returncode == 0, output
  lines = output.splitlines()
  for fold, workdir in zip((1, 2), workdirs):
    assert any(line.startswith(f'fold {fold}: started on GPU 0, output in {workdir / "run_folds.log"}: ')
               for line in lines), output
    assert any(line.startswith(f'fold {fold}: done: epoch 3 | train') for line in lines), output
    assert 'epoch 3 | train' in (workdir / 'run_folds.log').read_text()
    devices = environment.read(str(workdir))[-1]['devices']['variables']
    assert devices == {'CUDA_VISIBLE_DEVICES': '0', 'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.45'}
  assert 'resumed from' in (workdirs[0] / 'run_folds.log').read_text()
  first_done = next(i for i, line in enumerate(lines) if ': done' in line)
  assert all(i < first_done for i, line in enumerate(lines) if ': started on GPU' in line)  # at once
  best_wars = [max(record['war'] for record in eval_records(workdir)) for workdir in workdirs]  # the papers' epoch
  assert 'fold1' in output and 'fold2' in output and f'{100 * np.mean(best_wars):.2f}' in output
  assert 'not trained with one recipe' not in output  # the fold apart, one config
  process = run_folds(tmp_path, data_dir, '--folds=2', '--collect_only', '--latex')  # a subset keeps its names
  output, _ = process.communicate(timeout=300)
  assert process.returncode == 0 and '\nfold2 & ' in output and 'fold1' not in output, output
  assert output.startswith("% best epoch on test (papers' protocol), by WAR:\n\\begin{tabular}"), output


def test_ctrl_c_stops_within_seconds_naming_the_last_checkpoint(tmp_path, data_dir):  # noqa: F811
  """Ctrl-C in a terminal reaches the whole process group: the trainer and its input worker processes."""
  process = run_main(tmp_path, data_dir, '--config.num_epochs=30', '--config.input.num_workers=2', wait=False,
                     as_from_a_terminal=True)
  deadline = time.time() + 300
  while not (tmp_path / 'checkpoints' / '3').is_dir():
    assert process.poll() is None, process.communicate()[0]
    assert time.time() < deadline, 'no checkpoint at step 3'
    time.sleep(0.05)
  os.killpg(process.pid, signal.SIGINT)
  interrupted = time.time()
  output, _ = process.communicate(timeout=60)
  assert time.time() - interrupted < 30, output  # seconds, not the rest of the epoch (under a loaded CPU)
  assert process.returncode == 130 and 'Traceback' not in output and 'leaked' not in output, output
  last = max(int(name) for name in os.listdir(tmp_path / 'checkpoints') if name.isdigit())
  assert f'interrupted: the last checkpoint is {tmp_path / "checkpoints" / str(last)}' in output
