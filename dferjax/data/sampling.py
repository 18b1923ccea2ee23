"""Which frames of a clip a model sees: pure numpy, no I/O.

Two samplers, as in the papers' public loaders (refs.md §1.0, §1.6):
- `SegmentSampler`: the "dynamic sampling" of Former-DFER/STT/NR-DFERNet/AEN: S segments of T consecutive
  frames (8 x 2 = 16), random segment starts for training, centred starts for testing.
- `SnippetSampler`: CEFLNet/EST: the clip mapped to 105 frames, a 75-frame window, 7 overlapping snippets of
  15 frames, 5 frames from each (35 frames).
Both return frame indices into the clip, in the order the model sees them.
"""
import dataclasses

import numpy as np

from dferjax import configlib

SHORT_CLIP_FALLBACKS = ('zeros', 'edge')


def _check_num_frames(num_frames: int):
  if num_frames < 1:
    raise ValueError(f'a clip needs at least one frame, got num_frames={num_frames}')


def _short_clip_starts(num_frames, num_segments, short_clip_fallback):
  """Segment starts for a clip too short for the normal rule: [num_segments]."""
  if short_clip_fallback == 'zeros':  # Former-DFER/STT/NR-DFERNet/AEN: every segment starts at frame 0
    return np.zeros(num_segments, np.int64)
  if short_clip_fallback == 'edge':
    # DFER-CLIP: np.pad(arange(n), (0, S - n), 'edge'). For S < n <= S + T - 1 (test mode only) its pad
    # width is negative and numpy raises; we take the first S starts there.
    starts = np.arange(min(num_frames, num_segments))
    return np.pad(starts, (0, num_segments - len(starts)), mode='edge').astype(np.int64)
  raise ValueError(f'short_clip_fallback={short_clip_fallback!r} not in {SHORT_CLIP_FALLBACKS}')


def segment_starts_train(num_frames: int, num_segments: int, frames_per_segment: int,
                         rng: np.random.Generator, short_clip_fallback: str = 'zeros') -> np.ndarray:
  """Random segment starts, Former-DFER `_get_train_indices`: [num_segments] int64."""
  _check_num_frames(num_frames)
  average_duration = (num_frames - frames_per_segment + 1) // num_segments
  if average_duration > 0:  # one uniform start inside each of S equal parts
    return np.arange(num_segments) * average_duration + rng.integers(average_duration, size=num_segments)
  if num_frames > num_segments:  # parts shorter than one frame: S sorted uniform starts
    if num_frames < frames_per_segment:
      raise ValueError(f'num_frames={num_frames} > num_segments={num_segments} but < frames_per_segment='
                       f'{frames_per_segment}: the loaders\' randint(n - T + 1) has no valid start')
    return np.sort(rng.integers(num_frames - frames_per_segment + 1, size=num_segments))
  return _short_clip_starts(num_frames, num_segments, short_clip_fallback)


def segment_starts_test(num_frames: int, num_segments: int, frames_per_segment: int,
                        short_clip_fallback: str = 'zeros') -> np.ndarray:
  """Centred segment starts, Former-DFER `_get_test_indices`: [num_segments] int64."""
  _check_num_frames(num_frames)
  if num_frames > num_segments + frames_per_segment - 1:
    tick = (num_frames - frames_per_segment + 1) / float(num_segments)
    return np.array([int(tick / 2.0 + tick * x) for x in range(num_segments)], np.int64)
  return _short_clip_starts(num_frames, num_segments, short_clip_fallback)


def read_segments(starts: np.ndarray, frames_per_segment: int, num_frames: int) -> np.ndarray:
  """Frame indices read from each start: [len(starts) * frames_per_segment], segment-major.

  The loaders step `p += 1` only while `p < num_frames - 1`, so a segment at the clip's end repeats the
  last frame instead of running past it: p = min(start + i, num_frames - 1), since every start rule
  above gives start <= num_frames - 1.
  """
  steps = np.arange(frames_per_segment)
  return np.minimum(np.asarray(starts, np.int64)[:, None] + steps, num_frames - 1).reshape(-1)


@dataclasses.dataclass(frozen=True)
class SegmentSampler:
  """S segments x T consecutive frames (STT: S=8, T=2; NR-DFERNet: U=8, V=2; AEN: 16 = 8 x 2)."""
  num_segments: int = 8
  frames_per_segment: int = 2  # `duration` in the PyTorch loaders
  short_clip_fallback: str = 'zeros'  # the papers'; 'edge' = DFER-CLIP's

  def __post_init__(self):
    if self.num_segments < 1 or self.frames_per_segment < 1:
      raise ValueError(f'num_segments={self.num_segments} and frames_per_segment='
                       f'{self.frames_per_segment} must be >= 1')
    if self.short_clip_fallback not in SHORT_CLIP_FALLBACKS:
      raise ValueError(f'short_clip_fallback={self.short_clip_fallback!r} not in {SHORT_CLIP_FALLBACKS}')

  @property
  def num_output_frames(self) -> int:
    return self.num_segments * self.frames_per_segment

  def __call__(self, num_frames: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Frame indices [num_segments * frames_per_segment]; rng=None means test mode (deterministic)."""
    if rng is None:
      starts = segment_starts_test(num_frames, self.num_segments, self.frames_per_segment,
                                   self.short_clip_fallback)
    else:
      starts = segment_starts_train(num_frames, self.num_segments, self.frames_per_segment, rng,
                                    self.short_clip_fallback)
    return read_segments(starts, self.frames_per_segment, num_frames)


def resample_nearest(num_frames: int, length: int) -> np.ndarray:
  """Nearest-index map of a clip of `num_frames` onto `length` frames: [length] int64.

  CEFLNet/EST read videos "pre-normalised to 105 frames" by a conversion script that is not public; we use
  pixel-centre nearest resampling, index = floor((i + 0.5) * num_frames / length): the identity when
  num_frames == length, evenly spaced frames when longer, evenly repeated frames when shorter.
  """
  _check_num_frames(num_frames)
  return np.minimum(((np.arange(length) + 0.5) * num_frames / length).astype(np.int64), num_frames - 1)


@dataclasses.dataclass(frozen=True)
class SnippetSampler:
  """CEFLNet/EST: 7 snippets x 5 frames from a 75-frame window of the clip resampled to 105 frames.

  Train: window start uniform in 0..29, 5 distinct uniform positions in each 15-frame snippet, sorted
  (the original draws them into a Python `set` and lists it; the language leaves that order unspecified,
  CPython lists five ints below 15 in ascending order). Test: start 15, positions 0, 3, 6, 9, 12.
  """
  num_snippets: int = 7
  snippet_span: int = 15  # `each_clips`: frames a snippet covers
  snippet_stride: int = 10  # `next_jump`: snippets overlap by span - stride = 5 frames
  frames_per_snippet: int = 5  # `choose_num`
  resampled_length: int = 105
  num_window_starts: int = 30  # `first_clips_number`: train start uniform in 0..29
  test_window_start: int = 15  # `test_first`

  def __post_init__(self):
    window_end = self.num_window_starts - 1 + self.window_length
    if self.frames_per_snippet > self.snippet_span or window_end > self.resampled_length or \
        self.test_window_start + self.window_length > self.resampled_length:
      raise ValueError(f'{self}: snippets do not fit in {self.resampled_length} resampled frames')

  @property
  def window_length(self) -> int:  # 75
    return (self.num_snippets - 1) * self.snippet_stride + self.snippet_span

  @property
  def num_output_frames(self) -> int:
    return self.num_snippets * self.frames_per_snippet

  @property
  def test_positions(self) -> np.ndarray:  # range(0, 15, 15 // 5) = [0, 3, 6, 9, 12]
    return np.arange(0, self.snippet_span, self.snippet_span // self.frames_per_snippet)[
        :self.frames_per_snippet]

  def __call__(self, num_frames: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Frame indices [num_snippets * frames_per_snippet], snippet-major; rng=None means test mode."""
    resampled = resample_nearest(num_frames, self.resampled_length)
    if rng is None:
      window_start = self.test_window_start
      positions = np.tile(self.test_positions, (self.num_snippets, 1))
    else:
      window_start = int(rng.integers(self.num_window_starts))
      positions = np.stack([np.sort(rng.choice(self.snippet_span, self.frames_per_snippet, replace=False))
                            for _ in range(self.num_snippets)])
    snippet_starts = window_start + np.arange(self.num_snippets) * self.snippet_stride
    return resampled[(snippet_starts[:, None] + positions).reshape(-1)]


SAMPLERS = {'segments': SegmentSampler, 'snippets': SnippetSampler}

# EST's 10 fixed orders of 7 snippets (its datasets/permutation_10.npy, refs.md §1.7): slot j of a shuffled clip
# holds snippet EST_PERMUTATIONS[k][j].
EST_PERMUTATIONS = ((0, 4, 3, 2, 6, 1, 5), (5, 3, 1, 6, 4, 0, 2), (0, 4, 3, 5, 2, 6, 1), (5, 4, 3, 2, 1, 0, 6),
                    (5, 1, 2, 4, 0, 6, 3), (0, 5, 2, 6, 4, 1, 3), (3, 1, 5, 0, 6, 2, 4), (2, 3, 0, 4, 1, 6, 5),
                    (5, 0, 4, 1, 3, 2, 6), (0, 3, 2, 6, 4, 5, 1))


def make_sampler(spec) -> SegmentSampler | SnippetSampler:
  """A sampler from an instance, a name in SAMPLERS (default fields), or a mapping `{name, **fields}`
  such as `config.input.sampler`; unknown names and fields fail naming the valid ones."""
  if isinstance(spec, (SegmentSampler, SnippetSampler)):
    return spec
  return configlib.from_registry({'name': spec} if isinstance(spec, str) else spec, SAMPLERS,
                                 'config.input.sampler', 'sampler')
