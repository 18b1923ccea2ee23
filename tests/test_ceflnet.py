"""CEFLNet: paper-size parameters by hand count (no compute) against Tab. 8, MACs against Tab. 8 and Tab. 9, shapes,
the salient snippet and blindness to time order, EIAN's Eq. (5)-(8) in numpy, both BatchNorm modes and
rematerialisation, loud errors, the paper configs, train and eval steps through the trainer. PyTorch parity:
test_ceflnet_parity.py.

MACs, two conventions. Ours (dferjax.summary): the multiply-accumulates of every convolution and matmul of the
evaluation forward, 63.52 G for 35 frames of 224 px. The paper's 63.80 G (Tab. 8, footnote 1) is ptflops', which
also counts BatchNorm (2 per element), ReLU (1 per output) and pooling (1 per input element): 8.1 M per frame,
0.28 G per clip. Both are reproduced below, and with them all four rows of Tab. 9 (2, 5, 10, 15 frames per snippet).
"""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dferjax import configlib, models, summary, train
from dferjax.data import sampling
from dferjax.models import ceflnet
from dferjax.models.ceflnet import CEFLNet

# d = 64; 7 snippets x 2 frames of 32 px (1 x 1 layer4 maps).
TINY = dict(num_frames=14, frames_per_snippet=2, backbone_width=8, classifier_dims=(16, 8))
TINY_SHAPE = (2, 14, 32, 32, 3)


@pytest.fixture
def registered(monkeypatch):
  """The model registry with CEFLNet in it, as configs and the trainer look it up."""
  monkeypatch.setitem(models.MODELS, 'ceflnet', CEFLNet)


def conv(k, cin, cout):
  return k * k * cin * cout


def basic_block(cin, cout):  # two 3x3 convs with BN, a 1x1 conv + BN shortcut when the shape changes
  shortcut = conv(1, cin, cout) + 2 * cout if cin != cout else 0
  return conv(3, cin, cout) + conv(3, cout, cout) + 4 * cout + shortcut


def linear(cin, cout):
  return cin * cout + cout


def resnet18_params(width=64):
  widths = [width * 2**stage for stage in range(4)]
  blocks = sum(basic_block(cin, cout) + basic_block(cout, cout) for cin, cout in zip([width] + widths, widths))
  return conv(7, 3, width) + 2 * width + blocks


def by_module(num_classes=7, classifier_dims=(256, 128), relation_form='code'):
  """Hand count of CEFLNet at d = 512 per top-level module."""
  d = 512
  attention = linear(d, 3 * d) + linear(d, d) + 2 * d  # in-projection, out-projection, LayerNorm
  relation = linear(2 * d, 1) + linear(2 * d if relation_form == 'code' else d, d)  # q0, q1
  widths = [d, *classifier_dims, num_classes]
  return {'backbone': resnet18_params(), 'clip_encoder': attention + relation, 'emotion_activation': d,
          'classifier': sum(linear(cin, cout) for cin, cout in zip(widths, widths[1:]))}


@pytest.mark.parametrize('fields, num_classes, want', [
    ({}, 7, 12_919_624),  # the 12.92 M with the public code's 512-256-128-7 head
    (dict(classifier_dims=(128, 64)), 6, 12_828_807),  # Tab. 8's 12.83 M: BU-3DFE's 6 classes, 512-128-64-6
    (dict(classifier_dims=(128, 64), relation_form='paper'), 6, 12_566_663),  # Eq. (3) as printed: not Tab. 8's
])
def test_paper_sized_parameter_count_by_hand(fields, num_classes, want):
  model = CEFLNet(num_classes=num_classes, **fields)
  variables = jax.eval_shape(partial(model.init, train=False), jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 35, 224, 224, 3), jnp.float32))
  got = {name: sum(x.size for x in jax.tree.leaves(tree)) for name, tree in variables['params'].items()}
  assert got == by_module(num_classes, **fields)
  assert sum(got.values()) == want


def resnet18_conv_macs(size=224, width=64):
  """Conv MACs of one frame: (output positions x output channels) x (kernel taps x input channels) per conv."""
  out = lambda s, stride: (s - 1) // stride + 1
  size = out(size, 2)  # conv1, 7x7 / 2
  macs = size**2 * width * conv(7, 3, 1)
  size, channels = out(size, 2), width  # max-pool
  for stage in range(4):
    features = width * 2**stage
    stride = 1 if stage == 0 else 2
    size = out(size, stride)
    macs += size**2 * features * (conv(3, channels, 1) + 3 * conv(3, features, 1))  # 4 convs a stage
    if channels != features:
      macs += size**2 * features * channels  # the 1x1 shortcut
    channels = features
  return macs


def ptflops_extra_per_frame(size=224, width=64):
  """What ptflops adds per frame: BatchNorm 2 per element, ReLU 1 per output, max- and average-pool 1 per input
  element, on conv1's map (112 x 112 x 64 at 224 px) and the stages' (56 x 56 x 64, ..., 7 x 7 x 512)."""
  stem = (size // 2)**2 * width
  stages = [(size // 2**(stage + 2))**2 * width * 2**stage for stage in range(4)]
  batch_norm = 2 * (stem + 4 * stages[0] + 5 * sum(stages[1:]))  # 4 a stage, and the shortcut's from stage 2 on
  relu = stem + 4 * sum(stages)  # 2 a block
  pools = stem + stages[3]  # the max-pool's input, the average pool's
  return batch_norm + relu + pools


def head_matmul_macs(frames_per_snippet, num_snippets=7, d=512, heads=4, classifier=(512, 256, 128, 7)):
  k = frames_per_snippet
  attention = k * d * 3 * d + 2 * heads * k * k * (d // heads) + k * d * d  # in-projection, QK^T, AV, out-projection
  relation = k * 2 * d + 2 * d * d  # q0 per frame, q1 once
  return num_snippets * (attention + relation) + sum(a * b for a, b in zip(classifier, classifier[1:]))


def test_paper_config_size_and_macs_match_tab_8(registered):
  del registered
  result = summary.summarize(configlib.load_config('configs/ceflnet_dfew.py'))
  assert result['input_shape'] == [35, 224, 224, 3]
  assert result['params'] == 12_919_624 and result['params_by_module'] == by_module()
  conv_macs = 35 * resnet18_conv_macs() + 7 * 512  # + EIAN's width-1 Conv1d
  assert resnet18_conv_macs() == 1_813_561_344
  assert result['gmacs_per_clip_by_op']['conv'] * 1e9 == pytest.approx(conv_macs, rel=1e-12)
  assert result['gmacs_per_clip_by_op']['matmul'] * 1e9 == pytest.approx(head_matmul_macs(5), rel=1e-12)
  assert round(result['gmacs_per_clip'], 2) == 63.52
  assert ptflops_extra_per_frame() == 8_103_424
  assert round(result['gmacs_per_clip'] + 35 * ptflops_extra_per_frame() / 1e9, 2) == 63.80  # Tab. 8


@pytest.mark.parametrize('frames_per_snippet, want', [(2, 25.52), (10, 127.59), (15, 191.39)])
def test_macs_match_tab_9(frames_per_snippet, want):
  """Tab. 9's other rows: our exact conv + matmul count of the evaluation forward plus ptflops' extra per frame."""
  num_frames = 7 * frames_per_snippet
  model = CEFLNet(num_classes=7, num_frames=num_frames, frames_per_snippet=frames_per_snippet)
  shape = (1, num_frames, 224, 224, 3)
  macs = summary.count_macs(partial(model.apply, train=False), summary.abstract_variables(model, shape),
                            jax.ShapeDtypeStruct(shape, jnp.float32))
  assert macs['matmul'] == head_matmul_macs(frames_per_snippet)
  assert round((macs['total'] + num_frames * ptflops_extra_per_frame()) / 1e9, 2) == want


@pytest.fixture(scope='module')
def tiny():
  model = CEFLNet(num_classes=7, **TINY)
  video = jnp.asarray(np.random.default_rng(0).random(TINY_SHAPE), jnp.float32)
  return model, jax.jit(partial(model.init, train=False))(jax.random.key(0), video), video


def test_shapes_and_the_salient_snippet(tiny):
  model, variables, video = tiny
  evaluate = jax.jit(partial(model.apply, train=False))
  logits, aux = evaluate(variables, video)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert set(aux) == {'snippet_attention', 'salient_snippet', 'frame_weights'}
  attention = np.asarray(aux['snippet_attention'])
  assert attention.shape == (2, 7) and aux['frame_weights'].shape == (2, 7, 2)
  np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-6)  # a softmax over the snippets (Eq. 5)
  assert aux['salient_snippet'].dtype == jnp.int32
  np.testing.assert_array_equal(aux['salient_snippet'], attention.argmax(-1))  # P_e (Eq. 6)
  assert ((aux['frame_weights'] > 0) & (aux['frame_weights'] < 1)).all()  # sigmoids (Eq. 2)
  assert model.metric_heads() == {} and CEFLNet.rng_streams == ('dropout',)
  assert set(variables['params']) == {'backbone', 'clip_encoder', 'emotion_activation', 'classifier'}
  assert set(CEFLNet.classifier_names) <= set(variables['params'])
  # Blind to time order: snippets in another order, the frames of each reversed: the same logits.
  snippets = video.reshape(2, 7, 2, *video.shape[2:])
  shuffled = snippets[:, np.array([3, 0, 6, 1, 5, 2, 4])][:, :, ::-1].reshape(video.shape)
  np.testing.assert_allclose(evaluate(variables, shuffled)[0], logits, atol=1e-5)


def test_eian_follows_eq_5_to_8():
  """Hand-made snippet features and kernel: snippet 4 projects highest, so it is the salient one; the
  representation is the max over snippets of A_n V_n (float64 numpy)."""
  rng = np.random.default_rng(0)
  snippets = rng.normal(size=(2, 7, 6))
  module = ceflnet.EmotionIntensityActivation()
  kernel = rng.normal(size=(1, 6, 1))
  snippets[:, 4] = 3 * kernel[0, :, 0]  # the largest W^T V_n
  variables = {'params': {'scores': {'kernel': jnp.asarray(kernel, jnp.float32)}}}
  representation, attention = module.apply(variables, jnp.asarray(snippets, jnp.float32))
  scores = snippets @ kernel[0, :, 0]
  want_attention = np.exp(scores - scores.max(-1, keepdims=True))
  want_attention /= want_attention.sum(-1, keepdims=True)
  np.testing.assert_allclose(attention, want_attention, rtol=1e-5, atol=1e-7)
  assert (np.asarray(attention).argmax(-1) == 4).all()
  np.testing.assert_allclose(representation, (snippets * want_attention[..., None]).max(1), rtol=1e-5, atol=1e-6)


def _train_step(model, variables, video):
  """Logits, updated batch statistics and gradients of one train-mode pass (dropout drawn from a fixed key)."""
  def loss(params):
    (logits, _), updates = model.apply({**variables, 'params': params}, video, train=True, mutable=['batch_stats'],
                                       rngs={'dropout': jax.random.key(1)})
    return jax.nn.log_softmax(logits)[:, 3].sum(), (logits, updates)

  (_, (logits, updates)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
  return logits, updates['batch_stats'], grads


def test_batch_norm_modes_and_remat(tiny):
  """per_slot and joint share the parameters and evaluate alike, but train on different statistics (14 slot
  updates against one); remat_backbone (inside the slot scan) and slot_unroll change neither the outputs nor the
  gradients; every parameter learns."""
  model, variables, video = tiny
  joint = model.clone(backbone_batch_norm='joint')
  evaluate = lambda m: jax.jit(partial(m.apply, train=False))(variables, video)[0]
  np.testing.assert_allclose(evaluate(model), evaluate(joint), atol=1e-6)

  per_slot = _train_step(model, variables, video)
  rematerialised = _train_step(model.clone(remat_backbone=True, slot_unroll=4), variables, video)
  for want, got in zip(jax.tree.leaves(per_slot), jax.tree.leaves(rematerialised)):  # float rounding apart
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max() + 1e-6)
  joint = _train_step(joint, variables, video)
  assert np.abs(np.asarray(per_slot[0]) - np.asarray(joint[0])).max() > 1e-3
  # One update moves a running mean a tenth of the way to the batch's; 14 in a row move it 1 - 0.9^14 = 77 %.
  start = variables['batch_stats']['backbone']['bn1']['mean']
  moved = lambda stats: np.asarray(stats['backbone']['bn1']['mean'] - start)
  ratio = moved(per_slot[1]) / moved(joint[1])
  np.testing.assert_allclose(np.median(ratio), (1 - 0.9**14) / 0.1, rtol=0.1)
  zero = [jax.tree_util.keystr(path) for path, g in jax.tree_util.tree_flatten_with_path(per_slot[2])[0]
          if not np.any(np.asarray(g))]
  assert not zero, zero


def test_bad_inputs_and_fields_fail_loudly(tiny):
  model, variables, video = tiny
  with pytest.raises(ValueError, match=r'CEFLNet expects video \[batch, 14, height, width, 3\]'):
    model.apply(variables, video[:, :10], train=False)
  with pytest.raises(ValueError, match=r'CEFLNet expects video'):
    model.apply(variables, video[0], train=False)
  with pytest.raises(ValueError, match='num_frames=35 is not num_snippets=7 x frames_per_snippet=2'):
    model.clone(num_frames=35).apply(variables, video, train=False)
  with pytest.raises(ValueError, match=r"backbone_batch_norm='batch' not in \('per_slot', 'joint'\)"):
    model.clone(backbone_batch_norm='batch').apply(variables, video, train=False)
  with pytest.raises(ValueError, match='slot_unroll=0 must be >= 1'):
    model.clone(slot_unroll=0).apply(variables, video, train=False)
  with pytest.raises(ValueError, match=r"relation_form='eq2' not in \('code', 'paper'\)"):
    model.clone(relation_form='eq2').apply(variables, video, train=False)


def test_paper_configs(registered):
  del registered
  config = configlib.load_config('configs/ceflnet_dfew.py', 'fold=3')
  assert (config.model_name, config.dataset.name, config.init_from.backbone) == ('ceflnet', 'dfew/fold3_px224', '')
  assert sampling.make_sampler(config.input.sampler) == sampling.SnippetSampler()
  assert (config.input.image_size, config.input.augment, config.loss.name) == (224, 'none', 'cross_entropy')
  assert (config.optimizer.name, config.optimizer.learning_rate, config.optimizer.weight_decay) == ('adam', 1e-4, 1e-4)
  assert (config.batch_size, config.num_epochs) == (8, 120)
  schedule = train.learning_rate_schedule(config.optimizer, steps_per_epoch=4, num_epochs=120)
  for epoch in (0, 9, 60, 119):  # refs.md §1.6: 1e-4 * (1 + cos(pi e / 160)) / 2 * min(1, (e + 1) / 10)
    want = 1e-4 * 0.5 * (1 + np.cos(np.pi * epoch / 160)) * min(1.0, (epoch + 1) / 10)
    np.testing.assert_allclose(float(schedule(epoch * 4 + 2)), want, rtol=1e-5)
  model = train.build_model(config)
  train.check_frames(model, config)  # 35 = 7 x 5 from the sampler
  assert (model.backbone_batch_norm, model.relation_form, model.remat_backbone) == ('per_slot', 'code', False)
  assert tuple(model.classifier_dims) == (256, 128) and (model.attention_dropout, model.relation_dropout,
                                                         model.classifier_dropout) == (0.1, 0.5, 0.4)
  options = train.build_model(configlib.load_config('configs/ceflnet_dfew.py', 'bn=joint,relation=paper,remat'))
  assert (options.backbone_batch_norm, options.relation_form, options.remat_backbone) == ('joint', 'paper', True)
  afew = configlib.load_config('configs/ceflnet_afew.py')
  assert (afew.dataset.name, afew.dataset.eval_split, afew.init_from.backbone) == ('afew/px224', 'validation', '')
  assert (afew.optimizer.learning_rate, afew.num_epochs) == (1e-4, 120)


def test_train_and_eval_steps_through_the_trainer(registered):
  """The trainer's jitted steps on 2 CPU devices (the batch sharded): per-slot BatchNorm statistics carried through
  the scan under jit, the loss falls on a repeated batch, the evaluation counts every clip."""
  del registered
  config = configlib.load_config('configs/ceflnet_dfew.py')
  with config.unlocked():
    config.model.update(TINY)
    config.input.sampler = dict(name='snippets', frames_per_snippet=2)
    config.input.image_size = 32
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_epochs = 0
  from dferjax import sharding  # pylint: disable=import-outside-toplevel
  steps = train.make_steps(config, steps_per_epoch=4)
  state = steps.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {'video': rng.integers(0, 256, train.video_shape(config, 4), dtype=np.uint8),
           'label': np.array([0, 1, 2, 3], np.int32), 'mask': np.ones(4, bool)}
  batch = sharding.to_global(batch, steps.batch_sharding)
  first_mean = np.asarray(state.batch_stats['backbone']['bn1']['mean'])  # the step donates the state
  losses = []
  for _ in range(4):
    state, accumulator = steps.train(state, steps.init_accumulator(), batch)
    losses.append(float(accumulator['sums']['loss']) / int(accumulator['count']))
  assert losses[-1] < losses[0], losses
  assert not np.allclose(state.batch_stats['backbone']['bn1']['mean'], first_mean)
  confusions = steps.eval(state, steps.init_confusions(config.num_classes), batch)
  assert int(np.asarray(confusions['classes']).sum()) == 4
