"""ResNet18 backbone: torchvision shapes and names, init, BatchNorm semantics against torch."""
from functools import partial

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dferjax.models.resnet import ResNet


def _abstract(model, image_size=112, batch=2):
  return jax.eval_shape(partial(model.init, train=False), jax.random.key(0),
                        jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32))


@pytest.mark.parametrize('last_stage, pool, shape', [
    (1, False, (2, 28, 28, 64)), (2, False, (2, 14, 14, 128)), (3, False, (2, 7, 7, 256)),
    (4, False, (2, 4, 4, 512)), (4, True, (2, 512)), (3, True, (2, 256))])
def test_stage_output_shapes_at_112px(last_stage, pool, shape):
  model = ResNet(last_stage=last_stage, pool=pool)
  video = jax.ShapeDtypeStruct((2, 112, 112, 3), jnp.float32)
  variables = _abstract(model)
  assert jax.eval_shape(partial(model.apply, train=False), variables, video).shape == shape


def test_torchvision_names_and_param_count():
  variables = _abstract(ResNet())
  params = traverse_util.flatten_dict(variables['params'], sep='/')
  # torchvision resnet18: 11,689,512 parameters incl. fc (512 * 1000 + 1000); BN buffers are batch_stats.
  assert sum(x.size for x in params.values()) == 11_689_512 - 513_000
  assert params['conv1/kernel'].shape == (7, 7, 3, 64)
  assert params['layer2_0/downsample_0/kernel'].shape == (1, 1, 64, 128)
  assert params['layer4_1/bn2/scale'].shape == (512,)
  assert 'layer1_0/downsample_0/kernel' not in params  # stage 1 keeps shape: no projection
  stats = traverse_util.flatten_dict(variables['batch_stats'], sep='/')
  assert stats['layer3_0/downsample_1/var'].shape == (256,)
  # torchvision's 122 state_dict entries = these 60 + 40 running stats + 20 num_batches_tracked + fc.{weight,bias}
  assert len(params) == 60 and len(stats) == 40


def test_width_and_stage_sizes():
  variables = _abstract(ResNet(stage_sizes=(2, 1, 2, 2), width=16), image_size=32)
  names = set(variables['params'])
  assert 'layer2_0' in names and 'layer2_1' not in names and 'layer3_1' in names
  assert variables['params']['layer4_0']['conv1']['kernel'].shape == (3, 3, 64, 128)


def test_bad_arguments():
  with pytest.raises(ValueError, match='last_stage'):
    _abstract(ResNet(last_stage=5))
  with pytest.raises(ValueError, match=r'\[n, height, width, 3\]'):
    jax.eval_shape(partial(ResNet().init, train=False), jax.random.key(0),
                   jax.ShapeDtypeStruct((2, 4, 32, 32, 3), jnp.float32))


def test_init_follows_torchvision():
  init = jax.jit(partial(ResNet(width=16, last_stage=3).init, train=False))
  variables = init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  kernel = variables['params']['layer3_0']['conv2']['kernel']  # [3, 3, 64, 64]
  np.testing.assert_allclose(np.std(kernel), np.sqrt(2 / (9 * 64)), rtol=0.03)  # kaiming fan_out
  bn = variables['params']['layer3_0']['bn2']
  np.testing.assert_array_equal(bn['scale'], 1.0)
  np.testing.assert_array_equal(bn['bias'], 0.0)


def test_train_mode_batch_norm_matches_torch():
  """Batch statistics in train mode and the running-stat update with torch's momentum 0.1."""
  torch = pytest.importorskip('torch')
  from dferjax.reference import torch_stt
  torch.manual_seed(0)
  torch_model = torch_stt.ResNet(width=8, last_stage=2, num_classes=None)
  model = ResNet(width=8, last_stage=2)
  images = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype(np.float32)
  variables = jax.jit(partial(model.init, train=False))(jax.random.key(0), images)
  variables['batch_stats'] = jax.tree.map(lambda x: x + 0.3, variables['batch_stats'])
  torch_stt.load_flax_variables(torch_model, variables)
  torch_model.train()
  with torch.no_grad():
    want = torch_model.features(torch.from_numpy(images).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  with jax.default_matmul_precision('highest'):
    got, updates = jax.jit(partial(model.apply, train=True, mutable=['batch_stats']))(variables, images)
  np.testing.assert_allclose(got, want, atol=1e-4)
  torch_state = torch_model.state_dict()
  np.testing.assert_allclose(updates['batch_stats']['layer2_1']['bn2']['mean'],
                             torch_state['layer2.1.bn2.running_mean'].numpy(), atol=1e-5)
  # torch updates running_var with the unbiased batch variance, flax with the biased one.
  count = 4 * 4 * 4  # n * h * w at layer2 (8x8 -> 4x4)
  old_var = np.asarray(variables['batch_stats']['layer2_1']['bn2']['var'])
  flax_batch_var = (updates['batch_stats']['layer2_1']['bn2']['var'] - 0.9 * old_var) / 0.1
  torch_batch_var = (torch_state['layer2.1.bn2.running_var'].numpy() - 0.9 * old_var) / 0.1
  np.testing.assert_allclose(flax_batch_var * count / (count - 1), torch_batch_var, rtol=1e-4, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params():
  model = ResNet(width=8, pool=True, dtype=jnp.bfloat16)
  variables = _abstract(model, image_size=32)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  out = jax.eval_shape(partial(model.apply, train=False), variables,
                       jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  assert out.dtype == jnp.bfloat16 and out.shape == (2, 64)


@pytest.mark.parametrize('size', [7, 8, 56])
def test_max_pool_slices_equal_torch_forward_and_backward(size):
  """'slices' and 'reduce_window' both equal torch's MaxPool2d(3, 2, 1): outputs, and input gradients
  (random floats, so no ties inside a window)."""
  torch = pytest.importorskip('torch')
  from dferjax.models.resnet import max_pool_3x3_stride_2
  rng = np.random.default_rng(size)
  x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
  x_torch = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
  want = torch.nn.functional.max_pool2d(x_torch, 3, 2, 1)
  upstream = rng.normal(size=want.shape).astype(np.float32)
  (want * torch.from_numpy(upstream)).sum().backward()
  want_grad = x_torch.grad.permute(0, 2, 3, 1).numpy()
  for impl in ('reduce_window', 'slices'):
    pooled, pull_back = jax.vjp(partial(max_pool_3x3_stride_2, impl=impl), x)
    np.testing.assert_array_equal(pooled, want.detach().permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(pull_back(upstream.transpose(0, 2, 3, 1))[0], want_grad)
  with pytest.raises(ValueError, match='max_pool_impl'):
    max_pool_3x3_stride_2(x, impl='avg')
