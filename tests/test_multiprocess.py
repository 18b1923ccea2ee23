"""Two JAX processes on one machine (issue 16): `--distributed` against a local coordinator, one CPU device per
process, gloo collectives, the tiny model on the synthetic dataset. Run alone: pytest -m multiprocess."""
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from test_train import REPO, TEST_COMPILATION_CACHE, TINY_CONFIG, data_dir, final_params  # noqa: F401  (data_dir is a fixture)

pytestmark = pytest.mark.multiprocess
GLOBAL_DEVICES = 2


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def launch(workdir, data_dir, num_processes: int, *extra, env_of=None, timeout=300):  # noqa: F811
  """Runs dferjax.main in `num_processes` processes (GLOBAL_DEVICES devices in all) until all exit; fails with
  every process's output if one fails or hangs."""
  port = free_port()
  processes = []
  for index in range(num_processes):
    env = {key: value for key, value in os.environ.items() if not key.startswith(('SLURM_', 'DFERJAX_', 'JAX_COORD'))}
    env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={GLOBAL_DEVICES // num_processes}')
    args = ['--distributed']
    if env_of:
      env.update(env_of(index, port))
    elif num_processes > 1:
      args += [f'--coordinator_address=localhost:{port}', f'--num_processes={num_processes}', f'--process_id={index}']
    if num_processes == 1 and not env_of:
      args = []
    command = [sys.executable, '-m', 'dferjax.main', f'--config={TINY_CONFIG}', f'--workdir={workdir}',
               f'--config.dataset.data_dir={data_dir}', *args, *extra,
               f'--compilation_cache={TEST_COMPILATION_CACHE}']  # later launches load their executables
    processes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
  outputs = []
  try:
    for process in processes:
      outputs.append(process.communicate(timeout=timeout)[0])
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
  report = '\n'.join(f'--- process {i} (exit {p.returncode}) ---\n{o}' for i, (p, o) in enumerate(zip(processes, outputs)))
  assert all(process.returncode == 0 for process in processes), report
  return outputs


def assert_same_params(workdir_a, workdir_b):
  (step_a, a), (step_b, b) = final_params(workdir_a), final_params(workdir_b)
  assert step_a == step_b
  for collection in ('params', 'batch_stats'):  # gloo sums in another order than one process: float rounding
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5), a[collection], b[collection])


def truncate_to(source, target, step: int):
  """A copy of workdir `source` as if it had stopped after checkpoint `step`."""
  shutil.copytree(source, target)
  for name in os.listdir(target / 'checkpoints'):
    if name.isdigit() and int(name) > step:
      shutil.rmtree(target / 'checkpoints' / name)
      os.remove(target / 'checkpoint_files' / f'{name}.json')


def test_two_processes_train_resume_and_change_count_like_one(tmp_path, data_dir):  # noqa: F811
  launch(tmp_path / 'one', data_dir, 1, '--config.num_epochs=2')  # the reference: 1 process, 2 devices
  outputs = launch(tmp_path / 'two', data_dir, 2, '--config.num_epochs=1')
  assert 'JAX process 0/2, 2 devices' in outputs[0] and 'JAX process' not in outputs[1]
  data_files = sorted(os.listdir(tmp_path / 'two' / 'checkpoints' / '3' / 'data'))
  assert [name for name in data_files if name.startswith('process_')] == ['process_0-of-2.json', 'process_1-of-2.json']
  assert not any(name.startswith('process_') for name in os.listdir(tmp_path / 'two'))
  truncate_to(tmp_path / 'two', tmp_path / 'two_to_one', 3)
  truncate_to(tmp_path / 'one', tmp_path / 'one_to_two', 3)
  outputs = launch(tmp_path / 'two', data_dir, 2, '--config.num_epochs=2')  # 2 processes resume
  assert 'resumed from' in outputs[0] and 'at step 3' in outputs[0]
  assert_same_params(tmp_path / 'one', tmp_path / 'two')
  launch(tmp_path / 'two_to_one', data_dir, 1, '--config.num_epochs=2')
  assert_same_params(tmp_path / 'one', tmp_path / 'two_to_one')
  launch(tmp_path / 'one_to_two', data_dir, 2, '--config.num_epochs=2')
  assert_same_params(tmp_path / 'one', tmp_path / 'one_to_two')

