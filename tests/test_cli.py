"""Every command prints an expected error as one `error: ...` message and exits non-zero, without a traceback
(issue 18); `--help` exits 0; killing build_dataset takes its workers with it."""
import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from dferjax import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / 'tests' / 'tiny_config.py'
ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}


def _run(*args):
  return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=ENV, capture_output=True, text=True,
                        timeout=300, check=False)


def _one_error(result, *wanted):
  assert result.returncode == 1, result.stdout + result.stderr
  assert 'Traceback' not in result.stderr, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1, result.stderr
  for text in wanted:
    assert text in result.stderr, result.stderr


def test_main_help_exits_zero_and_says_how_to_print_a_config():
  result = _run('-m', 'dferjax.main', '--help')
  assert result.returncode == 0 and '--print_config' in result.stdout and '--config configs/' in result.stdout
  result = _run('-m', 'dferjax.main', '--config', TINY_CONFIG, '--print_config', '--config.batch_size=8')
  assert result.returncode == 0 and 'batch_size: 8' in result.stdout and 'learning_rate: 0.01' in result.stdout


def test_main_config_typo_names_the_fields_and_the_closest():
  result = _run('-m', 'dferjax.main', '--config', TINY_CONFIG, '--workdir=/tmp/unused', '--config.optimizer.lr=0.1')
  _one_error(result, "config.optimizer has no field 'lr'", 'learning_rate, momentum',
             'did you mean config.optimizer.learning_rate?')


@pytest.mark.parametrize('case', ['batch_size_0', 'unwritable_workdir', 'no_backbone'])
def test_main_expected_errors_are_one_message(tmp_path, case):
  if case == 'batch_size_0':
    args, wanted = (f'--workdir={tmp_path}', '--config.batch_size=0'), ('config.batch_size=0',)
  elif case == 'unwritable_workdir':
    args, wanted = ('--workdir=/sys/dferjax_unwritable_run',), ('cannot write (/sys/dferjax_unwritable_run)',)
  else:  # stops right after the checkpoint manager starts (its cleanup thread must not outlive the exit)
    args, wanted = (f'--workdir={tmp_path / "run"}', '--config.init_from.backbone='), (
        'stt trains from a pretrained backbone in its paper, and none was given',)
  _one_error(_run('-m', 'dferjax.main', '--config', TINY_CONFIG, '--compilation_cache=', *args), *wanted)


@pytest.mark.parametrize('module', ['dferjax.main', 'dferjax.summary'])
def test_config_flag_errors_are_one_message_naming_the_flag(module):
  """Parsed before anything runs: a missing config file, a config argument it does not take or of the wrong type,
  an override of the wrong type."""
  workdir = ['--workdir=/tmp/unused'] if module == 'dferjax.main' else []
  cases = [(['--config', 'configs/stt_dfw.py'], '--config configs/stt_dfw.py: no such file'),
           (['--config', f'{TINY_CONFIG}:fodl=2'], "config argument 'fodl' is not one of ['epochs', 'fold', 'layers']"),
           (['--config', f'{TINY_CONFIG}:fold=x'], "config argument fold='x': expected int (default 1"),
           (['--config', TINY_CONFIG, '--config.batch_size=abc'],
            "flag --config.batch_size=abc: invalid literal for int() with base 10: 'abc'")]
  for args, wanted in cases if module == 'dferjax.main' else cases[::3]:
    _one_error(_run('-m', module, *args, *workdir), wanted)


def test_evaluate_bad_step_and_duplicated_folds_are_one_message(tmp_path):
  for fold, name in ((1, 'a'), (1, 'b')):
    (tmp_path / name).mkdir()
    config = {'dataset': {'name': f'dfew/fold{fold}_px32'}, 'best_metric': 'war'}
    (tmp_path / name / 'config.json').write_text(json.dumps(config))
  _one_error(_run('-m', 'dferjax.evaluate', f'--folds={tmp_path / "a"},{tmp_path / "b"}'),
             f'fold 1 is given twice: {tmp_path / "a"}, {tmp_path / "b"}')
  (tmp_path / 'a' / 'checkpoints').mkdir()
  _one_error(_run('-m', 'dferjax.evaluate', f'--workdir={tmp_path / "a"}', '--step=foo'),
             "--step 'foo': expected 'best', 'selected', 'latest' or a step number")


def test_a_full_disk_and_a_file_size_limit_read_alike(tmp_path):
  """ENOSPC, EDQUOT and EFBIG, as an OSError under another error or in the text of tensorstore's ValueError (the
  real EFBIG of a save: test_checkpoint_damage), give one message naming the last checkpoint."""
  (tmp_path / 'checkpoints' / '6').mkdir(parents=True)
  (tmp_path / 'checkpoints' / '9.orbax-checkpoint-tmp-1').mkdir()
  last = f'the last checkpoint is {tmp_path / "checkpoints" / "6"} (the same command resumes from it)'
  wrapped = RuntimeError('save failed')
  wrapped.__cause__ = OSError(errno.ENOSPC, 'No space left on device', str(tmp_path / 'checkpoints' / '9'))
  assert cli.error_message(wrapped, str(tmp_path)) == (
      f'the disk refused a write ({tmp_path / "checkpoints" / "9"}): No space left on device; stopped, {last}. Free '
      'some space (or raise the file-size limit, ulimit -f) and rerun.')
  for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
    tensorstore = ValueError(f'OUT_OF_RANGE: Error writing local file "/w/checkpoints/9.orbax-checkpoint-tmp/x": '
                             f"Failed to write 9 bytes to file 3: {os.strerror(code)} [os_error_code='{code}']")
    assert cli.error_message(tensorstore, str(tmp_path)).startswith(
        f'the disk refused a write: {os.strerror(code)}; stopped, {last}. Free some space')
  other = ValueError("NOT_FOUND: Error opening file \"x\": No such file or directory [os_error_code='2']")
  assert cli.error_message(other, str(tmp_path)) == str(other)


def _children(pid):
  path = pathlib.Path(f'/proc/{pid}/task/{pid}/children')
  return [int(child) for child in path.read_text().split()] if path.exists() else []


def _alive(pid):
  try:
    return pathlib.Path(f'/proc/{pid}/stat').read_text().split()[2] != 'Z'
  except FileNotFoundError:
    return False


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')
def test_killing_build_dataset_kills_its_workers(tmp_path):
  from dferjax.data import synthetic
  synthetic.write_dfew(tmp_path / 'manual', clips_per_class=3, seed=0)
  process = subprocess.Popen(
      [sys.executable, 'scripts/build_dataset.py', '--dataset=dfew', f'--manual_dir={tmp_path / "manual"}',
       f'--data_dir={tmp_path / "data"}', '--configs=fold1_px32,fold2_px32', '--workers=2'],
      cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while len(workers := [child for child in _children(process.pid) if _alive(child)]) < 2:
    assert process.poll() is None and time.time() < deadline, 'no worker processes started'
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  deadline = time.time() + 15
  while any(_alive(worker) for worker in workers) and time.time() < deadline:
    time.sleep(0.1)
  left = [worker for worker in workers if _alive(worker)]
  for worker in left:
    os.kill(worker, signal.SIGKILL)
  assert not left, 'build_dataset workers outlived their parent'
