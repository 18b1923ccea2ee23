"""A miniature EST for the trainer-contract tests: an auxiliary snippet-order head, its own RNG stream, two
classifier parameter groups and an extra metric head that reads the batch field 'permutation'."""
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from dferjax import metrics


class OrderNet(nn.Module):
  """Per-frame conv features -> one feature per clip -> emotion logits and snippet-order logits."""
  num_classes: int
  num_frames: int = 7
  num_permutations: int = 10
  width: int = 8
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32

  rng_streams: ClassVar[tuple[str, ...]] = ('dropout',)
  classifier_names: ClassVar[tuple[str, ...]] = ('head', 'order_head')
  model_inputs: ClassVar[tuple[str, ...]] = ()  # batch fields __call__ takes besides the video

  def metric_heads(self) -> dict:
    return {'order': metrics.MetricHead(output='order_logits', labels='permutation',
                                        class_names=tuple(str(k) for k in range(self.num_permutations)))}

  @nn.compact
  def __call__(self, video, *, train: bool):
    batch, num_frames = video.shape[:2]
    assert num_frames == self.num_frames, (video.shape, self.num_frames)
    frames = video.reshape(batch * num_frames, *video.shape[2:]).astype(self.dtype)
    frames = nn.Conv(self.width, (3, 3), strides=(2, 2), dtype=self.dtype, name='conv')(frames)
    frames = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype, name='bn')(frames)
    per_frame = nn.relu(frames).mean(axis=(1, 2)).reshape(batch, num_frames * self.width)  # order matters
    features = nn.relu(nn.Dense(32, dtype=self.dtype, name='fuse')(per_frame))
    features = nn.Dropout(self.dropout_rate)(features, deterministic=not train)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(features)
    order_logits = nn.Dense(self.num_permutations, dtype=self.dtype, name='order_head')(features)
    return logits.astype(jnp.float32), {'order_logits': order_logits.astype(jnp.float32), 'features': features}
