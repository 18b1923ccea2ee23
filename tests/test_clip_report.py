"""Per-clip rows of `dferjax.evaluate`: a tiny CEFLNet run, then one row per test clip with its prediction, class
probabilities, salient snippet and that snippet's frames (models that declare no outputs: test_train.py)."""
import json

import numpy as np
import pytest

from dferjax import clip_report, configlib, evaluate, train
from dferjax.data import build, datasets, sampling, synthetic
from dferjax.models.ceflnet import CEFLNet
from dferjax.models.stt import STT


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('synthetic32')
  synthetic.write_dfew(str(root / 'manual'), clips_per_class=5, seed=0, motions='order_free')
  build.build('dfew', manual_dir=str(root / 'manual'), data_dir=str(root / 'tfds'), configs=['fold1_px32'])
  return str(root / 'tfds')


def tiny_ceflnet(data_dir):
  """7 snippets x 2 frames of 32 px, d = 64; one epoch of 2 steps."""
  config = configlib.base_config()
  config.model_name = 'ceflnet'
  config.model = dict(num_frames=14, frames_per_snippet=2, backbone_width=8, classifier_dims=(16, 8),
                      backbone_batch_norm='joint')
  config.dataset.name = 'dfew/fold1_px32'
  config.dataset.data_dir = data_dir
  config.input.sampler = dict(name='snippets', frames_per_snippet=2)
  config.input.image_size = 32
  config.input.num_threads = 2
  config.optimizer.name = 'adam'
  config.optimizer.learning_rate = 1e-3
  config.num_epochs = 1
  config.batch_size = 4
  config.eval_batch_size = 4  # 7 test clips: the last batch has a padding row
  config.steps_per_epoch = 2
  config.progress_bar = False
  config.init_from.backbone = 'none'
  return config.lock()


def test_evaluate_writes_the_salient_snippet_per_clip(tmp_path, data_dir):
  config = tiny_ceflnet(data_dir)
  train.train_and_evaluate(config, str(tmp_path))
  result = evaluate.evaluate_checkpoint(str(tmp_path), 'latest')
  assert result['clip_report'] == str(tmp_path / f'clips_test_step{result["step"]}.jsonl')
  rows = [json.loads(line) for line in open(result['clip_report'])]
  source = datasets.data_source('dfew/fold1_px32', 'test', data_dir)
  records = [source[i] for i in range(len(source))]
  assert [row['clip_id'] for row in rows] == [r['clip_id'].decode() for r in records]  # every clip once, in order
  assert [row['label'] for row in rows] == [int(r['label']) for r in records]
  confusion = np.zeros((7, 7), int)
  np.add.at(confusion, ([row['label'] for row in rows], [row['prediction'] for row in rows]), 1)
  np.testing.assert_array_equal(confusion, result['confusion'])  # the same predictions as the evaluation
  sampler = sampling.make_sampler(config.input.sampler)
  for row, record in zip(rows, records):
    probabilities = np.asarray(row['probabilities'])
    assert probabilities.shape == (7,) and abs(probabilities.sum() - 1) < 1e-5
    assert row['prediction'] == probabilities.argmax()
    attention = np.asarray(row['snippet_attention'])
    assert attention.shape == (7,) and abs(attention.sum() - 1) < 1e-5
    assert row['salient_snippet'] == attention.argmax()  # P_e (Eq. 6)
    snippets = sampler(int(record['num_frames']), None).reshape(7, 2)
    assert row['salient_snippet_frames'] == snippets[row['salient_snippet']].tolist()
    assert all(0 <= frame < record['num_frames'] for frame in row['salient_snippet_frames'])
  right = int(np.trace(confusion))
  assert result['clip_summary'].startswith(f'{right} of 7 clips predicted right\nsalient_snippet over 7 clips: ')


def test_declared_outputs_and_loud_errors():
  assert clip_report.declared(CEFLNet(num_classes=7)) == {'salient_snippet': 'snippet', 'snippet_attention': 'value'}
  assert clip_report.declared(STT(num_classes=7)) == {}  # its rows: the prediction and probabilities only

  class Wrong(CEFLNet):
    clip_outputs = {'salient_snippet': 'frame'}

  with pytest.raises(ValueError, match=r"Wrong.clip_outputs: kinds \{'salient_snippet': 'frame'\} not in"):
    clip_report.declared(Wrong(num_classes=7))
  config = configlib.load_config('configs/ceflnet_dfew.py')
  frames_of = clip_report.snippet_frames(config)
  np.testing.assert_array_equal(frames_of(105)[1], 15 + 10 + np.arange(0, 15, 3))  # test window from frame 15
  with config.unlocked():
    config.input.transforms = {'shuffle_snippets': {}}
  with pytest.raises(ValueError, match='shuffle_snippets'):
    clip_report.snippet_frames(config)
  stt = configlib.load_config('configs/stt_dfew.py')
  with pytest.raises(ValueError, match="'snippet' clip output needs the snippet sampler"):
    clip_report.snippet_frames(stt)
