"""Frame backbone: ResNet18 in torchvision's layout, so a PyTorch state_dict converts by name lookup.

Names: `conv1`, `bn1`, `layer{stage}_{block}` with `conv1/bn1/conv2/bn2/downsample_0/downsample_1`
(torchvision's `layer1.0.downsample.0` etc.). NHWC; input `[batch * frames, height, width, 3]`.
"""
from functools import partial, reduce
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dferjax.models import fused

# torchvision ResNet init: kaiming_normal_(mode='fan_out', nonlinearity='relu'), untruncated.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


# 'argmax' (stem only): ReLU and pool as fused.relu_max_pool, whose gradient reuses the forward's argmax.
MAX_POOL_IMPLS = ('reduce_window', 'slices', 'argmax')


def max_pool_3x3_stride_2(x: jax.Array, impl: str = 'reduce_window') -> jax.Array:
  """The stem's 3x3 / stride 2 / pad 1 max-pool on NHWC, padding with -inf like torch.

  'reduce_window' is XLA's windowed reduction, whose gradient is a select-and-scatter; 'slices' takes the max
  of the nine strided views, so the gradient is elementwise selects and pads that XLA fuses (no scatter).
  The two agree exactly forward and, away from ties inside a window, backward.
  """
  if impl == 'reduce_window':
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  if impl == 'argmax':
    raise ValueError("max_pool_impl='argmax' includes the ReLU: call fused.relu_max_pool")
  if impl != 'slices':
    raise ValueError(f'max_pool_impl {impl!r} not in {MAX_POOL_IMPLS}')
  n, height, width, channels = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  out_height, out_width = (height - 1) // 2 + 1, (width - 1) // 2 + 1
  views = [jax.lax.slice(padded, (0, row, col, 0), (n, row + 2 * out_height - 1, col + 2 * out_width - 1, channels),
                         (1, 2, 2, 1)) for row in range(3) for col in range(3)]
  return reduce(jnp.maximum, views)


def _batch_norm(train: bool, dtype, param_dtype, name: str, norm_impl: str = 'flax') -> nn.Module:
  if norm_impl not in fused.NORM_IMPLS:
    raise ValueError(f'norm_impl {norm_impl!r} not in {fused.NORM_IMPLS}')
  cls = fused.FusedBatchNorm if norm_impl == 'fused' else nn.BatchNorm
  return cls(use_running_average=not train, momentum=0.9,  # torch's momentum=0.1
             epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, name=name)


class BasicBlock(nn.Module):
  """Two 3x3 convs with a residual; a 1x1 conv + BN shortcut when the shape changes (torchvision)."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32  # compute; 'bfloat16' on GPU/TPU
  param_dtype: Any = jnp.float32  # float32 params for the optimizer
  norm_impl: str = 'flax'  # or 'fused' (fused.FusedBatchNorm: same statistics, hand-written gradient)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:  # x: [n, height, width, channels]
    conv = partial(nn.Conv, use_bias=False, kernel_init=conv_kernel_init, dtype=self.dtype,
                   param_dtype=self.param_dtype)
    norm = partial(_batch_norm, train, self.dtype, self.param_dtype, norm_impl=self.norm_impl)
    y = conv(self.features, (3, 3), self.strides, padding=((1, 1), (1, 1)), name='conv1')(x)
    y = nn.relu(norm('bn1')(y))
    y = conv(self.features, (3, 3), padding=((1, 1), (1, 1)), name='conv2')(y)
    y = norm('bn2')(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = conv(self.features, (1, 1), self.strides, padding='VALID', name='downsample_0')(x)
      shortcut = norm('downsample_1')(shortcut)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """ResNet18 trunk (torchvision layout) that can stop after any stage.

  Stage s has `width * 2**(s-1)` channels and stride 2 except stage 1; at 112 px the outputs are
  28, 28, 14, 7, 4 px for the max-pool and stages 1..4. No fc head.
  """
  stage_sizes: Sequence[int] = (2, 2, 2, 2)  # AEN's prototype uses (2, 1, 2, 2), NR-DFERNet (1, 1, 1)
  width: int = 64
  # 'conv7': torchvision's 7x7/2 conv1; 'conv3x2': NR-DFERNet's conv1 = [3x3/2 conv, BN, ReLU, 3x3 conv] (refs.md §1.4)
  stem: str = 'conv7'
  last_stage: int = 4
  pool: bool = False  # global average pool -> [n, channels] (CEFLNet/EST's 512-d frame feature)
  max_pool_impl: str = 'reduce_window'  # or 'slices' (max_pool_3x3_stride_2), 'argmax' (fused.relu_max_pool)
  stem_conv_impl: str = 'conv'  # conv7 stem: or 'space_to_depth' (fused.space_to_depth_conv7), same kernel
  norm_impl: str = 'flax'  # every BatchNorm: or 'fused' (fused.FusedBatchNorm)
  return_stages: bool = False  # every stage's output, [stage 1, ..., last_stage] (AEN's semantic levels)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    """images: [n, height, width, 3] -> [n, h', w', channels], [n, channels] if `pool` (the last stage), or the
    list of stage outputs if `return_stages`."""
    if not 1 <= self.last_stage <= len(self.stage_sizes):
      raise ValueError(f'last_stage={self.last_stage} must be in 1..{len(self.stage_sizes)}')
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'expected images [n, height, width, 3], got shape {images.shape}')
    conv = partial(nn.Conv, self.width, use_bias=False, kernel_init=conv_kernel_init, dtype=self.dtype,
                   param_dtype=self.param_dtype)
    if self.max_pool_impl not in MAX_POOL_IMPLS:
      raise ValueError(f'max_pool_impl {self.max_pool_impl!r} not in {MAX_POOL_IMPLS}')
    if self.stem != 'conv7' and self.stem_conv_impl != 'conv':
      raise ValueError(f"stem_conv_impl={self.stem_conv_impl!r} needs stem='conv7', not {self.stem!r}")
    if self.stem == 'conv7' and self.stem_conv_impl == 'conv':
      x = conv((7, 7), 2, padding=((3, 3), (3, 3)), name='conv1')(images)
    elif self.stem == 'conv7':
      x = fused.StemConv7(self.width, self.stem_conv_impl, kernel_init=conv_kernel_init, dtype=self.dtype,
                          param_dtype=self.param_dtype, name='conv1')(images)
    elif self.stem == 'conv3x2':  # names follow torch's conv1 = Sequential(conv, bn, relu, conv)
      x = conv((3, 3), 2, padding=((1, 1), (1, 1)), name='conv1_0')(images)
      x = nn.relu(_batch_norm(train, self.dtype, self.param_dtype, 'conv1_1', self.norm_impl)(x))
      x = conv((3, 3), 1, padding=((1, 1), (1, 1)), name='conv1_3')(x)
    else:
      raise ValueError(f"stem={self.stem!r} not in ('conv7', 'conv3x2')")
    x = _batch_norm(train, self.dtype, self.param_dtype, 'bn1', self.norm_impl)(x)
    if self.max_pool_impl == 'argmax':
      x = fused.relu_max_pool(x)
    else:
      x = max_pool_3x3_stride_2(nn.relu(x), self.max_pool_impl)
    stages = []
    for stage, num_blocks in enumerate(self.stage_sizes[:self.last_stage]):
      for block in range(num_blocks):
        x = BasicBlock(self.width * 2**stage, strides=2 if stage > 0 and block == 0 else 1,
                       dtype=self.dtype, param_dtype=self.param_dtype, norm_impl=self.norm_impl,
                       name=f'layer{stage + 1}_{block}')(x, train=train)
      stages.append(x)
    if self.pool:
      stages[-1] = stages[-1].mean(axis=(1, 2))
    return stages if self.return_stages else stages[-1]


ResNet18 = partial(ResNet, stage_sizes=(2, 2, 2, 2))
