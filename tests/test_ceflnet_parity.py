"""CEFLNet: the flax model against an independent PyTorch transcription (dferjax.reference.torch_ceflnet) with the
same weights: eval-mode logits, snippet attention, salient snippet and frame weights for both relation forms;
train-mode logits, BatchNorm running statistics and gradients with the backbone run per slot (the public code's
35 statistics and updates per step) and jointly; the default head at the paper's width; strict loading."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dferjax.models.ceflnet import CEFLNet

torch = pytest.importorskip('torch')
from dferjax.reference import loading, torch_ceflnet  # noqa: E402  (needs torch)

# d = 64 (4 heads of 16); 48 px frames give 2 x 2 layer4 maps (the odd 3 -> 2 step exercises the padding), so each
# slot's BatchNorm sees batch x 4 values per channel there.
TINY = dict(backbone_width=8, classifier_dims=(16, 8))
VIDEO_SHAPE = (3, 35, 48, 48, 3)
NO_DROPOUT = dict(attention_dropout=0.0, relation_dropout=0.0, classifier_dropout=0.0)


def _random_variables(model, video_shape, seed=0):
  """Every variable random and O(1)-relevant, so a misplaced weight or axis shows in the outputs; the classifier's
  output layer is drawn small to keep the logits O(1), where float32 leaves 1e-4 of room."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(partial(model.init, train=False), jax.random.key(0),
                            jax.ShapeDtypeStruct(video_shape, jnp.float32))

  def draw(path, spec):
    names = [entry.key for entry in path]
    if names[-1] == 'kernel':
      scale = np.sqrt(2 / np.prod(spec.shape[:-1])) * (0.2 if 'output' in names else 1.0)
      return rng.normal(scale=scale, size=spec.shape)
    if names[-1] in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, size=spec.shape)
    return rng.normal(scale=0.3, size=spec.shape)  # biases, means

  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), jax.tree_util.tree_map_with_path(draw, abstract))


def _video(shape=VIDEO_SHAPE, seed=0):
  """Uniform noise, each clip dimmer than the one before, so clips differ by more than noise."""
  brightness = np.linspace(1.0, 0.3, shape[0]).reshape(-1, 1, 1, 1, 1)
  return (np.random.default_rng(seed).uniform(size=shape) * brightness).astype(np.float32)


def _twins(seed=0, video_shape=VIDEO_SHAPE, **fields):
  """CEFLNet(**fields) with random weights and its torch transcription holding them."""
  model = CEFLNet(num_classes=7, **fields)
  variables = _random_variables(model, video_shape, seed)
  torch_model = torch_ceflnet.CEFLNet(7, **{k: v for k, v in fields.items() if k != 'remat_backbone'})
  torch_ceflnet.load_flax_variables(torch_model, variables)
  return model, variables, torch_model


def _torch_video(video):
  """[b, t, h, w, 3] numpy -> [b, t, 3, h, w] torch, copied to NCHW memory: with jaxlib loaded in the process,
  torch 2.13's oneDNN backward of a channels_last conv (the permuted view's layout) crashes (segfault)."""
  return torch.from_numpy(video).permute(0, 1, 4, 2, 3).contiguous()


def _torch_eval(torch_model, video):
  torch_model.eval()
  with torch.no_grad():
    return [x.numpy() for x in torch_model(_torch_video(video), return_aux=True)]


@pytest.mark.parametrize('relation_form', ['code', 'paper'])
def test_eval_mode_outputs_match(relation_form):
  model, variables, torch_model = _twins(relation_form=relation_form, **TINY)
  video = _video()
  logits, attention, salient, frame_weights = _torch_eval(torch_model, video)
  with jax.default_matmul_precision('highest'):
    got, aux = jax.jit(partial(model.apply, train=False))(variables, video)
  assert np.ptp(logits) > 0.2 and np.ptp(attention) > 0.05 and np.ptp(frame_weights) > 0.05  # not degenerate
  np.testing.assert_allclose(got, logits, atol=1e-4)
  np.testing.assert_allclose(aux['snippet_attention'], attention, atol=1e-5)
  np.testing.assert_allclose(aux['frame_weights'], frame_weights, atol=1e-5)
  np.testing.assert_array_equal(aux['salient_snippet'], salient)


def _torch_train_step(torch_model, video, labels):
  """One train-mode forward and backward: (logits, aux, BN statistics before and after, values per channel of
  each BN layer's batch, gradients by torch key). The torch model's weights and statistics are left as they were."""
  torch_model.train()
  counts = {}
  hooks = [module.register_forward_pre_hook(
      lambda module, args, name=name: counts.__setitem__(name, args[0].numel() // args[0].shape[1]))
           for name, module in torch_model.named_modules() if isinstance(module, torch.nn.BatchNorm2d)]
  before = {k: v.clone() for k, v in torch_model.state_dict().items()}
  try:
    torch_model.zero_grad()
    logits, attention, _, frame_weights = torch_model(_torch_video(video), return_aux=True)
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels).long()).backward()
    grads = {name: p.grad.numpy().copy() for name, p in torch_model.named_parameters()}
  finally:
    for hook in hooks:
      hook.remove()
    after = {k: v.clone() for k, v in torch_model.state_dict().items()}
    torch_model.load_state_dict(before)
  return (logits.detach().numpy(), attention.detach().numpy(), frame_weights.detach().numpy(), before, after,
          counts, grads)


def _flax_train_step(model, variables, video, labels):
  def loss(params):
    (logits, aux), updates = model.apply({**variables, 'params': params}, video, train=True,
                                         mutable=['batch_stats'], rngs={'dropout': jax.random.key(0)})
    log_probs = jax.nn.log_softmax(logits)
    return -log_probs[jnp.arange(labels.shape[0]), labels].mean(), (logits, aux, updates)

  with jax.default_matmul_precision('highest'):
    (_, (logits, aux, updates)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
  return logits, aux, updates, grads


@pytest.mark.parametrize('backbone_batch_norm, updates_per_step', [('per_slot', 35), ('joint', 1)])
def test_train_mode_outputs_statistics_and_gradients_match(backbone_batch_norm, updates_per_step):
  """Dropout off (random in both), BN on batch statistics: per_slot normalises each of the 35 slots with its own
  3 frames and moves the running statistics 35 times, in slot order, as the torch code's loop does."""
  model, variables, torch_model = _twins(seed=1, backbone_batch_norm=backbone_batch_norm, **TINY, **NO_DROPOUT)
  video, labels = _video(seed=1), np.array([0, 3, 5], np.int32)
  want, attention, frame_weights, before, after, counts, torch_grads = _torch_train_step(torch_model, video, labels)
  logits, aux, updates, grads = _flax_train_step(model, variables, video, labels)
  assert np.ptp(want) > 0.2
  np.testing.assert_allclose(logits, want, atol=1e-4)
  np.testing.assert_allclose(aux['snippet_attention'], attention, atol=1e-5)
  np.testing.assert_allclose(aux['frame_weights'], frame_weights, atol=1e-5)

  leaves = list(loading.flax_leaves(updates['batch_stats']))
  assert len(leaves) == 2 * len(counts) == 40  # bn1 and 19 in the blocks
  decay = 0.9**updates_per_step
  for path, got in leaves:
    key = torch_ceflnet.torch_key(path, torch_ceflnet.num_hidden_layers(torch_model))
    old = before[key].numpy()
    if path[-1] == 'mean':
      np.testing.assert_allclose(got, after[key].numpy(), atol=1e-5, err_msg=key)
    else:
      # flax moves towards each batch's biased variance, torch towards the unbiased one; every slot's batch has
      # the same n values per channel, so the moved part scales by (n - 1) / n.
      n = counts[key.rsplit('.', 1)[0]]
      biased = decay * old + (after[key].numpy() - decay * old) * (n - 1) / n
      np.testing.assert_allclose(got, biased, rtol=1e-5, atol=1e-5, err_msg=key)
    assert not np.allclose(got, old)  # the statistics did move

  flat = list(loading.flax_leaves(grads))
  assert len(flat) == len(torch_grads)
  scale = max(np.abs(g).max() for g in torch_grads.values())
  for path, got in flat:
    key = torch_ceflnet.torch_key(path, torch_ceflnet.num_hidden_layers(torch_model))
    got = np.asarray(got)
    if path[-1] == 'kernel':
      got = got.transpose(3, 2, 0, 1) if got.ndim == 4 else got.transpose(*reversed(range(got.ndim)))
    np.testing.assert_allclose(got, torch_grads[key], atol=1e-4 * scale, rtol=1e-3, err_msg=key)


def test_paper_width_eval_matches_and_parameters_agree():
  """d = 512, 4 heads of 128, the 256-128 head (the paper's 12.92 M parameters), on 7 snippets of 2 frames of 32 px
  (1 x 1 layer4 maps) to keep it quick."""
  shape = (1, 14, 32, 32, 3)
  model, variables, torch_model = _twins(seed=2, video_shape=shape, num_frames=14, frames_per_snippet=2)
  assert sum(p.numel() for p in torch_model.parameters()) == sum(x.size for x in jax.tree.leaves(variables['params']))
  assert sum(p.numel() for p in torch_model.parameters()) == 12_919_624
  assert torch_model.attn.in_proj_weight.shape == (1536, 512) and torch_model.fc.in_features == 1024
  video = _video(shape, seed=2)
  logits, attention, salient, _ = _torch_eval(torch_model, video)
  with jax.default_matmul_precision('highest'):
    got, aux = jax.jit(partial(model.apply, train=False))(variables, video)
  assert np.ptp(logits) > 0.2
  np.testing.assert_allclose(got, logits, atol=1e-4)
  np.testing.assert_allclose(aux['snippet_attention'], attention, atol=1e-5)
  np.testing.assert_array_equal(aux['salient_snippet'], salient)


def test_loading_is_strict():
  model, variables, torch_model = _twins(**TINY)
  params = dict(variables['params'], extra={'kernel': jnp.zeros((2, 2))})
  with pytest.raises(ValueError, match='unexpected extra.weight'):
    torch_ceflnet.load_flax_variables(torch_model, dict(variables, params=params))
  stats = dict(variables['batch_stats'], backbone={k: v for k, v in variables['batch_stats']['backbone'].items()
                                                    if k != 'layer1_0'})
  with pytest.raises(ValueError, match='missing layer1.0.bn1.running_mean'):
    torch_ceflnet.load_flax_variables(torch_model, dict(variables, batch_stats=stats))
  paper = _random_variables(CEFLNet(num_classes=7, relation_form='paper', **TINY), VIDEO_SHAPE)
  with pytest.raises(ValueError, match=r'shape fc.weight: flax \(64, 64\) vs torch \(64, 128\)'):
    torch_ceflnet.load_flax_variables(torch_model, paper)
  del model
