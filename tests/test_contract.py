"""The trainer contract with a model that is not STT: an auxiliary head, a two-term loss, a batch field added by a
clip transform, a second metric head, exact resume; and the snippet sampler end to end at 224 px."""
import json
import os

import jax
import numpy as np
import pytest

from dferjax import checkpoint as checkpoint_lib
from dferjax import configlib, models, reports, train
from contract_model import OrderNet
from test_writers import read_events, scalars


@pytest.fixture
def order_net(monkeypatch):
  monkeypatch.setitem(models.MODELS, 'order_net', OrderNet)


def build_synthetic(root, config_name):
  from dferjax.data import build, synthetic
  manual_dir, data_dir = root / 'manual', root / 'tfds'
  synthetic.write_dfew(str(manual_dir), clips_per_class=5, seed=0)
  build.build('dfew', manual_dir=str(manual_dir), data_dir=str(data_dir), configs=[config_name])
  return str(data_dir)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return build_synthetic(tmp_path_factory.mktemp('synthetic32'), 'fold1_px32')


def order_config(data_dir, epochs=2, **overrides):
  config = configlib.base_config()
  config.model_name = 'order_net'
  config.model = dict(num_frames=7, width=8)
  config.dataset.name = 'dfew/fold1_px32'
  config.dataset.data_dir = data_dir
  config.input.sampler = dict(name='snippets', frames_per_snippet=1)  # 7 snippets x 1 frame
  config.input.image_size = 32
  config.input.transforms = {'shuffle_snippets': {}}
  config.input.num_threads = 2
  config.loss = dict(name='order', order_weight=0.5)
  config.optimizer.name = 'adam'
  config.optimizer.learning_rate = 1e-3
  config.num_epochs = epochs
  config.batch_size = 4
  config.eval_batch_size = 8
  config.steps_per_epoch = 3
  config.log_every_steps = 1
  config.progress_bar = False
  for key, value in overrides.items():
    node, *path = key.split('.')
    target = config
    for part in [node, *path][:-1]:
      target = target[part]
    target[[node, *path][-1]] = value
  return config.lock()


def saved_arrays(workdir):
  checkpoints = checkpoint_lib.Checkpoints(str(workdir), read_only=True)
  arrays = checkpoints.restore_arrays(checkpoints.latest_step())
  checkpoints.close()
  return arrays


def test_aux_head_two_term_loss_extra_field_and_second_metric_head(tmp_path, data_dir, order_net):
  result = train.train_and_evaluate(order_config(data_dir), str(tmp_path))
  # Both loss terms are logged, and they add up to the loss (weights inside the terms).
  records = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  train_records = [r for r in records if r['split'] == 'train']
  assert len(train_records) == 6
  for record in train_records:
    assert record['loss'] == pytest.approx(record['cross_entropy'] + record['order'], rel=1e-5)
    assert record['order'] > 0 and 0 <= record['accuracy'] <= 1
  # The second head: the order predicted from shuffled snippets, scored against the 'permutation' field.
  evals = [r for r in records if r['split'] == 'test']
  assert [r['epoch'] for r in evals] == [1, 2]
  order = np.array(result['order']['confusion'])
  assert order.shape == (10, 10) and order.sum() == 7  # fold 1 tests 7 clips
  assert set(result['order']) >= {'uar', 'war', 'per_class', 'confusion', 'num_clips'}
  assert evals[-1]['order']['war'] == result['order']['war']
  summary = json.load(open(tmp_path / 'results.json'))
  assert summary['last']['order']['war'] == result['order']['war'] and 'order' in summary['best']
  found = scalars(read_events(tmp_path / 'tensorboard'))
  assert {'train/cross_entropy', 'train/order', 'test/war', 'test/order/war', 'test/order/uar'} <= set(found)
  # The fold table carries the head's columns.
  table = reports.format_results_table(reports.collect_fold_results([str(tmp_path)]), configlib.CLASS_NAMES)
  assert table.splitlines()[0].split('|')[-3:-1] == [' order UAR ', ' order WAR ']


def test_the_contract_model_resumes_exactly(tmp_path, data_dir, order_net):
  train.train_and_evaluate(order_config(data_dir, epochs=2), str(tmp_path / 'straight'))
  train.train_and_evaluate(order_config(data_dir, epochs=1), str(tmp_path / 'resumed'))
  train.train_and_evaluate(order_config(data_dir, epochs=2), str(tmp_path / 'resumed'))  # picks up at step 3
  straight, resumed = saved_arrays(tmp_path / 'straight'), saved_arrays(tmp_path / 'resumed')
  assert int(straight['step']) == int(resumed['step']) == 6
  jax.tree.map(np.testing.assert_array_equal, straight['params'], resumed['params'])
  jax.tree.map(np.testing.assert_array_equal, straight['batch_stats'], resumed['batch_stats'])
  jax.tree.map(np.testing.assert_array_equal, straight['opt_state'], resumed['opt_state'])


def test_reset_classifier_uses_the_models_classifier_names(tmp_path, data_dir, order_net):
  train.train_and_evaluate(order_config(data_dir, epochs=1), str(tmp_path / 'source'))
  config = order_config(data_dir, epochs=1, **{'init_from.workdir': str(tmp_path / 'source'),
                                               'init_from.reset_classifier': True, 'optimizer.learning_rate': 0.0})
  train.train_and_evaluate(config, str(tmp_path / 'target'))
  source, target = saved_arrays(tmp_path / 'source'), saved_arrays(tmp_path / 'target')
  for name in source['params']:
    same = jax.tree.all(jax.tree.map(np.array_equal, source['params'][name], target['params'][name]))
    assert same == (name not in OrderNet.classifier_names), name


def test_a_loss_that_needs_a_missing_batch_field_says_which(tmp_path, data_dir, order_net):
  config = order_config(data_dir, epochs=1, **{'input.transforms': {}})
  with pytest.raises(ValueError, match=r"batch field 'permutation' \(config.input.transforms.shuffle_snippets\)"):
    train.train_and_evaluate(config, str(tmp_path))


def test_snippet_sampler_trains_end_to_end_at_224_px(tmp_path_factory, order_net):
  """7 snippets x 5 frames from 105 resampled frames, 224 px (CEFLNet/EST's input), through the real builder,
  grain pipeline and trainer."""
  data_dir = build_synthetic(tmp_path_factory.mktemp('synthetic224'), 'fold1_px224')
  config = order_config(data_dir, epochs=1, **{
      'model.num_frames': 35, 'model.width': 4, 'dataset.name': 'dfew/fold1_px224', 'input.image_size': 224,
      'input.sampler': {'name': 'snippets'}, 'batch_size': 2, 'eval_batch_size': 4, 'steps_per_epoch': 2})
  assert train.video_shape(config, 2) == (2, 35, 224, 224, 3)
  workdir = tmp_path_factory.mktemp('run224')
  result = train.train_and_evaluate(config, str(workdir))
  assert np.array(result['confusion']).sum() == 7 and np.array(result['order']['confusion']).sum() == 7
  assert os.path.isdir(workdir / 'checkpoints' / '2')


def test_a_model_input_batch_field_reaches_est_in_train_and_eval(tmp_path, data_dir):
  """EST takes 'permutation' (drawn by the draw_permutation transform) as a model input; its order head is scored
  as the metric head 'order' and both loss terms are logged."""
  config = order_config(data_dir, epochs=1, **{
      'model_name': 'est', 'model': dict(num_frames=7, num_snippets=7, backbone_width=4, hidden_dim=32,
                                         num_encoder_layers=1, num_decoder_layers=1, classifier_dims=(8,),
                                         order_head_dims=(16,)),
      'input.transforms': {'draw_permutation': {}}, 'loss': dict(name='order', order_weight=0.1428),
      'steps_per_epoch': 2})
  result = train.train_and_evaluate(config, str(tmp_path))
  assert np.array(result['order']['confusion']).sum() == 7
  train_records = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')
                   if json.loads(line)['split'] == 'train']
  assert all(record['order'] > 0 and record['cross_entropy'] > 0 for record in train_records)
