"""--distributed (issue 16): the coordinator, process count and id from flags or DFERJAX_* variables, cluster
detection when none is given, one-line errors for an incomplete or bad set."""
import os
import subprocess
import sys

import pytest

from dferjax import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, 'tests', 'tiny_config.py')
FULL_ENV = {'DFERJAX_COORDINATOR_ADDRESS': 'host0:1234', 'DFERJAX_NUM_PROCESSES': '2', 'DFERJAX_PROCESS_ID': '1'}


def test_flags_then_environment_then_cluster_detection():
  assert distributed.resolve('h:1', 2, 0, environ=FULL_ENV) == dict(coordinator_address='h:1', num_processes=2,
                                                                     process_id=0)
  assert distributed.resolve(environ=FULL_ENV) == dict(coordinator_address='host0:1234', num_processes=2,
                                                       process_id=1)
  assert distributed.resolve(environ={'JAX_COORDINATOR_ADDRESS': 'h:1'}) == {}  # JAX reads it itself


@pytest.mark.parametrize('given, environ, wanted', [
    (dict(coordinator_address='h:1'), {}, '--coordinator_address given without --num_processes, --process_id'),
    (dict(num_processes=2, process_id=0), {}, '--num_processes, --process_id given without --coordinator_address'),
    ({}, {'DFERJAX_NUM_PROCESSES': '2'}, 'DFERJAX_NUM_PROCESSES given without DFERJAX_COORDINATOR_ADDRESS, '
                                         'DFERJAX_PROCESS_ID'),
    (dict(coordinator_address='h', num_processes=2, process_id=0), {}, "--coordinator_address='h': expected host:port"),
    (dict(coordinator_address='h:1', num_processes=2, process_id=2), {}, '--process_id=2 must be in [0, 2)'),
    ({}, {**FULL_ENV, 'DFERJAX_NUM_PROCESSES': 'two'}, "DFERJAX_NUM_PROCESSES='two': expected an integer"),
])
def test_an_incomplete_or_bad_set_names_what_is_wrong(given, environ, wanted):
  with pytest.raises(ValueError) as error:
    distributed.resolve(**given, environ=environ)
  assert wanted in str(error.value)


CLUSTER_PREFIXES = ('SLURM_', 'OMPI_', 'PMI_', 'JAX_COORDINATOR', 'DFERJAX_', 'TPU_', 'MEGASCALE_', 'KUBERNETES_',
                    'JOB_COMPLETION_INDEX')


def _main(*args):
  """dferjax.main outside any cluster (no scheduler's variables), on the CPU."""
  env = {name: value for name, value in os.environ.items() if not name.startswith(CLUSTER_PREFIXES)}
  env['JAX_PLATFORMS'] = 'cpu'
  return subprocess.run([sys.executable, '-m', 'dferjax.main', f'--config={TINY_CONFIG}', '--workdir=/tmp/unused',
                         '--compilation_cache=', *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=120, check=False)


def test_main_fails_in_one_line_on_an_incomplete_set_or_no_cluster():
  for args, wanted in ((('--distributed', '--num_processes=2'), 'given without --coordinator_address'),
                       (('--distributed',), '--distributed found no cluster to join')):
    result = _main(*args)
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and wanted in errors[0], result.stderr
  result = _main('--process_id=0')
  assert result.returncode == 1 and '--process_id given without --distributed' in result.stderr, result.stderr


def test_local_device_ids_all_a_list_or_jax_default():
  assert distributed.local_device_ids(None, environ={}) is None  # JAX's choice: one GPU per SLURM/MPI task
  assert distributed.local_device_ids('all', environ={}) == []  # JAX restricts devices only for a non-empty list
  assert distributed.local_device_ids(None, environ={'DFERJAX_LOCAL_DEVICE_IDS': '0,3'}) == [0, 3]
  assert distributed.local_device_ids('1', environ={'DFERJAX_LOCAL_DEVICE_IDS': 'all'}) == [1]  # the flag first
  for value, wanted in (('gpu0', "--local_device_ids='gpu0': expected 'all' or device ids"),
                        ('0,0', 'must be distinct')):
    with pytest.raises(ValueError, match=wanted):
      distributed.local_device_ids(value, environ={})


def test_a_bucket_url_as_workdir_or_data_dir_stops_before_anything_is_written(tmp_path, monkeypatch):
  from dferjax import train  # pylint: disable=import-outside-toplevel
  from dferjax.data import inputs  # pylint: disable=import-outside-toplevel
  import test_train  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(tmp_path)  # os.makedirs('gs://b/run') would make ./gs:/b/run
  config = test_train.tiny_config(str(tmp_path))
  with pytest.raises(ValueError, match=r"--workdir='gs://bucket/run': dferjax writes .* \(Cloud Storage FUSE"):
    train.train_and_evaluate(config, 'gs://bucket/run')
  assert os.listdir(tmp_path) == []
  with config.unlocked():
    config.dataset.data_dir = 's3://bucket/data'
  with pytest.raises(ValueError, match=r"config.dataset.data_dir='s3://bucket/data': ArrayRecord"):
    inputs.data_dir(config)
  assert inputs.data_dir(test_train.tiny_config('/mnt/gcs/data')) == '/mnt/gcs/data'  # a mounted bucket is a path


def test_tpu_pod_script_sends_the_same_command_to_every_worker(tmp_path):
  """scripts/launch/tpu_pod.sh with a `gcloud` that records its arguments: every worker, the command with
  --distributed and each extra flag quoted (the script cannot run for real without a pod)."""
  fake = tmp_path / 'gcloud'
  fake.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$GCLOUD_ARGS"\n')
  fake.chmod(0o755)
  env = dict(os.environ, PATH=f'{tmp_path}{os.pathsep}{os.environ["PATH"]}', GCLOUD_ARGS=str(tmp_path / 'args'),
             TPU='pod', ZONE='us-east5-a')
  subprocess.run(['bash', 'scripts/launch/tpu_pod.sh', 'configs/stt_dfew.py:fold=2', '/mnt/runs/stt 2',
                  '--config.dataset.data_dir=/mnt/data'], cwd=REPO, env=env, check=True, timeout=30)
  args = (tmp_path / 'args').read_text().splitlines()
  assert args[:5] == ['compute', 'tpus', 'tpu-vm', 'ssh', 'pod'] and '--zone=us-east5-a' in args
  assert '--worker=all' in args
  command, = (arg[len('--command='):] for arg in args if arg.startswith('--command='))
  assert command == ('cd ~/dferjax && . .venv/bin/activate && python -m dferjax.main --distributed '
                     "--config=configs/stt_dfew.py:fold=2 --workdir=/mnt/runs/stt\\ 2 --config.dataset.data_dir=/mnt/data")
