"""PyTorch transcription of AEN (plain torch, no torchvision), for parity tests, the PyTorch benchmark and export.

Written from the paper (Sec. 3, Eq. 1-6) and refs.md §1.5 (the authors' prototype, `bksain/AEN`) and §1.1
(Former-DFER's T-Former) rather than from dferjax/models/aen.py, so the two only meet in the outputs. It keeps the
prototype's shape: a torchvision-layout ResNet (`s_former`, configurable stage sizes) returning its stage outputs,
1x1 squeeze convs + `flatten(1)` on NCHW, one T-Former per level, the S2AC linears `fc0_1`, `fc0_1_o`, `fc0_0`
(first converter) and `fc2_3`, `fc2_3_o` (second), the heads `fc0` (global), `fc1` (groups), `fc3` (local), and
the frozen frame-level network `model_2D` (`s_former` through the middle stage, its squeeze, `fc2D`) as the guide.

Where the paper and the prototype differ the argument picks: `s2ac_order` ('paper': F_1 from the middle level,
F_2 from the low one; 'prototype': low first), `s2ac_softmax` ('row': Eq. 1's rho; 'column': the prototype's
softmax over dim 1), `prediction_space` ('probability': Eq. 3; 'log_probability': the prototype's mix). The
losses of both are `paper_loss` and `prototype_loss`, per example.

Video `[batch, frames, 3, h, w]` in [0, 1]. `load_flax_variables(model, variables)` copies `AEN.init`'s (or
`AENFrame.init`'s) variables into the torch module (strict).
"""
import math
import re

import torch
from torch import nn
from torch.nn import functional as F

from dferjax.reference import loading, torch_stt
from dferjax.reference.torch_nr_dfernet import FORMER_DFER_RENAMES, Transformer  # Former-DFER's pre-norm layers

# Former-DFER label order: Happy, Sad, Neutral, Angry, Surprise, Disgust, Fear (refs.md §1.5's grouping).
GROUP_NAMES = ('positive', 'neutral', 'negative')
CLASS_GROUPS = (0, 2, 1, 2, 0, 2, 2)


def _halve(size: int, times: int) -> int:
  """`times` stride-2 steps with 'same' padding (conv1, maxpool, layer2.., torch's floor((s - 1) / 2) + 1)."""
  for _ in range(times):
    size = (size - 1) // 2 + 1
  return size


def squeeze_width(image_size: int, stage: int, channels: int) -> int:
  """Length of a squeezed stage output: channels * h * w after conv1, maxpool and stages 2..stage."""
  return channels * _halve(image_size, stage + 1)**2


class StageResNet(torch_stt.ResNet):
  """The prototype's ResNet_SPF: conv1 .. layer`last_stage`, returning every stage's output (NCHW)."""

  def __init__(self, stage_sizes, width: int, last_stage: int = 4):
    super().__init__(tuple(stage_sizes), width, last_stage, num_classes=None)

  def forward(self, images):
    x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
    stages = []
    for stage in range(self.last_stage):
      x = getattr(self, f'layer{stage + 1}')(x)
      stages.append(x)
    return stages


def squeeze(channels: int, out_channels: int) -> nn.Sequential:
  """Point-wise conv, point-wise conv to `out_channels` (both biased); flatten(1) follows in the forward."""
  return nn.Sequential(nn.Conv2d(channels, channels, 1), nn.Conv2d(channels, out_channels, 1))


class TFormer(nn.Module):
  """Former-DFER's T-Former: randn class token and position table (frames + 1), pre-norm layers, class output."""

  def __init__(self, dim: int, num_frames: int, depth: int, heads: int, dim_head: int, mlp_dim: int):
    super().__init__()
    self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
    self.pos_embedding = nn.Parameter(torch.randn(1, num_frames + 1, dim))
    self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim)

  def forward(self, x):  # x: [b, T, dim] -> [b, dim]
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    return self.transformer(x + self.pos_embedding[:, :x.shape[1]])[:, 0]


class AENFrame(nn.Module):
  """The frame-level 2D network (2D_pretrain's model, AEN's `model_2D`): s_former through the middle stage, its
  squeeze and `fc2D`, per frame. Returns (mean frame logits [b, C], frame logits [b, T, C])."""

  def __init__(self, num_classes: int = 7, num_frames: int = 1, image_size: int = 112,
               backbone_stage_sizes=(2, 2, 2, 2), backbone_width: int = 64, middle_stage: int = 3,
               middle_channels: int = 16):
    super().__init__()
    del num_frames  # any number of frames: the network is per frame
    self.s_former = StageResNet(backbone_stage_sizes, backbone_width, last_stage=middle_stage)
    self.squeeze = squeeze(backbone_width * 2**(middle_stage - 1), middle_channels)
    self.fc2D = nn.Linear(squeeze_width(image_size, middle_stage, middle_channels), num_classes)

  def forward(self, video):
    b, t = video.shape[:2]
    features = self.squeeze(self.s_former(video.flatten(0, 1))[-1]).flatten(1)
    frame_logits = self.fc2D(features).unflatten(0, (b, t))
    return frame_logits.mean(dim=1), frame_logits


class AEN(nn.Module):
  """Paper sizes are the defaults (ResNet18, 16 frames of 112 px: 784-d low and middle levels, 512-d high level).
  Arguments carry dferjax's AEN field names, so a run's config builds it as is."""

  def __init__(self, num_classes: int = 7, num_frames: int = 16, image_size: int = 112,
               backbone_stage_sizes=(2, 2, 2, 2), backbone_width: int = 64, low_stage: int = 1, middle_stage: int = 3,
               low_channels: int = 1, middle_channels: int = 16, num_layers: int = 3, num_heads: int = 8,
               head_dim: int = 64, mlp_dim: int = 1024, s2ac_order: str = 'paper', s2ac_softmax: str = 'row',
               alpha: float = 0.7, prediction_space: str = 'probability', class_groups=CLASS_GROUPS,
               group_names=GROUP_NAMES, guide: bool = True):
    super().__init__()
    if s2ac_order not in ('paper', 'prototype') or s2ac_softmax not in ('row', 'column') or \
        prediction_space not in ('probability', 'log_probability'):
      raise ValueError(f'unknown s2ac_order={s2ac_order!r}, s2ac_softmax={s2ac_softmax!r} or '
                       f'prediction_space={prediction_space!r}')
    self.stages = {'low': low_stage, 'middle': middle_stage}
    self.s2ac_order, self.softmax_dim = s2ac_order, 2 if s2ac_softmax == 'row' else 1
    self.alpha, self.prediction_space = alpha, prediction_space
    self.register_buffer('class_groups', torch.tensor(list(class_groups)), persistent=False)
    w = backbone_width
    self.s_former = StageResNet(backbone_stage_sizes, w)
    self.squeeze_low = squeeze(w * 2**(low_stage - 1), low_channels)
    self.squeeze_middle = squeeze(w * 2**(middle_stage - 1), middle_channels)
    dims = {'low': squeeze_width(image_size, low_stage, low_channels),
            'middle': squeeze_width(image_size, middle_stage, middle_channels),
            'high': w * 2**(len(backbone_stage_sizes) - 1)}
    for level, dim in dims.items():
      self.add_module(f't_former_{level}', TFormer(dim, num_frames, num_layers, num_heads, head_dim, mlp_dim))
    first, second = ('middle', 'low') if s2ac_order == 'paper' else ('low', 'middle')
    high, c1, c2 = dims['high'], dims[first], dims[second]
    # First S2AC (F_0 = V_high -> F_1), second (F_1 -> F_2); fc0_0 / fc2_3_e expand F_{a-1} to the level's width.
    self.fc0_1, self.fc0_1_o, self.fc0_0 = nn.Linear(high, c1), nn.Linear(c1, c1), nn.Linear(high, c1)
    self.fc2_3, self.fc2_3_o = nn.Linear(c1, c2), nn.Linear(c2, c2)
    self.fc2_3_e = nn.Identity() if c1 == c2 else nn.Linear(c1, c2)  # the prototype's 784 = 784: no layer
    self.fc0 = nn.Linear(high, num_classes)  # P_G
    self.fc1 = nn.Linear(c1, len(group_names))  # P_L^1
    self.fc3 = nn.Linear(c2, num_classes)  # P_L^2
    self.model_2D = None
    if guide:
      self.model_2D = AENFrame(num_classes, num_frames, image_size, backbone_stage_sizes, w, middle_stage,
                               middle_channels)
      self.model_2D.requires_grad_(False)
    torch_stt.init_like_torchvision(self)

  def train(self, mode: bool = True):
    """The guide stays in eval mode (running statistics) while AEN trains."""
    super().train(mode)
    if self.model_2D is not None:
      self.model_2D.eval()
    return self

  def s2ac(self, previous, level, fc_in, fc_out, fc_expand):
    """Eq. 1: fc_out(rho(fc_in(F_{a-1}) V^T / sqrt(C)) V) + fc_expand(F_{a-1}); [b, c'], [b, c] -> [b, c]."""
    scores = fc_in(previous).unsqueeze(2) @ level.unsqueeze(1) / math.sqrt(level.shape[1])  # [b, c, c]
    attended = scores.softmax(dim=self.softmax_dim) @ level.unsqueeze(2)
    return fc_out(attended.squeeze(2)) + fc_expand(previous)

  def levels(self, video):
    """I_s {level: [b, T, C_s]} per frame: squeezed low and middle stages, the pooled last stage."""
    b, t = video.shape[:2]
    stages = self.s_former(video.flatten(0, 1))
    frames = {'low': self.squeeze_low(stages[self.stages['low'] - 1]).flatten(1),
              'middle': self.squeeze_middle(stages[self.stages['middle'] - 1]).flatten(1),
              'high': stages[-1].mean(dim=(2, 3))}
    return {level: x.unflatten(0, (b, t)) for level, x in frames.items()}

  def predict(self, global_logits, local_logits):
    """Eq. 3 at a = 2 as log-probabilities, or the prototype's mix of log-probabilities."""
    if self.prediction_space == 'probability':
      return (self.alpha * local_logits.softmax(-1) + (1 - self.alpha) * global_logits.softmax(-1)).log()
    return self.alpha * local_logits.log_softmax(-1) + (1 - self.alpha) * global_logits.log_softmax(-1)

  def forward(self, video):
    """video [b, T, 3, h, w] -> (logits [b, C], aux): the three heads' logits and class_groups; in training with
    a guide also V_s ('clip_features'), I_s ('frame_features') and the guide's frame logits ('guide_logits')."""
    frames = self.levels(video)
    clips = {level: getattr(self, f't_former_{level}')(x) for level, x in frames.items()}
    first, second = ('middle', 'low') if self.s2ac_order == 'paper' else ('low', 'middle')
    x0_1 = self.s2ac(clips['high'], clips[first], self.fc0_1, self.fc0_1_o, self.fc0_0)
    x2_3 = self.s2ac(x0_1, clips[second], self.fc2_3, self.fc2_3_o, self.fc2_3_e)
    aux = {'global_logits': self.fc0(clips['high']), 'group_logits': self.fc1(x0_1), 'local_logits': self.fc3(x2_3),
           'class_groups': self.class_groups}
    logits = self.predict(aux['global_logits'], aux['local_logits'])
    if self.training and self.model_2D is not None:
      with torch.no_grad():
        aux['guide_logits'] = self.model_2D(video)[1]
      aux['clip_features'], aux['frame_features'] = clips, frames
    return logits, aux


# ---------------------------------------------------------------------------------------------------------
# Losses, per example: (total [b], {term: [b]}), the weights inside the terms.


def _groups(class_groups, num_groups: int):
  """One-hot [classes, groups] float: probabilities @ it sum each group's classes."""
  return F.one_hot(class_groups.long(), num_groups).float()


def paper_loss(aux, labels, alpha: float = 0.7, ta_weight: float = 0.4, ga_weight: float = 0.5,
               level_weights=(1.4, 0.6)):
  """L = L_mc + lambda1 L_ta + lambda2 L_ga (Eq. 6).

  L_mc (Eq. 2-3): -log P_O^a[y^a] summed over a = 1 (groups), 2 (emotions), P_O^a = alpha softmax(P_L^a) +
  (1 - alpha) softmax(P_G)^a, the group level of P_G summing its classes' probabilities. L_ta (Eq. 4): the L1
  distance of V_s to sum_t I_s,t S_2[t, y], S_2 the guide's frame probabilities. L_ga (Eq. 5): beta_a times the
  squared L2 distance of sigmoid(P_L^a) to the frames' mean probabilities at level a.
  """
  groups = _groups(aux['class_groups'], aux['group_logits'].shape[-1])
  group_labels = aux['class_groups'].long()[labels]
  global_probs = aux['global_logits'].softmax(-1)
  fused_groups = alpha * aux['group_logits'].softmax(-1) + (1 - alpha) * global_probs @ groups
  fused_classes = alpha * aux['local_logits'].softmax(-1) + (1 - alpha) * global_probs
  multi_class = -(fused_groups.gather(1, group_labels[:, None]).log()
                  + fused_classes.gather(1, labels[:, None]).log()).squeeze(1)
  frame_probs = aux['guide_logits'].softmax(-1)  # S_2 [b, T, C]
  importance = frame_probs[torch.arange(len(labels)), :, labels]  # S_2 Y [b, T]
  temporal = sum((aux['clip_features'][level] - (frames * importance[..., None]).sum(1)).abs().sum(1)
                 for level, frames in aux['frame_features'].items())
  global_affectivity = sum(
      weight * (out.sigmoid() - target.mean(1)).square().sum(1)
      for weight, out, target in zip(level_weights, (aux['group_logits'], aux['local_logits']),
                                     (frame_probs @ groups, frame_probs)))
  terms = {'multi_class': multi_class, 'temporal_affectivity': ta_weight * temporal,
           'global_affectivity': ga_weight * global_affectivity}
  return sum(terms.values()), terms


def prototype_loss(aux, labels, alpha: float = 0.7, multi_class_weights=(0.6, 1.4), ta_weight: float = 0.4,
                   ta_scale: float = 3.0, ga_weights=(0.7, 0.3)):
  """The prototype's train_keyframed losses (refs.md §1.5), batch means taken per example.

  L_P1 = alpha NLL(log_softmax(P_L^1), y3) + (1 - alpha) NLL(PG1, y3), PG1 the group mean of P_G's
  log-probabilities; L_P2 = alpha NLL(log_softmax(P_L^2), y) + (1 - alpha) NLL(log_softmax(P_G), y). L_ta:
  L1Loss(v_s, sum_t score_t x_s,t) / dim_s over the levels, score the guide's raw logit of y, times 3. L_ga:
  L1Loss(sigmoid(P_L^2), E), E = softmax(sum_t guide logits), and L1Loss(sigmoid(P_L^1), group means of E).
  Total 0.6 L_P1 + 1.4 L_P2 + 0.4 L_ta + 0.7 L_ga1 + 0.3 L_ga2.
  """
  groups = _groups(aux['class_groups'], aux['group_logits'].shape[-1])
  group_labels = aux['class_groups'].long()[labels]
  nll = lambda log_probs, y: F.nll_loss(log_probs, y, reduction='none')
  global_log_probs = aux['global_logits'].log_softmax(-1)
  pg1 = global_log_probs @ groups / groups.sum(0)
  l_p1 = alpha * nll(aux['group_logits'].log_softmax(-1), group_labels) + (1 - alpha) * nll(pg1, group_labels)
  l_p2 = alpha * nll(aux['local_logits'].log_softmax(-1), labels) + (1 - alpha) * nll(global_log_probs, labels)
  scores = (aux['guide_logits'] * F.one_hot(labels, aux['guide_logits'].shape[-1])[:, None]).sum(-1, keepdim=True)
  l1 = lambda a, b: F.l1_loss(a, b, reduction='none').mean(1)
  temporal = sum(l1(aux['clip_features'][level], (frames * scores).sum(1)) / frames.shape[-1]
                 for level, frames in aux['frame_features'].items())
  expected = aux['guide_logits'].sum(1).softmax(-1)
  expected_groups = expected @ groups / groups.sum(0)
  terms = {'multi_class': multi_class_weights[0] * l_p1 + multi_class_weights[1] * l_p2,
           'temporal_affectivity': ta_weight * ta_scale * temporal,
           'global_affectivity': ga_weights[0] * l1(aux['group_logits'].sigmoid(), expected_groups)
                                 + ga_weights[1] * l1(aux['local_logits'].sigmoid(), expected)}
  return sum(terms.values()), terms


# ---------------------------------------------------------------------------------------------------------
# Flax variables -> torch keys.

# Flax path (joined with '/') -> torch key, applied in order; module renames, then leaf names.
_RENAMES = (
    (r'^guide/', 'model_2D/'),
    (r'(^|/)backbone/', r'\1s_former/'),
    (r'(^|/)squeeze(_low|_middle)?/conv_(\d)/', r'\1squeeze\2/\3/'),
    (r'(^|/)frame_head/', r'\1fc2D/'),
    (r'^temporal_(low|middle|high)/layer_(\d+)/', r't_former_\1/transformer/layers/\2/'),
    (r'^temporal_(low|middle|high)/', r't_former_\1/'),
    (r'^s2ac_1/query/', 'fc0_1/'),
    (r'^s2ac_1/out/', 'fc0_1_o/'),
    (r'^s2ac_1/skip/', 'fc0_0/'),
    (r'^s2ac_2/query/', 'fc2_3/'),
    (r'^s2ac_2/out/', 'fc2_3_o/'),
    (r'^s2ac_2/skip/', 'fc2_3_e/'),
    (r'^global_head/', 'fc0/'),
    (r'^group_head/', 'fc1/'),
    (r'^local_head/', 'fc3/'),
    *FORMER_DFER_RENAMES,
)


def torch_key(path: tuple[str, ...]) -> str:
  """('guide', 'backbone', 'layer3_0', 'downsample_1', 'var') ->
  'model_2D.s_former.layer3.0.downsample.1.running_var'."""
  key = '/'.join(path)
  for pattern, replacement in _RENAMES:
    key = re.sub(pattern, replacement, key)
  return key.replace('/', '.')


def load_flax_variables(model: nn.Module, variables) -> None:
  """Copies flax {'params', 'batch_stats'} of AEN (into `AEN`) or AENFrame (into `AENFrame`) in place, strictly."""
  loading.load_flax_variables(model, variables, torch_key)
