"""NR-DFERNet: the flax model against an independent PyTorch transcription (dferjax.reference.torch_nr_dfernet)
with the same weights: train-mode logits and BatchNorm updates, eval-mode filtered / sequence / snippet logits,
the snippet filter's decisions, and one eval pass at paper size."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dferjax.models.nr_dfernet import NEUTRAL, NRDFERNet

torch = pytest.importorskip('torch')
from dferjax.reference import loading, torch_nr_dfernet  # noqa: E402  (needs torch)
from parity_helpers import assert_running_stats_match  # noqa: E402

# Tiny but complete: 16 frames (15 vectors, 7 snippets of 3), 48 px -> 3x3 primary maps -> 2x2 fused maps
# (odd sizes exercise the stride-2 padding), dim = 32 * 2 * 2 = 128, two layers in each transformer.
TINY = dict(num_frames=16, stem_width=8, num_spatial_layers=2, num_temporal_layers=2, num_heads=2, head_dim=8,
            spatial_mlp_dim=48, temporal_mlp_dim=64)
VIDEO_SHAPE = (2, 16, 48, 48, 3)
PAPER_VIDEO_SHAPE = (1, 16, 112, 112, 3)


def _torch_model(video_shape, **fields):
  """The torch twin of NRDFERNet(**fields); its arguments use the authors' names."""
  renames = {'num_heads': 'heads', 'head_dim': 'dim_head', 'filter_max_probability': 'mu1',
             'filter_neutral_probability': 'mu2'}
  return torch_nr_dfernet.NRDFERNet(7, image_size=video_shape[2], **{renames.get(k, k): v for k, v in fields.items()})


def _random_variables(model, video_shape, seed=0):
  """Every variable random and O(1)-relevant, so a misplaced weight or axis shows in the logits; the head
  is drawn small because the temporal residual stream has no final LayerNorm, which keeps logits O(1)."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(partial(model.init, train=False), jax.random.key(0),
                            jax.ShapeDtypeStruct(video_shape, jnp.float32))

  def draw(path, spec):
    names = [entry.key for entry in path]
    if names[-1] == 'kernel':
      scale = np.sqrt(2 / np.prod(spec.shape[:-1])) * (0.3 if 'head' in names else 1.0)
      return rng.normal(scale=scale, size=spec.shape)
    if names[-1] in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, size=spec.shape)
    return rng.normal(scale=0.3, size=spec.shape)  # biases, means, position tables

  variables = jax.tree_util.tree_map_with_path(draw, abstract)
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), variables)


def _video(shape=VIDEO_SHAPE, seed=0):
  """Uniform noise, each clip dimmer than the one before, so clips differ by more than noise."""
  brightness = np.linspace(1.0, 0.3, shape[0]).reshape(-1, 1, 1, 1, 1)
  return (np.random.default_rng(seed).uniform(size=shape) * brightness).astype(np.float32)


def _run_torch(torch_model, video):
  with torch.no_grad():
    out = torch_model(torch.from_numpy(video).permute(0, 1, 4, 2, 3))
  return [x.numpy() for x in out] if isinstance(out, tuple) else out.numpy()


@pytest.fixture(scope='module')
def tiny():
  """The tiny model, its weights, a jitted eval apply shared by the tests, and the torch twin."""
  model = NRDFERNet(num_classes=7, **TINY)
  variables = _random_variables(model, VIDEO_SHAPE)
  torch_model = _torch_model(VIDEO_SHAPE, **TINY)
  torch_nr_dfernet.load_flax_variables(torch_model, variables)
  return model, variables, jax.jit(partial(model.apply, train=False)), torch_model


def _assert_filtered_close(got, want, atol=1e-4):
  """-inf in the same places, the finite logits within atol."""
  got, want = np.asarray(got), np.asarray(want)
  np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
  finite = np.isfinite(want)
  np.testing.assert_allclose(got[finite], want[finite], atol=atol)


def test_train_mode_logits_and_batch_norm_updates_match(tiny):
  model, variables, _, torch_model = tiny
  video = _video(seed=1)
  torch_model.train()
  counts = {}  # BN name -> values per channel in the batch, for torch's unbiased running variance
  hooks = [module.register_forward_pre_hook(
      lambda module, args, name=name: counts.__setitem__(name, args[0].numel() // args[0].shape[1]))
           for name, module in torch_model.named_modules() if isinstance(module, torch.nn.BatchNorm2d)]
  before = {k: v.clone() for k, v in torch_model.state_dict().items()}
  try:
    want = _run_torch(torch_model, video)
  finally:
    for hook in hooks:
      hook.remove()
    after = {k: v.clone() for k, v in torch_model.state_dict().items()}
    torch_model.load_state_dict(before)  # the fixture's weights stay as loaded
  with jax.default_matmul_precision('highest'):
    (logits, aux), updates = jax.jit(partial(model.apply, train=True, mutable=['batch_stats']))(variables, video)
  assert aux == {} and np.abs(want).max() > 0.5 and np.ptp(want) > 0.5  # not a degenerate comparison
  np.testing.assert_allclose(logits, want, atol=1e-4)

  leaves = list(loading.flax_leaves(updates['batch_stats']))
  assert len(leaves) == 2 * len(counts) == 36  # every BN layer: 10 stem, 7 dynamic branch, 1 static embedding
  assert_running_stats_match(updates['batch_stats'], torch_nr_dfernet.torch_key, before, after, counts)


def test_eval_mode_filtered_sequence_and_snippet_logits_match(tiny):
  _, variables, evaluate, torch_model = tiny
  torch_model.eval()
  video = _video()
  filtered, sequence, snippets = _run_torch(torch_model, video)
  with jax.default_matmul_precision('highest'):
    logits, aux = evaluate(variables, video)
  assert set(aux) == {'sequence_logits', 'snippet_logits'}
  assert aux['snippet_logits'].shape == snippets.shape == (2, 7, 7)  # starts 0, 2, ..., 12
  assert np.ptp(sequence) > 0.5 and np.ptp(snippets) > 0.5
  np.testing.assert_allclose(aux['sequence_logits'], sequence, atol=1e-4)
  np.testing.assert_allclose(aux['snippet_logits'], snippets, atol=1e-4)
  _assert_filtered_close(logits, filtered)


def _with_head_bias(variables, shift):
  """A copy of the variables with `shift` [7] added to the classifier's bias (moves every logit alike)."""
  params = dict(variables['params'])
  params['head'] = dict(params['head'], bias=params['head']['bias'] + jnp.asarray(shift, jnp.float32))
  return dict(variables, params=params)


def _fires(snippet_logits, mu1=0.7, mu2=0.05):
  """Eq. (7) in numpy: [batch, snippets, C] -> whether the filter fires per sequence."""
  p = np.exp(snippet_logits - snippet_logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return ((p.max(-1) > mu1) & (p[..., NEUTRAL] < mu2)).any(-1)


def test_snippet_filter_fires_and_holds_alike(tiny):
  """Shifting the head's bias moves the snippet probabilities without touching anything before it: a strong
  non-neutral shift fires the filter for every sequence, a strong neutral shift for none, and a shift chosen
  (well away from the thresholds) so that one sequence fires and the other does not tests the per-sequence
  decision."""
  _, variables, evaluate, torch_model = tiny
  torch_model.eval()
  video = _video(seed=2)
  _, _, base_snippets = _run_torch(torch_model, video)
  neutral, top = np.eye(7)[NEUTRAL], np.eye(7)[base_snippets.mean((0, 1)).argmax()]
  assert base_snippets.mean((0, 1)).argmax() != NEUTRAL
  # Neutral suppressed, the leading class raised by d: the clip whose snippets lead by more fires first.
  outcome = lambda d: _fires(base_snippets + d * top - 8 * neutral).tolist()
  mixed = [d for d in np.arange(-4, 8, 0.05)
           if sorted(outcome(d)) == [False, True] and outcome(d - 0.05) == outcome(d) == outcome(d + 0.05)]
  assert mixed, 'no bias shift separates the two sequences'
  cases = {'fires': (8 * top - 8 * neutral, [True, True]),
           'holds': (8 * neutral, [False, False]),
           'mixed': (mixed[len(mixed) // 2] * top - 8 * neutral, None)}
  for name, (shift, expected) in cases.items():
    shifted = _with_head_bias(variables, shift)
    torch_nr_dfernet.load_flax_variables(torch_model, shifted)
    filtered, sequence, snippets = _run_torch(torch_model, video)
    with jax.default_matmul_precision('highest'):
      logits, aux = evaluate(shifted, video)
    fired = np.isneginf(filtered).any(-1)
    assert fired.tolist() == (expected or _fires(base_snippets + shift).tolist()), name
    assert (np.isneginf(filtered) == (fired[:, None] & (np.arange(7) == NEUTRAL))).all(), name  # neutral only
    np.testing.assert_array_equal(np.isneginf(np.asarray(logits)).any(-1), fired, err_msg=name)
    _assert_filtered_close(logits, filtered)
    np.testing.assert_allclose(aux['sequence_logits'], sequence, atol=1e-4, err_msg=name)
    np.testing.assert_allclose(aux['snippet_logits'], snippets, atol=1e-4, err_msg=name)
    if name == 'mixed':
      assert sorted(fired.tolist()) == [False, True]
  torch_nr_dfernet.load_flax_variables(torch_model, variables)


def test_paper_size_eval_matches_and_parameters_agree():
  """M = 2, N = 4, 16 frames of 112 px: 4096-d frame vectors, 7 snippets; one clip in both frameworks."""
  model = NRDFERNet(num_classes=7)
  variables = _random_variables(model, PAPER_VIDEO_SHAPE, seed=3)
  torch_model = _torch_model(PAPER_VIDEO_SHAPE).eval()
  torch_nr_dfernet.load_flax_variables(torch_model, variables)
  assert sum(p.numel() for p in torch_model.parameters()) == sum(x.size for x in jax.tree.leaves(variables['params']))
  assert torch_model.temporal_pos_embedding.shape == (1, 16, 4096)
  assert torch_model.temporal_transformer.layers[3].attn.to_qkv.weight.shape == (384, 4096)
  assert torch_model.pos_embedding_static.shape == (1, 16, 256) and torch_model.fc.in_features == 4096
  video = _video(PAPER_VIDEO_SHAPE, seed=3)
  filtered, sequence, snippets = _run_torch(torch_model, video)
  with jax.default_matmul_precision('highest'):
    logits, aux = jax.jit(partial(model.apply, train=False))(variables, video)
  assert snippets.shape == (1, 7, 7) and np.ptp(sequence) > 0.5
  np.testing.assert_allclose(aux['sequence_logits'], sequence, atol=1e-4)
  np.testing.assert_allclose(aux['snippet_logits'], snippets, atol=1e-4)
  _assert_filtered_close(logits, filtered)


def test_loading_is_strict(tiny):
  _, variables, _, _ = tiny
  torch_model = _torch_model(VIDEO_SHAPE, **TINY)
  params = dict(variables['params'], extra={'kernel': jnp.zeros((2, 2))})
  with pytest.raises(ValueError, match='unexpected extra.weight'):
    torch_nr_dfernet.load_flax_variables(torch_model, dict(variables, params=params))
  with pytest.raises(ValueError, match='missing layer1.0.bn1.running_mean'):
    stats = dict(variables['batch_stats'], stem={k: v for k, v in variables['batch_stats']['stem'].items()
                                                 if k != 'layer1_0'})
    torch_nr_dfernet.load_flax_variables(torch_model, dict(variables, batch_stats=stats))
  wide = _random_variables(NRDFERNet(num_classes=7, **dict(TINY, temporal_mlp_dim=96)), VIDEO_SHAPE)
  with pytest.raises(ValueError, match=r'shape temporal_transformer.layers.0.ff.net.0.weight'):
    torch_nr_dfernet.load_flax_variables(torch_model, wide)
