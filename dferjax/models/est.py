"""EST: Expression snippet Transformer (Liu et al., Pattern Recognition 2023), with refs.md §1.7 for what its
public code settles.

A clip is 7 snippets x 5 frames (sampling.SnippetSampler). Each frame goes through a full ResNet18 with global
average pooling (512-d). AA-SFE (Sec. 3.2) turns each snippet's 5 frame features into one: self-attention over
the frames (Eq. 1), then cosine similarity of each attended frame to their max-pool (Eq. 2) weighs a mean (Eq. 3).
A transformer encoder (3 layers, 4 heads, sinusoidal snippet positions) and decoder (3 layers, 4 heads, one
learned emotion query) turn the 7 snippet features into the emotion representation T (Sec. 3.1, Fig. 7); an MLP
classifies it.

SSOP (Sec. 3.3, Algorithm 1): the snippet features are put in one of 10 fixed orders (the batch field
'permutation', drawn per clip by the `draw_permutation` transform), T is computed from the shuffled sequence,
and an order head reads O = concat_i(R_i + T) to predict which order it was. Training computes both losses on
the shuffled sequence; evaluation classifies the ordered clip (Sec. 4.2: "for test, we only used the normal
snippet order") and scores the order head on the shuffled one: the backbone runs once, the transformer twice.

Which positions shuffled snippets get decides whether SSOP can teach the transformer order (`snippet_positions`):
- 'slot' (default): position j goes to whatever snippet sits in slot j, the reading of "positional encoding to
  describe the positions of snippets within a video" for the sequence the transformer is given. Shuffling then
  changes T, so the order loss reaches the transformer.
- 'original' (the public code): each snippet keeps the encoding of its original index. The encoder has no mask,
  so it maps a permuted input to the same permuted output, and the single-query decoder reads its memory as a
  set: T, and so the class logits, do not depend on the order at all (tested); only the order head, through
  the R_i in O, can see it.
"""
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dferjax import metrics
from dferjax.data import sampling
from dferjax.models import layers
from dferjax.models.resnet import ResNet

SNIPPET_POSITIONS = ('slot', 'original')


def sinusoid_table(length: int, dim: int) -> np.ndarray:
  """The fixed sine/cosine position table [length, dim] (Vaswani et al.; EST's frozen PosEncoding)."""
  position = np.arange(length)[:, None]
  angle = position / np.power(10000.0, 2 * (np.arange(dim) // 2) / dim)
  return np.where(np.arange(dim) % 2 == 0, np.sin(angle), np.cos(angle)).astype(np.float32)


class SnippetFeatureExtractor(nn.Module):
  """AA-SFE (Eq. 1-3): frame features [batch, snippets, frames, d] -> snippet features [batch, snippets, d]."""
  num_heads: int = 4
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, frames: jax.Array, *, train: bool) -> jax.Array:
    attended = layers.PostNormAttention(self.num_heads, self.dropout_rate, kernel_init=nn.initializers.xavier_uniform(),
                                        dtype=self.dtype, param_dtype=self.param_dtype, name='attention')(
                                            frames, train=train)  # Eq. 1; torch MultiheadAttention's xavier init
    attended = attended.astype(jnp.float32)
    pooled = layers.max_over(attended, axis=-2)[..., None, :]  # r-hat': the max over the snippet's frames
    # Eq. (2) as torch's CosineSimilarity(eps=1e-8), clamped at 1e-8 as the public code (so weights stay positive).
    norms = jnp.maximum(jnp.linalg.norm(attended, axis=-1) * jnp.linalg.norm(pooled, axis=-1), 1e-8)
    similarity = jnp.maximum((attended * pooled).sum(-1) / norms, 1e-8)  # [batch, snippets, frames]
    return ((similarity[..., None] * attended).sum(-2) / similarity.sum(-1, keepdims=True)).astype(self.dtype)  # Eq. 3


class InProjection(nn.Module):
  """torch's fused in-projection [dim, 3 * dim] (q | k | v columns), applied a slice at a time, so cross-attention
  projects the query with the q part only and the memory with the k and v parts."""
  dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, parts: slice) -> jax.Array:
    kernel = self.param('kernel', layers.kaiming_uniform, (self.dim, 3 * self.dim), self.param_dtype)
    bias = self.param('bias', layers.torch_linear_bias_init(self.dim), (3 * self.dim,), self.param_dtype)
    columns = slice(parts.start * self.dim, parts.stop * self.dim)
    return x.astype(self.dtype) @ kernel[:, columns].astype(self.dtype) + bias[columns].astype(self.dtype)


class CrossAttention(nn.Module):
  """torch's nn.MultiheadAttention(query, memory, memory): in-projection `qkv`, out-projection `proj`, dropout on
  the attention weights. query [batch, queries, dim], memory [batch, tokens, dim] -> [batch, queries, dim]."""
  num_heads: int
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query: jax.Array, memory: jax.Array, *, train: bool) -> jax.Array:
    batch, num_queries, dim = query.shape
    head_dim = dim // self.num_heads
    projection = InProjection(dim, dtype=self.dtype, param_dtype=self.param_dtype, name='qkv')
    q = projection(query, slice(0, 1)).reshape(batch, num_queries, self.num_heads, head_dim)
    k, v = jnp.split(projection(memory, slice(1, 3)).reshape(batch, -1, 2, self.num_heads, head_dim), 2, axis=2)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k[:, :, 0]) / np.sqrt(head_dim)
    weights = nn.Dropout(self.dropout_rate)(jax.nn.softmax(logits.astype(jnp.float32), axis=-1),
                                            deterministic=not train).astype(v.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v[:, :, 0]).reshape(batch, num_queries, dim)
    return layers.torch_dense(dim, dim, layers.kaiming_uniform, dtype=self.dtype, param_dtype=self.param_dtype,
                              name='proj')(out)


class FeedForward(nn.Module):
  """Linear -> ReLU -> Dropout -> Linear, torch.nn.Transformer's feed-forward.

  Every weight matrix of the transformer (attention projections, feed-forward) starts from kaiming_uniform_,
  as the public code's `_reset_parameters` re-draws them (refs.md §1.7); biases keep torch's Linear default."""
  hidden_dim: int = 2048
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    dim = x.shape[-1]
    dense = lambda features, in_features, name: layers.torch_dense(
        features, in_features, layers.kaiming_uniform, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    x = nn.relu(dense(self.hidden_dim, dim, 'fc1')(x))
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    return dense(dim, self.hidden_dim, 'fc2')(x)


class EncoderLayer(nn.Module):
  """torch.nn.TransformerEncoderLayer, post-norm: x = LN(x + SA(x)); x = LN(x + FF(x)), dropout on each branch."""
  num_heads: int = 4
  hidden_dim: int = 2048
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop = lambda y: nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    x = layers.PostNormAttention(self.num_heads, self.dropout_rate, layers.kaiming_uniform, name='self_attention',
                                 **kwargs)(x, train=train)
    y = FeedForward(self.hidden_dim, self.dropout_rate, name='feed_forward', **kwargs)(x, train=train)
    return nn.LayerNorm(epsilon=1e-5, name='feed_forward_norm', **kwargs)(x + drop(y))


class DecoderLayer(nn.Module):
  """torch.nn.TransformerDecoderLayer, post-norm: self-attention, cross-attention to the memory, feed-forward."""
  num_heads: int = 4
  hidden_dim: int = 2048
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, memory: jax.Array, *, train: bool) -> jax.Array:
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop = lambda y: nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, name=name, **kwargs)
    x = layers.PostNormAttention(self.num_heads, self.dropout_rate, layers.kaiming_uniform, name='self_attention',
                                 **kwargs)(x, train=train)
    y = CrossAttention(self.num_heads, self.dropout_rate, name='cross_attention', **kwargs)(x, memory, train=train)
    x = norm('cross_attention_norm')(x + drop(y))
    y = FeedForward(self.hidden_dim, self.dropout_rate, name='feed_forward', **kwargs)(x, train=train)
    return norm('feed_forward_norm')(x + drop(y))


class SnippetTransformer(nn.Module):
  """Encoder over the snippet features (+ positions), decoder from one learned emotion query (Fig. 7):
  snippets [batch, n, d], positions [batch, n] (indices into the sinusoid table) -> T [batch, d]."""
  num_encoder_layers: int = 3
  num_decoder_layers: int = 3
  num_heads: int = 4
  hidden_dim: int = 2048
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, snippets: jax.Array, positions: jax.Array, *, train: bool) -> jax.Array:
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    batch, num_snippets, dim = snippets.shape
    table = jnp.asarray(sinusoid_table(num_snippets, dim), self.dtype)  # fixed, not a parameter
    memory = snippets + table[positions]
    for index in range(self.num_encoder_layers):
      memory = EncoderLayer(self.num_heads, self.hidden_dim, self.dropout_rate, name=f'encoder_{index}',
                            **kwargs)(memory, train=train)
    memory = nn.LayerNorm(epsilon=1e-5, name='encoder_norm', **kwargs)(memory)
    query = self.param('emotion_query', nn.initializers.normal(1.0), (dim,), self.param_dtype)  # N(0, 1)
    x = jnp.broadcast_to(query.astype(self.dtype), (batch, 1, dim))
    for index in range(self.num_decoder_layers):
      x = DecoderLayer(self.num_heads, self.hidden_dim, self.dropout_rate, name=f'decoder_{index}', **kwargs)(
          x, memory, train=train)
    return nn.LayerNorm(epsilon=1e-5, name='decoder_norm', **kwargs)(x)[:, 0]


class EST(nn.Module):
  """Paper sizes are the defaults: 7 snippets x 5 frames of 224 px, d = 512, 3 + 3 layers of 4 heads, SSOP on."""
  num_classes: int
  num_frames: int = 35  # num_snippets x frames_per_snippet, checked against the sampler by the trainer
  num_snippets: int = 7
  backbone_width: int = 64  # ResNet18: d = 8 x width = 512
  num_heads: int = 4
  num_encoder_layers: int = 3
  num_decoder_layers: int = 3
  hidden_dim: int = 2048
  dropout_rate: float = 0.1
  classifier_dims: tuple[int, ...] = (128, 64)
  classifier_dropout: float = 0.4
  ssop: bool = True  # False: Tab. 5's ablation without the order head (no 'permutation' needed)
  snippet_positions: str = 'slot'  # or 'original': the public code's (see the module docstring)
  order_head_dims: tuple[int, ...] = (2048, 512)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  rng_streams: ClassVar[tuple[str, ...]] = ('dropout',)
  classifier_names: ClassVar[tuple[str, ...]] = ('classifier', 'order_head')

  @property
  def model_inputs(self) -> tuple[str, ...]:
    return ('permutation',) if self.ssop else ()  # the order of the shuffled pass (draw_permutation)

  def metric_heads(self) -> dict:
    if not self.ssop:
      return {}
    return {'order': metrics.MetricHead(output='order_logits', labels='permutation',
                                        class_names=tuple(str(k) for k in range(len(sampling.EST_PERMUTATIONS))))}

  @nn.compact
  def __call__(self, video: jax.Array, permutation: jax.Array | None = None, *, train: bool):
    """video [batch, 35, height, width, 3] in [0, 1] (snippet-major, in order), permutation int [batch] (an index
    into sampling.EST_PERMUTATIONS; None: 0, e.g. at init) -> (logits [batch, C], {'order_logits': [batch, 10]})."""
    if self.num_frames % self.num_snippets or video.ndim != 5 or video.shape[1] != self.num_frames:
      raise ValueError(f'EST expects video [batch, {self.num_frames}, height, width, 3] of num_snippets='
                       f'{self.num_snippets} equal snippets, got shape {video.shape}')
    if self.snippet_positions not in SNIPPET_POSITIONS:
      raise ValueError(f'snippet_positions={self.snippet_positions!r} not in {SNIPPET_POSITIONS}')
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    batch = video.shape[0]
    backbone = ResNet(width=self.backbone_width, last_stage=4, pool=True, name='backbone', **kwargs)
    frames = backbone(layers.merge_frames(video.astype(self.dtype)), train=train)  # [batch * 35, d]
    frames = frames.reshape(batch, self.num_snippets, self.num_frames // self.num_snippets, -1)
    snippets = SnippetFeatureExtractor(self.num_heads, self.dropout_rate, name='snippet_features', **kwargs)(
        frames, train=train)  # R: [batch, 7, d]
    transformer = SnippetTransformer(self.num_encoder_layers, self.num_decoder_layers, self.num_heads,
                                     self.hidden_dim, self.dropout_rate, name='transformer', **kwargs)
    classifier = ClassifierMLP(self.classifier_dims, self.classifier_dropout, self.num_classes, name='classifier',
                               **kwargs)
    in_order = jnp.broadcast_to(jnp.arange(self.num_snippets), (batch, self.num_snippets))
    if not self.ssop:
      return classifier(transformer(snippets, in_order, train=train), train=train).astype(jnp.float32), {}

    table = jnp.asarray(sampling.EST_PERMUTATIONS, jnp.int32)
    if table.shape[1] != self.num_snippets:
      raise ValueError(f'SSOP permutes {table.shape[1]} snippets, the model has num_snippets={self.num_snippets}')
    order = table[jnp.zeros(batch, jnp.int32) if permutation is None else permutation]  # slot j <- snippet order[j]
    shuffled = jnp.take_along_axis(snippets, order[:, :, None], axis=1)
    positions = in_order if self.snippet_positions == 'slot' else order
    emotion = transformer(shuffled, positions, train=train)  # T of the shuffled sequence
    # Algorithm 1: O_i = R_i + T; only T and the head learn from the order loss (the public code detaches R).
    order_features = (jax.lax.stop_gradient(shuffled) + emotion[:, None]).reshape(batch, -1)
    order_logits = OrderHead(self.order_head_dims, len(sampling.EST_PERMUTATIONS), name='order_head', **kwargs)(
        order_features, train=train)
    if not train:  # the emotion is read from the clip in its own order (Sec. 4.2)
      emotion = transformer(snippets, in_order, train=train)
    logits = classifier(emotion, train=train)
    return logits.astype(jnp.float32), {'order_logits': order_logits.astype(jnp.float32)}


class ClassifierMLP(nn.Module):
  """The emotion head: 512 -> 128 -> ReLU -> 64 -> ReLU -> Dropout(0.4) -> classes (refs.md §1.7)."""
  hidden_dims: tuple[int, ...]
  dropout_rate: float
  num_classes: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for index, width in enumerate(self.hidden_dims):
      x = nn.relu(layers.torch_dense(width, x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype,
                                     name=f'fc{index + 1}')(x))
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    return layers.torch_dense(self.num_classes, x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype,
                              name='out')(x)


class OrderHead(nn.Module):
  """SSOP head: concat_i(O_i) [batch, 7 d] -> Linear, BN, ReLU -> Linear, BN, ReLU -> Linear -> 10 orders."""
  hidden_dims: tuple[int, ...]
  num_permutations: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for index, width in enumerate(self.hidden_dims):
      x = layers.torch_dense(width, x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype,
                             name=f'fc{index + 1}')(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                       param_dtype=self.param_dtype, name=f'bn{index + 1}')(x)  # torch's momentum=0.1
      x = nn.relu(x)
    return layers.torch_dense(self.num_permutations, x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype,
                              name='out')(x)
