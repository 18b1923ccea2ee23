"""PyTorch transcription of STT (plain torch, no torchvision), for parity tests and the PyTorch benchmark.

Written independently of dferjax/models/stt.py: it follows the reference token handling of refs.md §1.2
(mx-mark TimeSformer, operator order space -> time -> ffn) on one flat, patch-major token list
`[batch, 1 + positions * frames, dim]` with the class token first, reshaping per attention as the reference
does. The ResNet has torchvision's exact state_dict keys and shapes.

`load_flax_variables(model, variables)` copies flax variables into the torch module (strict), so the same
weights can be run in both frameworks.
"""
import re

import numpy as np
import torch
from torch import nn

from dferjax.reference import loading


def init_like_torchvision(model: nn.Module) -> None:
  """torchvision's ResNet init on every conv and 2-D BatchNorm of `model`: kaiming_normal_ (fan_out), BN 1 / 0."""
  for module in model.modules():
    if isinstance(module, nn.Conv2d):
      nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
    elif isinstance(module, nn.BatchNorm2d):
      nn.init.ones_(module.weight)
      nn.init.zeros_(module.bias)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, in_channels: int, channels: int, stride: int = 1):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(channels)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(channels)
    self.downsample = None
    if stride != 1 or in_channels != channels:
      self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                      nn.BatchNorm2d(channels))

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    shortcut = x if self.downsample is None else self.downsample(x)
    return self.relu(out + shortcut)


class ResNet(nn.Module):
  """torchvision-layout ResNet (BasicBlock). `last_stage` < 4 or `num_classes=None` leave the unused parts out."""

  def __init__(self, stage_sizes=(2, 2, 2, 2), width: int = 64, last_stage: int = 4,
               num_classes: int | None = 1000):
    super().__init__()
    self.last_stage = last_stage
    self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    in_channels = width
    for stage in range(last_stage):
      channels = width * 2**stage
      blocks = []
      for block in range(stage_sizes[stage]):
        blocks.append(BasicBlock(in_channels, channels, 2 if stage > 0 and block == 0 else 1))
        in_channels = channels
      setattr(self, f'layer{stage + 1}', nn.Sequential(*blocks))
    self.num_features = in_channels
    self.fc = None
    if num_classes is not None:
      self.avgpool = nn.AdaptiveAvgPool2d(1)
      self.fc = nn.Linear(in_channels, num_classes)
    init_like_torchvision(self)

  def features(self, x, pool: bool = False):
    """x: [n, 3, h, w] -> feature map of `last_stage` [n, c, h', w'] (or [n, c] if pool)."""
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for stage in range(self.last_stage):
      x = getattr(self, f'layer{stage + 1}')(x)
    return x.mean(dim=(2, 3)) if pool else x

  def forward(self, x):
    x = self.features(x, pool=self.fc is not None)
    return x if self.fc is None else self.fc(x)


def drop_path(x, rate: float, training: bool):
  """timm's DropPath: one Bernoulli draw per x.shape[0] row, survivors scaled by 1/keep."""
  if rate == 0.0 or not training:
    return x
  keep = 1.0 - rate
  mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
  return x * mask / keep


class Attention(nn.Module):

  def __init__(self, dim: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads)**-0.5
    self.qkv = nn.Linear(dim, 3 * dim, bias=True)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):  # x: [n, tokens, dim]
    n, tokens, dim = x.shape
    qkv = self.qkv(x).reshape(n, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
    query, key, value = qkv[0], qkv[1], qkv[2]
    weights = ((query @ key.transpose(-2, -1)) * self.scale).softmax(dim=-1)
    out = (weights @ value).transpose(1, 2).reshape(n, tokens, dim)
    return self.proj(out)


class Mlp(nn.Module):

  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU()  # exact erf form
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
  """Divided space-time block on the flat token list x: [b, 1 + p * t, d] (patch-major, time-minor)."""

  def __init__(self, dim, num_heads, mlp_ratio, drop_path_rate, num_frames, num_positions):
    super().__init__()
    self.num_frames, self.num_positions, self.drop_path_rate = num_frames, num_positions, drop_path_rate
    self.spatial_norm = nn.LayerNorm(dim)
    self.spatial_attention = Attention(dim, num_heads)
    self.temporal_norm = nn.LayerNorm(dim)
    self.temporal_attention = Attention(dim, num_heads)
    self.mlp_norm = nn.LayerNorm(dim)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))

  def forward(self, x):
    b, _, d = x.shape
    p, t = self.num_positions, self.num_frames
    # Spatial: 'b (p t) d -> (b t) p d'; the class token bypasses.
    cls, tokens = x[:, :1], x[:, 1:]
    query = tokens.reshape(b, p, t, d).transpose(1, 2).reshape(b * t, p, d)
    out = self.spatial_attention(self.spatial_norm(query))
    out = drop_path(out, self.drop_path_rate, self.training)
    out = out.reshape(b, t, p, d).transpose(1, 2).reshape(b, p * t, d)
    x = torch.cat([cls, tokens + out], dim=1)
    # Temporal: 'b (p t) d -> (b p) t d', class token repeated to every position and prepended.
    cls, tokens = x[:, :1], x[:, 1:]
    query = torch.cat([cls.expand(b, p, d).reshape(b * p, 1, d), tokens.reshape(b * p, t, d)], dim=1)
    out = self.temporal_attention(self.temporal_norm(query))
    out = drop_path(out, self.drop_path_rate, self.training)
    cls_out = out[:, 0].reshape(b, p, d).mean(dim=1, keepdim=True)
    x = x + torch.cat([cls_out, out[:, 1:].reshape(b, p * t, d)], dim=1)
    # FFN on all tokens.
    return x + drop_path(self.mlp(self.mlp_norm(x)), self.drop_path_rate, self.training)


class STT(nn.Module):
  """STT with the same fields as dferjax.models.stt.STT; `image_size` fixes the number of positions."""

  def __init__(self, num_classes: int, num_frames: int = 16, image_size: int = 112, embed_dim: int = 512,
               num_layers: int = 4, num_heads: int = 8, mlp_ratio: float = 4.0,
               drop_path_rate: float = 0.1, backbone_stage: int = 3, backbone_width: int = 64):
    super().__init__()
    self.num_frames, self.embed_dim = num_frames, embed_dim
    self.backbone = ResNet(width=backbone_width, last_stage=backbone_stage, num_classes=None)
    with torch.no_grad():
      height, width = self.backbone.features(torch.zeros(1, 3, image_size, image_size)).shape[2:]
    self.num_positions = height * width
    self.patch_embed = nn.Conv2d(self.backbone.num_features, embed_dim, 1)
    nn.init.kaiming_normal_(self.patch_embed.weight, mode='fan_in', nonlinearity='relu')
    nn.init.zeros_(self.patch_embed.bias)
    self.spatial_pos_embed = nn.Parameter(torch.zeros(1, self.num_positions, embed_dim))
    self.temporal_pos_embed = nn.Parameter(torch.zeros(1, num_frames + 1, embed_dim))
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    for parameter in (self.spatial_pos_embed, self.temporal_pos_embed, self.cls_token):
      nn.init.trunc_normal_(parameter, std=0.02)
    rates = np.linspace(0, drop_path_rate, num_layers)
    self.blocks = nn.ModuleList(
        Block(embed_dim, num_heads, mlp_ratio, float(rate), num_frames, self.num_positions) for rate in rates)
    self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
    self.head = nn.Linear(embed_dim, num_classes)

  def forward(self, video):
    """video: [b, t, 3, h, w] in [0, 1] -> logits [b, num_classes]."""
    b, t = video.shape[:2]
    p, d = self.num_positions, self.embed_dim
    x = self.patch_embed(self.backbone.features(video.flatten(0, 1)))
    x = x.flatten(2).transpose(1, 2) + self.spatial_pos_embed  # [(b t), p, d]
    x = x.reshape(b, t, p, d).transpose(1, 2).reshape(b * p, t, d)  # (b p) t d
    x = torch.cat([self.cls_token.expand(b * p, 1, d), x], dim=1) + self.temporal_pos_embed
    cls = x[:b, :1]  # identical for every position
    x = torch.cat([cls, x[:, 1:].reshape(b, p * t, d)], dim=1)  # b (p t) d, class token first
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x)[:, 0])


_LEAF_NAMES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
               'var': 'running_var'}


def torch_key(path: tuple[str, ...]) -> str:
  """Flax variable path -> torch state_dict key, e.g. ('backbone', 'layer2_0', 'downsample_1', 'mean') ->
  'backbone.layer2.0.downsample.1.running_mean'."""
  parts = []
  for name in path[:-1]:
    if match := re.fullmatch(r'(layer\d+)_(\d+)', name):
      parts += [match[1], match[2]]
    elif match := re.fullmatch(r'downsample_(\d+)', name):
      parts += ['downsample', match[1]]
    elif match := re.fullmatch(r'block_(\d+)', name):
      parts += ['blocks', match[1]]
    else:
      parts.append(name)
  leaf = path[-1]
  if leaf != 'embedding':  # a PositionEmbedding's table is the torch Parameter itself
    parts.append(_LEAF_NAMES.get(leaf, leaf))
  return '.'.join(parts)


def load_flax_variables(model: nn.Module, variables) -> None:
  """Copies flax {'params', 'batch_stats'} into `model` in place; every torch tensor must be filled.

  Conv kernels HWIO -> OIHW, Dense kernels [in, out] -> [out, in], everything else reshaped.
  """
  loading.load_flax_variables(model, variables, torch_key)
