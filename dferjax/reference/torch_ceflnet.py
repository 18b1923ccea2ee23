"""PyTorch transcription of CEFLNet (plain torch, no torchvision), for parity tests and the PyTorch benchmark.

Written from the paper (Sec. 3, Eq. 1-9) and refs.md §1.6 rather than from dferjax/models/ceflnet.py, so the two
only meet in their outputs. In training, as the public code, the backbone runs once per (snippet, frame) slot,
snippets outer, frames inner: every slot has its own BatchNorm batch statistics and updates the running ones in
turn. In evaluation BatchNorm reads its running statistics and every frame is on its own, so one call on all
frames gives the code's numbers faster. The self-attention is a sequence-first nn.MultiheadAttention shared by the
snippets. Module names follow the code: the ResNet's `conv1`, `bn1`, `layer1..4` at the top, `attn`, `dropout2`,
`norm1` (SAL), `dropout`, `beta` (Linear + Sigmoid) and `fc` (LRL), `temp_attn.attn` (Conv1d + Softmax, EIAN) and
`classifier`. The input is `[batch, frames, 3, h, w]` (the code's `[batch, 3, h, w, frames, snippets]` holds the
same frames).

`load_flax_variables(model, variables)` copies `CEFLNet.init`'s variables into the torch module (strict).
"""
import functools
import re

import torch
from torch import nn

from dferjax.reference import loading
from dferjax.reference.torch_stt import BasicBlock  # torchvision's block, shared by the transcriptions

RELATION_FORMS = ('code', 'paper')
BACKBONE_BATCH_NORMS = ('per_slot', 'joint')


class SnippetScores(nn.Module):
  """EIAN's scores (Eq. 5): Conv1d(d -> 1, width 1, no bias) over the snippets, softmax over the snippets."""

  def __init__(self, dim: int):
    super().__init__()
    self.attn = nn.Sequential(nn.Conv1d(dim, 1, 1, bias=False), nn.Softmax(dim=2))
    nn.init.kaiming_normal_(self.attn[0].weight, mode='fan_out')

  def forward(self, snippets):  # [b, d, n] -> [b, n]
    return self.attn(snippets)[:, 0]


class CEFLNet(nn.Module):
  """Paper sizes are the defaults (7 x 5 frames, ResNet18, 4 heads, head 256-128, dropouts 0.1 / 0.5 / 0.4)."""

  def __init__(self, num_classes: int = 7, num_frames: int = 35, num_snippets: int = 7, frames_per_snippet: int = 5,
               backbone_width: int = 64, num_heads: int = 4, attention_dropout: float = 0.1,
               relation_dropout: float = 0.5, classifier_dropout: float = 0.4, classifier_dims=(256, 128),
               relation_form: str = 'code', backbone_batch_norm: str = 'per_slot'):
    super().__init__()
    if num_frames != num_snippets * frames_per_snippet:
      raise ValueError(f'num_frames={num_frames} is not {num_snippets} x {frames_per_snippet}')
    if relation_form not in RELATION_FORMS or backbone_batch_norm not in BACKBONE_BATCH_NORMS:
      raise ValueError(f'relation_form={relation_form!r} (one of {RELATION_FORMS}), backbone_batch_norm='
                       f'{backbone_batch_norm!r} (one of {BACKBONE_BATCH_NORMS})')
    self.num_snippets, self.frames_per_snippet = num_snippets, frames_per_snippet
    self.relation_form, self.backbone_batch_norm = relation_form, backbone_batch_norm
    w = backbone_width
    self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(w)
    self.relu = nn.ReLU()
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    channels = w
    for stage in range(4):
      out = w * 2**stage
      stride = 1 if stage == 0 else 2
      setattr(self, f'layer{stage + 1}', nn.Sequential(BasicBlock(channels, out, stride), BasicBlock(out, out)))
      channels = out
    dim = channels
    for module in self.modules():  # the code's init: N(0, sqrt(2 / (k * k * out))), BN weight 1, bias 0
      if isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
        module.weight.data.normal_(0, (2.0 / fan_out)**0.5)
      elif isinstance(module, nn.BatchNorm2d):
        module.weight.data.fill_(1)
        module.bias.data.zero_()
    # SAL (Eq. 1)
    self.attn = nn.MultiheadAttention(dim, num_heads, dropout=attention_dropout)
    self.dropout2 = nn.Dropout(attention_dropout)
    self.norm1 = nn.LayerNorm(dim)
    # LRL (Eq. 2-3)
    self.dropout = nn.Dropout(relation_dropout)
    self.beta = nn.Sequential(nn.Linear(2 * dim, 1), nn.Sigmoid())
    self.fc = nn.Linear(2 * dim if relation_form == 'code' else dim, dim)
    # EIAN (Eq. 5-8) and the classifier (Eq. 9)
    self.temp_attn = SnippetScores(dim)
    head, width = [], dim
    for hidden in classifier_dims:
      head += [nn.Linear(width, hidden), nn.ReLU(True)]
      width = hidden
    self.classifier = nn.Sequential(*head, nn.Dropout(classifier_dropout), nn.Sequential(nn.Linear(width, num_classes)))

  def backbone(self, images):
    """[n, 3, h, w] -> the global-average-pooled layer4 features [n, d]."""
    x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return x.mean(dim=(2, 3))

  def snippet_feature(self, frames):
    """CFE on one snippet: f [b, K, d] -> (R [b, d], w [b, K])."""
    sequence = frames.transpose(0, 1)  # [K, b, d], the attention's sequence-first layout
    attended, _ = self.attn(sequence, sequence, sequence, need_weights=False)
    attended = self.norm1(sequence + self.dropout2(attended)).transpose(0, 1)  # f'_k
    global_feature = attended.max(dim=1, keepdim=True).values.expand_as(attended)  # f-hat'
    if self.relation_form == 'code':
      relation = torch.cat([frames, global_feature], dim=2)
      pooled = relation
    else:
      relation, pooled = torch.cat([global_feature, attended], dim=2), attended
    weights = self.beta(self.dropout(relation))  # w_k: [b, K, 1] (Eq. 2)
    return self.fc((pooled * weights).sum(dim=1) / weights.sum(dim=1)), weights[..., 0]  # Eq. (3)

  def forward(self, video, return_aux: bool = False):
    """video [b, n * K, 3, h, w] -> logits [b, C]; with return_aux also the snippet attention A [b, n], the
    salient snippet P_e [b] and the frame weights [b, n, K]."""
    b, num_frames = video.shape[:2]
    if num_frames != self.num_snippets * self.frames_per_snippet:
      raise ValueError(f'expected {self.num_snippets * self.frames_per_snippet} frames, got {num_frames}')
    if self.backbone_batch_norm == 'per_slot' and self.training:
      frames = torch.stack([self.backbone(video[:, slot]) for slot in range(num_frames)], dim=1)
    else:
      frames = self.backbone(video.flatten(0, 1)).unflatten(0, (b, num_frames))
    frames = frames.unflatten(1, (self.num_snippets, self.frames_per_snippet))
    snippets, frame_weights = zip(*(self.snippet_feature(frames[:, s]) for s in range(self.num_snippets)))
    snippets = torch.stack(snippets, dim=1)  # V^f [b, n, d] (Eq. 4)
    attention = self.temp_attn(snippets.transpose(1, 2))  # A (Eq. 5)
    representation = (snippets * attention[..., None]).max(dim=1).values  # Eq. (7)-(8)
    logits = self.classifier(representation)
    if not return_aux:
      return logits
    return logits, attention, attention.argmax(dim=1), torch.stack(frame_weights, dim=1)


# Flax path (joined with '/') -> torch key, applied in order; module renames, then leaf names.
_RENAMES = (
    (r'^backbone/', ''),
    (r'^clip_encoder/self_attention/attention/qkv/kernel$', 'attn/in_proj_weight'),
    (r'^clip_encoder/self_attention/attention/qkv/bias$', 'attn/in_proj_bias'),
    (r'^clip_encoder/self_attention/attention/proj/', 'attn/out_proj/'),
    (r'^clip_encoder/self_attention/norm/', 'norm1/'),
    (r'^clip_encoder/relation_weight/', 'beta/0/'),
    (r'^clip_encoder/relation_projection/', 'fc/'),
    (r'^emotion_activation/scores/', 'temp_attn/attn/0/'),
    (r'(layer\d)_(\d+)/', r'\1/\2/'),
    (r'downsample_(\d)/', r'downsample/\1/'),
    (r'/(kernel|scale)$', '/weight'),
    (r'/mean$', '/running_mean'),
    (r'/var$', '/running_var'),
)


def torch_key(path: tuple[str, ...], num_hidden: int) -> str:
  """('backbone', 'layer2_0', 'downsample_1', 'mean') -> 'layer2.0.downsample.1.running_mean'; the classifier's
  `num_hidden` (Linear, ReLU) pairs come first, then its Dropout, then the output Linear in a Sequential."""
  key = '/'.join(path)
  key = re.sub(r'^classifier/hidden_(\d+)/', lambda m: f'classifier/{2 * int(m.group(1))}/', key)
  key = re.sub(r'^classifier/output/', f'classifier/{2 * num_hidden + 1}/0/', key)
  for pattern, replacement in _RENAMES:
    key = re.sub(pattern, replacement, key)
  return key.replace('/', '.')


def num_hidden_layers(model: CEFLNet) -> int:
  """The classifier's hidden (Linear, ReLU) pairs."""
  return sum(isinstance(module, nn.Linear) for module in model.classifier.modules()) - 1


def load_flax_variables(model: CEFLNet, variables) -> None:
  """Copies flax {'params', 'batch_stats'} into `model` in place (dferjax.reference.loading: strict; conv HWIO ->
  OIHW, the width-1 Conv1d WIO -> OIW, Dense [in, out] -> [out, in], so the fused qkv kernel becomes
  MultiheadAttention's in_proj_weight)."""
  loading.load_flax_variables(model, variables, functools.partial(torch_key, num_hidden=num_hidden_layers(model)))
