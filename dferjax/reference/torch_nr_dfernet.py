"""PyTorch transcription of NR-DFERNet (plain torch, no torchvision), for parity tests against the flax model.

Written from the paper (Sec. 3, Eq. 1-7) and refs.md §1.4 / §1.1 rather than from dferjax/models/nr_dfernet.py,
so the two only meet in the logits. Module names follow the authors' code: `conv1` (two 3x3 convs), `bn1`,
`relu`, `maxpool`, `layer1..3`, the dynamic branch `d_branch`, the static `patch_embedding` and
`pos_embedding_static`, `temporal_pos_embedding` and `fc`. Tensors are NCHW, video `[batch, frames, 3, h, w]`.

`load_flax_variables(model, variables)` copies `NRDFERNet.init`'s variables into the torch module (strict).
"""
import re

import torch
from torch import nn

from dferjax.reference import loading, torch_stt
from dferjax.reference.torch_stt import BasicBlock  # torchvision's block, shared by the transcriptions

NEUTRAL = 2  # Happy, Sad, Neutral, ... (refs.md §2.5)


class Attention(nn.Module):
  """Former-DFER attention: qkv without bias, inner width heads * dim_head, out projection with bias."""

  def __init__(self, dim: int, heads: int, dim_head: int):
    super().__init__()
    self.heads = heads
    self.scale = dim_head**-0.5
    self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
    self.to_out = nn.Linear(heads * dim_head, dim)

  def forward(self, x):  # x: [n, tokens, dim]
    n, tokens, _ = x.shape
    # chunk(3) then 'b n (h d) -> b h n d' for each of q, k, v
    query, key, value = (t.reshape(n, tokens, self.heads, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, -1))
    weights = (query @ key.transpose(-1, -2) * self.scale).softmax(dim=-1)
    return self.to_out((weights @ value).transpose(1, 2).reshape(n, tokens, -1))


class FeedForward(nn.Module):

  def __init__(self, dim: int, hidden: int):
    super().__init__()
    # Former-DFER's own GELU class is the tanh form.
    self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate='tanh'), nn.Linear(hidden, dim))

  def forward(self, x):
    return self.net(x)


class TransformerLayer(nn.Module):
  """Pre-norm: x + Attn(LN(x)), then x + FF(LN(x)); LayerNorm eps 1e-5."""

  def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int):
    super().__init__()
    self.attn_norm = nn.LayerNorm(dim)
    self.attn = Attention(dim, heads, dim_head)
    self.ff_norm = nn.LayerNorm(dim)
    self.ff = FeedForward(dim, mlp_dim)

  def forward(self, x):
    x = x + self.attn(self.attn_norm(x))
    return x + self.ff(self.ff_norm(x))


class Transformer(nn.Module):
  """A stack of pre-norm layers with no final LayerNorm (lucidrains ViT, as Former-DFER)."""

  def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int):
    super().__init__()
    self.layers = nn.ModuleList(TransformerLayer(dim, heads, dim_head, mlp_dim) for _ in range(depth))

  def forward(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


def _reduce(size: int, times: int) -> int:
  for _ in range(times):
    size = (size - 1) // 2 + 1
  return size


def snippet_filter(sequence_logits, snippet_logits, mu1: float, mu2: float, neutral: int = NEUTRAL):
  """Eq. (7): some snippet with P_max > mu1 and P_neutral < mu2 zeroes the sequence's neutral probability,
  i.e. its logit becomes -inf. sequence_logits [b, C], snippet_logits [b, snippets, C] -> ([b, C], fired [b])."""
  probabilities = snippet_logits.softmax(dim=-1)
  fired = ((probabilities.max(dim=-1).values > mu1) & (probabilities[..., neutral] < mu2)).any(dim=1)
  filtered = sequence_logits.clone()
  filtered[fired, neutral] = float('-inf')
  return filtered, fired


class NRDFERNet(nn.Module):
  """Paper sizes are the defaults (T = 16 frames of 112 px, M = 2, N = 4, 4 heads of 32, L = 3, S = 2,
  mu1 = 0.7, mu2 = 0.05); `image_size` fixes the static position table and the temporal width."""

  def __init__(self, num_classes: int = 7, num_frames: int = 16, image_size: int = 112, stem_width: int = 64,
               num_dynamic_blocks: int = 3, num_spatial_layers: int = 2, num_temporal_layers: int = 4,
               heads: int = 4, dim_head: int = 32, spatial_mlp_dim: int = 256, temporal_mlp_dim: int = 512,
               snippet_length: int = 3, snippet_stride: int = 2, mu1: float = 0.7, mu2: float = 0.05):
    super().__init__()
    self.num_frames, self.snippet_length, self.snippet_stride = num_frames, snippet_length, snippet_stride
    self.mu1, self.mu2 = mu1, mu2
    w = stem_width
    # "three convolutional layers" (Sec. 3.2) = the authors' stem: conv1, then one basic block per stage.
    self.conv1 = nn.Sequential(nn.Conv2d(3, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                               nn.Conv2d(w, w, 3, 1, 1, bias=False))
    self.bn1 = nn.BatchNorm2d(w)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    self.layer1 = nn.Sequential(BasicBlock(w, w))
    self.layer2 = nn.Sequential(BasicBlock(w, 2 * w, 2))
    self.layer3 = nn.Sequential(BasicBlock(2 * w, 4 * w, 2))
    c = 4 * w
    # DSF (Sec. 3.3): dynamic branch of three 3x3 blocks, the first halving H and W; static Conv-D (Eq. 2).
    self.d_branch = nn.Sequential(*(BasicBlock(c, c, 2 if i == 0 else 1) for i in range(num_dynamic_blocks)))
    self.patch_embedding = nn.Sequential(nn.Conv2d(c, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c),
                                         nn.ReLU(inplace=True))
    # Five 3x3 / stride 2 / pad 1 reductions (conv1, maxpool, layer2, layer3, patch_embedding): 112 -> 4.
    height = width = _reduce(image_size, 5)
    self.pos_embedding_static = nn.Parameter(torch.randn(1, height * width, c))
    self.spatial_transformer = Transformer(c, num_spatial_layers, heads, dim_head, spatial_mlp_dim)
    dim = c * height * width  # C * H/2 * W/2 (Sec. 3.4)
    self.temporal_pos_embedding = nn.Parameter(torch.randn(1, num_frames, dim))  # DCT + T - 1 frame vectors
    self.temporal_transformer = Transformer(dim, num_temporal_layers, heads, dim_head, temporal_mlp_dim)
    self.fc = nn.Linear(dim, num_classes)
    torch_stt.init_like_torchvision(self)

  def stem(self, images):
    """[n, 3, h, w] -> primary feature maps F_i [n, 4 * stem_width, h/16, w/16]."""
    x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
    return self.layer3(self.layer2(self.layer1(x)))

  def snippet_starts(self, num_vectors: int) -> list[int]:
    """Eq. (6) over the T - 1 fused vectors: floor((T' - L) / S) + 1 windows of width L, stride S."""
    return list(range(0, num_vectors - self.snippet_length + 1, self.snippet_stride))

  def temporal(self, vectors):
    """[n, k, dim] -> the dynamic class token's output [n, dim]; the token is the mean of the k vectors (Eq. 5)."""
    tokens = torch.cat([vectors.mean(dim=1, keepdim=True), vectors], dim=1)
    tokens = tokens + self.temporal_pos_embedding[:, :tokens.shape[1]]
    return self.temporal_transformer(tokens)[:, 0]

  def forward(self, video):
    """video [b, T, 3, h, w] -> sequence logits [b, C] in training; in eval (filtered logits, sequence logits,
    snippet logits [b, N_s, C])."""
    b, t = video.shape[:2]
    maps = self.stem(video.flatten(0, 1)).unflatten(0, (b, t))
    dynamic = self.d_branch((maps[:, 1:] - maps[:, :-1]).flatten(0, 1))  # Eq. (1), then the dynamic branch
    static = self.patch_embedding(maps[:, :-1].flatten(0, 1))  # Eq. (2): the first T - 1 frames
    n, c, height, width = static.shape
    tokens = self.spatial_transformer(static.flatten(2).transpose(1, 2) + self.pos_embedding_static)  # Eq. (3)
    static = tokens.transpose(1, 2).reshape(n, c, height, width)
    vectors = (dynamic + static).reshape(b, t - 1, c * height * width)  # Eq. (4), flattened channel-major
    sequence_logits = self.fc(self.temporal(vectors))
    if self.training:
      return sequence_logits
    starts = self.snippet_starts(t - 1)
    snippets = torch.stack([vectors[:, s:s + self.snippet_length] for s in starts], dim=1)
    snippet_logits = self.fc(self.temporal(snippets.flatten(0, 1))).reshape(b, len(starts), -1)
    filtered, _ = snippet_filter(sequence_logits, snippet_logits, self.mu1, self.mu2)
    return filtered, sequence_logits, snippet_logits


# Flax names -> torch names of the torchvision-layout ResNet blocks and Former-DFER's pre-norm layers (Transformer
# above), and the leaf names; shared with the AEN transcription.
FORMER_DFER_RENAMES = (
    (r'(layer\d)_(\d+)/', r'\1/\2/'),
    (r'downsample_(\d)/', r'downsample/\1/'),
    (r'attention_norm/', 'attn_norm/'),
    (r'attention/qkv/', 'attn/to_qkv/'),
    (r'attention/proj/', 'attn/to_out/'),
    (r'mlp_norm/', 'ff_norm/'),
    (r'mlp/fc1/', 'ff/net/0/'),
    (r'mlp/fc2/', 'ff/net/2/'),
    (r'/(kernel|scale)$', '/weight'),
    (r'/mean$', '/running_mean'),
    (r'/var$', '/running_var'),
)

# Flax path (joined with '/') -> torch key, applied in order; module renames, then the shared ones.
_RENAMES = (
    (r'^stem/conv1_(\d)/', r'conv1/\1/'),
    (r'^stem/', ''),
    (r'^fusion/dynamic_(\d+)/', r'd_branch/\1/'),
    (r'^fusion/static_embed/', 'patch_embedding/0/'),
    (r'^fusion/static_embed_bn/', 'patch_embedding/1/'),
    (r'^fusion/static_pos_embed$', 'pos_embedding_static'),
    (r'^fusion/static_block_(\d+)/', r'spatial_transformer/layers/\1/'),
    (r'^temporal/block_(\d+)/', r'temporal_transformer/layers/\1/'),
    (r'^temporal/pos_embed$', 'temporal_pos_embedding'),
    (r'^head/', 'fc/'),
    *FORMER_DFER_RENAMES,
)


def torch_key(path: tuple[str, ...]) -> str:
  """('stem', 'layer2_0', 'downsample_1', 'mean') -> 'layer2.0.downsample.1.running_mean'."""
  key = '/'.join(path)
  for pattern, replacement in _RENAMES:
    key = re.sub(pattern, replacement, key)
  return key.replace('/', '.')


def load_flax_variables(model: NRDFERNet, variables) -> None:
  """Copies flax {'params', 'batch_stats'} into `model` in place. Every torch parameter and buffer (but
  num_batches_tracked) must be filled and every flax variable used, with matching shapes: conv HWIO -> OIHW,
  Dense [in, out] -> [out, in], position tables gain torch's leading 1."""
  loading.load_flax_variables(model, variables, torch_key)
