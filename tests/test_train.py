"""End to end: the trainer on a built synthetic dataset, 1 vs 2 devices, bad inputs and resumes that must fail
(runs stopped and restarted: test_interrupts.py)."""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import cv2
import jax
import numpy as np
import pytest

from dferjax import checkpoint as checkpoint_lib
from dferjax import configlib, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, 'tests', 'tiny_config.py')
# One XLA compilation cache for every `python -m dferjax.main` the tests start: a run that compiles what an earlier
# one did loads it (the cache keys on the program and the jax version, so sharing cannot change a result). One per
# pytest-xdist worker: JAX writes an entry in place, and a run of the other worker could read it half-written.
TEST_COMPILATION_CACHE = os.path.join(tempfile.gettempdir(), f'dferjax_tests_xla_cache_{os.getuid()}'
                                      f'{os.environ.get("PYTEST_XDIST_WORKER", "")}')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """The synthetic DFEW layout, built as TFDS `dfew/fold1_px32` and `fold2_px32` (the real builder code path)."""
  from dferjax.data import build, synthetic
  root = tmp_path_factory.mktemp('synthetic')
  manual_dir, data_dir = root / 'manual', root / 'tfds'
  synthetic.write_dfew(str(manual_dir), clips_per_class=5, seed=0)
  build.build('dfew', manual_dir=str(manual_dir), data_dir=str(data_dir), configs=['fold1_px32', 'fold2_px32'])
  return str(data_dir)


def tiny_config(data_dir, arg=None, **overrides):
  config = configlib.load_config(TINY_CONFIG, arg)
  with config.unlocked():
    config.dataset.data_dir = data_dir
    for key, value in overrides.items():
      node = config
      *parents, leaf = key.split('.')
      for parent in parents:
        node = node[parent]
      node[leaf] = value
  return config


# A command typed in a terminal starts with SIGINT at its default. The tests themselves may not: a background job
# of a non-interactive shell (`bash -c 'pytest ...' &`, as some CI runners start them) inherits SIGINT ignored, and
# Python then leaves it ignored, so a Ctrl-C test would test nothing. This shim sets it back, then runs the command.
AS_FROM_A_TERMINAL = [sys.executable, '-c', 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); '
                      'signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT]); os.execvp(sys.argv[1], sys.argv[1:])']


def run_main(workdir, data_dir, *extra, wait=True, file_size_limit_kib=None, compilation_cache=TEST_COMPILATION_CACHE,
             as_from_a_terminal=False):
  """`python -m dferjax.main` on the tiny config; with `file_size_limit_kib` (bash's `ulimit -f`) a write past
  that size fails with EFBIG, as on a full disk (bash sets it: no Python runs between fork and exec). Such a run
  needs a `compilation_cache` of its own: JAX would leave its entries there cut at the limit. With
  `as_from_a_terminal`, SIGINT starts at its default (AS_FROM_A_TERMINAL)."""
  command = [sys.executable, '-m', 'dferjax.main', f'--config={TINY_CONFIG}', f'--workdir={workdir}',
             f'--config.dataset.data_dir={data_dir}', *extra, f'--compilation_cache={compilation_cache}']
  if file_size_limit_kib is not None:
    command = ['bash', '-c', f'ulimit -f {file_size_limit_kib} && exec "$@"', 'bash', *command]
  if as_from_a_terminal:
    command = [*AS_FROM_A_TERMINAL, *command]
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1', 'JAX_PLATFORMS': 'cpu'}
  process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # its own process group, as a terminal gives a command
  if not wait:
    return process
  output, _ = process.communicate(timeout=600)
  return process.returncode, output


def final_params(workdir):
  checkpoints = checkpoint_lib.Checkpoints(str(workdir), read_only=True)
  step = checkpoints.latest_step()
  arrays = checkpoints.restore_arrays(step)
  checkpoints.close()
  return step, arrays


def test_train_writes_metrics_reports_and_checkpoints(tmp_path, data_dir):
  config = tiny_config(data_dir)
  result = train.train_and_evaluate(config, str(tmp_path))
  assert 0 <= result['war'] <= 1 and 0 <= result['uar'] <= 1
  confusion = np.array(result['confusion'])
  assert confusion.shape == (7, 7) and (confusion.sum(axis=1) == 1).all()  # fold 1 tests 1 clip of each class (5 / 5 folds)
  for name in ('metrics.jsonl', 'confusion_matrix.png', 'learning_curves.png', 'results.json', 'config.json'):
    assert os.path.getsize(tmp_path / name) > 0, name
  records = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [r['epoch'] for r in records if r['split'] == 'test'] == [1, 2, 3]
  for before, record in zip(records, records[1:]):  # each pass's wall time, after the epoch's last train record
    if record['split'] == 'test':
      assert before['split'] == 'train' and 0 < record['seconds'] <= record['wall_time'] - before['wall_time']
  assert os.listdir(tmp_path / 'tensorboard')


def truncate_to(source, target, step: int):
  """A copy of workdir `source` as if it had stopped after checkpoint `step`."""
  assert (source / 'checkpoints' / str(step)).is_dir(), f'{source} kept no checkpoint {step}'
  shutil.copytree(source, target)
  for name in os.listdir(target / 'checkpoints'):
    if name.isdigit() and int(name) > step:
      shutil.rmtree(target / 'checkpoints' / name)
      os.remove(target / 'checkpoint_files' / f'{name}.json')


def eval_records(workdir, split='test') -> list[dict]:
  return [record for record in map(json.loads, open(workdir / 'metrics.jsonl')) if record['split'] == split]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
  config = tiny_config(data_dir, **{'optimizer.learning_rate': 1e30, 'optimizer.weight_decay': 0.0,
                                    'num_epochs': 2, 'log_every_steps': 1})
  with pytest.raises(train.NonFiniteLossError, match='non-finite at step'):
    train.train_and_evaluate(config, str(tmp_path))
  checkpoints = os.listdir(tmp_path / 'checkpoints') if (tmp_path / 'checkpoints').exists() else []
  for step in checkpoints:  # whatever was saved before the failure holds finite parameters
    arrays = checkpoint_lib.Checkpoints(str(tmp_path), read_only=True).restore_arrays(int(step))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(arrays['params']))


def test_resuming_with_another_model_fails_naming_the_field(tmp_path, data_dir):
  train.train_and_evaluate(tiny_config(data_dir, 'epochs=1'), str(tmp_path))
  with pytest.raises(ValueError, match=r'config.model.num_layers=2 \(checkpoint: 1\)') as error:
    train.train_and_evaluate(tiny_config(data_dir, 'epochs=2,layers=2'), str(tmp_path))
  assert 'num_epochs=' not in str(error.value)  # may change on resume


def test_resuming_another_fold_or_recipe_fails_naming_the_fields(tmp_path, data_dir):
  """A fold-2 run started in a fold-1 workdir must not continue the fold-1 checkpoint (test-fold leakage)."""
  train.train_and_evaluate(tiny_config(data_dir, 'epochs=1'), str(tmp_path))
  config = tiny_config(data_dir, 'epochs=2', **{'dataset.name': 'dfew/fold2_px32', 'optimizer.momentum': 0.5})
  with pytest.raises(ValueError, match="config.dataset.name='dfew/fold2_px32' \\(checkpoint: 'dfew/fold1_px32'\\)"
                     ) as error:
    train.train_and_evaluate(config, str(tmp_path))
  assert 'config.optimizer.momentum=0.5 (checkpoint: 0.9)' in str(error.value)
  resumed = tiny_config(data_dir, 'epochs=2', **{'log_every_steps': 1, 'progress_bar': False})
  train.train_and_evaluate(resumed, str(tmp_path))  # epochs and logging may change


def test_restoring_a_checkpoint_of_another_shape_names_the_parameters(tmp_path, data_dir):
  train.train_and_evaluate(tiny_config(data_dir, 'epochs=1'), str(tmp_path / 'one_block'))
  config = tiny_config(data_dir, 'epochs=1,layers=2', **{'init_from.workdir': str(tmp_path / 'one_block')})
  with pytest.raises(ValueError, match='missing .*blocks?_1'):
    train.train_and_evaluate(config, str(tmp_path / 'two_blocks'))


def test_init_from_workdir_resets_only_the_classifier(tmp_path, data_dir):
  train.train_and_evaluate(tiny_config(data_dir, 'epochs=1'), str(tmp_path / 'source'))
  _, source = final_params(tmp_path / 'source')
  config = tiny_config(data_dir, 'epochs=1', **{'init_from.workdir': str(tmp_path / 'source'),
                                                'init_from.reset_classifier': True, 'optimizer.learning_rate': 0.0,
                                                'optimizer.weight_decay': 0.0})
  train.train_and_evaluate(config, str(tmp_path / 'target'))
  _, target = final_params(tmp_path / 'target')
  for name in source['params']:
    same = jax.tree.all(jax.tree.map(np.array_equal, source['params'][name], target['params'][name]))
    assert same == (name not in train.build_model(config).classifier_names), name


def test_unknown_config_override_fails_naming_the_field(tmp_path, data_dir):
  code, output = run_main(tmp_path, data_dir, '--config.optimizer.lr=0.1')
  assert code != 0 and "'lr'" in output


def test_evaluate_cli_reproduces_the_final_evaluation(tmp_path, data_dir, monkeypatch):
  result = train.train_and_evaluate(tiny_config(data_dir, 'epochs=1'), str(tmp_path))
  from dferjax import evaluate
  again = evaluate.evaluate_checkpoint(str(tmp_path), 'latest')
  assert again['confusion'] == result['confusion']
  rows = [json.loads(line) for line in open(again['clip_report'])]  # every model's per-clip predictions
  assert again['clip_report'] == str(tmp_path / f'clips_test_step{again["step"]}.jsonl')
  assert sorted(rows[0]) == ['clip_id', 'label', 'prediction', 'probabilities']
  confusion = np.zeros((7, 7), int)
  np.add.at(confusion, ([row['label'] for row in rows], [row['prediction'] for row in rows]), 1)
  np.testing.assert_array_equal(confusion, result['confusion'])
  assert all(np.argmax(row['probabilities']) == row['prediction'] for row in rows)
  # The command prints the table and nothing of the libraries' INFO logs or Orbax's read-only warnings.
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1', 'JAX_PLATFORMS': 'cpu'}
  output = subprocess.run([sys.executable, '-m', 'dferjax.evaluate', f'--workdir={tmp_path}', '--step=latest',
                           '--latex'], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True)
  assert f'& {100 * result["war"]:.2f} \\\\\n\\bottomrule' in output.stdout, output.stdout  # --latex: a tabular
  assert output.stdout.startswith(f'% {tmp_path} step {again["step"]}:'), output.stdout
  assert not re.search(r'^([IWE]\d{4} |WARNING:)', output.stdout + output.stderr, re.MULTILINE), output.stderr

  # Across datasets: the checkpoint on AFEW's validation split (its reported one), built from synthetic AFEW files
  # whose class folders (Angry, ..., Surprise) map to the same seven labels; each fold copy of the run the same.
  from dferjax.data import build, synthetic
  afew_root, afew_data = tmp_path.parent / f'{tmp_path.name}_afew', tmp_path.parent / f'{tmp_path.name}_afew_tfds'
  synthetic.write_afew(str(afew_root), clips_per_class=1, seed=5, val_clips_per_class=2)
  build.build('afew', manual_dir=str(afew_root), data_dir=str(afew_data), configs=['px32'], show_progress=False)
  across = evaluate.evaluate_checkpoint(str(tmp_path), 'latest', data_dir=str(afew_data), dataset='afew/px32')
  assert (across['dataset'], across['split'], across['step']) == ('afew/px32', 'validation', again['step'])
  assert across['clip_report'] == str(tmp_path / f'clips_afew_px32_validation_step{again["step"]}.jsonl')
  assert across['confusion_plot'] == str(tmp_path / f'confusion_afew_px32_validation_step{again["step"]}.png')
  assert cv2.imread(across['confusion_plot']).shape[2] == 3  # a PNG that reads back
  confusion = np.array(across['confusion'])  # rows: the true classes, 2 clips each
  assert confusion.shape == (7, 7) and (confusion.sum(axis=1) == 2).all()
  assert across['war'] == across['uar'] == pytest.approx(np.trace(confusion) / 14)
  folds = []
  for fold in range(1, 6):
    shutil.copytree(tmp_path, folds_dir := tmp_path.parent / f'{tmp_path.name}_fold{fold}')
    run_config = json.loads((folds_dir / 'config.json').read_text())
    run_config['dataset']['name'] = f'dfew/fold{fold}_px32'
    run_config['init_from']['workdir'] = f'runs/pretrained_fold{fold}'  # as AEN's per-fold guides differ
    (folds_dir / 'config.json').write_text(json.dumps(run_config))
    folds.append(str(folds_dir))
  made, make_steps = [], train.make_steps
  monkeypatch.setattr(train, 'make_steps', lambda *args, **kwargs: made.append(1) or make_steps(*args, **kwargs))
  table = evaluate.evaluate_folds(folds[::-1], 'afew/px32', 'latest', data_dir=str(afew_data))
  assert len(made) == 1  # the five folds share one compilation
  monkeypatch.undo()
  assert table.startswith('5 folds, --step latest on afew/px32 validation:'), table
  for row in ('fold1', 'fold5', 'mean'):
    assert re.search(rf'^\| {row} .*\| +{100 * across["uar"]:.2f} \| +{100 * across["war"]:.2f} \|$', table, re.M), table
  assert re.search(r'^\| std .*\| +0\.00 \| +0\.00 \|$', table, re.M), table
  with pytest.raises(FileNotFoundError, match=r'(?s)ferv39k/px32 is not built.*--dataset ferv39k'):
    evaluate.evaluate_checkpoint(str(tmp_path), 'latest', data_dir=str(afew_data), dataset='ferv39k/px32')
  with pytest.raises(ValueError, match=r"dataset name 'rafdb/px32'"):
    evaluate.evaluate_checkpoint(str(tmp_path), 'latest', dataset='rafdb/px32')


def test_one_and_two_devices_give_the_same_parameters():
  from train_helpers import run_random_steps
  config = configlib.load_config(TINY_CONFIG)
  assert jax.device_count() == 2  # tests/conftest.py
  one_device = jax.make_mesh((1,), ('data',), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
  results = []
  for mesh in (one_device, None):  # None: the trainer's mesh over both devices
    state, _ = run_random_steps(config, mesh=mesh)
    assert {leaf.sharding.mesh.size for leaf in jax.tree.leaves(state.params)} == {1 if mesh else 2}
    results.append(jax.tree.map(np.asarray, {'params': state.params, 'batch_stats': state.batch_stats}))
  # XLA's unoptimised CPU code (tests/conftest.py) sums conv1's weight gradient in another order per device count:
  # 4e-4 of the kernel's largest entry after 3 steps. BatchNorm statistics of half the batch differ by 17 % of a
  # leaf's largest entry after one step.
  jax.tree.map(lambda one, two: np.testing.assert_allclose(one, two, rtol=2e-4, atol=1e-3 * np.abs(one).max()),
               *results)


def test_bfloat16_compute_keeps_float32_parameters_and_optimizer_state():
  from train_helpers import run_random_steps
  config = configlib.load_config(TINY_CONFIG)
  with config.unlocked():
    config.dtype = 'bfloat16'
  assert train.build_model(config).dtype == 'bfloat16'
  state, accumulator = run_random_steps(config, num_steps=1)
  assert np.isfinite(float(accumulator['sums']['loss']))
  floating = [x for x in jax.tree.leaves((state.params, state.opt_state)) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)]
  assert floating and {x.dtype for x in floating} == {np.dtype('float32')}


def test_frames_smaller_than_the_model_input_get_a_note(capsys):
  """A px112 build under a 224-px model trains on enlarged frames: said once at the start, not silently."""
  from dferjax.data import inputs  # pylint: disable=import-outside-toplevel
  config = configlib.load_config(TINY_CONFIG)
  source = [{'frames': np.zeros((3, 16, 16, 3), np.uint8), 'label': 0, 'clip_id': 'a', 'num_frames': 3}]
  inputs.note_enlarged_frames(config, source)  # 16-px frames, image_size 32
  assert capsys.readouterr().out == ('note: dfew/fold1_px32 stores 16-px frames and config.input.image_size=32 '
                                     'enlarges each 2.00x (frames stored at 32 px or more keep more detail: a px32 '
                                     'build)\n')
  jpeg = [dict(source[0], frames=[cv2.imencode('.jpg', np.zeros((32, 32, 3), np.uint8))[1].tobytes()] * 3)]
  inputs.note_enlarged_frames(config, jpeg)  # stored at the input size: nothing to say
  inputs.note_enlarged_frames(config, [])
  assert capsys.readouterr().out == ''


def test_a_second_run_in_a_busy_workdir_stops_before_touching_it(tmp_path, data_dir):
  """The same command started twice: the second stops naming the first's process, and leaves the workdir alone
  (Orbax would remove the first's half-written save); once the first ends, the workdir is free again. A file
  where the workdir should be is named too."""
  config = tiny_config(data_dir, 'epochs=1')
  (tmp_path / 'file').write_text('')
  for workdir in (tmp_path / 'file', tmp_path / 'file' / 'run'):  # a file where the workdir, or a folder above, is
    with pytest.raises(ValueError, match=rf'--workdir {workdir}: {tmp_path / "file"} is a file, not a directory'):
      train.train_and_evaluate(config, str(workdir))
  (tmp_path / 'file').unlink()
  with train.workdir_lock(str(tmp_path)):  # the first run, holding the lock
    with pytest.raises(train.WorkdirInUseError, match=rf'another run is training in {tmp_path} \(pid {os.getpid()} '
                                                      r'on .*, since .*\).*another --workdir'):
      train.train_and_evaluate(config, str(tmp_path))
    assert os.listdir(tmp_path) == ['run.lock']
  with train.workdir_lock(str(tmp_path)):  # released when the first run ended (the SIGKILL tests: on any exit)
    assert (tmp_path / 'run.lock').read_text().startswith(f'pid {os.getpid()} on ')


def test_device_out_of_memory_is_one_line_naming_the_batch(tmp_path, data_dir):
  """XLA's RESOURCE_EXHAUSTED (here a real one: a token MLP of 2^33 hidden units, 1 TiB of parameters, on the
  CPU) becomes one line saying what ran out at which batch and what to change."""
  from dferjax import cli  # pylint: disable=import-outside-toplevel
  config = tiny_config(data_dir, **{'model.mlp_ratio': 2.0 ** 28})
  with pytest.raises(train.DeviceOutOfMemoryError) as raised:
    train.train_and_evaluate(config, str(tmp_path))
  message = cli.error_message(raised.value)
  per_device = 4 // jax.device_count()
  assert message.startswith('the device ran out of memory (Out of memory allocating 1099511627776 bytes') and (
      f'with stt at config.batch_size=4 ({per_device} clips per device), config.eval_batch_size=8 '
      f'({2 * per_device} clips per device), 32 px, dtype float32. Lower the batch size' in message), message
  assert '\n' not in message
  assert not cli.error_message(MemoryError()).startswith('MemoryError')  # Python's own, empty: still a sentence
