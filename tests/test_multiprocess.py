"""Two JAX processes on one machine (issue 16): `--distributed` against a local coordinator, one CPU device per
process, gloo collectives, the tiny model on the synthetic dataset; and the launch recipes of docs/multihost.md
(scripts/launch/) run as two local processes. Run alone: pytest -m multiprocess."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import yaml

from dferjax import preemption
from test_train import (REPO, TEST_COMPILATION_CACHE, TINY_CONFIG, data_dir, final_params,  # noqa: F401  (data_dir is a fixture)
                        truncate_to)

pytestmark = pytest.mark.multiprocess
GLOBAL_DEVICES = 2
# 2 epochs of 3 steps, checkpoints at 2, 3, 4 and 6: a kill after step 2 restarts mid-epoch.
RUN = ('--config.num_epochs=2', '--config.checkpoint_every_steps=2')
CLUSTER_PREFIXES = ('SLURM_', 'DFERJAX_', 'JAX_COORD', 'OMPI_', 'PMI_', 'TPU_', 'KUBERNETES_')
# The paths a process opened for writing, created, or renamed onto (Python's audit events): which process wrote
# what in the shared workdir. Only the test's processes load it (PYTHONPATH).
WRITES_AUDIT = '''import os, sys
_fd = os.open(os.environ['WRITES_LOG'], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
_WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def _log(path):
  if isinstance(path, (str, bytes, os.PathLike)):
    os.write(_fd, os.path.abspath(os.fsdecode(path)).encode() + b'\\n')
def _hook(event, args):
  if event == 'open' and args[2] & _WRITING or event == 'os.mkdir':
    _log(args[0])
  elif event == 'os.rename':
    _log(args[1])
sys.addaudithook(_hook)
'''


def free_port(low: int = 1024, high: int = 65535) -> int:
  for port in random.sample(range(low, high + 1), 200):
    with socket.socket() as s:
      try:
        s.bind(('localhost', port))
      except OSError:
        continue
      return port
  raise RuntimeError(f'no free port in [{low}, {high}]')


def base_env(devices_per_process: int) -> dict:
  env = {key: value for key, value in os.environ.items() if not key.startswith(CLUSTER_PREFIXES)}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={devices_per_process}')
  return env


def start(workdir, data_dir, num_processes: int, *extra, audit=None):  # noqa: F811
  """Starts dferjax.main in `num_processes` processes (GLOBAL_DEVICES devices in all), the coordinator given by
  flags; with `audit` (a directory) each process logs the paths it writes to `audit/writes_<i>.log`."""
  port = free_port()
  processes = []
  for index in range(num_processes):
    env = base_env(GLOBAL_DEVICES // num_processes)
    if audit is not None:
      env.update(PYTHONPATH=os.pathsep.join(filter(None, (str(audit), env.get('PYTHONPATH')))),
                 WRITES_LOG=str(audit / f'writes_{index}.log'))
    args = []
    if num_processes > 1:
      args = ['--distributed', f'--coordinator_address=localhost:{port}', f'--num_processes={num_processes}',
              f'--process_id={index}']
    command = [sys.executable, '-m', 'dferjax.main', f'--config={TINY_CONFIG}', f'--workdir={workdir}',
               f'--config.dataset.data_dir={data_dir}', *args, *extra,
               f'--compilation_cache={TEST_COMPILATION_CACHE}']  # later launches load their executables
    processes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
  return processes


def finish(processes, timeout=300) -> list[str]:
  """Waits for every process; fails with every process's output if one fails or hangs."""
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


def launch(workdir, data_dir, num_processes: int, *extra, audit=None) -> list[str]:  # noqa: F811
  return finish(start(workdir, data_dir, num_processes, *extra, audit=audit))


def assert_same_params(workdir_a, workdir_b):
  (step_a, a), (step_b, b) = final_params(workdir_a), final_params(workdir_b)
  assert step_a == step_b
  for collection in ('params', 'batch_stats'):  # gloo sums in another order than one process: float rounding
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5), a[collection], b[collection])


def written_names(log, workdir) -> set[str]:
  """The workdir entries (first path component) a process wrote to."""
  prefix = os.path.abspath(workdir) + os.sep
  return {line[len(prefix):].split(os.sep)[0] for line in open(log).read().splitlines() if line.startswith(prefix)}


@pytest.fixture(scope='module')
def one_process_run(tmp_path_factory, data_dir):  # noqa: F811
  """The reference: 1 process with 2 devices, uninterrupted; its checkpoints kept, to resume from."""
  workdir = tmp_path_factory.mktemp('one') / 'run'
  launch(workdir, data_dir, 1, *RUN, '--config.keep_checkpoints=4')
  return workdir


def test_two_processes_killed_resume_exactly_and_change_count_like_one(tmp_path, data_dir, one_process_run):  # noqa: F811
  two = tmp_path / 'two'
  processes = start(two, data_dir, 2, *RUN)
  deadline = time.time() + 300
  while not (two / 'checkpoints' / '2').is_dir():  # Orbax renames a step's directory once it is complete
    assert all(p.poll() is None for p in processes), finish(processes)
    assert time.time() < deadline, 'no checkpoint at step 2'
    time.sleep(0.05)
  for process in processes:
    process.send_signal(signal.SIGKILL)
  outputs = [process.communicate()[0] for process in processes]
  assert 'JAX process 0/2, 2 devices' in outputs[0] and 'JAX process' not in outputs[1]
  assert not (two / 'results.json').exists(), 'the run ended before it was killed'
  data_files = os.listdir(two / 'checkpoints' / '2' / 'data')  # both hosts' iterator states in one checkpoint
  assert sorted(name for name in data_files if name.startswith('process_')) == ['process_0-of-2.json',
                                                                                'process_1-of-2.json']

  audit = tmp_path / 'audit'
  audit.mkdir()
  (audit / 'sitecustomize.py').write_text(WRITES_AUDIT)
  # Both restarted, each making its batches, training and evaluation, in a worker process: the same batches.
  outputs = launch(two, data_dir, 2, *RUN, '--config.input.num_workers=1', audit=audit)
  assert 'resumed from' in outputs[0], outputs[0]
  assert_same_params(one_process_run, two)
  clips_evaluated = [[record['num_clips'] for record in map(json.loads, open(run / 'metrics.jsonl'))
                      if record['split'] == 'test'] for run in (one_process_run, two)]
  assert clips_evaluated[0] == clips_evaluated[1] == [7, 7]  # every test clip once, over both hosts' workers
  chief, other = (written_names(audit / f'writes_{i}.log', two) for i in range(2))
  assert {'metrics.jsonl', 'tensorboard', 'config.json', 'environment.json', 'results.json', 'confusion_matrix.png',
          'learning_curves.png', 'checkpoint_files', 'checkpoints'} <= chief
  assert other <= {'checkpoints'}, f'process 1 wrote {sorted(other)}'

  truncate_to(two, tmp_path / 'two_to_one', 4)  # resume mid-epoch 2 with another process count
  launch(tmp_path / 'two_to_one', data_dir, 1, *RUN)
  assert_same_params(one_process_run, tmp_path / 'two_to_one')


# --- The launch recipes (scripts/launch/, docs/multihost.md), each resuming the 1-process run with 2 processes.

FAKE_SRUN = '''#!{python}
"""srun on one machine: every task of the step, each with the variables srun gives it, output to $SRUN_LOGS."""
import os, subprocess, sys
args = sys.argv[1:]
while args[0].startswith('-'):
  args.pop(0)
tasks, nodes = int(os.environ['SLURM_NTASKS']), int(os.environ['SLURM_NNODES'])
processes = []
for rank in range(tasks):
  env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank % (tasks // nodes)),
             SLURM_NODEID=str(rank // (tasks // nodes)), SLURM_STEP_NODELIST=os.environ['SLURM_JOB_NODELIST'],
             SLURM_STEP_NUM_NODES=str(nodes), SLURM_STEP_NUM_TASKS=str(tasks), SLURM_STEP_ID='0')
  log = open(os.path.join(os.environ['SRUN_LOGS'], f'task{{rank}}.log'), 'w')
  processes.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT))
sys.exit(max(process.wait() for process in processes))
'''


def test_slurm_batch_script_one_task_per_node(tmp_path, data_dir, one_process_run):  # noqa: F811
  """scripts/launch/slurm.sbatch as sbatch runs it on 2 nodes x 1 task: JAX's SLURM detection (coordinator from
  the node list and job id, count and rank from srun's variables) and --local_device_ids=all."""
  workdir = tmp_path / 'slurm'
  truncate_to(one_process_run, workdir, 4)
  bin_dir, logs = tmp_path / 'bin', tmp_path / 'logs'
  bin_dir.mkdir()
  logs.mkdir()
  (bin_dir / 'srun').write_text(FAKE_SRUN.format(python=sys.executable))
  (bin_dir / 'srun').chmod(0o755)
  port = free_port(61440, 65535)  # JAX's SLURM coordinator port: 61440 + SLURM_JOB_ID % 4096
  env = base_env(GLOBAL_DEVICES // 2)
  env.update(PATH=os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), env['PATH']]), SRUN_LOGS=str(logs),
             SLURM_JOB_ID=str(4096 * 100 + port - 61440), SLURM_JOB_NODELIST='localhost', SLURM_NNODES='2',
             SLURM_NTASKS='2', SLURM_NTASKS_PER_NODE='1')
  result = subprocess.run(['bash', 'scripts/launch/slurm.sbatch', TINY_CONFIG, str(workdir), *RUN,
                           f'--config.dataset.data_dir={data_dir}', f'--compilation_cache={TEST_COMPILATION_CACHE}'],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
  outputs = [(logs / f'task{rank}.log').read_text() for rank in range(2)]
  assert result.returncode == 0, result.stderr + '\n'.join(outputs)
  assert 'JAX process 0/2, 2 devices' in outputs[0] and 'resumed from' in outputs[0], outputs[0]
  assert_same_params(one_process_run, workdir)


def test_kubernetes_indexed_job_manifest(tmp_path, data_dir, one_process_run):  # noqa: F811
  """scripts/launch/k8s_indexed_job.yaml: its container command and environment, run as its two pods would (pod
  i's completion index as DFERJAX_PROCESS_ID, the coordinator's pod DNS name as localhost); one pod deleted
  mid-run (SIGTERM), both save the same step, and the pods started again resume from it."""
  documents = list(yaml.safe_load_all(open(os.path.join(REPO, 'scripts', 'launch', 'k8s_indexed_job.yaml'))))
  service, = (d for d in documents if d['kind'] == 'Service')
  job, = (d for d in documents if d['kind'] == 'Job')
  pod = job['spec']['template']['spec']
  container, = pod['containers']
  env = {item['name']: item for item in container['env']}
  assert service['spec']['clusterIP'] == 'None' and pod['subdomain'] == service['metadata']['name']
  assert job['spec']['completionMode'] == 'Indexed'
  host, port = env['DFERJAX_COORDINATOR_ADDRESS']['value'].rsplit(':', 1)
  assert host == f'{job["metadata"]["name"]}-0.{pod["subdomain"]}'  # Indexed Job pod 0's DNS name
  assert int(port) in [p['port'] for p in service['spec']['ports']]
  num_processes = int(env['DFERJAX_NUM_PROCESSES']['value'])
  assert num_processes == job['spec']['completions'] == job['spec']['parallelism'] == 2
  assert env['DFERJAX_PROCESS_ID']['valueFrom']['fieldRef']['fieldPath'] == (
      "metadata.annotations['batch.kubernetes.io/job-completion-index']")
  restarted, = (rule['onExitCodes'] for rule in job['spec']['podFailurePolicy']['rules']
                if rule['action'] == 'Ignore' and 'onExitCodes' in rule)
  assert restarted == {'containerName': container['name'], 'operator': 'In', 'values': [preemption.EXIT_STATUS]}

  workdir = tmp_path / 'k8s'
  truncate_to(one_process_run, workdir, 2)
  ours = {'--config': TINY_CONFIG, '--workdir': str(workdir), '--config.dataset.data_dir': data_dir}
  args = [f'{name}={ours[name]}' for name, _ in (arg.split('=', 1) for arg in container['args'])]
  assert sorted(arg.split('=')[0] for arg in args) == sorted(ours)  # the manifest's args are these three

  def start_pods():
    address = f'localhost:{free_port()}'
    processes = []
    for index in range(num_processes):
      pod_env = base_env(GLOBAL_DEVICES // num_processes)
      pod_env.update({name: item['value'] for name, item in env.items() if 'value' in item},
                     DFERJAX_COORDINATOR_ADDRESS=address, DFERJAX_PROCESS_ID=str(index))
      processes.append(subprocess.Popen(
          [sys.executable if word == 'python' else word for word in container['command']]
          + args + list(RUN) + [f'--compilation_cache={TEST_COMPILATION_CACHE}'],
          cwd=REPO, env=pod_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return processes

  # Kubernetes deletes pod 1 (preemption, a drained node): SIGTERM to its process. JAX's preemption service tells
  # pod 0, and both save the same step, then exit 143, which the Job's restart policy restarts.
  processes = start_pods()
  seen = []
  for line in processes[0].stdout:  # both processes are past jax.distributed.initialize and training begins
    seen.append(line)
    if 'resumed from' in line:
      break
  processes[1].send_signal(signal.SIGTERM)
  outputs = []
  for process in processes:
    try:
      outputs.append(process.communicate(timeout=300)[0])
    finally:
      if process.poll() is None:
        process.kill()
  outputs[0] = ''.join(seen) + outputs[0]
  report = '\n'.join(f'--- pod {i} (exit {p.returncode}) ---\n{o}' for i, (p, o) in enumerate(zip(processes, outputs)))
  assert [process.returncode for process in processes] == [143, 143], report
  saved = max(int(name) for name in os.listdir(workdir / 'checkpoints') if name.isdigit())
  assert 3 <= saved < 6, report
  for output in outputs:
    assert f'every process saves step {saved}, then stops' in output, report
    assert output.strip().splitlines()[-1].startswith(f'stopped by SIGTERM after saving step {saved}:'), report
  assert sorted(name for name in os.listdir(workdir / 'checkpoints' / str(saved) / 'data')
                if name.startswith('process_')) == ['process_0-of-2.json', 'process_1-of-2.json']

  outputs = finish(start_pods())
  assert 'JAX process 0/2, 2 devices' in outputs[0] and f'resumed from {workdir / "checkpoints"} at step {saved}' \
      in outputs[0], outputs[0]
  assert_same_params(one_process_run, workdir)
