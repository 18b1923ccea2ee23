"""CEFLNet: clip-aware emotion-rich feature learning (Liu, Feng, Yuan, Zhou, Wang, Qin, Luo; Information Sciences
2022), with refs.md §1.6 for what its public code (`CVLab-Liuyuanyuan/CEFLNet`) settles.

A video is n = 7 snippets (the paper's "clips") of K = 5 frames, snippet-major (sampling.SnippetSampler). Every
frame goes through a full ResNet18 with global average pooling: f_k, d = 512 (Sec. 3.2). The clip-based feature
encoder (CFE, Fig. 1b) turns each snippet's K frame features into one, its weights shared over snippets:
- SAL (Eq. 1, Fig. 2): self-attention among the K frames, torch's nn.MultiheadAttention (4 heads, dropout 0.1 on
  the weights), then LN(f + Dropout(attention)) = f'_k (layers.PostNormAttention);
- LRL (Eq. 2-3): the max over the K attended frames is the snippet's global feature f-hat'; sigmoid weights
  w_k = sigma(q0 . Dropout_0.5(c_k)) weigh a mean of the frames, which a Linear q1 maps to R_i [d].
The emotional intensity activation network (EIAN, Sec. 3.3, Fig. 3) scores the snippet features V^f (Eq. 4) with
a 1-D convolution of width 1 and no bias, takes the softmax over snippets (Eq. 5; the salient snippet P_e is its
argmax, Eq. 6), weighs V^f by it (the activation map, Eq. 7) and max-pools over snippets (Eq. 8). An MLP
512 -> 256 -> ReLU -> 128 -> ReLU -> Dropout(0.4) -> C classifies (Eq. 9). The loss is plain cross-entropy (the
code's; Eq. 11 is printed BCE-style).

Where the paper and its code differ (`relation_form`):
- 'code' (default): c_k = [f_k ; f-hat'], the frame's raw backbone feature first, then the global feature;
  R_i = q1(sum_k w_k c_k / sum_k w_k) with q1: 2d -> d.
- 'paper': Eq. (2)-(3) as printed: c_k = [f-hat' ; f'_k] for the weights, R_i = q1(sum_k w_k f'_k / sum_k w_k)
  with q1: d -> d.
The code's form is the default because the paper's own figures come from it: Tab. 8's 12.83 M parameters are the
code's model (with BU-3DFE's 512-128-64-6 head); Eq. (3) as printed would have 262,144 fewer (12.57 M).

BatchNorm in training (`backbone_batch_norm`): the public code calls the backbone once per (snippet, frame) slot,
snippets outer, frames inner, so each of the 35 slots is normalised with the statistics of its own `batch` frames,
and the running statistics move 35 times per step, in that order. 'per_slot' (the default: what the paper's
numbers were trained with) does the same with an `nn.scan` over the slot axis: parameters broadcast, batch_stats
carried from slot to slot. 'joint' normalises all batch x 35 frames together with one update: one big backbone
call (faster on an accelerator) but different training outputs. Evaluation reads the running statistics, where
the two are one function, so both evaluate with a single backbone call (and `init` traces that call too).
`remat_backbone` recomputes the backbone's activations in the backward pass instead of keeping them (`nn.remat`):
the same numbers in less memory. Both max-pools (f-hat', Eq. 8) send their gradient to one maximal element, as
torch's max-pooling does.

Nothing in CEFLNet sees time order: SAL has no positions, LRL's weighted mean and the max-pools are symmetric, and
EIAN scores each snippet on its own, so in evaluation a clip's logits are the same for any order of its snippets
and of the frames in each (tested). Classes that differ only by the direction of a change (the synthetic data's
happy / sad, surprise / fear) are beyond it.

Paper size (7 x 5 frames of 224 px, 7 classes): 12,919,624 parameters (12.92 M; 12,828,807 = Tab. 8's
12.83 M with a 512-128-64-6 head) and 63.52 GMACs per clip counting convolutions and matmuls (dferjax.summary);
Tab. 8's 63.80 G is ptflops', which adds BN, ReLU and pooling (tests/test_ceflnet.py counts both, and Tab. 9).
"""
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dferjax.models import layers
from dferjax.models.resnet import ResNet

RELATION_FORMS = ('code', 'paper')
BACKBONE_BATCH_NORMS = ('per_slot', 'joint')


def backbone_features(backbone: nn.Module, video: jax.Array, *, train: bool, per_slot: bool, remat: bool,
                      unroll: int = 1) -> jax.Array:
  """The backbone's pooled feature per frame: video [batch, slots, height, width, 3] -> [batch, slots, d].

  per_slot (training only): one backbone call per slot, in slot order, each with its own batch statistics and
  each updating the running statistics before the next (`unroll` slots per loop iteration); otherwise one call
  on [batch * slots, ...].
  """
  def run(module, images):
    return module(images, train=train)

  if remat:
    run = nn.remat(run)
  if per_slot:
    def step(module, carry, images):  # images: one slot [batch, height, width, 3]
      return carry, run(module, images)

    slots = nn.scan(step, variable_broadcast='params', variable_carry='batch_stats', split_rngs={'params': False},
                    in_axes=1, out_axes=1, unroll=unroll)
    _, features = slots(backbone, None, video)
    return features
  batch, num_slots = video.shape[:2]
  return run(backbone, layers.merge_frames(video)).reshape(batch, num_slots, -1)


class ClipFeatureEncoder(nn.Module):
  """CFE (Sec. 3.2): frame features f [batch, snippets, K, d] -> (snippet features R [batch, snippets, d], the LRL
  frame weights w [batch, snippets, K])."""
  num_heads: int = 4
  attention_dropout: float = 0.1
  relation_dropout: float = 0.5
  relation_form: str = 'code'  # or 'paper' (module docstring)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, frames: jax.Array, *, train: bool):
    if self.relation_form not in RELATION_FORMS:
      raise ValueError(f'relation_form={self.relation_form!r} not in {RELATION_FORMS}')
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dim = frames.shape[-1]
    # torch's MultiheadAttention draws its in-projection from xavier_uniform (the code keeps that default).
    attended = layers.PostNormAttention(self.num_heads, self.attention_dropout, nn.initializers.xavier_uniform(),
                                        name='self_attention', **kwargs)(frames, train=train)  # f'_k (Eq. 1)
    global_feature = jnp.broadcast_to(layers.max_over(attended, -2)[..., None, :], attended.shape)  # f-hat'
    if self.relation_form == 'code':
      relation = pooled = jnp.concatenate([frames.astype(attended.dtype), global_feature], axis=-1)
    else:
      relation, pooled = jnp.concatenate([global_feature, attended], axis=-1), attended
    relation = nn.Dropout(self.relation_dropout)(relation, deterministic=not train)
    weights = nn.sigmoid(layers.torch_dense(1, relation.shape[-1], name='relation_weight', **kwargs)(
        relation))  # w_k (Eq. 2): [batch, snippets, K, 1]
    pooled = (weights * pooled).sum(axis=-2) / weights.sum(axis=-2)  # Eq. (3)
    snippets = layers.torch_dense(dim, pooled.shape[-1], name='relation_projection', **kwargs)(pooled)  # q1
    return snippets, weights[..., 0]


class EmotionIntensityActivation(nn.Module):
  """EIAN (Sec. 3.3): snippet features V^f [batch, n, d] -> (the emotion-rich representation [batch, d], the
  emotional scores A [batch, n], float32)."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, snippets: jax.Array):
    # W^T V^f: Conv1d(d, 1, kernel 1, no bias) over the snippet axis, kaiming_normal(mode='fan_out') as the code.
    scores = nn.Conv(1, (1,), use_bias=False, kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
                     dtype=self.dtype, param_dtype=self.param_dtype, name='scores')(snippets)[..., 0]
    attention = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)  # A (Eq. 5)
    activation_map = snippets * attention[..., None].astype(snippets.dtype)  # M (Eq. 7)
    return layers.max_over(activation_map, 1), attention  # max-pool over snippets (Eq. 8)


class Classifier(nn.Module):
  """The FC classifier (Eq. 9): [batch, d] -> (Linear, ReLU) per hidden width -> Dropout -> Linear [batch, C]."""
  num_classes: int
  hidden_dims: Sequence[int] = (256, 128)
  dropout_rate: float = 0.4
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for index, width in enumerate(self.hidden_dims):
      x = nn.relu(layers.torch_dense(width, x.shape[-1], name=f'hidden_{index}', **kwargs)(x))
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    return layers.torch_dense(self.num_classes, x.shape[-1], name='output', **kwargs)(x)


class CEFLNet(nn.Module):
  """Paper sizes are the defaults: 7 snippets x 5 frames, a full ResNet18 (d = 512), 4 heads, head 256-128."""
  num_classes: int
  num_frames: int = 35  # num_snippets x frames_per_snippet, checked against the sampler by the trainer
  num_snippets: int = 7  # n
  frames_per_snippet: int = 5  # K
  backbone_width: int = 64  # ResNet18: d = 8 x width = 512
  num_heads: int = 4
  attention_dropout: float = 0.1  # SAL: on the attention weights and the residual branch
  relation_dropout: float = 0.5  # LRL: on c_k before q0
  classifier_dropout: float = 0.4
  classifier_dims: Sequence[int] = (256, 128)  # BU-3DFE's Tab. 8 figure: (128, 64)
  relation_form: str = 'code'  # or 'paper': Eq. (2)-(3) as printed (module docstring)
  backbone_batch_norm: str = 'per_slot'  # or 'joint' (module docstring)
  remat_backbone: bool = False
  # Slots per iteration of the per-slot loop (nn.scan's unroll): the same numbers; a rolled loop compiles once, an
  # unrolled one runs faster on CPU (the demo's size: 0.53 s a step fully unrolled, 2.2 s rolled, on 2 cores).
  slot_unroll: int = 1
  max_pool_impl: str = 'reduce_window'  # the backbone stem's max-pool: or 'slices' (resnet.max_pool_3x3_stride_2)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  rng_streams: ClassVar[tuple[str, ...]] = ('dropout',)
  classifier_names: ClassVar[tuple[str, ...]] = ('classifier',)  # the whole MLP, as the code's `classifier`
  model_inputs: ClassVar[tuple[str, ...]] = ()  # batch fields __call__ takes besides the video
  # Written per clip by dferjax.evaluate (clip_report.py): the salient snippet P_e with its frames, as Fig. 3 shows.
  clip_outputs: ClassVar[dict[str, str]] = {'salient_snippet': 'snippet', 'snippet_attention': 'value'}

  def metric_heads(self) -> dict:
    return {}  # one head: the emotion classes

  @nn.compact
  def __call__(self, video: jax.Array, *, train: bool):
    """video [batch, 35, height, width, 3] in [0, 1], snippet-major -> (logits [batch, C] float32, aux):
    'snippet_attention' A [batch, n] float32 (Eq. 5), 'salient_snippet' P_e [batch] int32 (Eq. 6), and
    'frame_weights' w [batch, n, K] float32 (Eq. 2)."""
    if self.num_frames != self.num_snippets * self.frames_per_snippet:
      raise ValueError(f'num_frames={self.num_frames} is not num_snippets={self.num_snippets} x '
                       f'frames_per_snippet={self.frames_per_snippet}')
    if video.ndim != 5 or video.shape[1] != self.num_frames or video.shape[-1] != 3:
      raise ValueError(f'CEFLNet expects video [batch, {self.num_frames}, height, width, 3] (num_frames='
                       f'{self.num_frames}), got shape {video.shape}')
    if self.backbone_batch_norm not in BACKBONE_BATCH_NORMS:
      raise ValueError(f'backbone_batch_norm={self.backbone_batch_norm!r} not in {BACKBONE_BATCH_NORMS}')
    if self.slot_unroll < 1:
      raise ValueError(f'slot_unroll={self.slot_unroll} must be >= 1')
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    batch = video.shape[0]
    backbone = ResNet(width=self.backbone_width, last_stage=4, pool=True, max_pool_impl=self.max_pool_impl,
                      name='backbone', **kwargs)
    per_slot = train and self.backbone_batch_norm == 'per_slot' and not self.is_initializing()
    frames = backbone_features(backbone, video.astype(self.dtype), train=train, per_slot=per_slot,
                               remat=self.remat_backbone, unroll=self.slot_unroll)  # f: [batch, 35, d]
    frames = frames.reshape(batch, self.num_snippets, self.frames_per_snippet, -1)
    snippets, frame_weights = ClipFeatureEncoder(self.num_heads, self.attention_dropout, self.relation_dropout,
                                                 self.relation_form, name='clip_encoder', **kwargs)(
                                                     frames, train=train)  # V^f (Eq. 4): [batch, n, d]
    representation, attention = EmotionIntensityActivation(name='emotion_activation', **kwargs)(snippets)
    logits = Classifier(self.num_classes, tuple(self.classifier_dims), self.classifier_dropout, name='classifier',
                        **kwargs)(representation, train=train)
    aux = {'snippet_attention': attention, 'salient_snippet': attention.argmax(axis=-1).astype(jnp.int32),
           'frame_weights': frame_weights.astype(jnp.float32)}
    return logits.astype(jnp.float32), aux
