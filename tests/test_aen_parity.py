"""AEN: the flax model and losses against an independent PyTorch transcription (dferjax.reference.torch_aen) with the
same weights, for the paper variant and the prototype's (stages (2, 1, 2, 2), low level fused first, column
softmax, log-probability prediction): eval-mode logits of the prediction and of each head, the guide's frame
logits; train-mode logits, every term of both losses, and the BatchNorm running statistics (the guide's held)."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dferjax import losses
from dferjax.models import aen
from dferjax.models.aen import AEN

torch = pytest.importorskip('torch')
from dferjax.reference import loading, torch_aen  # noqa: E402  (needs torch)
from parity_helpers import assert_running_stats_match  # noqa: E402

# 48 px: layer1 12 x 12, layer3 3 x 3, layer4 2 x 2. Paper: low 1 x 144, middle 4 x 9 = 36 (unequal widths, so both
# converters expand F_{a-1}); prototype: middle 16 x 9 = 144, equal widths as its 784 = 784 (no second expansion).
TINY = dict(num_frames=4, backbone_width=8, low_channels=1, middle_channels=4, num_layers=1, num_heads=2, head_dim=8,
            mlp_dim=16)
VARIANTS = {
    'paper': TINY,
    'prototype': dict(TINY, middle_channels=16, backbone_stage_sizes=(2, 1, 2, 2), s2ac_order='prototype',
                      s2ac_softmax='column', prediction_space='log_probability'),
}
VIDEO_SHAPE = (3, 4, 48, 48, 3)
HEADS = ('global_logits', 'group_logits', 'local_logits')


def _random_variables(model, seed=0):
  """Every variable random and O(1)-relevant, so a misplaced weight or axis shows in the outputs; heads drawn
  small, as the T-Formers' residual streams have no final LayerNorm."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(partial(model.init, train=False), jax.random.key(0),
                            jax.ShapeDtypeStruct(VIDEO_SHAPE, jnp.float32))

  def draw(path, spec):
    names = [entry.key for entry in path]
    if names[-1] == 'kernel':
      small = any(name.endswith('head') for name in names)
      return rng.normal(scale=np.sqrt(2 / np.prod(spec.shape[:-1])) * (0.3 if small else 1.0), size=spec.shape)
    if names[-1] in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, size=spec.shape)
    return rng.normal(scale=0.3, size=spec.shape)  # biases, means, class tokens, position tables

  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), jax.tree_util.tree_map_with_path(draw, abstract))


def _video(seed=0):
  """Uniform noise, each clip dimmer than the one before, so clips differ by more than noise."""
  brightness = np.linspace(1.0, 0.3, VIDEO_SHAPE[0]).reshape(-1, 1, 1, 1, 1)
  return (np.random.default_rng(seed).uniform(size=VIDEO_SHAPE) * brightness).astype(np.float32)


def _torch_video(video):
  return torch.from_numpy(video).permute(0, 1, 4, 2, 3).contiguous()


def _numpy(tree):
  return jax.tree.map(lambda x: x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x), tree)


LABELS = np.array([0, 3, 4])  # happy, angry, surprise: two groups, three classes
LOSSES = {'paper': (losses.AENLoss(), 'paper_loss'), 'prototype': (losses.AENPrototypeLoss(), 'prototype_loss')}


def _flax_outputs(model, variables, eval_video, train_video):
  """Everything the tests compare, from one compiled function (tracing AEN dominates the test's time): eval
  (logits, aux), train (logits, aux), the updated statistics, and both losses' (total, terms) on the train aux."""
  def run(variables, eval_video, train_video, labels):
    evaluated = model.apply(variables, eval_video, train=False)
    (logits, aux), updates = model.apply(variables, train_video, train=True, mutable=['batch_stats'])
    loss_values = {name: loss(logits, aux, {'label': labels}) for name, (loss, _) in LOSSES.items()}
    return evaluated, (logits, aux), updates, loss_values

  with jax.default_matmul_precision('highest'):
    return jax.device_get(jax.jit(run)(variables, eval_video, train_video, jnp.asarray(LABELS)))


@pytest.fixture(scope='module', params=sorted(VARIANTS))
def twins(request):
  """(variant, flax variables, flax outputs, the torch twin holding the variables)."""
  fields = VARIANTS[request.param]
  model = AEN(7, **fields)
  variables = _random_variables(model, seed=len(request.param))
  torch_model = torch_aen.AEN(7, image_size=VIDEO_SHAPE[2], **fields)
  torch_aen.load_flax_variables(torch_model, variables)
  return request.param, variables, _flax_outputs(model, variables, _video(), _video(seed=1)), torch_model


def test_transcription_agrees_on_sizes_and_grouping(twins):
  _, variables, _, torch_model = twins
  assert torch_aen.CLASS_GROUPS == aen.CLASS_GROUPS and torch_aen.GROUP_NAMES == aen.GROUP_NAMES
  assert sum(p.numel() for p in torch_model.parameters()) == sum(x.size for x in jax.tree.leaves(variables['params']))
  assert torch_model.t_former_low.pos_embedding.shape == (1, 5, 144)


def test_eval_mode_logits_heads_and_guide_match(twins):
  _, _, ((got, got_aux), (_, train_aux), _, _), torch_model = twins
  torch_model.eval()
  with torch.no_grad():
    logits, aux = _numpy(torch_model(_torch_video(_video())))
    _, frame_logits = _numpy(torch_model.model_2D(_torch_video(_video(seed=1))))
  assert np.ptp(logits) > 0.2 and all(np.ptp(aux[head]) > 0.2 for head in HEADS) and np.ptp(frame_logits) > 0.2
  np.testing.assert_allclose(got, logits, atol=1e-4)
  for head in HEADS:
    np.testing.assert_allclose(got_aux[head], aux[head], atol=1e-4, err_msg=head)
  np.testing.assert_allclose(train_aux['guide_logits'], frame_logits, atol=1e-4)  # flax's guide: inference mode
  assert 'guide_logits' not in aux and 'guide_logits' not in got_aux  # evaluation does not run the guide


def _torch_train_forward(torch_model, video):
  """One training forward: (logits, aux) and the BN state before / after it with each BN's values per channel."""
  torch_model.train()
  counts = {}
  hooks = [module.register_forward_pre_hook(
      lambda module, args, name=name: counts.__setitem__(name, args[0].numel() // args[0].shape[1]))
           for name, module in torch_model.named_modules() if isinstance(module, torch.nn.BatchNorm2d)]
  before = {k: v.clone() for k, v in torch_model.state_dict().items()}
  try:
    outputs = torch_model(_torch_video(video))
  finally:
    for hook in hooks:
      hook.remove()
    after = {k: v.clone() for k, v in torch_model.state_dict().items()}
    torch_model.load_state_dict(before)  # the fixture's weights stay as loaded
  return outputs, before, after, counts


def test_train_mode_logits_loss_terms_and_batch_norm_updates_match(twins):
  _, variables, (_, (got, got_aux), updates, loss_values), torch_model = twins
  (logits, aux), before, after, counts = _torch_train_forward(torch_model, _video(seed=1))
  assert torch_model.training and not torch_model.model_2D.training  # the guide ran in eval mode
  np.testing.assert_allclose(got, logits.detach().numpy(), atol=1e-4)
  np.testing.assert_allclose(got_aux['guide_logits'], aux['guide_logits'].numpy(), atol=1e-4)

  torch_labels = torch.from_numpy(LABELS)
  flax_aux = jax.tree.map(lambda x: torch.from_numpy(np.array(x)), got_aux)
  for name, (flax_loss, torch_name) in LOSSES.items():
    total, terms = loss_values[name]
    want_total, want_terms = _numpy(getattr(torch_aen, torch_name)(aux, torch_labels))
    assert set(terms) == set(want_terms) == set(flax_loss.terms)
    for term, value in terms.items():
      assert np.abs(want_terms[term]).min() > 1e-3, term  # every term live
      # rtol: the paper's L_ta sums |differences| over every feature (O(1000) here, float32's step 6e-5 at 512).
      np.testing.assert_allclose(value, want_terms[term], rtol=1e-6, atol=1e-4, err_msg=f'{name} {term}')
    np.testing.assert_allclose(total, want_total, rtol=1e-6, atol=1e-4)
    # The torch loss on flax's own outputs: the loss transcriptions alone, at float32 rounding.
    _, from_flax = _numpy(getattr(torch_aen, torch_name)(flax_aux, torch_labels))
    for term, value in terms.items():
      np.testing.assert_allclose(value, from_flax[term], rtol=1e-5, atol=1e-6, err_msg=f'{name} {term}')

  trained = {name: stats for name, stats in updates['batch_stats'].items() if name != 'guide'}
  assert len(list(loading.flax_leaves(trained))) == 2 * sum(not key.startswith('model_2D') for key in counts)
  assert_running_stats_match(trained, torch_aen.torch_key, before, after, counts)
  jax.tree.map(np.testing.assert_array_equal, updates['batch_stats']['guide'], variables['batch_stats']['guide'])
  for key, value in before.items():
    if key.startswith('model_2D'):
      torch.testing.assert_close(after[key], value, rtol=0, atol=0)  # the guide's statistics stay


def test_frame_network_loads_alone_and_loading_is_strict(twins):
  name, variables, _, torch_model = twins
  fields = {k: v for k, v in VARIANTS[name].items() if k in ('backbone_stage_sizes', 'backbone_width',
                                                              'middle_channels')}
  frame = torch_aen.AENFrame(7, image_size=VIDEO_SHAPE[2], **fields)
  torch_aen.load_flax_variables(frame, {'params': variables['params']['guide'],
                                        'batch_stats': variables['batch_stats']['guide']})
  torch.testing.assert_close(frame.fc2D.weight, torch_model.model_2D.fc2D.weight)
  params = dict(variables['params'], extra={'kernel': jnp.zeros((2, 2))})
  with pytest.raises(ValueError, match='unexpected extra.weight'):
    torch_aen.load_flax_variables(torch_aen.AEN(7, image_size=48, **VARIANTS[name]), dict(variables, params=params))
  without_guide = {collection: {k: v for k, v in tree.items() if k != 'guide'}
                   for collection, tree in variables.items()}
  with pytest.raises(ValueError, match='missing model_2D.fc2D.weight'):
    torch_aen.load_flax_variables(torch_aen.AEN(7, image_size=48, **VARIANTS[name]), without_guide)
  torch_aen.load_flax_variables(torch_aen.AEN(7, image_size=48, guide=False, **VARIANTS[name]), without_guide)
