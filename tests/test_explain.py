"""dferjax.explain: integrated gradients against their closed forms (exact where the midpoint rule is, the rule's
known error where it is not), then on tiny runs of STT and EST (its permutation input): the clip, prediction and
probabilities that evaluation gives, attributions that add up to the logit difference, the sampler's frames, the
PNG and the JSON lines, the most confident mistakes of evaluate's per-clip file, and one-line errors."""
import json
import shutil

import cv2
import numpy as np
import pytest

from dferjax import evaluate, explain, predict
from dferjax.data import build, datasets, sampling, synthetic
import test_predict
import workdir_helpers
from workdir_helpers import fails_in_one_line, tiny_workdir  # noqa: F401  (a fixture)


def test_integrated_gradients_match_their_closed_forms():
  rng = np.random.default_rng(0)
  video = rng.random((3, 4, 4, 3)).astype(np.float32)
  baseline = rng.random((3, 4, 4, 3)).astype(np.float32)
  weights = rng.normal(size=(3, 4, 4, 3)).astype(np.float32)
  linear = explain.path_gradient(lambda videos: (videos * weights).sum(axis=(1, 2, 3, 4)))
  for steps, chunk in ((1, 8), (5, 2), (32, 8)):  # (5, 2): the last call padded with a zero-weight point
    np.testing.assert_allclose(explain.integrated_gradients(linear, video, baseline, steps=steps, chunk=chunk),
                               (video - baseline) * weights, rtol=1e-5, atol=1e-6)
  # A quadratic's gradient is linear along the path: the midpoint rule is exact, IG_i = c (x_i^2 - b_i^2).
  quadratic = explain.path_gradient(lambda videos: 0.7 * (videos ** 2).sum(axis=(1, 2, 3, 4)))
  np.testing.assert_allclose(explain.integrated_gradients(quadratic, video, baseline, steps=3, chunk=2),
                             0.7 * (video ** 2 - baseline ** 2), rtol=1e-5, atol=1e-6)
  # A cubic from zero: IG_i = x_i^3, and the midpoint rule's mean of alpha^2 is 1/3 - 1/(12 n^2).
  cubic = explain.path_gradient(lambda videos: (videos ** 3).sum(axis=(1, 2, 3, 4)))
  for steps in (2, 7, 40):
    np.testing.assert_allclose(explain.integrated_gradients(cubic, video, np.zeros_like(video), steps=steps),
                               video ** 3 * (1 - 1 / (4 * steps ** 2)), rtol=1e-5)
  with pytest.raises(explain.ExplainError, match='--steps 0'):
    explain.integrated_gradients(linear, video, baseline, steps=0)


def test_the_still_baseline_is_the_mean_frame():
  video = np.random.default_rng(1).random((4, 2, 2, 3))
  still = explain.make_baseline(video, 'still')
  np.testing.assert_allclose(still, np.broadcast_to(video.mean(axis=0), video.shape))
  assert not explain.make_baseline(video, 'black').any()
  static = np.broadcast_to(video[:1], video.shape)  # a clip that does not change is its own still baseline
  np.testing.assert_array_equal(explain.make_baseline(static, 'still'), static)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('synthetic_explain')
  synthetic.write_dfew(str(root / 'manual'), clips_per_class=3, seed=2)
  build.build('dfew', manual_dir=str(root / 'manual'), data_dir=str(root / 'tfds'),
              configs=['fold1_px32', 'fold1_px48'], show_progress=False)
  return str(root / 'tfds')


@pytest.mark.parametrize('model_name', ['stt', 'est'])
def test_clips_explained_as_evaluation_sees_them(tmp_path, tiny_workdir, data_dir, model_name):  # noqa: F811
  workdir = str(tmp_path / 'run')
  shutil.copytree(tiny_workdir(model_name), workdir)
  evaluated = evaluate.evaluate_checkpoint(workdir, data_dir=data_dir)
  rows = [json.loads(line) for line in open(evaluated['clip_report'])]
  chosen = [rows[-1]['clip_id'], rows[0]['clip_id']]
  records = explain.explain(workdir, clips=','.join(chosen), data_dir=data_dir, steps=32)
  assert [record['clip_id'] for record in records] == chosen
  by_id = {row['clip_id']: row for row in rows}
  config = evaluate.load_run_config(workdir)
  class_names = list(config.class_names)
  source = datasets.data_source('dfew/fold1_px32', 'test', data_dir)
  num_frames = {record['clip_id'].decode(): int(record['num_frames']) for record in source}
  sampler = sampling.make_sampler(config.input.sampler.to_dict())
  out = tmp_path / 'run' / f'explain_test_step{evaluated["step"]}'
  for record in records:
    row = by_id[record['clip_id']]
    assert record['label'] == class_names[row['label']] and record['prediction'] == class_names[row['prediction']]
    np.testing.assert_allclose(list(record['probabilities'].values()), row['probabilities'], rtol=1e-4, atol=1e-6)
    assert record['target'] == record['prediction'] and record['baseline'] == 'black'
    assert record['attributed'] == 'logits'
    assert record['frames'] == sampler(num_frames[record['clip_id']], None).reshape(-1).tolist()
    assert len(record['frame_share']) == len(record['frame_attribution']) == sampler.num_output_frames
    assert sum(record['frame_share']) == pytest.approx(1, abs=1e-5) and min(record['frame_share']) >= 0
    check = record['completeness']
    assert check['attributions_sum'] == pytest.approx(sum(record['frame_attribution']), rel=1e-4, abs=1e-4)
    if model_name == 'stt':  # its random weights move the logit by 0.2 between black and the clip
      assert check['attributions_sum'] == pytest.approx(check['logit_difference'], rel=0.02), check
    image = cv2.imread(record['png'])
    assert record['png'] == str(out / f'{record["clip_id"]}.png') and image.shape[2] == 3
  assert [json.loads(line) for line in open(out / 'attributions.jsonl')] == records

  # Another target and the still baseline. From the clip's mean frame random weights move a logit by about 1e-3, so
  # that kinks along the path weigh: completeness shows as the midpoint rule's error shrinking with more steps.
  gaps = []
  for steps in (16, 128):
    record, = explain.explain(workdir, clips=chosen[0], data_dir=data_dir, target='label', baseline='still',
                              steps=steps, out=str(tmp_path / 'label'))
    assert record['target'] == record['label'] and record['baseline'] == 'still'
    gaps.append(abs(record['completeness']['attributions_sum'] - record['completeness']['logit_difference']))
  assert gaps[1] < gaps[0] / 3 and gaps[1] < 0.1 * abs(record['completeness']['logit_difference']), gaps

  if model_name != 'stt':  # what follows chooses clips, the same for every model
    return
  # The most confident mistakes of evaluate's file, most confident first.
  mistakes = sorted((row for row in rows if row['prediction'] != row['label']),
                    key=lambda row: -max(row['probabilities']))
  assert len(mistakes) >= 2  # random weights
  wrong = explain.explain(workdir, wrong=2, data_dir=data_dir, steps=8, out=str(tmp_path / 'wrong'))
  assert [record['clip_id'] for record in wrong] == [row['clip_id'] for row in mistakes[:2]]

  # Per class: its 2 clips with the highest probability of it, their own class's logit, and the mean shares.
  out = tmp_path / 'per_class'
  per_class = explain.explain(workdir, per_class=2, data_dir=data_dir, steps=8, out=str(out))
  profiles = json.loads((out / 'class_profiles.json').read_text())
  assert list(profiles) == [name for name in class_names if any(class_names[row['label']] == name for row in rows)]
  for name, profile in profiles.items():
    label = class_names.index(name)
    expected = sorted((row for row in rows if row['label'] == label), key=lambda row: -row['probabilities'][label])
    assert profile['clips'] == [row['clip_id'] for row in expected[:2]]
    of_class = [record for record in per_class if record['label'] == name]
    assert [record['clip_id'] for record in of_class] == profile['clips']
    assert all(record['target'] == name for record in of_class)
    assert profile['right'] == sum(record['prediction'] == name for record in of_class)
    share = np.mean([record['frame_share'] for record in of_class], axis=0)
    np.testing.assert_allclose(profile['mean_share'], share, rtol=1e-6)
    assert len(share) == 4  # the later half is frames 3 and 4
    assert profile['later_half'] == pytest.approx(share[len(share) // 2:].sum(), rel=1e-6)
  assert cv2.imread(str(out / 'class_profiles.png')).shape[2] == 3

  # A per-clip file that no longer matches the split (its clips in another order) is not trusted.
  rows[0]['clip_id'], rows[1]['clip_id'] = rows[1]['clip_id'], rows[0]['clip_id']
  with open(evaluated['clip_report'], 'w') as f:
    f.writelines(json.dumps(row) + '\n' for row in rows)
  with pytest.raises(explain.ExplainError, match=rf"lists '{rows[0]['clip_id']}' where the test split now holds "
                                                 rf"'{rows[1]['clip_id']}': evaluate the run again"):
    explain.explain(workdir, clips=rows[0]['clip_id'], data_dir=data_dir)


def test_errors_are_one_line(tmp_path, capsys, tiny_workdir, data_dir):  # noqa: F811
  workdir = str(tmp_path / 'run')
  shutil.copytree(tiny_workdir('stt'), workdir)
  common = ['--workdir', workdir, '--data_dir', data_dir]
  assert 'give one of --clips ID[,ID...], --wrong N, --per_class N and --video/--frames' in fails_in_one_line(
      capsys, explain.main, common)
  assert '--per_class needs' in fails_in_one_line(capsys, explain.main, [*common, '--per_class', '2'])
  assert "--target label: --per_class explains each clip's own class" in fails_in_one_line(
      capsys, explain.main, [*common, '--per_class', '2', '--target', 'label'])
  assert "not in the test split (first: 'nope'" in fails_in_one_line(capsys, explain.main,
                                                                      [*common, '--clips', 'nope'])
  message = fails_in_one_line(capsys, explain.main, [*common, '--wrong', '3'])
  assert '--wrong needs' in message and f'python -m dferjax.evaluate --workdir {workdir} --step 3 first' in message
  assert "--target 'joy'" in fails_in_one_line(capsys, explain.main, [*common, '--clips', 'x', '--target', 'joy'])
  assert "--baseline 'grey'" in fails_in_one_line(capsys, explain.main, [*common, '--clips', 'x', '--baseline',
                                                                          'grey'])
  assert 'a dferjax workdir?' in fails_in_one_line(capsys, explain.main, ['--workdir', str(tmp_path / 'none'),
                                                                         '--clips', 'x'])


def test_a_video_of_ones_own_is_explained_window_by_window(tmp_path, tiny_workdir):  # noqa: F811
  """--video: dferjax.predict's windows of the video (here 3 s at 10 fps: frames 0-20 and 10-30), each explained
  with the probabilities predict gives it, its frames numbered from the video's start, and no label."""
  frames, _ = test_predict._face_frames()
  video = test_predict._write_video(tmp_path / 'happy.avi', frames)
  workdir = tiny_workdir('stt')
  predicted = predict.main(['--workdir', workdir, '--video', video, '--no_detect', '--out', str(tmp_path / 'p')])
  records = explain.explain(workdir, video=video, detect=False, steps=8, out=str(tmp_path / 'e'))
  assert [record['clip_id'] for record in records] == ['frames 0-20', 'frames 10-30']
  sampler = sampling.make_sampler(evaluate.load_run_config(workdir).input.sampler.to_dict())
  for record, window, start in zip(records, predicted['windows'], (0, 10)):
    assert record['label'] is None and record['target'] == record['prediction'] == window['prediction']
    np.testing.assert_allclose(list(record['probabilities'].values()), list(window['probabilities'].values()),
                               atol=1e-5)
    assert record['frames'] == (start + sampler(20, None).reshape(-1)).tolist()
    assert cv2.imread(str(tmp_path / 'e' / f'{record["clip_id"].replace(" ", "_")}.png')).shape[2] == 3
  with pytest.raises(explain.ExplainError, match='--target label: a video of your own has no label'):
    explain.explain(workdir, video=video, detect=False, target='label')


def test_a_decision_rule_after_the_logits_is_not_differentiated(tmp_path, data_dir):  # noqa: F811
  """NR-DFERNet's snippet filter, made to fire on every clip: its neutral logit is -inf, its probability 0, and
  explain attributes the sequence logits the network computes (attribution_output), complete and finite."""
  config = workdir_helpers.tiny_config('nr_dfernet', filter_max_probability=0.0, filter_neutral_probability=1.0)
  config.dataset.name = 'dfew/fold1_px48'
  workdir = str(tmp_path / 'run')
  workdir_helpers.write_workdir(workdir, config, seed=1)
  clip_id = datasets.data_source('dfew/fold1_px48', 'test', data_dir)[0]['clip_id'].decode()
  record, = explain.explain(workdir, clips=clip_id, data_dir=data_dir, target='neutral', steps=32)
  assert record['probabilities']['neutral'] == 0 and record['prediction'] != 'neutral'
  assert record['attributed'] == 'sequence_logits'
  check = record['completeness']
  assert np.isfinite(check['logit_difference']) and check['logit_difference'] != 0
  assert check['attributions_sum'] == pytest.approx(check['logit_difference'], rel=0.05), check

