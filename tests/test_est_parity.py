"""EST: the flax model against an independent PyTorch transcription (dferjax.reference.torch_est) with the same
weights: eval-mode class logits (ordered clip) and order logits (shuffled clip), train-mode logits and
BatchNorm updates, both snippet-position modes, SSOP off, the order-invariance that 'original' positions imply,
and the paper-size parameter counts."""
import functools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dferjax.data.sampling import EST_PERMUTATIONS
from dferjax.models.est import EST

torch = pytest.importorskip('torch')
from dferjax.reference import loading, torch_est  # noqa: E402  (needs torch)
from parity_helpers import assert_running_stats_match  # noqa: E402

# Tiny but complete: 7 snippets x 3 frames of 32 px, d = 8 * backbone_width = 64, FFN 96 wide (not square, so a
# transposed FFN weight fails the shape check), the paper's 3 + 3 layers of 4 heads. A batch of 10 clips carries
# all 10 orders, shuffled against the batch index.
TINY = dict(num_frames=21, backbone_width=8, hidden_dim=96, classifier_dims=(16, 8), order_head_dims=(32, 16))
NO_DROPOUT = dict(dropout_rate=0.0, classifier_dropout=0.0)
VIDEO_SHAPE = (10, 21, 32, 32, 3)
PERMUTATION = np.array([3, 9, 0, 7, 1, 5, 8, 2, 6, 4])
MODES = ('slot', 'original')


def _random_variables(model, seed=0):
  """Every variable random and O(1)-relevant (scaled as tests/test_stt.py), so a misplaced weight or axis shows."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(partial(model.init, train=False), jax.random.key(0),
                            jax.ShapeDtypeStruct(VIDEO_SHAPE, jnp.float32))

  def draw(path, spec):
    name = path[-1].key
    if name == 'kernel':
      return rng.normal(scale=np.sqrt(2 / np.prod(spec.shape[:-1])), size=spec.shape)
    if name in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, size=spec.shape)
    return rng.normal(scale=0.3, size=spec.shape)  # biases, means, the emotion query

  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), jax.tree_util.tree_map_with_path(draw, abstract))


def _video(seed=0):
  """Uniform noise, each clip dimmer than the one before, so clips differ by more than noise."""
  brightness = np.linspace(1.0, 0.3, VIDEO_SHAPE[0]).reshape(-1, 1, 1, 1, 1)
  return (np.random.default_rng(seed).uniform(size=VIDEO_SHAPE) * brightness).astype(np.float32)


@functools.cache
def _twins(mode: str, train: bool, ssop: bool = True):
  """Flax model, its weights, a jitted apply (run it through _run_flax), and the torch twin, per configuration;
  training runs without dropout (in both frameworks) so that its BatchNorm behaviour can be compared."""
  fields = dict(TINY, snippet_positions=mode, ssop=ssop, **(NO_DROPOUT if train else {}))
  model = EST(num_classes=7, **fields)
  apply = jax.jit(partial(model.apply, train=train, mutable=['batch_stats'] if train else False))
  return model, _random_variables(model), apply, torch_est.EST(7, **fields)


def _run_flax(apply, variables, video, permutation):
  with jax.default_matmul_precision('highest'):
    return apply(variables, video, permutation)


def _run_torch(torch_model, video, permutation=None, dtype=torch.float32):
  """Training compares against torch in float64: with batch statistics (BatchNorm over 10 clips in the order
  head) torch's own float32 result is up to ~1.3e-4 from its float64 one, flax's float32 within ~5e-5."""
  torch_model.to(dtype)
  with torch.no_grad():
    logits, order_logits = torch_model(torch.from_numpy(video).to(dtype).permute(0, 1, 4, 2, 3),
                                       None if permutation is None else torch.from_numpy(permutation).long())
  return logits.numpy(), None if order_logits is None else order_logits.numpy()


@pytest.mark.parametrize('mode', MODES)
def test_eval_class_and_order_logits_match(mode):
  _, variables, evaluate, torch_model = _twins(mode, train=False)
  torch_est.load_flax_variables(torch_model, variables)
  video = _video()
  want_logits, want_order = _run_torch(torch_model.eval(), video, PERMUTATION)
  logits, aux = _run_flax(evaluate, variables, video, PERMUTATION)
  assert set(aux) == {'order_logits'} and aux['order_logits'].shape == (10, 10)
  assert np.ptp(want_logits) > 0.5 and np.ptp(want_order) > 0.5  # not a degenerate comparison
  np.testing.assert_allclose(logits, want_logits, atol=1e-4)
  np.testing.assert_allclose(aux['order_logits'], want_order, atol=1e-4)
  # Evaluation classifies the ordered clip: the drawn orders do not matter to the class logits.
  np.testing.assert_allclose(_run_flax(evaluate, variables, video, np.zeros(10, np.int32))[0], logits, atol=1e-5)


@pytest.mark.parametrize('mode', MODES)
def test_train_logits_and_batch_norm_updates_match(mode):
  _, variables, train_step, torch_model = _twins(mode, train=True)
  torch_est.load_flax_variables(torch_model.double().train(), variables)
  counts = {}  # BN name -> values per channel in the batch, for torch's unbiased running variance
  hooks = [module.register_forward_pre_hook(
      lambda module, args, name=name: counts.__setitem__(name, args[0].numel() // args[0].shape[1]))
           for name, module in torch_model.named_modules()
           if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))]
  before = {k: v.clone() for k, v in torch_model.state_dict().items()}
  video = _video(seed=1)
  try:
    want_logits, want_order = _run_torch(torch_model, video, PERMUTATION, torch.float64)
  finally:
    for hook in hooks:
      hook.remove()
  after = torch_model.state_dict()
  (logits, aux), updates = _run_flax(train_step, variables, video, PERMUTATION)
  assert np.ptp(want_logits) > 0.5 and np.ptp(want_order) > 0.5
  np.testing.assert_allclose(logits, want_logits, atol=1e-4)
  np.testing.assert_allclose(aux['order_logits'], want_order, atol=1e-4)

  leaves = list(loading.flax_leaves(updates['batch_stats']))
  assert len(leaves) == 2 * len(counts) == 2 * (20 + 2)  # ResNet18's 20 BNs, the order head's 2
  assert counts['order_head.1'] == 10 and counts['backbone.bn1'] == 10 * 21 * 16 * 16
  assert_running_stats_match(updates['batch_stats'], lambda path: torch_est.torch_key(torch_model, path), before,
                             after, counts)


@pytest.mark.parametrize('mode', MODES)
def test_shuffled_class_logits_ignore_the_order_only_with_original_positions(mode):
  """One clip under all 10 orders, training without dropout (class logits from the shuffled clip): with each
  snippet keeping its original index's encoding, the unmasked encoder is permutation-equivariant and the
  one-query decoder reads a set, so T cannot see the order; with slot positions it must. The order head sees the
  order through the R_i in both modes. Checked in both frameworks (torch in float32), which also agree."""
  _, variables, train_step, torch_model = _twins(mode, train=True)
  torch_est.load_flax_variables(torch_model, variables)
  video = np.repeat(_video(seed=2)[:1], 10, axis=0)
  permutation = np.arange(len(EST_PERMUTATIONS))
  torch_logits, torch_order = _run_torch(torch_model.train(), video, permutation)
  (logits, aux), _ = _run_flax(train_step, variables, video, permutation)
  torch_est.load_flax_variables(torch_model, variables)  # the running statistics as drawn again
  want_logits, want_order = _run_torch(torch_model, video, permutation, torch.float64)
  np.testing.assert_allclose(logits, want_logits, atol=1e-4)
  np.testing.assert_allclose(aux['order_logits'], want_order, atol=1e-4)
  for class_logits, order_logits in ((np.asarray(logits), np.asarray(aux['order_logits'])),
                                     (torch_logits, torch_order)):
    spread = np.ptp(class_logits, axis=0).max()
    if mode == 'original':
      assert spread <= 1e-5, spread
    else:
      assert spread > 1e-2, spread
    assert np.ptp(order_logits, axis=0).max() > 0.1


def test_without_ssop_logits_match():
  model, variables, evaluate, torch_model = _twins('slot', train=False, ssop=False)
  assert 'order_head' not in variables['params'] and torch_model.order_head is None
  torch_est.load_flax_variables(torch_model, variables)
  video = _video(seed=3)
  want, order = _run_torch(torch_model.eval(), video)
  logits, aux = _run_flax(evaluate, variables, video, None)
  assert aux == {} and order is None and np.ptp(want) > 0.5
  np.testing.assert_allclose(logits, want, atol=1e-4)
  with pytest.raises(ValueError, match=r'no torch place for order_head/fc1/kernel'):
    torch_est.load_flax_variables(torch_model, _twins('slot', train=False)[1])
  with pytest.raises(ValueError, match=r'shape transformer.encoder.layers.0.linear1.weight: flax \(96, 64\)'):
    torch_est.load_flax_variables(torch_est.EST(7, ssop=False, **dict(TINY, hidden_dim=128)), variables)


@pytest.mark.parametrize('ssop, count', [(True, 42_775_761), (False, 34_374_343)])
def test_paper_size_parameter_counts(ssop, count):
  """ResNet18 (no fc), AA-SFE, 3 + 3 layers of d = 512 with FFN 2048, the heads; the frozen sinusoid table is a
  buffer, not a parameter."""
  torch_model = torch_est.EST(7, ssop=ssop)
  assert sum(p.numel() for p in torch_model.parameters()) == count
  assert torch_model.transformer.decoder.layers[2].multihead_attn.in_proj_weight.shape == (1536, 512)
  abstract = jax.eval_shape(partial(EST(num_classes=7, ssop=ssop).init, train=False), jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 35, 224, 224, 3), jnp.float32))
  assert sum(x.size for x in jax.tree.leaves(abstract['params'])) == count
