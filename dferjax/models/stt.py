"""STT: Spatio-Temporal Transformer for DFER (Ma, Sun, Li 2022), with refs.md §1.2 for what the paper leaves open.

ResNet18 through layer3 -> 1x1 conv to d -> + spatial pos-emb (Eq. 1) -> class token prepended on the time
axis at every position, + temporal pos-emb over F+1 (Eq. 2) -> N blocks of [spatial MHSA (Eq. 3-8, the class
token bypasses), temporal MHSA over F+1 (Eq. 9-11, class outputs averaged over positions), MLP (Eq. 12)]
-> LayerNorm -> Dense on the class token (Eq. 13).

Tokens stay as `[batch, frames, positions, dim]` (+ the class token `[batch, dim]`); the reference's
patch-major token list `[batch, 1 + positions * frames, dim]` is only a different memory order of the same
numbers (dferjax/reference/torch_stt.py, tested to 1e-4).
"""
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from dferjax.models import fused, layers
from dferjax.models.resnet import ResNet


def layer_norm(norm_impl: str, **kwargs) -> nn.Module:
  """nn.LayerNorm, or fused.FusedLayerNorm (same parameters and numbers, hand-written gradient)."""
  if norm_impl not in fused.NORM_IMPLS:
    raise ValueError(f'norm_impl {norm_impl!r} not in {fused.NORM_IMPLS}')
  return (fused.FusedLayerNorm if norm_impl == 'fused' else nn.LayerNorm)(**kwargs)


class STTBlock(nn.Module):
  """Divided space-time block, pre-LN: spatial attention -> temporal attention -> MLP, each residual."""
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = 'xla'  # 'cudnn': flash attention on GPU, needs dtype bfloat16; 'pallas': pallas_attention
  attention_layout: str = 'tokens_heads'  # or 'heads_first' (layers.ATTENTION_LAYOUTS)
  attention_pad_multiple: int = 1  # pad the 49/17 tokens to a multiple, masked (cuDNN wants even lengths)
  norm_impl: str = 'flax'  # or 'fused' (fused.FusedLayerNorm)

  @nn.compact
  def __call__(self, cls_token: jax.Array, tokens: jax.Array, *, train: bool):
    """cls_token: [batch, dim], tokens: [batch, frames, positions, dim] -> the same two, updated."""
    batch, num_frames, num_positions, dim = tokens.shape
    assert cls_token.shape == (batch, dim), (cls_token.shape, tokens.shape)
    norm = lambda name: layer_norm(self.norm_impl, epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype,
                                   name=name)  # torch's default eps inside blocks
    attention = lambda name: layers.MultiHeadSelfAttention(
        self.num_heads, qkv_bias=True, attention_impl=self.attention_impl, attention_layout=self.attention_layout,
        attention_pad_multiple=self.attention_pad_multiple, dtype=self.dtype, param_dtype=self.param_dtype,
        name=name)
    drop_path = lambda batch_ndim: layers.DropPath(self.drop_path_rate, batch_ndim=batch_ndim)

    # Spatial attention among the positions of each frame (Eq. 3-8); one drop-path draw per (sample, frame).
    spatial = attention('spatial_attention')(norm('spatial_norm')(tokens))
    tokens = tokens + drop_path(2)(spatial, deterministic=not train)

    # Temporal attention among the F+1 entries at each position, class token first (Eq. 9-11).
    by_position = jnp.swapaxes(tokens, 1, 2)  # [batch, positions, frames, dim]
    cls_per_position = jnp.broadcast_to(cls_token[:, None, None, :], (batch, num_positions, 1, dim))
    sequence = jnp.concatenate([cls_per_position, by_position], axis=2)
    temporal = attention('temporal_attention')(norm('temporal_norm')(sequence))
    temporal = drop_path(2)(temporal, deterministic=not train)  # per (sample, position)
    cls_token = cls_token + temporal[:, :, 0].mean(axis=1)  # the class token's outputs, averaged over positions
    tokens = tokens + jnp.swapaxes(temporal[:, :, 1:], 1, 2)

    # MLP on every token incl. the class token (Eq. 12); one drop-path draw per sample for both.
    mlp_norm = norm('mlp_norm')
    mlp = layers.Mlp(self.mlp_ratio, dtype=self.dtype, param_dtype=self.param_dtype, name='mlp')
    mlp_out = tuple(mlp(mlp_norm(x), deterministic=not train) for x in (cls_token, tokens))
    cls_out, tokens_out = drop_path(1)(mlp_out, deterministic=not train)
    return cls_token + cls_out, tokens + tokens_out


class STT(nn.Module):
  """Spatio-temporal transformer on ResNet18 feature maps. Paper sizes are the defaults (d=512, N=4, 8 heads)."""
  num_classes: int
  num_frames: int = 16  # F = S x T = 8 segments x 2 frames
  embed_dim: int = 512
  num_layers: int = 4
  num_heads: int = 8
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.1  # linspace(0, rate, num_layers) over the blocks
  backbone_stage: int = 3  # layer3: 256 x 7 x 7 at 112 px
  backbone_width: int = 64
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = 'xla'  # 'cudnn': flash attention on GPU, needs dtype bfloat16; 'pallas': pallas_attention
  max_pool_impl: str = 'reduce_window'  # the backbone stem's max-pool: or 'slices', 'argmax' (resnet.MAX_POOL_IMPLS)
  # Issue 17's options, exact re-expressions of the default (tests/test_fused.py), none measured faster yet:
  attention_layout: str = 'tokens_heads'  # or 'heads_first': head split/merge inside the projections
  attention_pad_multiple: int = 1  # pad the 49/17 tokens to a multiple (2: 50/18, 8: 56/24, 32: 64/32), masked
  stem_conv_impl: str = 'conv'  # or 'space_to_depth': the 7x7/2 stem conv as a 4x4/1 conv on 2x2 blocks
  norm_impl: str = 'flax'  # or 'fused': every BatchNorm/LayerNorm with a hand-written backward pass

  rng_streams: ClassVar[tuple[str, ...]] = ('drop_path',)  # the RNGs a training forward pass draws from
  classifier_names: ClassVar[tuple[str, ...]] = ('head',)  # top-level parameters init_from.reset_classifier drops
  model_inputs: ClassVar[tuple[str, ...]] = ()  # batch fields __call__ takes besides the video

  def metric_heads(self) -> dict:
    return {}  # one head: the emotion classes

  @nn.compact
  def __call__(self, video: jax.Array, *, train: bool):
    """video: [batch, frames, height, width, 3] in [0, 1] -> (logits [batch, num_classes] float32,
    {'features': the normalised class token [batch, embed_dim]})."""
    if video.ndim != 5 or video.shape[1] != self.num_frames or video.shape[-1] != 3:
      raise ValueError(f'STT expects video [batch, {self.num_frames}, height, width, 3] '
                       f'(num_frames={self.num_frames}), got shape {video.shape}')
    dtype = jnp.dtype(self.dtype)
    batch = video.shape[0]
    backbone = ResNet(width=self.backbone_width, last_stage=self.backbone_stage, max_pool_impl=self.max_pool_impl,
                      stem_conv_impl=self.stem_conv_impl, norm_impl=self.norm_impl, dtype=dtype, param_dtype=self.param_dtype, name='backbone')
    feature_map = backbone(layers.merge_frames(video), train=train)  # [batch * frames, h, w, channels]
    # "Flatten and project by a 1x1 convolution" (Sec. 3.2): [batch * frames, h, w, c] -> [.., h * w, d];
    # kaiming fan_in init and zero bias as mx-mark's PatchEmbed.
    feature_map = nn.Conv(self.embed_dim, (1, 1), kernel_init=nn.initializers.variance_scaling(2.0, 'fan_in', 'normal'),
                          dtype=dtype, param_dtype=self.param_dtype, name='patch_embed')(feature_map)
    tokens = layers.split_frames(layers.flatten_positions(feature_map), self.num_frames)
    tokens = layers.PositionEmbedding(axis=2, param_dtype=self.param_dtype,
                                      name='spatial_pos_embed')(tokens)  # Eq. (1)

    # Class token prepended on the time axis at every position, then the temporal table over F+1 (Eq. 2).
    cls_token = self.param('cls_token', nn.initializers.truncated_normal(0.02), (self.embed_dim,),
                           self.param_dtype).astype(tokens.dtype)
    num_positions = tokens.shape[2]
    cls_rows = jnp.broadcast_to(cls_token, (batch, 1, num_positions, self.embed_dim))
    tokens = jnp.concatenate([cls_rows, tokens], axis=1)
    tokens = layers.PositionEmbedding(axis=1, param_dtype=self.param_dtype,
                                      name='temporal_pos_embed')(tokens)
    cls_token, tokens = tokens[:, 0, 0], tokens[:, 1:]  # the class rows are equal at every position

    for index, rate in enumerate(layers.drop_path_rates(self.drop_path_rate, self.num_layers)):
      cls_token, tokens = STTBlock(self.num_heads, self.mlp_ratio, rate, dtype=dtype,
                                   param_dtype=self.param_dtype, attention_impl=self.attention_impl,
                                   attention_layout=self.attention_layout,
                                   attention_pad_multiple=self.attention_pad_multiple, norm_impl=self.norm_impl,
                                   name=f'block_{index}')(cls_token, tokens, train=train)
    cls_token = layer_norm(self.norm_impl, epsilon=1e-6, dtype=dtype, param_dtype=self.param_dtype,
                           name='norm')(cls_token)
    logits = layers.torch_dense(self.num_classes, self.embed_dim, dtype=dtype,
                                param_dtype=self.param_dtype, name='head')(cls_token)  # Eq. (13)
    return logits.astype(jnp.float32), {'features': cls_token}
