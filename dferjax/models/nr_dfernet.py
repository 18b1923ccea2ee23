"""NR-DFERNet: noise-robust DFER (Li, Sui, Zhu, Zhao 2022), with refs.md §1.4 for what its authors' code settles.

Per frame: a small convolutional stem (conv1 of two 3x3 convs, then one basic block per stage to 256 x 7 x 7
at 112 px; trained from scratch). Dynamic-static fusion (Sec. 3.3): the dynamic branch runs three basic
blocks (the first with stride 2) on frame differences F_{i+1} - F_i (Eq. 1); the static branch a stride-2
conv (Eq. 2) and M transformer encoders over its 4 x 4 positions (Eq. 3); their sum (Eq. 4) is flattened per
frame, channel-major as torch's flatten (256 * 4 * 4 = 4096). Temporal stage (Sec. 3.4): the dynamic class
token, the mean of the T - 1 frame vectors (Eq. 5), is prepended, a position table added, N encoders run, and
a linear classifier reads the class token. Decision stage (Sec. 3.5): at evaluation, snippets of L frame
vectors every S frames (Eq. 6) go through the same temporal encoders with their own dynamic class tokens, and
the snippet-based filter (Eq. 7) sets the sequence's neutral probability to zero when any snippet is
confidently non-neutral.

Training returns the sequence logits (the loss is cross-entropy on them). Evaluation returns the filtered
logits as the prediction and, in `aux`, the unfiltered 'sequence_logits' (the metric head 'unfiltered', so a
run reports both, as the paper's Tab. 1 and Fig. 4 compare them) and the 'snippet_logits'.
"""
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from dferjax import metrics
from dferjax.models import layers
from dferjax.models.resnet import BasicBlock, ResNet, conv_kernel_init

NEUTRAL = 2  # the label order of tfds_builders.labels (refs.md §2.5)


def snippet_starts(num_vectors: int, snippet_length: int, snippet_stride: int) -> list[int]:
  """First frame vector of each snippet: N_s = floor((T' - L) / S) + 1 windows (Eq. 6), over the T' = T - 1
  fused frame vectors the temporal stage sees (as the authors' code: 7 snippets of 3 from 15 vectors)."""
  if snippet_length > num_vectors:
    raise ValueError(f'snippet_length={snippet_length} exceeds the {num_vectors} frame vectors')
  return list(range(0, num_vectors - snippet_length + 1, snippet_stride))


def snippet_filter(sequence_logits: jax.Array, snippet_logits: jax.Array, max_probability: float,
                   neutral_probability: float, neutral_class: int = NEUTRAL) -> jax.Array:
  """Eq. (7): if some snippet has P_max > mu1 and P_neutral < mu2, the sequence's neutral probability becomes 0
  (its logit -inf); otherwise the sequence logits stand. sequence_logits [batch, C], snippet_logits
  [batch, snippets, C] -> [batch, C]."""
  probabilities = jax.nn.softmax(snippet_logits.astype(jnp.float32), axis=-1)
  confident = (probabilities.max(axis=-1) > max_probability) & (probabilities[..., neutral_class] < neutral_probability)
  suppress = confident.any(axis=-1)[:, None] & (jnp.arange(sequence_logits.shape[-1]) == neutral_class)
  return jnp.where(suppress, -jnp.inf, sequence_logits)


class DynamicStaticFusion(nn.Module):
  """DSF (Sec. 3.3, Eq. 1-4): feature maps [batch, T, h, w, C] -> flattened F^DS [batch, T - 1, C * h/2 * w/2]."""
  num_dynamic_blocks: int = 3
  num_layers: int = 2  # M
  num_heads: int = 4
  head_dim: int = 32
  mlp_dim: int = 256
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feature_maps: jax.Array, *, train: bool) -> jax.Array:
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    batch, num_frames, _, _, channels = feature_maps.shape
    dynamic = layers.merge_frames(feature_maps[:, 1:] - feature_maps[:, :-1])  # Eq. (1)
    for index in range(self.num_dynamic_blocks):  # three 3x3 blocks, the first halving the size
      dynamic = BasicBlock(channels, strides=2 if index == 0 else 1, name=f'dynamic_{index}', **kwargs)(
          dynamic, train=train)
    static = nn.Conv(channels, (3, 3), 2, padding=((1, 1), (1, 1)), use_bias=False, kernel_init=conv_kernel_init,
                     name='static_embed', **kwargs)(layers.merge_frames(feature_maps[:, :-1]))  # Eq. (2)
    static = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,  # torch's momentum=0.1
                          name='static_embed_bn', **kwargs)(static)
    static = nn.relu(static)
    n, height, width, _ = static.shape
    tokens = layers.flatten_positions(static)
    # N(0, 1) as the authors' torch.randn table.
    table = self.param('static_pos_embed', nn.initializers.normal(1.0), tokens.shape[1:], self.param_dtype)
    tokens = tokens + table.astype(tokens.dtype)  # Eq. (3)
    for index in range(self.num_layers):
      tokens = layers.PreNormBlock(self.num_heads, self.head_dim, self.mlp_dim, name=f'static_block_{index}',
                                   **kwargs)(tokens)
    fused = dynamic + tokens.reshape(n, height, width, channels)  # Eq. (4)
    # Channel-major, as torch flattens [C, h, w]: the temporal weights carry over as they are.
    return jnp.transpose(fused, (0, 3, 1, 2)).reshape(batch, num_frames - 1, -1)


class TemporalEncoder(nn.Module):
  """Dynamic class token (Sec. 3.4): [n, vectors, dim] -> the token's output [n, dim] after N encoders.

  One module serves the whole sequence and every snippet: a snippet of L vectors takes the first L + 1 rows
  of the position table, as the authors' code does.
  """
  max_tokens: int  # T: the class token and T - 1 frame vectors
  num_layers: int = 4  # N
  num_heads: int = 4
  head_dim: int = 32
  mlp_dim: int = 512
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, frame_vectors: jax.Array) -> jax.Array:
    num_vectors, dim = frame_vectors.shape[1:]
    if num_vectors + 1 > self.max_tokens:
      raise ValueError(f'{num_vectors} frame vectors and a class token exceed max_tokens={self.max_tokens}')
    table = self.param('pos_embed', nn.initializers.normal(1.0), (self.max_tokens, dim), self.param_dtype)
    class_token = frame_vectors.mean(axis=1, keepdims=True)  # Eq. (5)
    tokens = jnp.concatenate([class_token, frame_vectors], axis=1) + table[:num_vectors + 1].astype(self.dtype)
    for index in range(self.num_layers):
      tokens = layers.PreNormBlock(self.num_heads, self.head_dim, self.mlp_dim, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name=f'block_{index}')(tokens)
    return tokens[:, 0]


class NRDFERNet(nn.Module):
  """Paper sizes are the defaults: M = 2 spatial and N = 4 temporal encoders, 4 heads, 16 frames of 112 px."""
  num_classes: int
  num_frames: int = 16  # T = U x V = 8 segments x 2 frames
  stem_width: int = 64  # channels 64, 128, 256 over the three stages
  num_dynamic_blocks: int = 3
  num_spatial_layers: int = 2  # M
  num_temporal_layers: int = 4  # N (the authors' code: 2)
  num_heads: int = 4
  head_dim: int = 32
  spatial_mlp_dim: int = 256
  temporal_mlp_dim: int = 512
  snippet_length: int = 3  # L
  snippet_stride: int = 2  # S
  filter_max_probability: float = 0.7  # mu1 (the authors' code: 0.75)
  filter_neutral_probability: float = 0.05  # mu2 (the authors' code: 0.03)
  snippet_filter: bool = True  # False: evaluation predicts from the unfiltered sequence logits
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  rng_streams: ClassVar[tuple[str, ...]] = ()  # no dropout or stochastic depth
  classifier_names: ClassVar[tuple[str, ...]] = ('head',)
  model_inputs: ClassVar[tuple[str, ...]] = ()  # batch fields __call__ takes besides the video
  # What dferjax.explain attributes: the filter is a decision, not a differentiable function, and sets the
  # neutral logit to -inf; the sequence logits are what the network computes.
  attribution_output: ClassVar[str] = 'sequence_logits'

  def metric_heads(self) -> dict:
    if not self.snippet_filter:
      return {}
    return {'unfiltered': metrics.MetricHead(output='sequence_logits', class_names=_class_names(self.num_classes))}

  @nn.compact
  def __call__(self, video: jax.Array, *, train: bool):
    """video: [batch, frames, height, width, 3] in [0, 1] -> (logits [batch, num_classes] float32, aux)."""
    if video.ndim != 5 or video.shape[1] != self.num_frames or video.shape[-1] != 3:
      raise ValueError(f'NRDFERNet expects video [batch, {self.num_frames}, height, width, 3] '
                       f'(num_frames={self.num_frames}), got shape {video.shape}')
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    batch = video.shape[0]
    stem = ResNet(stage_sizes=(1, 1, 1), width=self.stem_width, last_stage=3, stem='conv3x2', name='stem', **kwargs)
    feature_maps = layers.split_frames(stem(layers.merge_frames(video.astype(self.dtype)), train=train),
                                       self.num_frames)  # F_i: [batch, T, h, w, C]
    frame_vectors = DynamicStaticFusion(self.num_dynamic_blocks, self.num_spatial_layers, self.num_heads,
                                        self.head_dim, self.spatial_mlp_dim, name='fusion', **kwargs)(
                                            feature_maps, train=train)  # [batch, T - 1, dim]
    num_vectors, dim = frame_vectors.shape[1:]
    temporal = TemporalEncoder(self.num_frames, self.num_temporal_layers, self.num_heads, self.head_dim,
                               self.temporal_mlp_dim, name='temporal', **kwargs)
    head = layers.torch_dense(self.num_classes, dim, name='head', **kwargs)
    sequence_logits = head(temporal(frame_vectors)).astype(jnp.float32)
    if train:  # the loss is cross-entropy on the sequence logits only
      return sequence_logits, {}

    starts = snippet_starts(num_vectors, self.snippet_length, self.snippet_stride)  # Eq. (6)
    snippets = jnp.stack([frame_vectors[:, s:s + self.snippet_length] for s in starts], axis=1)
    snippet_features = temporal(snippets.reshape(batch * len(starts), self.snippet_length, dim))
    snippet_logits = head(snippet_features).astype(jnp.float32).reshape(batch, len(starts), self.num_classes)
    aux = {'sequence_logits': sequence_logits, 'snippet_logits': snippet_logits}
    if not self.snippet_filter:
      return sequence_logits, aux
    return snippet_filter(sequence_logits, snippet_logits, self.filter_max_probability,
                          self.filter_neutral_probability), aux


def _class_names(num_classes: int) -> tuple[str, ...]:
  from tfds_builders.labels import CLASS_NAMES  # pylint: disable=import-outside-toplevel
  return CLASS_NAMES if num_classes == len(CLASS_NAMES) else tuple(str(c) for c in range(num_classes))
