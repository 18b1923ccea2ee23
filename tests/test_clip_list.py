"""Clips listed in text files (dferjax/data/clip_list.py): Former-DFER-style lists of the synthetic DFEW read as the
TFDS builder reads the same files, every malformed line refused naming it, and a 3-class dataset of one's own
trained and evaluated end to end through configs/clip_list.py."""
import json
import os
import pickle

import cv2
import numpy as np
import pytest

from dferjax import configlib, evaluate, reports, train
from dferjax.data import build, clip_list, datasets, pipeline, synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def dfew(tmp_path_factory):
  """The synthetic DFEW (2 clips per class), built as dfew/fold1_px32, and fold 1's train and test lists in
  Former-DFER's format: `<clip folder> <frame count> <label 0..6>`."""
  root = tmp_path_factory.mktemp('clip_list')
  clips = synthetic.write_dfew(str(root / 'DFEW'), clips_per_class=2, seed=1)
  build.build('dfew', manual_dir=str(root / 'DFEW'), data_dir=str(root / 'tfds'), configs=['fold1_px32'],
              show_progress=False)
  for split in ('train', 'test'):
    lines = [f'{root}/DFEW/Clip/clip_224x224/{c["clip_id"]} {c["num_frames"]} {c["label"]}\n'
             for c in clips if (c['test_fold'] == 1) == (split == 'test')]
    (root / f'set_1_{split}.txt').write_text(''.join(lines))
  return root, clips


def test_lists_read_as_the_builder_reads_the_same_clips(dfew):
  root, _ = dfew
  for split in ('train', 'test'):
    listed = clip_list.ClipListSource(str(root / f'set_1_{split}.txt'))
    if split == 'train':  # as grain's worker processes receive it
      listed = pickle.loads(pickle.dumps(listed))
    built = datasets.data_source('dfew/fold1_px32', split, str(root / 'tfds'))
    built_records = {record['clip_id'].decode(): record for record in (built[i] for i in range(len(built)))}
    assert len(listed) == len(built_records)
    for index in range(len(listed)):
      record = listed[index]
      clip_id = os.path.basename(record['clip_id'].decode())
      reference = built_records[clip_id]
      assert int(record['label']) == int(reference['label'])  # the lists' 0..6 = the builder's labels
      assert record['num_frames'] == int(reference['num_frames'])
      # Frame order: the folder's frames, each shrunk to the build's 32 px as the builder does, match the built
      # ones up to its JPEG coding; a frame out of order (the face moves) would not.
      for frame in (0, record['num_frames'] // 2, record['num_frames'] - 1):
        full = pipeline.decode_frames([record['frames'][frame]], [frame], clip_id)[0]
        small = cv2.resize(full, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float64)
        stored = pipeline.decode_frames(reference['frames'][frame:frame + 1], [frame], clip_id)[0]
        assert np.abs(small - stored).mean() < 4, (clip_id, frame)


def test_labels_by_number_or_name_and_the_default_spellings():
  labels = clip_list.label_map(datasets.CLASS_NAMES)
  assert [clip_list.parse_line(text, 'x:1', labels) for text in
          ('a/00001 12 0', 'b 6', 'c Happiness', 'd 30 ANGER', '  # comment', '')] == [
              ('a/00001', 12, 0), ('b', None, 6), ('c', None, 0), ('d', 30, 3), None, None]
  own = clip_list.label_map(('calm', 'Tense'))
  assert clip_list.parse_line('e tense', 'x:1', own) == ('e', None, 1)
  with pytest.raises(ValueError, match=r"x:1: label 'happy' is neither 0..1 nor a class of config.class_names \("
                                       r"calm, tense\)"):
    clip_list.parse_line('e happy', 'x:1', own)
  with pytest.raises(ValueError, match=r"x:1: label '2' is neither"):
    clip_list.parse_line('e 2', 'x:1', own)
  with pytest.raises(ValueError, match=r'x:2: expected "<clip folder> <frame count> <label>".*4 columns'):
    clip_list.parse_line('my clip 12 0', 'x:2', labels)
  with pytest.raises(ValueError, match=r"x:3: the middle column is a frame count, got 'x'"):
    clip_list.parse_line('a x 0', 'x:3', labels)
  with pytest.raises(ValueError, match='names a class twice'):
    clip_list.label_map(('calm', 'Calm'))


def test_a_bad_list_fails_naming_each_kind_of_problem_and_its_first_line(dfew, tmp_path):
  root, clips = dfew
  folder = lambda clip: f'DFEW/Clip/clip_224x224/{clip["clip_id"]}'
  (root / 'empty').mkdir(exist_ok=True)
  (root / 'nested' / 'nested').mkdir(parents=True, exist_ok=True)
  cv2.imwrite(str(root / 'nested' / 'nested' / '1.png'), np.zeros((8, 8, 3), np.uint8))
  lines = [f'{folder(clips[0])} {clips[0]["num_frames"]} 0', f'{folder(clips[1])} {clips[1]["num_frames"] + 1} 1',
           'DFEW/Clip/clip_224x224/99999 10 2', 'empty 3', f'{folder(clips[2])} 5', f'{folder(clips[0])} 4',
           'nested 1']
  (root / 'bad.txt').write_text('\n'.join(lines) + '\n')
  with pytest.raises(ValueError) as error:
    clip_list.ClipListSource(str(root / 'bad.txt'))
  message = str(error.value)
  assert f'relative folders start at {root}' in message
  assert f'1 x frame count, first: {root}/bad.txt:2: lists {clips[1]["num_frames"] + 1} frames' in message
  assert f'1 x missing clip folder, first: {root}/bad.txt:3: {root}/DFEW/Clip/clip_224x224/99999' in message
  assert f'1 x empty clip folder (no image files), first: {root}/bad.txt:4: {root}/empty' in message
  assert f'1 x frames one folder deeper (<clip>/<clip>/*.jpg: unpacked one level too deep?), first: {root}/bad.txt:7' in message
  assert f'1 x listed twice, first: {root}/bad.txt:6: clip {folder(clips[0])} is listed again (first at line 1)' in message
  (tmp_path / 'none.txt').write_text('# nothing\n')
  with pytest.raises(ValueError, match='lists no clips'):
    clip_list.ClipListSource(str(tmp_path / 'none.txt'))
  with pytest.raises(FileNotFoundError, match='clip list .*missing.txt does not exist'):
    clip_list.ClipListSource(str(tmp_path / 'missing.txt'))
  # A frame removed after the check: the read names the file.
  listed = clip_list.ClipListSource(str(root / 'set_1_test.txt'))
  frames = listed[0]['frames']
  os.rename(os.path.join(frames.folder, frames.names[0]), tmp_path / 'moved.jpg')
  try:
    with pytest.raises(OSError, match=rf'cannot read frame {frames.folder}/{frames.names[0]}'):
      frames[0]  # pylint: disable=pointless-statement
  finally:
    os.rename(tmp_path / 'moved.jpg', os.path.join(frames.folder, frames.names[0]))


def test_class_names_must_fit_num_classes_and_the_dataset():
  config = configlib.load_config(os.path.join(REPO, 'configs', 'clip_list.py'),
                                 'recipe=stt_dfew,train=a.txt,test=b.txt,classes=calm+tense+amused,fold=2')
  assert (config.num_classes, config.class_names, config.model_name) == (3, ('calm', 'tense', 'amused'), 'stt')
  assert dict(config.dataset.clip_lists) == {'train': 'a.txt', 'test': 'b.txt'} and config.dataset.fold == 2
  configlib.check_known_fields(config)
  configlib.check_classes(config)
  with config.unlocked():
    config.num_classes = 7
  with pytest.raises(ValueError, match=r"config.num_classes=7, but config.class_names names 3 classes"):
    configlib.check_classes(config)
  dfew_config = configlib.load_config(os.path.join(REPO, 'configs', 'stt_dfew.py'))
  with dfew_config.unlocked():
    dfew_config.class_names, dfew_config.num_classes = ('calm', 'tense', 'amused'), 3
  with pytest.raises(ValueError, match=r"'dfew/fold1' labels its clips \('happy', .*only config.dataset.name="):
    configlib.check_classes(dfew_config)
  with pytest.raises(ValueError, match=r"recipe='stt' is not a config in configs/"):
    configlib.load_config(os.path.join(REPO, 'configs', 'clip_list.py'), 'recipe=stt,train=a,test=b')
  # {fold} in the paths is the fold scripts/run_folds.py appends.
  folded = configlib.load_config(os.path.join(REPO, 'configs', 'clip_list.py'),
                                 'train=l/set_{fold}_train.txt,test=l/set_{fold}_test.txt,root=r{fold},fold=4')
  assert dict(folded.dataset.clip_lists) == {'train': 'l/set_4_train.txt', 'test': 'l/set_4_test.txt'}
  assert folded.dataset.clip_root == 'r4'


def test_three_classes_of_ones_own_train_and_evaluate(dfew, tmp_path, capsys):
  """The synthetic clips of three classes, named 'calm', 'tense', 'amused' (labels by name in the lists); the six
  clips are both splits (this checks the plumbing, not generalisation)."""
  root, clips = dfew
  names = ('calm', 'tense', 'amused')
  mine = [c for c in clips if c['label'] < 3]
  for split in ('train', 'test'):
    (tmp_path / f'{split}.txt').write_text(''.join(
        f'DFEW/Clip/clip_224x224/{c["clip_id"]} {names[c["label"]]}\n' for c in mine))
  config = configlib.load_config(
      os.path.join(REPO, 'configs', 'clip_list.py'),
      f'recipe={REPO}/tests/tiny_config.py,train={tmp_path}/train.txt,test={tmp_path}/test.txt,root={root},'
      'classes=calm+tense+amused,fold=3')
  with config.unlocked():
    config.num_epochs = 1
  workdir = tmp_path / 'run'
  result = train.train_and_evaluate(config, str(workdir))
  assert (f'warning: 6 of the 6 clips of the test list are also in the train list (first: {root}/DFEW/Clip/'
          f'clip_224x224/{mine[0]["clip_id"]}): the evaluation is not on held-out clips') in capsys.readouterr().out
  confusion = np.array(result['confusion'])
  assert confusion.shape == (3, 3)
  np.testing.assert_array_equal(confusion.sum(axis=1), [2, 2, 2])
  assert sorted(result['per_class']) == sorted(names)
  again = evaluate.evaluate_checkpoint(str(workdir), 'latest')
  assert again['confusion'] == result['confusion']
  rows = [json.loads(line) for line in open(again['clip_report'])]
  assert [len(row['probabilities']) for row in rows] == [3] * 6
  assert [row['clip_id'] for row in rows] == [f'DFEW/Clip/clip_224x224/{c["clip_id"]}' for c in mine]
  assert [row['label'] for row in rows] == [c['label'] for c in mine]
  assert reports.run_fold(workdir) == 3 and reports.class_names_of([workdir]) == names
  table = reports.format_results_table({'run': result}, reports.class_names_of([workdir]), with_mean=False)
  assert [cell.strip() for cell in table.splitlines()[0].split('|')[2:5]] == list(names)
  environment = json.loads((workdir / 'environment.json').read_text())['runs'][-1]
  lists = environment['dataset']['lists']
  assert lists['test']['path'] == f'{tmp_path}/test.txt' and lists['test']['sha256']
  # What changes XLA's numerics is recorded beside the devices (conftest sets XLA_FLAGS).
  assert environment['devices']['numerics'] == {'default_matmul_precision': None, 'XLA_FLAGS': os.environ['XLA_FLAGS']}
  # evaluate --clip_list: the test list given by hand evaluates as the run's own test split did.
  listed = evaluate.evaluate_checkpoint(str(workdir), 'latest', clip_list=f'{tmp_path}/test.txt', clip_root=str(root))
  assert listed['confusion'] == result['confusion'] and listed['dataset'] == f'{tmp_path}/test.txt'
  assert listed['clip_report'] == str(workdir / f'clips_test_test_step{again["step"]}.jsonl')
  with pytest.raises(ValueError, match='give --dataset or --clip_list, not both'):
    evaluate.evaluate_checkpoint(str(workdir), 'latest', dataset='afew/px32', clip_list=f'{tmp_path}/test.txt')
  with pytest.raises(ValueError, match=r'--split train: a --clip_list is one split'):
    evaluate.evaluate_checkpoint(str(workdir), 'latest', 'train', clip_list=f'{tmp_path}/test.txt')
  seven = tmp_path / 'seven'  # the config of a 7-class clip-list run (the check comes before any restore)
  seven.mkdir()
  run_config = json.loads((workdir / 'config.json').read_text())
  run_config.update(class_names=list(datasets.CLASS_NAMES), num_classes=7)
  (seven / 'config.json').write_text(json.dumps(run_config))
  with pytest.raises(ValueError, match=r"--dataset afew/px112: the run read 'clip_list', which names no TFDS data dir; "
                                       r'give --data_dir'):
    evaluate.evaluate_checkpoint(str(seven), 'latest', dataset='afew/px112')
  with pytest.raises(ValueError, match=r"the run was trained on the classes \('calm', 'tense', 'amused'\)"):
    evaluate.evaluate_checkpoint(str(workdir), 'latest', dataset='dfew/fold1_px32', data_dir=str(root / 'tfds'))


def test_frames_of_one_clip_at_different_sizes_are_resized_to_the_first(tmp_path):
  """A face detector's crops differ in size frame to frame: each is resized to the first sampled frame's size."""
  rng = np.random.default_rng(0)
  sizes = [(40, 40), (52, 44), (30, 30)]
  originals = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in sizes]
  (tmp_path / 'clip').mkdir()
  for i, image in enumerate(originals, 1):
    cv2.imwrite(str(tmp_path / 'clip' / f'{i}.png'), image[..., ::-1])  # lossless; cv2 writes BGR
  (tmp_path / 'list.txt').write_text('clip 3 calm\n')
  record = clip_list.ClipListSource(str(tmp_path / 'list.txt'), class_names=('calm',))[0]
  video = pipeline.decode_frames(record['frames'][:], [0, 1, 2], 'clip')
  assert video.shape == (3, 40, 40, 3)
  np.testing.assert_array_equal(video[0], originals[0])
  for i in (1, 2):
    np.testing.assert_array_equal(video[i], cv2.resize(originals[i], (40, 40), interpolation=cv2.INTER_AREA))


def test_a_list_saved_with_a_byte_order_mark_or_not_as_utf8(tmp_path):
  (tmp_path / 'clip').mkdir()
  cv2.imwrite(str(tmp_path / 'clip' / '1.png'), np.zeros((8, 8, 3), np.uint8))
  (tmp_path / 'bom.txt').write_bytes('\ufeffclip 1 0\r\n'.encode())  # Windows Notepad's UTF-8
  assert clip_list.ClipListSource(str(tmp_path / 'bom.txt')).listed_folders == ['clip']
  (tmp_path / 'latin1.txt').write_bytes('clip 1 0\n# caf\xe9\n'.encode('latin-1'))
  with pytest.raises(ValueError, match=r'latin1.txt:2: not UTF-8 text \(invalid continuation byte\); save the clip'):
    clip_list.ClipListSource(str(tmp_path / 'latin1.txt'))
