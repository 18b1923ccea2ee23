"""STT: paper sizes (shapes only), parity with the PyTorch transcription, gradients, drop path, bf16."""
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dferjax import models
from dferjax.models import layers
from dferjax.models.stt import STT

# One tiny configuration for every compiled test: 3x3 positions at 48 px, 4 frames.
TINY = dict(num_frames=4, embed_dim=64, num_layers=2, num_heads=4, backbone_width=16)
VIDEO_SHAPE = (2, 4, 48, 48, 3)


def _abstract(model, video_shape):
  return jax.eval_shape(partial(model.init, train=False), jax.random.key(0),
                        jax.ShapeDtypeStruct(video_shape, jnp.float32))


def _random_variables(model, seed=0):
  """Every variable random and O(1)-relevant, so a misplaced weight or axis shows in the logits."""
  rng = np.random.default_rng(seed)

  def draw(path, spec):
    name = path[-1].key
    if name == 'kernel':
      fan_in = np.prod(spec.shape[:-1])
      return rng.normal(scale=np.sqrt(2 / fan_in), size=spec.shape)
    if name in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, size=spec.shape)
    return rng.normal(scale=0.3, size=spec.shape)  # biases, means, embeddings, class token

  variables = jax.tree_util.tree_map_with_path(draw, _abstract(model, VIDEO_SHAPE))
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), variables)


def _video(seed=0):
  return np.random.default_rng(seed).uniform(size=VIDEO_SHAPE).astype(np.float32)


def test_paper_sized_model_shapes_and_param_count():
  model = models.build('stt', 7)
  variables = _abstract(model, (2, 16, 112, 112, 3))
  # LOGO-Former's TimeSformer configuration (refs.md §1.2) counts 19,769,415 torch parameters; BN running
  # statistics are batch_stats here and buffers there, so the counts agree exactly.
  assert sum(x.size for x in jax.tree.leaves(variables['params'])) == 19_769_415
  params = variables['params']
  assert params['spatial_pos_embed']['embedding'].shape == (49, 512)
  assert params['temporal_pos_embed']['embedding'].shape == (17, 512)
  assert params['patch_embed']['kernel'].shape == (1, 1, 256, 512)
  assert params['block_3']['mlp']['fc1']['kernel'].shape == (512, 2048)
  assert 'layer4_0' not in params['backbone']
  logits, aux = jax.eval_shape(partial(model.apply, train=False), variables,
                               jax.ShapeDtypeStruct((2, 16, 112, 112, 3), jnp.float32))
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert jax.tree.map(lambda x: x.shape, aux) == {'features': (2, 512)}  # the class token, for tools and losses
  small = _abstract(models.build('stt', 7), (1, 16, 64, 64, 3))  # 64 px -> 4x4 positions
  assert small['params']['spatial_pos_embed']['embedding'].shape == (16, 512)


@pytest.mark.parametrize('train', [False, True])
def test_matches_torch_transcription(train):
  """Same weights in both frameworks: eval mode with running BN statistics; train mode (drop path 0) with
  batch statistics and the running-statistics update."""
  torch = pytest.importorskip('torch')
  from dferjax.reference import torch_stt
  model = STT(num_classes=7, drop_path_rate=0.0 if train else 0.1, **TINY)
  variables = _random_variables(model)
  video = _video()
  torch_model = torch_stt.STT(7, image_size=48, drop_path_rate=0.0 if train else 0.1, **TINY)
  torch_stt.load_flax_variables(torch_model, variables)
  torch_model.train(train)
  with torch.no_grad():
    want = torch_model(torch.from_numpy(video).permute(0, 1, 4, 2, 3)).numpy()
  with jax.default_matmul_precision('highest'):
    apply = jax.jit(partial(model.apply, train=train, mutable=['batch_stats'] if train else False))
    output = apply(variables, video)
  (logits, _), updates = output if train else (output, None)
  assert np.abs(want).max() > 0.5  # not a degenerate comparison
  np.testing.assert_allclose(logits, want, atol=1e-4)
  if train:
    np.testing.assert_allclose(updates['batch_stats']['backbone']['layer3_1']['bn2']['mean'],
                               torch_model.state_dict()['backbone.layer3.1.bn2.running_mean'].numpy(), atol=1e-5)


def test_gradients_reach_every_parameter_and_drop_path_is_random_only_in_training():
  model = STT(num_classes=7, drop_path_rate=0.5, **TINY)
  variables = _random_variables(model, seed=1)
  video, labels = _video(1), jnp.array([1, 5])

  @jax.jit
  def loss_and_grads(params, drop_path_key):
    def loss_fn(params):
      (logits, _), _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, video, train=True,
                                   rngs={'drop_path': drop_path_key}, mutable=['batch_stats'])
      return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1).sum(), logits
    return jax.grad(loss_fn, has_aux=True)(params)

  grads, logits_a = loss_and_grads(variables['params'], jax.random.key(0))
  zero = [jax.tree_util.keystr(path) for path, g in jax.tree_util.tree_leaves_with_path(grads)
          if not np.any(np.asarray(g))]
  assert not zero, f'no gradient reaches {zero}'
  _, logits_b = loss_and_grads(variables['params'], jax.random.key(1))
  _, logits_a_again = loss_and_grads(variables['params'], jax.random.key(0))
  assert not np.allclose(logits_a, logits_b)  # drop path is active in training
  np.testing.assert_array_equal(logits_a, logits_a_again)

  evaluate = jax.jit(partial(model.apply, train=False))
  np.testing.assert_array_equal(evaluate(variables, video)[0], evaluate(variables, video)[0])


def test_bfloat16_compute_returns_float32_logits():
  model = models.build('stt', 7, dtype='bfloat16', **TINY)
  variables = _random_variables(model)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(_abstract(model, VIDEO_SHAPE)))
  logits, _ = jax.jit(partial(model.apply, train=False))(variables, _video())
  reference, _ = jax.jit(partial(STT(num_classes=7, **TINY).apply, train=False))(variables, _video())
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, reference, atol=0.1 * np.abs(reference).max())


def test_attention_matches_numpy_over_leading_batch_axes():
  attention = layers.MultiHeadSelfAttention(num_heads=2)
  x = np.random.default_rng(0).normal(size=(2, 3, 5, 8)).astype(np.float32)  # [batch, frames, tokens, dim]
  variables = attention.init(jax.random.key(0), x)
  with jax.default_matmul_precision('highest'):
    got = attention.apply(variables, x)
  qkv_params, proj_params = variables['params']['qkv'], variables['params']['proj']
  qkv = x.astype(np.float64) @ np.float64(qkv_params['kernel']) + np.float64(qkv_params['bias'])
  query, key, value = (qkv[..., i * 8:(i + 1) * 8].reshape(2, 3, 5, 2, 4) for i in range(3))
  logits = np.einsum('bfqhd,bfkhd->bfhqk', query, key) / np.sqrt(4)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  heads = np.einsum('bfhqk,bfkhd->bfqhd', weights, value).reshape(2, 3, 5, 8)
  want = heads @ np.float64(proj_params['kernel']) + np.float64(proj_params['bias'])
  np.testing.assert_allclose(got, want, atol=1e-5)
  with pytest.raises(ValueError, match="attention_impl 'flash' not in"):
    layers.MultiHeadSelfAttention(num_heads=2, attention_impl='flash').init(jax.random.key(0), x)


def test_drop_path_masks_whole_reshaped_batch_elements():
  drop = layers.DropPath(rate=0.5, batch_ndim=2)
  tokens, cls = jnp.ones((6, 5, 3, 4)), jnp.ones((6, 5, 4))
  out_tokens, out_cls = drop.apply({}, (tokens, cls), deterministic=False, rngs={'drop_path': jax.random.key(0)})
  per_element = np.asarray(out_tokens).reshape(6, 5, -1)
  assert set(np.unique(per_element)) == {0.0, 2.0}  # kept elements scaled by 1 / (1 - rate)
  assert (per_element.min(-1) == per_element.max(-1)).all()  # one draw per (sample, frame)
  np.testing.assert_array_equal(per_element[..., 0], out_cls[..., 0])  # leaves share the mask
  assert drop.apply({}, tokens, deterministic=True) is tokens


def test_bad_inputs_and_fields():
  model = STT(num_classes=7, **TINY)
  with pytest.raises(ValueError, match=r'STT expects video \[batch, 4, height, width, 3\]'):
    _abstract(model, (2, 8, 48, 48, 3))
  with pytest.raises(ValueError, match=r"model_name 'vivit' not in \['aen', 'aen_frame', 'ceflnet', 'est', 'nr_dfernet', 'stt'\]"):
    models.build('vivit', 7)
  with pytest.raises(ValueError, match=r"\['num_layer'\] are not STT fields; valid fields: \[.*'num_layers'"):
    models.build('stt', 7, num_layer=2)
  assert isinstance(models.build('stt', 7, **TINY), nn.Module)
