"""AEN: Affectivity Extraction Network (Lee et al., CVPRW 2023), with refs.md §1.5 for what its prototype settles.

Bottom-up branch (Sec. 3.1): a ResNet per frame gives three semantic levels, squeezed to vectors I_s [T, C_s]:
low = layer1 and middle = layer3, each through two pointwise convolutions and a channel-major flatten (784 at
112 px: 1 x 28 x 28 and 16 x 7 x 7), and high = layer4 average-pooled (512). A temporal transformer per level
(Former-DFER's T-Former: class token, 3 pre-LN layers) turns I_s into the clip vector V_s.

Top-down branch: two S2AC converters (Eq. 1) fuse the high vector F_0 = V_2 with the lower levels,
F_a = W2 rho(W1 F_{a-1} V^T / sqrt(C)) V + skip(F_{a-1}) (the skip is Fig. 2's linear expansion of F_{a-1});
the global classifier reads V_2 (P_G, 7 emotions), the local classifiers read F_1 (P_L^1, 3 emotion groups) and
F_2 (P_L^2, 7 emotions). The prediction is Eq. 3 at a = 2: alpha * softmax(P_L^2) + (1 - alpha) * softmax(P_G).

Guide (Sec. 3.3): a frozen copy of the frame-level network (`AENFrame`: backbone through layer3, the middle
squeeze and a frame classifier, pre-trained on single frames) gives per-frame emotion logits S_2 for the
frame-level emotion-guided losses (losses.AENLoss). It runs inside the training step, in inference mode and
behind a stop-gradient; the trainer keeps it out of the optimizer (`frozen_params`). Evaluation skips it.

Where the prototype differs (refs.md §1.5), a field offers its form: ResNet stages (2, 1, 2, 2)
(`backbone_stage_sizes`), the fusion order (`s2ac_order`: it fuses the low level first), the softmax axis of the
S2AC (`s2ac_softmax`: over the first axis, column-wise) and the prediction in log-probabilities
(`prediction_space`). Its unused layer2 squeeze and fourth transformer are not built.
"""
import math
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dferjax import metrics
from dferjax.models import layers
from dferjax.models.resnet import ResNet, conv_kernel_init
from tfds_builders.labels import CLASS_NAMES

# The paper's emotion grouping (Tab. 2, third row): positive {happy, surprise}, neutral, negative {the rest}.
GROUP_NAMES = ('positive', 'neutral', 'negative')
CLASS_GROUPS = tuple({'happy': 0, 'surprise': 0, 'neutral': 1}.get(name, 2) for name in CLASS_NAMES)
S2AC_ORDERS = ('paper', 'prototype')
S2AC_SOFTMAX = ('row', 'column')
PREDICTION_SPACES = ('probability', 'log_probability')


class Squeeze(nn.Module):
  """Pointwise conv -> pointwise conv to `out_channels` -> channel-major flatten, as torch's flatten(1) on NCHW:
  [n, h, w, c] -> [n, out_channels * h * w] (AEN's "point-wise convolution and flattening")."""
  out_channels: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feature_map: jax.Array) -> jax.Array:
    channels = feature_map.shape[-1]
    conv = lambda features, name: nn.Conv(features, (1, 1), kernel_init=conv_kernel_init,
                                          bias_init=layers.torch_linear_bias_init(channels), dtype=self.dtype,
                                          param_dtype=self.param_dtype, name=name)
    x = conv(self.out_channels, 'conv_1')(conv(channels, 'conv_0')(feature_map))
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


class TemporalTransformer(nn.Module):
  """Former-DFER's T-Former: [batch, frames, dim] -> the class token's output [batch, dim]. Class token and a
  position table over frames + 1 drawn from N(0, 1) (torch.randn), pre-LN layers, no final LayerNorm."""
  num_layers: int = 3
  num_heads: int = 8
  head_dim: int = 64
  mlp_dim: int = 1024
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, frames: jax.Array) -> jax.Array:
    batch, num_frames, dim = frames.shape
    cls_token = self.param('cls_token', nn.initializers.normal(1.0), (dim,), self.param_dtype)
    table = self.param('pos_embedding', nn.initializers.normal(1.0), (num_frames + 1, dim), self.param_dtype)
    tokens = jnp.concatenate([jnp.broadcast_to(cls_token.astype(frames.dtype), (batch, 1, dim)), frames], axis=1)
    tokens = tokens + table.astype(frames.dtype)
    for index in range(self.num_layers):
      tokens = layers.PreNormBlock(self.num_heads, self.head_dim, self.mlp_dim, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name=f'layer_{index}')(tokens)
    return tokens[:, 0]


class S2AC(nn.Module):
  """Semantic-to-affective converter (Eq. 1): F_{a-1} [batch, c'] and a level's clip vector V [batch, c] ->
  F_a [batch, c]. The score matrix W1 F_{a-1} V^T / sqrt(c) is an outer product [batch, c, c]; 'row' takes the
  paper's row-wise softmax, 'column' the prototype's softmax over the first axis."""
  softmax: str = 'row'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, previous: jax.Array, level: jax.Array) -> jax.Array:
    if self.softmax not in S2AC_SOFTMAX:
      raise ValueError(f's2ac_softmax={self.softmax!r} not in {S2AC_SOFTMAX}')
    dim, previous_dim = level.shape[-1], previous.shape[-1]
    dense = lambda features, in_features, name: layers.torch_dense(
        features, in_features, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    query = dense(dim, previous_dim, 'query')(previous)  # W1 F_{a-1}
    scores = (query[:, :, None] * level[:, None, :]).astype(jnp.float32) / math.sqrt(dim)
    weights = jax.nn.softmax(scores, axis=2 if self.softmax == 'row' else 1)
    attended = jnp.einsum('bij,bj->bi', weights, level.astype(jnp.float32)).astype(level.dtype)
    skip = previous if previous_dim == dim else dense(dim, previous_dim, 'skip')(previous)
    return dense(dim, dim, 'out')(attended) + skip  # W2 (...) V + Fig. 2's expansion of F_{a-1}


class AENFrame(nn.Module):
  """The frame-level 2D network: backbone through the middle level, its squeeze and a frame classifier.

  Pre-trained alone on single frames (model_name 'aen_frame'; the clip's logits are the mean over its frames),
  it is then AEN's starting backbone and its frozen guide (config.init_from.guide)."""
  num_classes: int
  num_frames: int = 1
  backbone_stage_sizes: Sequence[int] = (2, 2, 2, 2)
  backbone_width: int = 64
  middle_stage: int = 3
  middle_channels: int = 16  # 16 x 7 x 7 = 784 at 112 px
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  rng_streams: ClassVar[tuple[str, ...]] = ()
  classifier_names: ClassVar[tuple[str, ...]] = ('frame_head',)
  model_inputs: ClassVar[tuple[str, ...]] = ()
  frozen_params: ClassVar[tuple[str, ...]] = ()

  def metric_heads(self) -> dict:
    return {}

  @nn.compact
  def __call__(self, video: jax.Array, *, train: bool):
    """video [batch, frames, height, width, 3] -> (mean frame logits [batch, C], {'frame_logits': [batch, T, C]})."""
    if video.ndim != 5 or video.shape[-1] != 3:
      raise ValueError(f'AENFrame expects video [batch, frames, height, width, 3], got shape {video.shape}')
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    feature_map = ResNet(self.backbone_stage_sizes, self.backbone_width, last_stage=self.middle_stage,
                         name='backbone', **kwargs)(layers.merge_frames(video.astype(self.dtype)), train=train)
    features = Squeeze(self.middle_channels, name='squeeze', **kwargs)(feature_map)
    logits = layers.torch_dense(self.num_classes, features.shape[-1], name='frame_head', **kwargs)(features)
    frame_logits = layers.split_frames(logits.astype(jnp.float32), video.shape[1])
    return frame_logits.mean(axis=1), {'frame_logits': frame_logits}


class AEN(nn.Module):
  """Paper values are the defaults: ResNet18, levels layer1 / layer3 / layer4, 784-d squeezes at 112 px, T-Formers
  of 3 layers x 8 heads x 64, S2AC fusing middle then low (Eq. 1), alpha = 0.7 (Eq. 3), a frozen guide."""
  num_classes: int
  num_frames: int = 16
  backbone_stage_sizes: Sequence[int] = (2, 2, 2, 2)  # prototype: (2, 1, 2, 2)
  backbone_width: int = 64
  low_stage: int = 1
  middle_stage: int = 3
  low_channels: int = 1  # 1 x 28 x 28 = 784 at 112 px
  middle_channels: int = 16  # 16 x 7 x 7 = 784
  num_layers: int = 3
  num_heads: int = 8
  head_dim: int = 64
  mlp_dim: int = 1024
  s2ac_order: str = 'paper'  # F_1 from the middle level, F_2 from the low; 'prototype': low first
  s2ac_softmax: str = 'row'  # Eq. 1's row-wise softmax; 'column': the prototype's
  alpha: float = 0.7  # weight of the local classifier in the prediction (Eq. 3)
  prediction_space: str = 'probability'  # Eq. 3; 'log_probability': the prototype's mix of log-probabilities
  class_groups: Sequence[int] = CLASS_GROUPS  # emotion class -> group (GROUP_NAMES)
  group_names: Sequence[str] = GROUP_NAMES
  guide: bool = True  # the frozen frame-level network for AENLoss; False: no guide (losses on the labels only)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  rng_streams: ClassVar[tuple[str, ...]] = ()
  classifier_names: ClassVar[tuple[str, ...]] = ('global_head', 'group_head', 'local_head')
  model_inputs: ClassVar[tuple[str, ...]] = ()

  @property
  def frozen_params(self) -> tuple[str, ...]:
    """Top-level parameters the optimizer leaves alone."""
    return ('guide',) if self.guide else ()

  def guide_sources(self) -> dict[str, str]:
    """Where config.init_from.guide's frame-level parameters go: {this model's parameter: the AENFrame's ('' for
    all of it)}. The trainable backbone and middle squeeze start from the same weights as the guide."""
    return {'guide': '', 'backbone': 'backbone', 'squeeze_middle': 'squeeze'}

  def metric_heads(self) -> dict:
    """The paper's 3-emotion accuracy: the 7-class prediction counted right when it falls in the label's group."""
    return {'groups': metrics.MetricHead(output='group_prediction', class_names=tuple(self.group_names),
                                         label_map=tuple(self.class_groups))}

  def check_fields(self):
    for field, value, valid in (('s2ac_order', self.s2ac_order, S2AC_ORDERS),
                                ('prediction_space', self.prediction_space, PREDICTION_SPACES)):
      if value not in valid:
        raise ValueError(f'AEN {field}={value!r} not in {valid}')
    if len(self.class_groups) != self.num_classes or not set(self.class_groups) <= set(range(len(self.group_names))):
      raise ValueError(f'AEN class_groups={tuple(self.class_groups)} must give each of the {self.num_classes} classes '
                       f'a group index into group_names={tuple(self.group_names)}')
    if not 1 <= self.low_stage < self.middle_stage < len(self.backbone_stage_sizes):
      raise ValueError(f'AEN needs 1 <= low_stage < middle_stage < {len(self.backbone_stage_sizes)} (the last stage '
                       f'is the high level), got low_stage={self.low_stage}, middle_stage={self.middle_stage}')

  @nn.compact
  def __call__(self, video: jax.Array, *, train: bool):
    """video [batch, frames, height, width, 3] in [0, 1] -> (logits [batch, C]: log of the prediction (Eq. 3),
    aux: the classifiers' logits, the group prediction, and in training V_s, I_s and the guide's frame logits)."""
    self.check_fields()
    if video.ndim != 5 or video.shape[1] != self.num_frames or video.shape[-1] != 3:
      raise ValueError(f'AEN expects video [batch, {self.num_frames}, height, width, 3] '
                       f'(num_frames={self.num_frames}), got shape {video.shape}')
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    num_frames = video.shape[1]
    stages = ResNet(self.backbone_stage_sizes, self.backbone_width, return_stages=True, name='backbone',
                    **kwargs)(layers.merge_frames(video.astype(self.dtype)), train=train)
    frame_features = {  # I_s [batch, T, C_s]
        'low': Squeeze(self.low_channels, name='squeeze_low', **kwargs)(stages[self.low_stage - 1]),
        'middle': Squeeze(self.middle_channels, name='squeeze_middle', **kwargs)(stages[self.middle_stage - 1]),
        'high': stages[-1].mean(axis=(1, 2)),
    }
    frame_features = {level: layers.split_frames(x, num_frames) for level, x in frame_features.items()}
    clip_features = {  # V_s [batch, C_s]
        level: TemporalTransformer(self.num_layers, self.num_heads, self.head_dim, self.mlp_dim,
                                   name=f'temporal_{level}', **kwargs)(x)
        for level, x in frame_features.items()}

    first, second = ('middle', 'low') if self.s2ac_order == 'paper' else ('low', 'middle')
    fused_1 = S2AC(self.s2ac_softmax, name='s2ac_1', **kwargs)(clip_features['high'], clip_features[first])
    fused_2 = S2AC(self.s2ac_softmax, name='s2ac_2', **kwargs)(fused_1, clip_features[second])
    head = lambda features, x, name: layers.torch_dense(features, x.shape[-1], name=name, **kwargs)(x).astype(
        jnp.float32)
    global_logits = head(self.num_classes, clip_features['high'], 'global_head')  # P_G
    group_logits = head(len(self.group_names), fused_1, 'group_head')  # P_L^1
    local_logits = head(self.num_classes, fused_2, 'local_head')  # P_L^2

    if self.prediction_space == 'probability':  # Eq. 3
      logits = jnp.log(self.alpha * jax.nn.softmax(local_logits) + (1 - self.alpha) * jax.nn.softmax(global_logits))
    else:
      logits = (self.alpha * jax.nn.log_softmax(local_logits)
                + (1 - self.alpha) * jax.nn.log_softmax(global_logits))
    aux = {'global_logits': global_logits, 'group_logits': group_logits, 'local_logits': local_logits,
           'group_prediction': jnp.asarray(self.class_groups, jnp.int32)[logits.argmax(-1)],
           'class_groups': jnp.asarray(self.class_groups, jnp.int32)}
    if self.guide and (train or self.is_initializing()):
      aux['clip_features'] = {level: x.astype(jnp.float32) for level, x in clip_features.items()}
      aux['frame_features'] = {level: x.astype(jnp.float32) for level, x in frame_features.items()}
      guide = AENFrame(self.num_classes, num_frames, self.backbone_stage_sizes, self.backbone_width,
                       self.middle_stage, self.middle_channels, name='guide', **kwargs)
      _, guide_aux = guide(jax.lax.stop_gradient(video), train=False)  # inference mode: running statistics
      aux['guide_logits'] = jax.lax.stop_gradient(guide_aux['frame_logits'])  # [batch, T, C]
    return logits, aux


def group_matrix(class_groups: Sequence[int], num_groups: int) -> np.ndarray:
  """One-hot [classes, groups]: probabilities [.., classes] @ it = the group sums."""
  return np.eye(num_groups, dtype=np.float32)[np.asarray(class_groups)]
