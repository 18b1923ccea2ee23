"""JSONL records, resume truncation, TensorBoard event files (read back without TF), progress output."""
import json
import os
import pathlib
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from sklearn import metrics as sk_metrics
from tensorboardX.crc32c import crc32c
from tensorboardX.proto import event_pb2

from dferjax import metrics
from dferjax import writers
from tfds_builders.labels import CLASS_NAMES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def masked_crc(data: bytes) -> int:
  """TFRecord's CRC mask (tensorflow/core/lib/hash/crc32c.h)."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(logdir: pathlib.Path) -> list[event_pb2.Event]:
  """Events of every event file under logdir; TFRecord framing: uint64 length, masked crc, data, masked crc."""
  events = []
  files = sorted(logdir.glob('events.out.tfevents.*'))
  assert files, f'no event files in {logdir}'
  for path in files:
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      header = data[offset:offset + 8]
      (length,) = struct.unpack('<Q', header)
      assert struct.unpack('<I', data[offset + 8:offset + 12])[0] == masked_crc(header)
      payload = data[offset + 12:offset + 12 + length]
      assert struct.unpack('<I', data[offset + 12 + length:offset + 16 + length])[0] == masked_crc(payload)
      events.append(event_pb2.Event.FromString(payload))
      offset += 16 + length
  return events


def scalars(events) -> dict[str, list[tuple[int, float]]]:
  found = {}
  for event in events:
    for value in event.summary.value:
      if value.HasField('simple_value'):
        found.setdefault(value.tag, []).append((event.step, value.simple_value))
  return found


def random_confusion(seed, num_clips=300):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 7, size=num_clips)
  predictions = np.where(rng.random(num_clips) < 0.6, labels, rng.integers(0, 7, size=num_clips))
  return sk_metrics.confusion_matrix(labels, predictions, labels=range(7)), labels, predictions


def test_jsonl_records_and_tensorboard_events(tmp_path):
  confusion, labels, predictions = random_confusion(0)
  writer = writers.MetricWriter(tmp_path, enabled=True)
  writer.write('train', 10, 0.5, {'loss': np.float32(1.5), 'learning_rate': 1e-4})
  # Flushed on every write: readable while the writer is open.
  assert json.loads((tmp_path / 'metrics.jsonl').read_text())['loss'] == 1.5
  record = writer.write_eval(20, 1, confusion, CLASS_NAMES, loss=0.9)
  # The same layout built by hand (as the train loop does) gets the same TensorBoard treatment.
  writer.write('val', 20, 1, {**metrics.recall_metrics(confusion, CLASS_NAMES), 'confusion': confusion.tolist()})
  writer.close()

  records = writers.read_records(tmp_path)
  assert [r['split'] for r in records] == ['train', 'test', 'val']
  assert records[0]['step'] == 10 and records[0]['epoch'] == 0.5 and records[0]['learning_rate'] == 1e-4
  test = records[1]
  assert test == record
  assert {'split', 'step', 'epoch', 'wall_time', 'uar', 'war', 'per_class', 'confusion', 'num_clips',
          'loss'} == set(test)
  assert test['uar'] == pytest.approx(sk_metrics.balanced_accuracy_score(labels, predictions))
  assert test['war'] == pytest.approx(sk_metrics.accuracy_score(labels, predictions))
  assert list(test['per_class']) == list(CLASS_NAMES)
  assert test['confusion'] == confusion.tolist() and test['num_clips'] == 300
  assert writers.read_records(tmp_path, 'test') == [test]

  events = read_events(tmp_path / 'tensorboard')
  found = scalars(events)
  assert found['train/loss'] == [(10, 1.5)]
  assert found['train/learning_rate'][0] == (10, pytest.approx(1e-4))
  assert found['test/uar'] == [(20, pytest.approx(test['uar']))]
  assert found['test/war'] == [(20, pytest.approx(test['war']))]
  assert found['test/loss'] == [(20, pytest.approx(0.9))]
  for name in CLASS_NAMES:
    assert found[f'test/recall/{name}'] == [(20, pytest.approx(test['per_class'][name]))]
  assert 'test/confusion' not in found and 'test/num_clips' in found
  assert found['val/uar'] == found['test/uar'] and 'val/recall/fear' in found
  images = [(value.tag, event.step, value.image) for event in events for value in event.summary.value
            if value.HasField('image')]
  assert [(tag, step) for tag, step, _ in images] == [('test/confusion', 20), ('val/confusion', 20)]
  assert images[0][2].encoded_image_string[:8] == b'\x89PNG\r\n\x1a\n' and images[0][2].height > 200


def test_resume_truncates_jsonl_and_purges_tensorboard(tmp_path):
  confusion = random_confusion(1)[0]
  with writers.MetricWriter(tmp_path, enabled=True, confusion_images=False) as writer:
    for step in range(1, 7):
      writer.write('train', step * 10, step, {'loss': 1.0 / step})
      if step % 2 == 0:
        writer.write_eval(step * 10, step, confusion, CLASS_NAMES)
  # Killed mid-write: a torn last line.
  with open(tmp_path / 'metrics.jsonl', 'a') as file:
    file.write('{"split": "train", "step": 70, "ep')
  assert [r['step'] for r in writers.read_records(tmp_path)][-1] == 60  # torn line skipped

  # Resume from the step-40 checkpoint and log steps 50.. again.
  with writers.MetricWriter(tmp_path, enabled=True, confusion_images=False, resume_step=40) as writer:
    assert [(r['split'], r['step']) for r in writers.read_records(tmp_path)][-2:] == [('train', 40), ('test', 40)]
    writer.write('train', 50, 5, {'loss': 0.5})
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  steps = [(json.loads(line)['split'], json.loads(line)['step']) for line in lines]
  assert steps == [('train', 10), ('train', 20), ('test', 20), ('train', 30), ('train', 40), ('test', 40),
                   ('train', 50)]
  assert json.loads(lines[-1])['loss'] == 0.5

  # TensorBoard: the second event file starts with a purge (SessionLog.START) at step 41.
  events = read_events(tmp_path / 'tensorboard')
  starts = [event.step for event in events if event.HasField('session_log')]
  assert starts == [41]
  assert scalars(events)['train/loss'][-1] == (50, 0.5)


def test_read_records_lets_a_restart_replace_later_steps(tmp_path):
  # A restarted run that never called truncate_after: steps 20, 30 logged twice.
  lines = [{'split': 'train', 'step': s, 'epoch': e, 'loss': l} for s, e, l in
           [(10, 1, 3.0), (20, 2, 2.0), (30, 3, 1.0), (20, 2, 2.5), (30, 3, 1.5)]]
  lines.insert(2, {'split': 'test', 'step': 20, 'epoch': 2, 'uar': 0.3, 'war': 0.4})
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(line) + '\n' for line in lines))
  records = writers.read_records(tmp_path)
  assert [(r['split'], r['step'], r.get('loss')) for r in records] == [
      ('train', 10, 3.0), ('test', 20, None), ('train', 20, 2.5), ('train', 30, 1.5)]
  with writers.MetricWriter(tmp_path, enabled=True, tensorboard=False) as writer:
    writer.truncate_after(20)
  assert [json.loads(line)['step'] for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()] == [10, 20, 20]


def test_bad_records_and_disabled_writer(tmp_path):
  with pytest.raises(FileNotFoundError, match='metrics.jsonl'):
    writers.read_records(tmp_path)
  (tmp_path / 'metrics.jsonl').write_text('{"split": "train", "step": 1, "epoch": 0}\nnot json\n{}\n')
  with pytest.raises(ValueError, match='metrics.jsonl:2'):
    writers.read_records(tmp_path)
  (tmp_path / 'metrics.jsonl').write_text('{"split": "train", "epoch": 0}\n')
  with pytest.raises(ValueError, match="metrics.jsonl:1: a record needs 'split', 'step' and 'epoch'"):
    writers.read_records(tmp_path)

  workdir = tmp_path / 'other_process'
  with writers.MetricWriter(workdir, enabled=False) as writer:
    record = writer.write('train', 1, 0, {'loss': 1.0})
    writer.write_eval(1, 0, random_confusion(2)[0], CLASS_NAMES)
    writer.truncate_after(0)
  assert record['loss'] == 1.0 and not workdir.exists()
  with writers.MetricWriter(tmp_path / 'run', enabled=True, tensorboard=False) as writer:
    with pytest.raises(ValueError, match="reserved"):
      writer.write('train', 1, 0, {'step': 3})
    with pytest.raises(TypeError, match='object'):
      writer.write('train', 1, 0, {'loss': object()})
    # nan (a class with no clips) is written as null: strict JSON.
    writer.write('train', 2, 0, {'loss': float('nan')})
  assert json.loads((tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()[-1])['loss'] is None
  with pytest.raises(ValueError, match='closed'):
    writer.write('train', 3, 0, {'loss': 1.0})


def test_progress_bar_and_epoch_summary(capsys):
  with writers.ProgressBar(6, batch_size=8, initial=2, description='epoch 3/10', enabled=True,
                           mininterval=0) as bar:
    for _ in range(4):
      bar.update(loss=np.float32(1.25))
    bar.set_postfix(accuracy=0.5)
  assert bar.mean_step_seconds > 0 and bar.clips_per_second == pytest.approx(8 / bar.mean_step_seconds)
  shown = capsys.readouterr().err
  assert 'epoch 3/10' in shown and '6/6' in shown and 'clips/s' in shown and 'loss=1.25' in shown
  assert 'loss=1.25, accuracy=0.5' in shown
  with writers.ProgressBar(2, batch_size=8, enabled=False) as quiet:
    quiet.update()
  assert capsys.readouterr().err == ''

  line = writers.epoch_summary_line(
      3, {'loss': 1.23456, 'learning_rate': 1e-4, 'clips_per_second': np.float32(210.5)},
      {'war': 0.567, 'uar': 0.451, 'num_clips': 2341, 'per_class': {'happy': 0.9}, 'confusion': [[1]]}, 123.45)
  assert line == ('epoch 3 | train loss 1.235 learning_rate 0.0001 clips_per_second 210.5 | '
                  'test UAR 45.10% WAR 56.70% num_clips 2341 | 123.5 s')
  assert writers.epoch_summary_line(1, {'loss': 2.0}, None, 5.0) == 'epoch 1 | train loss 2 | 5.0 s'
  assert writers.epoch_summary_line(1, None, {'uar': 0.5}, 5.0, eval_split='val', clips_per_second=12.34) == (
      'epoch 1 | val UAR 50.00% | 5.0 s, 12.3 clips/s')
  assert writers.epoch_summary_line(1, None, {'uar': 0.5}, 5.0, clips_per_second=12.34, eval_seconds=1.25) == (
      'epoch 1 | test UAR 50.00% | 5.0 s (evaluation 1.2 s), 12.3 clips/s')
  assert writers.epoch_summary_line(3, {'loss': 2.0}, None, 5.0, train_steps=(8, 9)) == (
      'epoch 3 | train (steps 8-9) loss 2 | 5.0 s')  # resumed mid-epoch: the train means are of these steps only


def test_metric_heads_get_their_own_scalars_line_and_table_columns(tmp_path):
  head = {'uar': 0.25, 'war': 0.5, 'per_class': {'0': 0.5, '1': None}, 'confusion': [[1, 1], [0, 0]], 'num_clips': 2}
  with writers.MetricWriter(tmp_path, enabled=True) as writer:
    writer.write('test', 10, 1, {'uar': 0.4, 'war': 0.6, 'per_class': {'happy': 0.6}, 'confusion': [[3]],
                                 'num_clips': 5, 'order': head})
  found = scalars(read_events(tmp_path / 'tensorboard'))
  assert found['test/order/war'] == [(10, 0.5)] and found['test/order/recall/0'] == [(10, 0.5)]
  assert 'test/order/recall/1' not in found and found['test/war'] == [(10, pytest.approx(0.6))]
  line = writers.epoch_summary_line(1, None, {'uar': 0.4, 'war': 0.6, 'order': head}, 5.0)
  assert line == 'epoch 1 | test UAR 40.00% WAR 60.00% order UAR 25.00% WAR 50.00% | 5.0 s'


class _RunningStep:
  """Stands for a dispatched step's output: it is ready 0.2 s after the bar asks."""

  def block_until_ready(self):
    time.sleep(0.2)
    return self


def test_progress_bar_counts_finished_steps_not_dispatch():
  """The bar waits for the step it is given, so clips/s is compute, not how fast steps are queued (issue 18)."""
  with writers.ProgressBar(4, batch_size=8, enabled=True, mininterval=0) as bar:
    for _ in range(4):
      bar.update(wait_for={'count': _RunningStep()})
  assert bar.mean_step_seconds >= 0.2 and bar.clips_per_second <= 40
  with writers.ProgressBar(4, batch_size=8, enabled=False) as quiet:
    start = time.perf_counter()
    quiet.update(wait_for=_RunningStep())  # no bar, no wait: runs without a bar keep dispatching ahead
  assert time.perf_counter() - start < 0.2


FULL_DISK_SCRIPT = """
import resource, sys
import numpy as np
from dferjax import cli, writers
workdir, limit, tensorboard = sys.argv[1], int(sys.argv[2]), sys.argv[3] == 'tensorboard'
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes past it fail with EFBIG, as on a full disk
writer = writers.MetricWriter(workdir, enabled=True, tensorboard=tensorboard)
try:
  for step in range(1, 200):
    writer.write_eval(step, step, np.eye(7, dtype=np.int64) * step, [str(i) for i in range(7)])
except OSError as error:
  print('STOPPED', step, cli.error_message(error, workdir))
"""


@pytest.mark.parametrize('tensorboard', ['tensorboard', 'jsonl'])
def test_a_full_disk_stops_the_writer_with_the_file_named(tmp_path, tensorboard):
  """A refused write raises OSError naming its file in the caller: tensorboardX's writer thread would print a
  traceback and die, and the next flush waited for it forever (a trainer hung instead of stopping)."""
  script = tmp_path / 'full.py'
  script.write_text(FULL_DISK_SCRIPT)
  limit = 30_000 if tensorboard == 'tensorboard' else 3_000  # an image is ~15 KB, a JSONL eval record ~0.5 KB
  result = subprocess.run([sys.executable, str(script), str(tmp_path / 'run'), str(limit), tensorboard],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
  assert 'Traceback' not in result.stderr and 'Exception in thread' not in result.stderr, result.stderr
  stopped = [line for line in result.stdout.splitlines() if line.startswith('STOPPED')]
  assert len(stopped) == 1, result.stdout + result.stderr
  written = (sorted((tmp_path / 'run' / 'tensorboard').glob('events.out.tfevents.*'))[0]
             if tensorboard == 'tensorboard' else tmp_path / 'run' / 'metrics.jsonl')
  assert f'the disk refused a write ({written}): File too large' in stopped[0]
  records = len(writers.read_records(tmp_path / 'run' / 'metrics.jsonl'))
  step = int(stopped[0].split()[1])
  raw = (tmp_path / 'run' / 'metrics.jsonl').read_bytes()
  # The JSONL has every record before the refused one, whose line is torn; when the limit falls just before its
  # newline (record lengths vary with the wall time), its JSON is whole and it counts (a resume rewrites the file).
  assert records == step - (tensorboard == 'jsonl') or (tensorboard == 'jsonl' and records == step
                                                        and raw.endswith(b'}')), (step, records, raw[-80:])
