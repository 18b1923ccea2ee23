"""PyTorch transcription of EST (Liu et al., Pattern Recognition 2023), for parity tests against
dferjax/models/est.py.

Written from the paper (Sec. 3, Algorithm 1, Sec. 4.2, Fig. 7) and refs.md §1.7, not from the flax model, and
built from torch's own layers so that the two share no code: `nn.MultiheadAttention` for AA-SFE's frame
attention, `nn.Transformer` (post-norm, ReLU FFN, final LayerNorm on both stacks) for the snippet transformer.
The shuffle happens where the paper puts it, on the snippets of the input clip ("re-arrange the snippets
accordingly. The snippets with a shuffled order are later sent to the EST"), so the backbone sees the frames
in their shuffled order; only BatchNorm's batch statistics could notice, and they are order-free.

`load_flax_variables(model, variables)` copies flax variables into the torch module (strict, shape-checked).
"""
import math
import re

import torch
from torch import nn

from dferjax.reference import loading

from dferjax.data.sampling import EST_PERMUTATIONS
from dferjax.reference import torch_stt

SNIPPET_POSITIONS = ('slot', 'original')


def sinusoid_positions(length: int, dim: int) -> torch.Tensor:
  """Vaswani et al.'s table: even channels sin(pos / 10000^(2i/d)), odd channels the cosine of the same angle."""
  table = torch.zeros(length, dim, dtype=torch.float64)
  position = torch.arange(length, dtype=torch.float64)[:, None]
  frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
  table[:, 0::2] = torch.sin(position * frequency)
  table[:, 1::2] = torch.cos(position * frequency[:dim // 2])
  return table.float()


class AttentionSnippetFeatures(nn.Module):
  """AA-SFE: self-attention over a snippet's frames (Eq. 1) with the public code's LN(v + Dropout(attn)), then
  the cosine-similarity-weighted mean against the frames' max-pool (Eq. 2-3), weights clamped at 1e-8."""

  def __init__(self, dim: int, num_heads: int, dropout: float):
    super().__init__()
    self.attention = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
    self.dropout = nn.Dropout(dropout)
    self.norm = nn.LayerNorm(dim)
    self.cosine = nn.CosineSimilarity(dim=1, eps=1e-8)

  def forward(self, frames):
    """frames [m, J, d] -> snippet features [m, d]."""
    attended, _ = self.attention(frames, frames, frames, need_weights=False)
    out = self.norm(frames + self.dropout(attended))
    m, num_frames, dim = out.shape
    pooled = out.max(dim=1).values  # r-hat': max over the frames
    alpha = self.cosine(out.reshape(m * num_frames, dim), pooled.repeat_interleave(num_frames, dim=0))
    alpha = alpha.clamp(min=1e-8).reshape(m, num_frames, 1)
    return (alpha * out).sum(dim=1) / alpha.sum(dim=1)


class EST(nn.Module):
  """EST with the same fields as dferjax.models.est.EST (paper sizes by default).

  forward(video [b, frames, 3, h, w], permutation [b] long or None (= order 0)) -> (class logits, order logits);
  order logits are None without SSOP. Training: both from the shuffled clip. Evaluation: class logits from the
  clip in its own order (Sec. 4.2), order logits from the shuffled one.
  """

  def __init__(self, num_classes: int, num_frames: int = 35, num_snippets: int = 7, backbone_width: int = 64,
               num_heads: int = 4, num_encoder_layers: int = 3, num_decoder_layers: int = 3,
               hidden_dim: int = 2048, dropout_rate: float = 0.1, classifier_dims=(128, 64),
               classifier_dropout: float = 0.4, ssop: bool = True, snippet_positions: str = 'slot',
               order_head_dims=(2048, 512)):
    super().__init__()
    if num_frames % num_snippets:
      raise ValueError(f'num_frames={num_frames} is not a multiple of num_snippets={num_snippets}')
    if snippet_positions not in SNIPPET_POSITIONS:
      raise ValueError(f'snippet_positions={snippet_positions!r} not in {SNIPPET_POSITIONS}')
    self.num_snippets, self.frames_per_snippet = num_snippets, num_frames // num_snippets
    self.ssop, self.snippet_positions = ssop, snippet_positions
    self.backbone = torch_stt.ResNet(width=backbone_width, num_classes=None)  # full ResNet18, GAP
    dim = self.backbone.num_features
    self.snippet_features = AttentionSnippetFeatures(dim, num_heads, dropout_rate)
    self.register_buffer('position_table', sinusoid_positions(num_snippets, dim), persistent=False)  # frozen
    self.transformer = nn.Transformer(dim, num_heads, num_encoder_layers, num_decoder_layers, hidden_dim,
                                      dropout_rate, batch_first=True, norm_first=False)
    self.emotion_query = nn.Embedding(1, dim)  # N(0, 1), the decoder's one-token target
    classifier, width = [], dim
    for hidden in classifier_dims:
      classifier += [nn.Linear(width, hidden), nn.ReLU()]
      width = hidden
    self.classifier = nn.Sequential(*classifier, nn.Dropout(classifier_dropout), nn.Linear(width, num_classes))
    self.order_head = None
    if ssop:
      permutations = torch.tensor(EST_PERMUTATIONS, dtype=torch.long)
      if permutations.shape[1] != num_snippets:
        raise ValueError(f'SSOP permutes {permutations.shape[1]} snippets, the model has {num_snippets}')
      self.register_buffer('permutations', permutations, persistent=False)
      head, width = [], num_snippets * dim
      for hidden in order_head_dims:
        head += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
        width = hidden
      self.order_head = nn.Sequential(*head, nn.Linear(width, len(EST_PERMUTATIONS)))

  def snippets(self, clips):
    """clips [b, n, J, 3, h, w] -> R [b, n, d]: ResNet18 + GAP per frame, AA-SFE per snippet."""
    b, n, num_frames = clips.shape[:3]
    frames = self.backbone.features(clips.flatten(0, 2), pool=True)
    return self.snippet_features(frames.reshape(b * n, num_frames, -1)).reshape(b, n, -1)

  def emotion(self, snippets, positions):
    """R [b, n, d] + sinusoid rows `positions` [b, n] -> encoder; one learned query -> decoder -> T [b, d]."""
    b, _, dim = snippets.shape
    query = self.emotion_query.weight.expand(b, 1, dim)
    return self.transformer(snippets + self.position_table[positions], query)[:, 0]

  def forward(self, video, permutation=None):
    b = video.shape[0]
    clips = video.reshape(b, self.num_snippets, self.frames_per_snippet, *video.shape[2:])
    in_order = torch.arange(self.num_snippets, device=video.device).expand(b, -1)
    if not self.ssop:
      return self.classifier(self.emotion(self.snippets(clips), in_order)), None
    if permutation is None:
      permutation = torch.zeros(b, dtype=torch.long, device=video.device)
    order = self.permutations[permutation]  # [b, n]: slot j holds snippet order[j]
    shuffled = self.snippets(clips[torch.arange(b, device=video.device)[:, None], order])
    emotion = self.emotion(shuffled, in_order if self.snippet_positions == 'slot' else order)
    order_logits = self.order_head((shuffled.detach() + emotion[:, None]).flatten(1))  # Algorithm 1, lines 3-5
    if not self.training:
      emotion = self.emotion(self.snippets(clips), in_order)
    return self.classifier(emotion), order_logits


_LEAVES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}


def _attention_key(prefix: str, projection: str, leaf: str) -> str:
  """Flax fused `qkv` / `proj` -> nn.MultiheadAttention's in_proj_{weight,bias} / out_proj."""
  if projection == 'qkv':
    return f'{prefix}.in_proj_{_LEAVES[leaf]}'
  if projection == 'proj':
    return f'{prefix}.out_proj.{_LEAVES[leaf]}'
  raise KeyError(projection)


def _layer_key(prefix: str, stack: str, rest: tuple[str, ...]) -> str:
  """One flax encoder_i / decoder_i subtree path -> its nn.TransformerEncoderLayer / DecoderLayer key."""
  leaf = _LEAVES.get(rest[-1], rest[-1])
  last_norm = 'norm2' if stack == 'encoder' else 'norm3'
  match rest:
    case ('self_attention', 'attention', projection, name):
      return _attention_key(f'{prefix}.self_attn', projection, name)
    case ('self_attention', 'norm', _):
      return f'{prefix}.norm1.{leaf}'
    case ('cross_attention', projection, name) if stack == 'decoder':
      return _attention_key(f'{prefix}.multihead_attn', projection, name)
    case ('cross_attention_norm', _) if stack == 'decoder':
      return f'{prefix}.norm2.{leaf}'
    case ('feed_forward', 'fc1' | 'fc2' as fc, _):
      return f'{prefix}.linear{fc[-1]}.{leaf}'
    case ('feed_forward_norm', _):
      return f'{prefix}.{last_norm}.{leaf}'
  raise KeyError('/'.join(rest))


def _head_key(model: EST, head: str, name: str, leaf: str) -> str:
  """classifier / order_head fc{k}, bn{k}, out -> index into the torch Sequential (k-th Linear / BatchNorm1d)."""
  sequential = getattr(model, head)
  linears = [i for i, m in enumerate(sequential) if isinstance(m, nn.Linear)]
  norms = [i for i, m in enumerate(sequential) if isinstance(m, nn.BatchNorm1d)]
  if name == 'out':
    index = linears[-1]
  elif match := re.fullmatch(r'(fc|bn)(\d+)', name):
    candidates = linears[:-1] if match[1] == 'fc' else norms
    if int(match[2]) > len(candidates):
      raise KeyError(name)
    index = candidates[int(match[2]) - 1]
  else:
    raise KeyError(name)
  return f'{head}.{index}.{_LEAVES[leaf]}'


def torch_key(model: EST, path: tuple[str, ...]) -> str:
  """Flax variable path -> torch state_dict key; KeyError for a path the torch model has no place for."""
  match path:
    case ('backbone', *_):
      return torch_stt.torch_key(path)
    case ('snippet_features', 'attention', 'attention', projection, leaf):
      return _attention_key('snippet_features.attention', projection, leaf)
    case ('snippet_features', 'attention', 'norm', leaf):
      return f'snippet_features.norm.{_LEAVES[leaf]}'
    case ('transformer', 'emotion_query'):
      return 'emotion_query.weight'
    case ('transformer', 'encoder_norm' | 'decoder_norm' as norm, leaf):
      return f'transformer.{norm.split("_")[0]}.norm.{_LEAVES[leaf]}'
    case ('transformer', layer, *rest) if re.fullmatch(r'(encoder|decoder)_\d+', layer) and rest:
      stack, index = layer.split('_')
      return _layer_key(f'transformer.{stack}.layers.{index}', stack, tuple(rest))
    case ('classifier' | 'order_head' as head, name, leaf) if getattr(model, head) is not None:
      return _head_key(model, head, name, leaf)
  raise KeyError('/'.join(path))


def load_flax_variables(model: EST, variables) -> None:
  """Copies flax {'params', 'batch_stats'} into `model` in place; every torch tensor must be filled once, with
  exactly its shape: conv HWIO -> OIHW, Dense and the fused in-projection [in, out] -> [out, in], the emotion
  query [d] -> nn.Embedding's [1, d]."""
  loading.load_flax_variables(model, variables, lambda path: torch_key(model, path))
