"""Frame samplers against plain transcriptions of the PyTorch loaders' loops (same generator draws)."""
import numpy as np
import pytest

from dferjax.data import sampling

# n < S, n == S, S < n < S + T - 1, the boundaries around it, short and long clips.
NUM_FRAMES = list(range(1, 70)) + [100, 105, 150, 333, 1000]
SEGMENT_SHAPES = [(8, 2), (16, 1), (8, 3), (4, 5)]


def loader_train_offsets(n, S, T, rng, fallback):
  """Former-DFER `_get_train_indices` (DFER-CLIP's np.pad for fallback='edge'), transcribed."""
  average_duration = (n - T + 1) // S
  if average_duration > 0:
    return np.multiply(list(range(S)), average_duration) + rng.integers(average_duration, size=S)
  elif n > S:
    return np.sort(rng.integers(n - T + 1, size=S))
  elif fallback == 'zeros':
    return np.zeros((S,))
  return np.pad(np.array(list(range(n))), (0, S - n), 'edge')


def loader_test_offsets(n, S, T, fallback):
  if n > S + T - 1:
    tick = (n - T + 1) / float(S)
    return np.array([int(tick / 2.0 + tick * x) for x in range(S)])
  elif fallback == 'zeros':
    return np.zeros((S,))
  return np.pad(np.array(list(range(n))), (0, max(S - n, 0)), 'edge')[:S]  # DFER-CLIP fails for S < n


def loader_read(offsets, T, n):
  """The loaders' `get`: T frames from each offset, `p += 1` only while p < n - 1."""
  indices = []
  for seg_ind in offsets:
    p = int(seg_ind)
    for _ in range(T):
      indices.append(p)
      if p < n - 1:
        p += 1
  return np.array(indices)


@pytest.mark.parametrize('fallback', ['zeros', 'edge'])
@pytest.mark.parametrize('S,T', SEGMENT_SHAPES)
def test_segment_sampler_matches_loader(S, T, fallback):
  sampler = sampling.SegmentSampler(S, T, fallback)
  for n in NUM_FRAMES:
    if S < n < T:  # the loaders' randint(n - T + 1) has no valid value: we raise instead
      with pytest.raises(ValueError, match='no valid start'):
        sampler(n, np.random.default_rng(0))
      continue
    for seed in range(3):
      want = loader_read(loader_train_offsets(n, S, T, np.random.default_rng(seed), fallback), T, n)
      got = sampler(n, np.random.default_rng(seed))
      np.testing.assert_array_equal(got, want, err_msg=f'train n={n} seed={seed}')
    want = loader_read(loader_test_offsets(n, S, T, fallback), T, n)
    np.testing.assert_array_equal(sampler(n), want, err_msg=f'test n={n}')


@pytest.mark.parametrize('S,T', SEGMENT_SHAPES)
def test_segment_sampler_properties(S, T):
  sampler = sampling.SegmentSampler(S, T)
  rng = np.random.default_rng(1)
  for n in NUM_FRAMES:
    if S < n < T:
      continue
    for index in (sampler(n, rng), sampler(n)):
      assert index.shape == (S * T,) and index.dtype == np.int64
      assert index.min() >= 0 and index.max() <= n - 1
      segments = index.reshape(S, T)
      assert (np.diff(segments, axis=1) >= 0).all()  # consecutive frames within a segment
      assert (np.diff(segments[:, 0]) >= 0).all()  # segments in time order
    np.testing.assert_array_equal(sampler(n), sampler(n))  # test mode is deterministic
    if n >= S * T:  # long enough: segments are distinct consecutive runs
      assert (np.diff(sampler(n, rng).reshape(S, T), axis=1) == 1).all()


def test_segment_sampler_covers_each_part_uniformly():
  # n = 40, S = 8, T = 2: average_duration 4, segment s starts uniformly in 4s..4s+3.
  sampler = sampling.SegmentSampler(8, 2)
  rng = np.random.default_rng(0)
  starts = np.stack([sampler(40, rng)[::2] for _ in range(4000)])
  counts = np.stack([np.bincount(starts[:, s] - 4 * s, minlength=4) for s in range(8)])
  assert counts.shape == (8, 4)
  np.testing.assert_allclose(counts / 4000, 0.25, atol=0.03)


def test_segment_sampler_rejects_bad_input():
  with pytest.raises(ValueError, match='at least one frame'):
    sampling.SegmentSampler()(0)
  with pytest.raises(ValueError, match='short_clip_fallback'):
    sampling.SegmentSampler(short_clip_fallback='repeat')
  with pytest.raises(ValueError, match="'segments', 'snippets'"):
    sampling.make_sampler('uniform')


def test_edge_fallback_matches_dfer_clip():
  # 5 frames, 8 x 2: DFER-CLIP's starts [0 1 2 3 4 4 4 4], each read for 2 frames with the end clamp.
  got = sampling.SegmentSampler(8, 2, 'edge')(5, np.random.default_rng(0))
  np.testing.assert_array_equal(got, [0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4, 4])
  np.testing.assert_array_equal(sampling.SegmentSampler(8, 2, 'zeros')(5), [0, 1] * 8)


def loader_snippets(resampled, rng):
  """CEFLNet/EST NewDataset.__getitem__ on a 105-frame list, transcribed (sorted random positions)."""
  first = 15 if rng is None else int(rng.integers(30))
  sub = resampled[first:first + 75]
  out, cur = [], 0
  for _ in range(7):
    frames_tmp = sub[cur:cur + 15]
    if rng is None:
      positions = list(range(0, 15, 15 // 5))
    else:
      positions = sorted(rng.choice(15, 5, replace=False))
    out.extend(frames_tmp[p] for p in positions)
    cur += 10
  return np.array(out)


@pytest.mark.parametrize('n', [1, 7, 35, 104, 105, 106, 150, 210, 1000])
def test_snippet_sampler_matches_loader(n):
  sampler = sampling.SnippetSampler()
  resampled = [int(np.floor((i + 0.5) * n / 105)) for i in range(105)]  # documented nearest map
  for seed in range(5):
    got = sampler(n, np.random.default_rng(seed))
    np.testing.assert_array_equal(got, loader_snippets(resampled, np.random.default_rng(seed)))
    assert got.shape == (35,) and got.min() >= 0 and got.max() <= n - 1
    assert (np.diff(got.reshape(7, 5), axis=1) >= 0).all()
  np.testing.assert_array_equal(sampler(n), loader_snippets(resampled, None))


def test_snippet_sampler_on_105_frames():
  sampler = sampling.SnippetSampler()
  np.testing.assert_array_equal(sampling.resample_nearest(105, 105), np.arange(105))
  # Test: start 15, snippets at 15, 25, ..., 75, positions 0, 3, 6, 9, 12.
  want = (15 + 10 * np.arange(7)[:, None] + np.array([0, 3, 6, 9, 12])).ravel()
  np.testing.assert_array_equal(sampler(105), want)
  # Train: window starts cover 0..29, each snippet has 5 distinct frames of its 15.
  rng = np.random.default_rng(0)
  draws = np.stack([sampler(105, rng).reshape(7, 5) for _ in range(600)])
  assert all(len(set(snippet)) == 5 for snippet in draws.reshape(-1, 5))
  window_starts = draws[:, 0].min(axis=1)  # first snippet's earliest frame >= window start
  assert window_starts.min() == 0 and window_starts.max() <= 29 + 10
  spans = draws.reshape(600, 7, 5)
  assert (spans.max(axis=2) - spans.min(axis=2) <= 14).all()
  np.testing.assert_array_equal(np.diff(sampling.resample_nearest(210, 105)), 2)
  np.testing.assert_array_equal(sampling.resample_nearest(35, 105), np.repeat(np.arange(35), 3))
