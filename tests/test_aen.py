"""AEN: paper-size parameters by hand count (no compute), S2AC's Eq. (1) and the prediction's Eq. (3) in float64
numpy, every loss term of the paper (Eq. 2-6) and of the prototype against float64 numpy transcriptions, the frozen
guide (no update, no optimizer state), init_from.guide, the 3-class group head, configs, guide pre-training and
AEN training end to end on synthetic clips. PyTorch parity: test_aen_parity.py."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dferjax import checkpoint as checkpoint_lib
from dferjax import configlib, losses, metrics, reports, summary, train
from dferjax.models import aen
from dferjax.models.aen import AEN, AENFrame
from test_contract import build_synthetic
from workdir_helpers import random_state, write_workdir

TINY = dict(num_frames=4, backbone_stage_sizes=(1, 1, 1, 1), backbone_width=8, low_channels=1, middle_channels=4,
            num_layers=1, num_heads=2, head_dim=8, mlp_dim=16)
TINY_FRAME = dict(num_frames=1, backbone_stage_sizes=(1, 1, 1, 1), backbone_width=8, middle_channels=4)


def linear(cin, cout):
  return cin * cout + cout


def temporal_transformer(dim, frames=16, layers=3, heads=8, head_dim=64, mlp=1024):
  inner = heads * head_dim
  layer = 2 * dim + dim * 3 * inner + linear(inner, dim) + 2 * dim + linear(dim, mlp) + linear(mlp, dim)
  return dim + (frames + 1) * dim + layers * layer


def resnet_params(stage_sizes=(2, 2, 2, 2), width=64, last_stage=4):
  def block(cin, cout):
    shortcut = cin * cout + 2 * cout if cin != cout else 0
    return 9 * cin * cout + 9 * cout * cout + 4 * cout + shortcut
  total, cin = 49 * 3 * width + 2 * width, width
  for stage, blocks in enumerate(stage_sizes[:last_stage]):
    cout = width * 2**stage
    total += block(cin, cout) + (blocks - 1) * block(cout, cout)
    cin = cout
  return total


def count(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize('stage_sizes', [(2, 2, 2, 2), (2, 1, 2, 2)])
def test_paper_sized_parameters_by_hand(stage_sizes):
  """At 112 px the squeezes give 1 x 28 x 28 and 16 x 7 x 7 = 784; layer4 pools to 512."""
  model = AEN(7, backbone_stage_sizes=stage_sizes)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 112, 112, 3)), train=False))['params']
  want = {
      'backbone': resnet_params(stage_sizes),
      'squeeze_low': linear(64, 64) + linear(64, 1), 'squeeze_middle': linear(256, 256) + linear(256, 16),
      'temporal_low': temporal_transformer(784), 'temporal_middle': temporal_transformer(784),
      'temporal_high': temporal_transformer(512),
      's2ac_1': linear(512, 784) + linear(784, 784) + linear(512, 784),  # W1, W2, the expansion of F_0
      's2ac_2': 2 * linear(784, 784),
      'global_head': linear(512, 7), 'group_head': linear(784, 3), 'local_head': linear(784, 7),
      'guide': resnet_params(stage_sizes, last_stage=3) + linear(256, 256) + linear(256, 16) + linear(784, 7),
  }
  assert {name: count(tree) for name, tree in params.items()} == want
  counts = summary.count_parameters({'params': params}, train.frozen_params(model))
  assert counts['params'] == sum(want.values()) - want['guide'] and counts['frozen_params'] == {'guide': want['guide']}
  frame = AENFrame(7, backbone_stage_sizes=stage_sizes)
  frame_params = jax.eval_shape(lambda: frame.init(jax.random.key(0), jnp.zeros((1, 1, 112, 112, 3)), train=False))
  assert jax.tree.map(lambda x: x.shape, frame_params['params']) == jax.tree.map(lambda x: x.shape, params['guide'])


@pytest.fixture(scope='module')
def tiny():
  model = AEN(7, **TINY)
  video = jax.random.uniform(jax.random.key(1), (3, 4, 48, 48, 3))
  variables = jax.jit(model.init, static_argnames='train')(jax.random.key(0), video, train=False)
  return model, variables, video


def softmax(x, axis=-1):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def log_softmax(x):
  return np.log(softmax(x))


def sigmoid(x):
  return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


def test_outputs_and_eq_3_prediction(tiny):
  model, variables, video = tiny
  apply = jax.jit(model.apply, static_argnames=('train', 'mutable'))
  (logits, aux), _ = apply(variables, video, train=True, mutable=('batch_stats',))
  assert logits.shape == (3, 7) and aux['group_logits'].shape == (3, 3) and aux['guide_logits'].shape == (3, 4, 7)
  assert {level: x.shape for level, x in aux['frame_features'].items()} == {
      'low': (3, 4, 144), 'middle': (3, 4, 36), 'high': (3, 4, 64)}  # 1 x 12 x 12, 4 x 3 x 3 at 48 px
  want = np.log(0.7 * softmax(aux['local_logits']) + 0.3 * softmax(aux['global_logits']))
  np.testing.assert_allclose(logits, want, atol=1e-5)
  np.testing.assert_array_equal(aux['group_prediction'], np.asarray(aen.CLASS_GROUPS)[np.argmax(want, -1)])
  eval_logits, eval_aux = apply(variables, video, train=False)
  assert 'guide_logits' not in eval_aux  # evaluation does not run the guide
  prototype = model.clone(prediction_space='log_probability')
  proto_logits, proto_aux = jax.jit(prototype.apply, static_argnames='train')(variables, video, train=False)
  np.testing.assert_allclose(proto_logits, 0.7 * log_softmax(proto_aux['local_logits'])
                             + 0.3 * log_softmax(proto_aux['global_logits']), atol=1e-5)
  assert eval_logits.shape == (3, 7)


@pytest.mark.parametrize('softmax_axis', ['row', 'column'])
def test_s2ac_follows_eq_1(softmax_axis):
  rng = np.random.default_rng(0)
  previous, level = rng.normal(size=(2, 5)), rng.normal(size=(2, 6))
  module = aen.S2AC(softmax_axis)
  variables = module.init(jax.random.key(0), jnp.asarray(previous, jnp.float32), jnp.asarray(level, jnp.float32))
  got = module.apply(variables, jnp.asarray(previous, jnp.float32), jnp.asarray(level, jnp.float32))
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), variables['params'])
  query = previous @ p['query']['kernel'] + p['query']['bias']  # W1 F_{a-1}
  scores = query[:, :, None] * level[:, None, :] / np.sqrt(6)
  weights = softmax(scores, axis=2 if softmax_axis == 'row' else 1)
  attended = np.einsum('bij,bj->bi', weights, level)
  want = attended @ p['out']['kernel'] + p['out']['bias'] + previous @ p['skip']['kernel'] + p['skip']['bias']
  np.testing.assert_allclose(got, want, atol=1e-5)


def random_aux(rng, batch=4, frames=5, classes=7):
  groups = np.asarray(aen.CLASS_GROUPS)
  dims = {'low': 6, 'middle': 5, 'high': 4}
  return {
      'global_logits': rng.normal(size=(batch, classes)), 'group_logits': rng.normal(size=(batch, 3)),
      'local_logits': rng.normal(size=(batch, classes)), 'class_groups': groups,
      'clip_features': {k: rng.normal(size=(batch, d)) for k, d in dims.items()},
      'frame_features': {k: rng.normal(size=(batch, frames, d)) for k, d in dims.items()},
      'guide_logits': 2 * rng.normal(size=(batch, frames, classes)),
  }


def as_jax(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.int32 if np.asarray(x).dtype.kind == 'i' else jnp.float32), tree)


def group_sum(values, groups, num_groups=3):
  return np.stack([values[..., groups == g].sum(-1) for g in range(num_groups)], -1)


def test_paper_loss_terms_follow_eq_2_to_6():
  rng = np.random.default_rng(1)
  aux, labels = random_aux(rng), np.array([0, 1, 4, 6])
  groups = aux['class_groups']
  total, terms = losses.AENLoss()(None, as_jax(aux), {'label': jnp.asarray(labels)})
  rows = np.arange(4)
  # Eq. 3: P_O^a = alpha softmax(P_L^a) + (1 - alpha) softmax(P_G)^a, the group level summing class probabilities.
  fused_2 = 0.7 * softmax(aux['local_logits']) + 0.3 * softmax(aux['global_logits'])
  fused_1 = 0.7 * softmax(aux['group_logits']) + 0.3 * group_sum(softmax(aux['global_logits']), groups)
  multi_class = -np.log(fused_1[rows, groups[labels]]) - np.log(fused_2[rows, labels])  # Eq. 2
  s2 = softmax(aux['guide_logits'])  # [batch, T, C]
  weights = s2[rows, :, labels]  # S_2 Y
  temporal = sum(np.abs(aux['clip_features'][k] - np.einsum('btc,bt->bc', aux['frame_features'][k], weights)).sum(-1)
                 for k in ('low', 'middle', 'high'))  # Eq. 4
  ga = (1.4 * ((sigmoid(aux['group_logits']) - group_sum(s2, groups).mean(1))**2).sum(-1)
        + 0.6 * ((sigmoid(aux['local_logits']) - s2.mean(1))**2).sum(-1))  # Eq. 5
  want = {'multi_class': multi_class, 'temporal_affectivity': 0.4 * temporal, 'global_affectivity': 0.5 * ga}
  for name, value in want.items():
    np.testing.assert_allclose(terms[name], value, rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(total, sum(want.values()), rtol=1e-5)  # Eq. 6


def test_prototype_loss_terms_follow_refs():
  rng = np.random.default_rng(2)
  aux, labels = random_aux(rng), np.array([2, 3, 4, 5])
  groups = aux['class_groups']
  total, terms = losses.AENPrototypeLoss()(None, as_jax(aux), {'label': jnp.asarray(labels)})
  rows = np.arange(4)
  group_sizes = np.bincount(groups)
  global_lp = log_softmax(aux['global_logits'])
  group_mean_lp = group_sum(global_lp, groups) / group_sizes
  l_p1 = 0.7 * -log_softmax(aux['group_logits'])[rows, groups[labels]] + 0.3 * -group_mean_lp[rows, groups[labels]]
  l_p2 = 0.7 * -log_softmax(aux['local_logits'])[rows, labels] + 0.3 * -global_lp[rows, labels]
  scores = aux['guide_logits'][rows, :, labels]  # raw logits of the label per frame
  l_ta = sum(np.abs(aux['clip_features'][k] - np.einsum('btc,bt->bc', aux['frame_features'][k], scores)).mean(-1)
             / aux['frame_features'][k].shape[-1] for k in ('low', 'middle', 'high'))
  e = softmax(aux['guide_logits'].sum(1))
  e1 = group_sum(e, groups) / group_sizes
  l_ga1 = np.abs(sigmoid(aux['group_logits']) - e1).mean(-1)
  l_ga2 = np.abs(sigmoid(aux['local_logits']) - e).mean(-1)
  want = {'multi_class': 0.6 * l_p1 + 1.4 * l_p2, 'temporal_affectivity': 0.4 * 3 * l_ta,
          'global_affectivity': 0.7 * l_ga1 + 0.3 * l_ga2}
  for name, value in want.items():
    np.testing.assert_allclose(terms[name], value, rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(total, sum(want.values()), rtol=1e-5)


def test_losses_name_what_they_miss():
  with pytest.raises(ValueError, match="guide_logits"):
    losses.AENLoss()(None, {'global_logits': 0, 'group_logits': 0, 'local_logits': 0, 'class_groups': 0,
                            'clip_features': 0, 'frame_features': 0}, {'label': 0})


def test_group_head_counts_the_paper_3_class_accuracy():
  head = AEN(7).metric_heads()['groups']
  labels = jnp.array([0, 4, 1, 2, 6])  # happy, surprise, sad, neutral, fear
  predictions = jnp.asarray(aen.CLASS_GROUPS)[jnp.array([4, 0, 3, 1, 6])]  # surprise, happy, angry, sad, fear
  confusions = metrics.head_confusions(jax.nn.one_hot(jnp.array([4, 0, 3, 1, 6]), 7), {'group_prediction': predictions},
                                       {'label': labels}, {'groups': head}, 7)
  np.testing.assert_array_equal(confusions['groups'], [[2, 0, 0], [0, 0, 1], [0, 0, 2]])  # neutral -> sad: wrong
  assert head.class_names == ('positive', 'neutral', 'negative')


def tiny_aen_config(data_dir='', **overrides):
  config = configlib.load_config('configs/aen_dfew.py')
  with config.unlocked():
    config.model.update(TINY)
    config.dataset.name = 'dfew/fold1_px32'
    config.dataset.data_dir = data_dir
    config.input.sampler = configlib.segment_sampler(num_segments=2, frames_per_segment=2)
    config.input.image_size = 32
    config.input.num_threads = 2
    config.batch_size = 4
    config.eval_batch_size = 8
    config.steps_per_epoch = 2
    config.num_epochs = 1
    config.progress_bar = False
    config.init_from.guide = 'none'
    for key, value in overrides.items():
      *path, last = key.split('.')
      node = config
      for part in path:
        node = node[part]
      node[last] = value
  return config


def test_configs_and_the_required_guide():
  config = configlib.load_config('configs/aen_dfew.py', 'fold=2')
  assert (config.model_name, config.dataset.name, config.init_from.guide) == ('aen', 'dfew/fold2', '')
  assert (config.loss.name, config.loss.alpha, config.loss.ta_weight, config.loss.ga_weight,
          tuple(config.loss.level_weights)) == ('aen', 0.7, 0.4, 0.5, (1.4, 0.6))
  assert (config.input.augment, config.batch_size, config.num_epochs, config.optimizer.learning_rate) == (
      'aen', 32, 100, 0.01)
  model = train.build_model(config)
  train.check_frames(model, config)
  assert (tuple(model.backbone_stage_sizes), model.s2ac_order, model.s2ac_softmax, model.alpha) == (
      (2, 2, 2, 2), 'paper', 'row', 0.7)
  with pytest.raises(ValueError, match='init_from.guide'):
    checkpoint_lib.check_starting_point(config)
  prototype = train.build_model(configlib.load_config('configs/aen_dfew.py', 'variant=prototype'))
  assert (tuple(prototype.backbone_stage_sizes), prototype.s2ac_order, prototype.s2ac_softmax,
          prototype.prediction_space) == ((2, 1, 2, 2), 'prototype', 'column', 'log_probability')
  assert configlib.load_config('configs/aen_dfew.py', 'variant=prototype').loss.name == 'aen_prototype'
  afew = configlib.load_config('configs/aen_afew.py')
  checkpoint_lib.check_starting_point(afew)  # the DFEW run carries the guide
  assert (afew.dataset.name, afew.dataset.eval_split, afew.init_from.workdir) == (
      'afew/px112', 'validation', 'runs/aen_dfew_fold1')
  assert configlib.load_config('configs/aen_ferv39k.py').dataset.name == 'ferv39k/px112'
  frame = configlib.load_config('configs/aen_frame_dfew.py', 'fold=3')
  assert (frame.model_name, frame.dataset.name, frame.model.num_frames) == ('aen_frame', 'dfew/fold3', 1)
  train.check_frames(train.build_model(frame), frame)
  with pytest.raises(ValueError, match='s2ac_order'):
    AEN(7, **TINY, s2ac_order='sideways').init(jax.random.key(0), jnp.zeros((1, 4, 32, 32, 3)), train=False)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return build_synthetic(tmp_path_factory.mktemp('synthetic32_aen'), 'fold1_px32')


def test_aen_from_a_guide_run_keeps_the_guide_frozen(tmp_path, data_dir):
  """AEN starts its guide (whole) and backbone (through layer3) from an aen_frame run; training (SGD, momentum,
  weight decay) never changes the guide, which has no optimizer state; every loss term and the group head are
  logged."""
  frame = configlib.load_config('configs/aen_frame_dfew.py')
  with frame.unlocked():
    frame.model.update(TINY_FRAME)
    frame.dataset.name, frame.input.image_size = 'dfew/fold1_px32', 32
  saved = write_workdir(tmp_path / 'frame', frame, seed=2)  # an aen_frame run's checkpoint, random weights

  config = tiny_aen_config(data_dir, **{'init_from.guide': str(tmp_path / 'frame')})
  steps = train.make_steps(config, steps_per_epoch=2)
  assert not [path for path, _ in jax.tree_util.tree_flatten_with_path(steps.abstract_state.opt_state)[0]
              if 'guide' in jax.tree_util.keystr(path)]  # no momentum kept for the guide
  fresh = random_state(steps.abstract_state, seed=3)
  state = checkpoint_lib.initial_state(config, fresh, steps.model, steps.state_sharding)
  assert_same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, a),
                                          jax.tree.map(np.asarray, b))
  assert_same(state.params['guide'], saved.params)
  assert_same(state.batch_stats['guide'], saved.batch_stats)
  assert_same(state.params['squeeze_middle'], saved.params['squeeze'])
  assert_same(state.params['backbone']['layer3_0'], saved.params['backbone']['layer3_0'])
  assert_same(state.params['backbone']['layer4_0'], fresh.params['backbone']['layer4_0'])  # not in the frame run

  result = train.train_and_evaluate(config, str(tmp_path / 'aen'))
  assert {'uar', 'war', 'groups'} <= set(result) and result['groups']['num_clips'] == result['num_clips']
  assert np.asarray(result['groups']['confusion']).shape == (3, 3)
  records = [json.loads(line) for line in open(os.path.join(tmp_path / 'aen', 'metrics.jsonl'))]
  train_record = next(r for r in records if r['split'] == 'train')
  assert {'multi_class', 'temporal_affectivity', 'global_affectivity'} <= set(train_record)
  assert os.path.exists(tmp_path / 'aen' / 'confusion_matrix_groups.png')  # Fig. 4's coarse matrix
  table = reports.format_results_table(reports.collect_fold_results([tmp_path / 'aen'], fold_names=['fold1']),
                                       aen.CLASS_NAMES)
  assert 'groups UAR' in table.splitlines()[0] and 'groups WAR' in table.splitlines()[0]  # Tab. 3's 3-class columns
  trained = checkpoint_lib.Checkpoints(str(tmp_path / 'aen'), read_only=True)
  arrays = trained.restore_arrays(trained.latest_step())
  trained.close()
  assert_same(arrays['params']['guide'], saved.params)
  assert_same(arrays['batch_stats']['guide'], saved.batch_stats)
  assert not np.allclose(arrays['params']['backbone']['conv1']['kernel'], state.params['backbone']['conv1']['kernel'])

  wrong = tiny_aen_config(data_dir, **{'init_from.guide': str(tmp_path / 'aen')})
  with pytest.raises(ValueError, match="not the frame-level 'aen_frame'"):
    checkpoint_lib.initial_state(wrong, fresh, steps.model, steps.state_sharding)


def test_run_folds_gives_each_fold_its_own_guide():
  import importlib.util  # pylint: disable=import-outside-toplevel
  path = os.path.join(os.path.dirname(__file__), '..', 'scripts', 'run_folds.py')
  spec = importlib.util.spec_from_file_location('run_folds', path)
  run_folds = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(run_folds)
  command = run_folds.fold_command('configs/aen_dfew.py:variant=prototype', 3, 'runs/aen_fold3',
                                   ['--config.init_from.guide=runs/aen_frame_dfew_fold{fold}'])
  assert command[3:] == ['--config=configs/aen_dfew.py:variant=prototype,fold=3', '--workdir=runs/aen_fold3',
                         '--config.init_from.guide=runs/aen_frame_dfew_fold3']


def test_demo_runs_the_guide_then_aen_from_it():
  frame = configlib.load_config('configs/demo_synthetic.py', 'model=aen_frame')
  video = configlib.load_config('configs/demo_synthetic.py', 'model=aen')
  assert (frame.model_name, frame.num_epochs, video.model_name, video.num_epochs) == ('aen_frame', 12, 'aen', 20)
  assert video.loss.name == 'aen_prototype'
  assert video.init_from.guide == 'runs/demo_aen_frame' and frame.init_from.guide == 'none'
  assert frame.dataset.synthetic.motions == video.dataset.synthetic.motions == 'time_reversed'
  for config in (frame, video):
    train.check_frames(train.build_model(config), config)


def test_guide_pretraining_config_for_rafdb_image_lists():
  config = configlib.load_config('configs/aen_frame_rafdb.py', 'root=/data/raf,labels=dfew')
  assert (config.model_name, config.dataset.name, config.dataset.label_order) == ('aen_frame', 'image_list', 'dfew')
  assert dict(config.dataset.image_lists) == {'train': '/data/raf/train.txt', 'test': '/data/raf/test.txt'}
  assert (config.dataset.image_root, config.input.image_size) == ('/data/raf/Image/aligned', 112)
  train.check_frames(train.build_model(config), config)
  with pytest.raises(FileNotFoundError, match='/data/raf/train.txt'):
    from dferjax.data import inputs  # pylint: disable=import-outside-toplevel
    inputs.split_source(config, 'train')
