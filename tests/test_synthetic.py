"""The synthetic generator: real on-disk layouts, determinism, expressions whose direction in time matters (the
default motion set) and an order-free set whose classes differ in the set of frames."""
import csv
import pathlib
import re

import cv2
import numpy as np
import pytest

from dferjax.data import synthetic


def _tree(root: pathlib.Path) -> dict[str, bytes]:
  return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def dfew_tree(tmp_path_factory):
  root = tmp_path_factory.mktemp('dfew')
  clips = synthetic.write_dfew(root, clips_per_class=4, seed=0)
  return root, clips


def test_dfew_layout_frames_and_csvs(dfew_tree):
  root, clips = dfew_tree
  assert len(clips) == 28
  clip_dirs = sorted((root / 'Clip' / 'clip_224x224').iterdir())
  assert [d.name for d in clip_dirs] == [f'{i:05d}' for i in range(1, 29)]
  lengths = []
  for clip, clip_dir in zip(clips, clip_dirs):
    names = sorted(p.name for p in clip_dir.iterdir())
    assert names == [f'{clip_dir.name}_{i:05d}.jpg' for i in range(1, len(names) + 1)]  # frames from 00001
    assert clip['clip_id'] == clip_dir.name and clip['num_frames'] == len(names)
    lengths.append(len(names))
  assert cv2.imread(str(clip_dirs[0] / f'{clip_dirs[0].name}_00001.jpg')).shape == (224, 224, 3)
  assert min(lengths) >= 8 and max(lengths) <= 48
  assert any(n < 16 for n in lengths) and sum(n >= 16 for n in lengths) > len(lengths) / 2  # short-clip fallback
  by_id = {int(c['clip_id']): c for c in clips}
  tests = []
  for fold in range(1, 6):
    rows = {}
    for split in ('train', 'test'):
      path = root / 'EmoLabel_DataSplit' / f'{split}(single-labeled)' / f'set_{fold}.csv'
      lines = path.read_text().splitlines()
      assert lines[0] == 'video_name,label'
      assert all(re.fullmatch(r'[1-9]\d*,[1-7]', line) for line in lines[1:])  # no zero padding, labels 1..7
      rows[split] = {int(v): int(label) for v, label in csv.reader(lines[1:])}
      assert all(by_id[v]['label'] == label - 1 for v, label in rows[split].items())
    assert not rows['train'].keys() & rows['test'].keys()
    assert rows['train'].keys() | rows['test'].keys() == by_id.keys()
    tests.append(set(rows['test']))
  assert sum(map(len, tests)) == len(clips) and set().union(*tests) == set(by_id)  # 5 disjoint folds, all clips
  for label in range(7):  # stratified: each class spread over the folds within one clip
    per_fold = [sum(by_id[v]['label'] == label for v in test) for test in tests]
    assert max(per_fold) - min(per_fold) <= 1


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
  for name, seed, workers in (('a', 3, 1), ('b', 3, 3), ('c', 4, 1)):  # 'b' on threads: the same files
    synthetic.write_dfew(tmp_path / name, 1, seed=seed, workers=workers)
  first, second, other = (_tree(tmp_path / name) for name in 'abc')
  assert first == second
  frames = [name for name in first if name.endswith('.jpg')]
  assert len(frames) > 50
  assert sum(first[name] != other.get(name) for name in frames) > 0.9 * len(frames)


@pytest.mark.parametrize('forward, backward', synthetic.TIME_REVERSED_PAIRS)
def test_pairs_are_time_reverses(forward, backward):
  t = np.linspace(0, 1, 23)
  onset, offset, amplitude = 0.2, 0.8, 0.9
  reversed_forward = synthetic.expression(forward, 1 - t, amplitude, 1 - offset, 1 - onset)
  backward_params = synthetic.expression(backward, t, amplitude, onset, offset)
  for name in synthetic.NEUTRAL:
    np.testing.assert_allclose(backward_params[name], reversed_forward[name], atol=1e-12)
  moving = [name for name in synthetic.NEUTRAL if np.ptp(backward_params[name]) > 0.5]
  assert moving  # the pair differs by motion, not by a static expression


def test_default_motion_set_is_unchanged():
  """The default classes as first written: the default demos' data stays byte-identical (same draws, same
  parameters), and asking for 'time_reversed' by name is the default."""
  assert synthetic.MOTIONS == {
      'happy': {'smile': (0.0, 1.0)},
      'sad': {'smile': (1.0, 0.0)},
      'neutral': {},
      'angry': {'brow_frown': (0.0, 1.0), 'eye_open': (1.0, 0.75)},
      'surprise': {'mouth_open': (0.0, 1.0), 'brow_raise': (0.0, 1.0), 'eye_open': (1.0, 1.35)},
      'disgust': {'smile': (0.0, -1.0), 'eye_open': (1.0, 0.45)},
      'fear': {'mouth_open': (1.0, 0.0), 'brow_raise': (1.0, 0.0), 'eye_open': (1.35, 1.0)},
  }
  assert synthetic.MOTION_SETS['time_reversed'] is synthetic.MOTIONS
  default, _, _ = synthetic.render_clip('fear', 6, synthetic.clip_rng(0, 't', 't', 6, 0), size=48)
  named, _, _ = synthetic.render_clip('fear', 6, synthetic.clip_rng(0, 't', 't', 6, 0), size=48,
                                      motions='time_reversed')
  np.testing.assert_array_equal(default, named)


def _frame_multiset(class_name, motions):
  """The expression parameters over a clip with time order discarded: [parameter, sorted values]."""
  params = synthetic.expression(class_name, np.linspace(0, 1, 101), motions=motions)
  return np.stack([np.sort(params[name]) for name in synthetic.NEUTRAL])


def _multiset_distance(first, second, motions):
  """Largest mean gap between two classes' sorted values of one parameter: 0 iff one is the other's reorder."""
  return np.abs(_frame_multiset(first, motions) - _frame_multiset(second, motions)).mean(axis=1).max()


def test_order_free_classes_differ_in_their_set_of_frames():
  """No pair of 'order_free' classes is a reorder of the other's frames (by a margin of 0.15, a sixth of a full
  move), whereas the default set's pairs are exactly that; sad and fear are the only classes that changed."""
  for first, second in synthetic.TIME_REVERSED_PAIRS:
    assert _multiset_distance(first, second, 'time_reversed') < 1e-12  # what the measure is there to catch
  names = synthetic.CLASS_NAMES
  gaps = {(a, b): _multiset_distance(a, b, 'order_free') for i, a in enumerate(names) for b in names[i + 1:]}
  assert min(gaps.values()) > 0.15, sorted(gaps.items(), key=lambda item: item[1])[:3]
  changed = {name for name in names if synthetic.ORDER_FREE_MOTIONS[name] != synthetic.MOTIONS[name]}
  assert changed == {'sad', 'fear'}
  with pytest.raises(ValueError, match=r"motions='reversed' not in \['order_free', 'time_reversed'\]"):
    synthetic.write_dfew('/nonexistent', 1, motions='reversed')


def test_order_free_cues_survive_the_demo_frame_size():
  """At the demo's 48 px, the last frame of sad and fear (after the move) differs from that of neutral and of
  their nearest classes drawn with the same face, colours, timing, jitter and noise (only the motion differs)."""
  def last_frame(name, index):
    frames, _, _ = synthetic.render_clip(name, 12, synthetic.clip_rng(0, 't', 't', 0, index), motions='order_free')
    return cv2.resize(frames[-1], (48, 48), interpolation=cv2.INTER_AREA).astype(np.float64)

  for index in range(2):
    for name, other in (('sad', 'neutral'), ('sad', 'disgust'), ('fear', 'neutral'), ('fear', 'angry'),
                        ('fear', 'surprise')):
      gap = np.abs(last_frame(name, index) - last_frame(other, index)).mean()
      assert gap > 2.0, (name, other, index, gap)  # measured 3.5-9.3 (grey levels, mean over the frame)


def test_ensure_built_refuses_a_folder_of_the_other_motion_set(tmp_path):
  manual = tmp_path / 'manual' / 'synthetic_dfew'
  manual.mkdir(parents=True)
  (manual / 'synthetic.json').write_text('{"clips_per_class": 40, "seed": 0}')  # written before `motions`
  with pytest.raises(ValueError, match=r"written with .*'motions': 'time_reversed'.* asks for .*'order_free'"):
    synthetic.ensure_built('dfew/fold1_px32', str(tmp_path), motions='order_free')


def _mouth_pixels(frames, style, colour_test):
  """Per frame: how many pixels of the mouth region pass colour_test (dark interior or white teeth)."""
  cx, cy = style.center
  radius = style.radius
  top, bottom = int(cy + 0.3 * radius), int(cy + 1.1 * radius)
  left, right = int(cx - 0.7 * radius), int(cx + 0.7 * radius)
  return np.array([colour_test(frame[top:bottom, left:right]).sum() for frame in frames])


@pytest.mark.parametrize('forward, backward, colour_test', [
    ('surprise', 'fear', lambda region: (region < 60).all(axis=-1)),  # dark open mouth
    ('happy', 'sad', lambda region: (region > 225).all(axis=-1)),  # teeth of the grin
])
def test_rendered_motion_direction(forward, backward, colour_test):
  """The mouth opening measured on the pixels grows for one class of a pair and shrinks for the other."""
  for index in range(3):
    frames, _, style = synthetic.render_clip(forward, 20, synthetic.clip_rng(0, 't', 't', 0, index))
    grows = _mouth_pixels(frames, style, colour_test)
    frames, _, style = synthetic.render_clip(backward, 20, synthetic.clip_rng(0, 't', 't', 1, index))
    shrinks = _mouth_pixels(frames, style, colour_test)
    assert grows[-3:].mean() > grows[:3].mean() + 100, grows
    assert shrinks[:3].mean() > shrinks[-3:].mean() + 100, shrinks
  frames, _, style = synthetic.render_clip('neutral', 20, synthetic.clip_rng(0, 't', 't', 2, 0))
  assert _mouth_pixels(frames, style, colour_test).max() < 30  # neutral barely moves


def test_afew_layout(tmp_path):
  clips = synthetic.write_afew(tmp_path, clips_per_class=1, seed=0, val_clips_per_class=1)
  assert len(clips) == 14
  for clip in clips:
    split, emotion, video = clip['clip_id'].split('/')
    assert emotion in ('Angry', 'Disgust', 'Fear', 'Happy', 'Neutral', 'Sad', 'Surprise')
    assert re.fullmatch(r'\d{9}', video)
    folder = tmp_path / f'{split}_AFEW' / emotion / video
    assert sorted(p.name for p in folder.iterdir()) == [f'{i:05d}.jpg' for i in range(1, clip['num_frames'] + 1)]
  assert {c['clip_id'].split('/')[0] for c in clips} == {'Train', 'Val'}


def test_ferv39k_layout(tmp_path):
  clips = synthetic.write_ferv39k(tmp_path, clips_per_class=2, seed=0, test_clips_per_class=1)
  setups = tmp_path / '4_setups' / 'All_scenes'
  listed = {}
  for split, count in (('train', 14), ('test', 7)):
    lines = (setups / f'{split}_All.csv').read_text().splitlines()
    assert len(lines) == count
    for line in lines:
      path, emotion = line.split(' ')
      scene, folder_emotion, number = path.split('/')
      assert scene in synthetic.FERV39K_SCENES and folder_emotion == emotion and re.fullmatch(r'\d{4}', number)
      listed[path] = split
  assert listed == {c['clip_id']: c['split'] for c in clips}
  for clip in clips:
    assert len(list((tmp_path / '2_ClipsforFaceCrop' / clip['clip_id']).glob('*.jpg'))) == clip['num_frames']


def test_cli(tmp_path, capsys):
  synthetic.main(['--out', str(tmp_path / 'afew'), '--layout', 'afew', '--clips-per-class', '1', '--seed', '1'])
  assert 'wrote 14 afew clips' in capsys.readouterr().out
  synthetic.main(['--out', str(tmp_path / 'free'), '--layout', 'afew', '--clips-per-class', '1', '--motions',
                  'order_free'])
  assert 'order_free motions' in capsys.readouterr().out
  assert (tmp_path / 'afew' / 'Val_AFEW' / 'Fear').is_dir()
  with pytest.raises(SystemExit):  # refuses to mix two runs in one directory
    synthetic.main(['--out', str(tmp_path / 'afew'), '--layout', 'afew', '--clips-per-class', '1'])
