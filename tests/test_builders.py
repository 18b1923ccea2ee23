"""TFDS builders on synthetic trees of the three real layouts: records, splits, bad input, failed builds."""
import importlib.util
import json
import os
import pathlib
import pickle
import re
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

from dferjax import cli
from dferjax.data import build as build_lib
from dferjax.data import datasets, synthetic
from tfds_builders import common, labels
from tfds_builders.afew import Afew
from tfds_builders.dfew import Dfew, read_split_csv
from tfds_builders.ferv39k import Ferv39k

SIZE = 32


def _source_frame(path, size=SIZE):
  """The reference: cv2 decode, INTER_AREA resize, RGB."""
  image = cv2.resize(cv2.imread(str(path)), (size, size), interpolation=cv2.INTER_AREA)
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _decode(frames):
  """Records hold JPEG bytes per frame or a raw uint8 array (docs/contracts.md)."""
  if isinstance(frames, np.ndarray) and frames.dtype == np.uint8:
    return frames
  return np.stack([cv2.cvtColor(cv2.imdecode(np.frombuffer(f, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                   for f in frames])


def _records(name, split, data_dir):
  source = datasets.data_source(name, split, data_dir)
  return {(r['clip_id'].decode() if isinstance(r['clip_id'], bytes) else r['clip_id']): r
          for r in (source[i] for i in range(len(source)))}


def _check_records(records, expected, frame_dir_of, atol):
  """Labels, ids, num_frames == files on disk, frames close to a cv2 resize of the source JPEGs."""
  assert sorted(records) == sorted(expected)
  for clip_id, record in records.items():
    folder = frame_dir_of(clip_id)
    paths = sorted(folder.glob('*.jpg'))
    assert record['label'] == expected[clip_id]
    assert record['num_frames'] == len(paths) == len(record['frames'])
    frames = _decode(record['frames'])
    assert frames.shape == (len(paths), SIZE, SIZE, 3)
    for index in (0, len(paths) - 1):  # first and last: frames are in time order
      error = np.abs(frames[index].astype(int) - _source_frame(paths[index])).mean()
      assert error <= atol, (clip_id, index, error)


@pytest.fixture(scope='module')
def dfew(tmp_path_factory):
  root = tmp_path_factory.mktemp('dfew_manual')
  clips = synthetic.write_dfew(root, clips_per_class=2, seed=0)
  return root, clips


@pytest.fixture
def small_dfew(tmp_path):
  """One clip per class, to be damaged by a test."""
  root = tmp_path / 'manual'
  synthetic.write_dfew(root, clips_per_class=1, seed=1)
  return root


def _dfew_expected(clips, fold, split):
  return {c['clip_id']: c['label'] for c in clips if (c['test_fold'] == fold) == (split == 'test')}


def test_dfew_builds_raw_and_jpeg_records(dfew, tmp_path):
  root, clips = dfew
  data_dir = tmp_path / 'data'
  reports = build_lib.build('dfew', root, data_dir, ['fold1', 'fold2_jpeg'], image_size=SIZE, workers=1,
                            show_progress=False)
  assert [r.name for r in reports] == ['dfew/fold1_px32', 'dfew/fold2_px32_jpeg']
  frame_dir = lambda clip_id: root / 'Clip' / 'clip_224x224' / clip_id
  # raw: exact; JPEG (q90, 4:2:0 chroma) at 32 px: mean error 5-7 on these sharp drawings
  for name, fold, atol in (('dfew/fold1_px32', 1, 0.0), ('dfew/fold2_px32_jpeg', 2, 9.0)):
    for split in ('train', 'test'):
      records = _records(name, split, data_dir)
      _check_records(records, _dfew_expected(clips, fold, split), frame_dir, atol)
  raw = next(iter(_records('dfew/fold1_px32', 'test', data_dir).values()))['frames']
  jpeg = next(iter(_records('dfew/fold2_px32_jpeg', 'test', data_dir).values()))['frames']
  assert isinstance(raw, np.ndarray) and raw.dtype == np.uint8
  assert all(isinstance(f, bytes) and f[:2] == b'\xff\xd8' for f in jpeg)
  report = reports[0]
  assert report.splits['test'] == {n: sum(c['label'] == i for c in clips if c['test_fold'] == 1)
                                   for i, n in enumerate(datasets.CLASS_NAMES)}
  assert report.skipped == {}
  again = build_lib.build('dfew', root, data_dir, 'fold1', image_size=SIZE, workers=1, show_progress=False)
  assert again[0].status == 'already built'
  source = datasets.data_source('dfew/fold1_px32', 'train', data_dir)
  copy = pickle.loads(pickle.dumps(source))  # grain worker processes receive the source pickled
  np.testing.assert_array_equal(copy[1]['frames'], source[1]['frames'])
  with pytest.raises(ValueError, match=r"split 'validation' not in \['test', 'train'\]"):
    datasets.data_source('dfew/fold1_px32', 'validation', data_dir)
  assert 'tensorflow' not in sys.modules  # built and read without TF


def test_dfew_folds_disjoint_and_covering(dfew):
  root, clips = dfew
  all_ids = {c['clip_id'] for c in clips}
  test_sets = []
  for fold in range(1, 6):
    scan = Dfew(config=f'fold{fold}_px{SIZE}', data_dir='/nonexistent').scan(root)
    train, test = ({c.clip_id for c in scan.splits[s]} for s in ('train', 'test'))
    assert not train & test and train | test == all_ids
    test_sets.append(test)
  assert sum(map(len, test_sets)) == len(all_ids) and set().union(*test_sets) == all_ids


@pytest.mark.parametrize('spelling', ['single-labeled', 'single_labeled'])
def test_both_split_folder_spellings(tmp_path, spelling):
  clips = synthetic.write_dfew(tmp_path, 1, seed=2, split_folder_spelling=spelling)
  scan = Dfew(config='fold3', data_dir='/nonexistent').scan(tmp_path)
  assert {c.clip_id: c.label for c in scan.splits['test']} == _dfew_expected(clips, 3, 'test')


def test_csv_header_with_bom_and_whitespace(tmp_path):
  path = tmp_path / 'set_1.csv'
  path.write_bytes('\ufeff video_name , label \r\n 2522 , 6 \r\n\r\n17,1\r\n'.encode())
  assert read_split_csv(path) == [(2, '02522', 5), (4, '00017', 0)]


@pytest.mark.parametrize('row, message', [
    ('12,9', 'unknown label 9'), ('12,0', 'unknown label 0'), ('12', 'malformed row'), ('12,3,4', 'malformed row'),
    ('abc,3', 'malformed row'), ('12,happy', 'malformed row')])
def test_bad_csv_row_names_file_and_line(small_dfew, tmp_path, row, message):
  path = small_dfew / 'EmoLabel_DataSplit' / 'test(single-labeled)' / 'set_1.csv'
  path.write_text(path.read_text() + row + '\n')
  line = len(path.read_text().splitlines())
  with pytest.raises(ValueError, match=f'{message}') as error:
    build_lib.build('dfew', small_dfew, tmp_path / 'data', ['fold1'], image_size=SIZE, workers=1, show_progress=False)
  assert f'{path}:{line}:' in str(error.value)


def test_missing_manual_dir_and_csv(small_dfew, tmp_path):
  missing = tmp_path / 'nowhere'
  with pytest.raises(FileNotFoundError, match='Clip/clip_224x224') as error:
    build_lib.build('dfew', missing, tmp_path / 'data', ['fold1'], workers=1, show_progress=False)
  assert str(missing) in str(error.value)
  csv_path = small_dfew / 'EmoLabel_DataSplit' / 'train(single-labeled)' / 'set_2.csv'
  csv_path.unlink()
  with pytest.raises(FileNotFoundError, match='EmoLabel_DataSplit') as error:
    build_lib.build('dfew', small_dfew, tmp_path / 'data', ['fold2'], image_size=SIZE, workers=1, show_progress=False)
  assert str(csv_path) in str(error.value)
  shutil.rmtree(small_dfew / 'Clip')
  with pytest.raises(FileNotFoundError, match='clip_224x224'):
    Dfew(config='fold1', data_dir='/nonexistent').scan(small_dfew)


def test_tfds_manual_dir_error_is_file_not_found(tmp_path):
  import tensorflow_datasets as tfds  # the builder used directly, without build()
  builder = Dfew(config=f'fold1_px{SIZE}', data_dir=os.fspath(tmp_path / 'data'))
  with pytest.raises(FileNotFoundError, match='Clip/clip_224x224'):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=tmp_path / 'nowhere'))


def test_missing_empty_and_nested_clip_folders_are_skipped_and_counted(small_dfew, tmp_path):
  clip_root = small_dfew / 'Clip' / 'clip_224x224'
  ids = sorted(p.name for p in clip_root.iterdir())
  shutil.rmtree(clip_root / ids[0])
  for frame in (clip_root / ids[1]).iterdir():
    frame.unlink()
  (clip_root / ids[1] / 'notes.txt').write_text('not a frame')
  (clip_root / ids[2]).rename(tmp_path / 'moved')  # its frames one folder deeper: <clip>/<clip>/*.jpg
  (clip_root / ids[2]).mkdir()
  (tmp_path / 'moved').rename(clip_root / ids[2] / ids[2])
  # macOS's metadata files beside each frame (a copy to an exFAT disk): not frames, left out
  frames_of_3 = sorted(path.name for path in (clip_root / ids[3]).iterdir())
  for name in frames_of_3:
    (clip_root / ids[3] / f'._{name}').write_bytes(b'\x00\x05\x16\x07' + bytes(4092))
  report, = build_lib.build('dfew', small_dfew, tmp_path / 'data', ['fold1'], image_size=SIZE, workers=1,
                            show_progress=False)
  assert report.skipped == {common.MISSING_FOLDER: 1, common.EMPTY_FOLDER: 1, common.NESTED_FOLDER: 1}
  assert sum(sum(per_class.values()) for per_class in report.splits.values()) == 4
  built = {**_records(f'dfew/fold1_px{SIZE}', 'train', tmp_path / 'data'),
           **_records(f'dfew/fold1_px{SIZE}', 'test', tmp_path / 'data')}
  assert sorted(built) == ids[3:]
  assert built[ids[3]]['num_frames'] == len(frames_of_3)
  summary = build_lib.format_summary([report])
  assert 'skipped 1 clip(s): missing clip folder' in summary and 'skipped 1 clip(s): empty clip folder' in summary
  assert 'skipped 1 clip(s): frames one folder deeper' in summary


def test_clip_root_one_level_too_deep_is_named(small_dfew, tmp_path):
  """clip_224x224.zip unpacked into a folder of its own name: every clip is missing; the error says what is there."""
  clip_root = small_dfew / 'Clip' / 'clip_224x224'
  clip_root.rename(small_dfew / 'Clip' / 'inner')
  clip_root.mkdir()
  (small_dfew / 'Clip' / 'inner').rename(clip_root / 'clip_224x224')
  with pytest.raises(ValueError) as error:
    build_lib.build('dfew', small_dfew, tmp_path / 'data', ['fold1'], image_size=SIZE, workers=1, show_progress=False)
  assert re.search(rf"split 'train' has no usable clips .*'missing clip folder': \d+\}}; expected e\.g\. "
                   rf"{re.escape(str(clip_root))}/\d{{5}}, but {re.escape(str(clip_root))} holds clip_224x224/$",
                   str(error.value)), error.value


def test_a_cut_copy_of_a_built_dataset_is_named_before_any_read(small_dfew, tmp_path):
  """An interrupted copy of the built files (rsync to a node's disk): found by their recorded sizes at open, and,
  for a build that recorded none, ArrayRecord's error is one line."""
  name = f'dfew/fold1_px{SIZE}'
  build_lib.build('dfew', small_dfew, tmp_path / 'data', ['fold1'], image_size=SIZE, workers=1, show_progress=False)
  shutil.copytree(tmp_path / 'data', tmp_path / 'copy')
  data_path = pathlib.Path(os.fspath(datasets.builder(name, tmp_path / 'copy').data_path))
  shard, = data_path.glob('*-train.array_record-*')
  size = shard.stat().st_size
  os.truncate(shard, size // 2)
  with pytest.raises(ValueError) as error:
    datasets.data_source(name, 'train', tmp_path / 'copy')
  assert str(error.value) == (f'{name} in {data_path} is not as built: {shard.name} is {size // 2:,} bytes, the build '
                              f'wrote {size:,} (a cut or unfinished copy?). Copy it again from where it was built, or '
                              'rebuild it (scripts/build_dataset.py --overwrite).')
  with pytest.raises(ValueError, match='is not as built'):  # building there again does not take it as built
    build_lib.build('dfew', small_dfew, tmp_path / 'copy', ['fold1'], image_size=SIZE, workers=1, show_progress=False)

  record = json.loads((data_path / datasets.BUILD_RECORD).read_text())
  del record['files']  # as a build before the sizes were recorded
  (data_path / datasets.BUILD_RECORD).write_text(json.dumps(record))
  source = datasets.data_source(name, 'train', tmp_path / 'copy')
  with pytest.raises(RuntimeError) as error:
    for index in range(len(source)):
      source[index]
  message = cli.error_message(error.value)
  assert message.startswith('a built dataset file is damaged (Corrupted Riegeli') and '\n' not in message
  assert message.endswith('copy the dataset again from where it was built, or rebuild it '
                          '(scripts/build_dataset.py --overwrite)')
  (data_path / 'dataset_info.json').write_text('{"name": "dfew", "splits": [')  # TFDS's metadata, cut short
  with pytest.raises(ValueError, match=f'{name}: the built metadata under {tmp_path / "copy" / "dfew"}.* cannot be '
                                       r'read \(ParseError: .*a cut or unfinished copy\?'):
    datasets.data_source(name, 'train', tmp_path / 'copy')


def test_corrupt_frame_fails_naming_file_and_leaves_nothing_readable(small_dfew, tmp_path):
  data_dir = tmp_path / 'data'
  clip_dir = sorted((small_dfew / 'Clip' / 'clip_224x224').iterdir())[3]
  frame = sorted(clip_dir.iterdir())[2]
  good = frame.read_bytes()
  frame.write_bytes(b'not a jpeg')
  with pytest.raises(ValueError, match='cannot decode frame') as error:
    build_lib.build('dfew', small_dfew, data_dir, ['fold1'], image_size=SIZE, workers=2, show_progress=False)
  assert str(frame) in str(error.value)
  leftovers = [p for p in data_dir.rglob('*') if 'incomplete' in p.name or p.suffix == '.json' and 'fold1' in str(p)]
  assert leftovers == []
  with pytest.raises(FileNotFoundError, match='is not built') as error:
    datasets.data_source(f'dfew/fold1_px{SIZE}', 'train', data_dir)
  assert 'scripts/build_dataset.py --dataset dfew' in str(error.value) and str(data_dir) in str(error.value)
  # A cut JPEG: OpenCV 5 refuses it; older OpenCV decodes it to grey and the end-of-image check catches it.
  for broken, why in ((b'', 'not a readable image'), (good[:len(good) // 2], '(not a readable image|truncated JPEG)')):
    frame.write_bytes(broken)
    with pytest.raises(ValueError, match=f'cannot decode frame {frame} .*{why}'):
      build_lib.build('dfew', small_dfew, data_dir, ['fold1'], image_size=SIZE, workers=1, show_progress=False)
  frame.write_bytes(good)  # fixed input: the same call now builds
  build_lib.build('dfew', small_dfew, data_dir, ['fold1'], image_size=SIZE, workers=1, show_progress=False)
  assert len(datasets.data_source(f'dfew/fold1_px{SIZE}', 'train', data_dir)) > 0


def test_a_full_disk_stops_the_build_in_one_line_and_a_rerun_builds(dfew, tmp_path):
  """array_record reports a refused write as a RuntimeError with the error in its text: the build script prints
  the one disk-full line naming the file (here past a file-size limit, as on a full disk), and the next run,
  with room, builds the config as if nothing had happened."""
  root, clips = dfew
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  command = [sys.executable, os.path.join(repo, 'scripts', 'build_dataset.py'), '--dataset=dfew',
             f'--manual_dir={root}', f'--data_dir={tmp_path}', '--configs=fold1_px112']
  limited = subprocess.run(['bash', '-c', 'ulimit -f 100 && exec "$@"', 'bash', *command], capture_output=True,
                           text=True, timeout=300, cwd=repo)
  assert limited.returncode == 1 and 'Traceback' not in limited.stderr, limited.stderr
  error, = [line for line in limited.stderr.splitlines() if line.startswith('error: ')]
  assert re.fullmatch(rf'error: the disk refused a write \({tmp_path}/dfew/fold1/incomplete\.\w+_1\.0\.0/'
                      r'dfew-train\.array_record-00000-of-00001\): File too large; stopped\. Free some space '
                      r'\(or raise the file-size limit, ulimit -f\) and rerun\.', error), error
  subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=repo, check=True)
  assert len(datasets.data_source('dfew/fold1', 'train', str(tmp_path))) == len(_dfew_expected(clips, 1, 'train'))


def test_parallel_build_of_two_configs(small_dfew, tmp_path):
  """Process pool path (spawned workers): a failure names the frame and leaves nothing; then every config builds."""
  data_dir = tmp_path / 'data'
  frame = sorted(sorted((small_dfew / 'Clip' / 'clip_224x224').iterdir())[0].iterdir())[-1]
  good = frame.read_bytes()
  frame.write_bytes(good[:20])  # truncated inside the header
  with pytest.raises(ValueError, match=f'cannot decode frame {frame}'):
    build_lib.build('dfew', small_dfew, data_dir, ['fold1_px16', 'fold2_px16'], workers=2, show_progress=False)
  assert not [p for p in data_dir.rglob('*') if 'incomplete' in p.name or p.name == 'dataset_info.json']
  frame.write_bytes(good)
  reports = build_lib.build('dfew', small_dfew, data_dir, ['fold1_px16', 'fold2_px16'], workers=2,
                            show_progress=False)
  assert [r.status for r in reports] == ['built', 'built']
  for fold in (1, 2):
    scan = Dfew(config=f'fold{fold}_px16', data_dir='/nonexistent').scan(small_dfew)
    for split in ('train', 'test'):
      assert len(datasets.data_source(f'dfew/fold{fold}_px16', split, data_dir)) == len(scan.splits[split])


def test_afew(tmp_path):
  root = tmp_path / 'manual'
  clips = synthetic.write_afew(root, clips_per_class=1, seed=0, val_clips_per_class=1)
  (root / 'Train_AFEW' / 'Angry' / '000046280.avi').write_bytes(b'')  # an .avi whose frames were not extracted
  (root / 'Train_AFEW' / 'Train_6.xml').write_text('<xml/>')
  report, = build_lib.build('afew', root, tmp_path / 'data', [f'px{SIZE}'], workers=1, show_progress=False)
  assert report.skipped == {'frames not extracted (an .avi without a frame folder)': 1}
  for split, prefix in (('train', 'Train'), ('validation', 'Val')):
    expected = {c['clip_id']: c['label'] for c in clips if c['split'] == prefix}
    assert len(expected) == 7
    _check_records(_records(f'afew/px{SIZE}', split, tmp_path / 'data'), expected,
                   lambda clip_id: root / clip_id.replace('/', '_AFEW/', 1), 0.0)
  (root / 'Val_AFEW' / 'Contempt').mkdir()
  with pytest.raises(ValueError, match="unknown emotion folder 'Contempt'") as error:
    Afew(config='px112', data_dir='/nonexistent').scan(root)
  assert str(root / 'Val_AFEW' / 'Contempt') in str(error.value)
  shutil.rmtree(root / 'Val_AFEW')
  with pytest.raises(FileNotFoundError, match='Val_AFEW'):
    Afew(config='px112', data_dir='/nonexistent').scan(root)


def test_ferv39k(tmp_path):
  root = tmp_path / 'manual'
  clips = synthetic.write_ferv39k(root, clips_per_class=1, seed=0)
  report, = build_lib.build('ferv39k', root, tmp_path / 'data', None, image_size=SIZE, workers=1,
                            show_progress=False)
  assert report.name == f'ferv39k/px{SIZE}' and report.skipped == {}
  for split in ('train', 'test'):
    expected = {c['clip_id']: c['label'] for c in clips if c['split'] == split}
    _check_records(_records(f'ferv39k/px{SIZE}', split, tmp_path / 'data'), expected,
                   lambda clip_id: root / '2_ClipsforFaceCrop' / clip_id, 0.0)
  setup = root / '4_setups' / 'All_scenes' / 'test_All.csv'
  lines = setup.read_text().splitlines()
  for bad, message in ((lines[0].replace(' ', '  ') + ' Happy', 'malformed line'),
                       (lines[0].split()[0] + ' Contempt', "unknown label 'Contempt'")):
    setup.write_text('\n'.join(lines[1:] + [bad]) + '\n')
    with pytest.raises(ValueError, match=message) as error:
      Ferv39k(config='px112', data_dir='/nonexistent').scan(root)
    assert f'{setup}:{len(lines)}:' in str(error.value)
  setup.write_text('\n'.join(lines + ['Action/Happy/9999 Happy']) + '\n')  # listed, no folder
  scan = Ferv39k(config='px112', data_dir='/nonexistent').scan(root)
  assert scan.skipped == [('test', 'Action/Happy/9999', common.MISSING_FOLDER)]


def test_config_names():
  assert Dfew.config_from_name('fold1') is Dfew.builder_configs['fold1']
  assert Dfew.config_from_name('fold1_px112_jpeg') is Dfew.builder_configs['fold1']
  assert Dfew.config_from_name('fold3_px224') is Dfew.builder_configs['fold3_px224']
  tiny = Dfew.config_from_name('fold4_px48')
  assert (tiny.fold, tiny.image_size, tiny.frame_encoding) == (4, 48, 'raw')
  assert Dfew.config_from_name('fold4_px48') is tiny  # TFDS needs one object per name
  assert Dfew.get_builder_config('fold4_px48') is tiny
  assert Afew.config_from_name('px224').frame_encoding == 'jpeg'
  assert Ferv39k.config_from_name('px40_jpeg').name == 'px40_jpeg'
  assert [c.name for c in Afew.BUILDER_CONFIGS] == ['px112', 'px224']
  assert Afew(data_dir='/x').builder_config.name == 'px112'  # the default
  for cls, bad in ((Dfew, 'fold6'), (Dfew, 'fold1_px48_png'), (Dfew, 'px112'), (Afew, 'fold1'), (Ferv39k, 'px4')):
    with pytest.raises(ValueError):
      cls.config_from_name(bad)
  assert build_lib.resolve_configs('dfew', None, 48) == [f'fold{k}_px48' for k in range(1, 6)]
  assert build_lib.resolve_configs('dfew') == ([f'fold{k}' for k in range(1, 6)]
                                               + [f'fold{k}_px224' for k in range(1, 6)])
  with pytest.raises(ValueError, match='give one of them'):
    build_lib.resolve_configs('afew', ['px112'], 48)


def test_one_label_schema_and_no_import_circle():
  """Every builder's ClassLabel, the readers and the synthetic layouts share tfds_builders.labels; the builders
  import no dferjax.data (which imports them), and labels imports no TFDS (cheap for the trainer)."""
  assert datasets.CLASS_NAMES is labels.CLASS_NAMES
  assert tuple(common.clip_features(32, 'raw')['label'].names) == labels.CLASS_NAMES
  assert [common.emotion_label(name) for name in synthetic.EMOTION_NAMES] == list(range(labels.NUM_CLASSES))
  code = ('import sys; import tfds_builders.labels; cheap = "tensorflow_datasets" not in sys.modules; '
          'import tfds_builders.dfew, tfds_builders.afew, tfds_builders.ferv39k; '
          'print(cheap, sorted(m for m in sys.modules if m.startswith("dferjax")))')
  printed = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.split()
  assert printed == ['True', '[]']


def test_data_source_errors(tmp_path):
  with pytest.raises(ValueError, match="dataset name 'rafdb/px112'"):
    datasets.data_source('rafdb/px112', 'train', tmp_path)
  with pytest.raises(FileNotFoundError, match=r'afew/px48 is not built') as error:
    datasets.data_source('afew/px48', 'train', tmp_path)
  assert str(tmp_path / 'afew' / 'px48') in str(error.value) and '--configs px48' in str(error.value)


def test_natural_frame_order(tmp_path):
  for name in ('10.jpg', '2.jpg', '1.jpg', 'notes.txt'):
    (tmp_path / name).write_bytes(b'')
  assert [pathlib.Path(p).name for p in common.list_frames(tmp_path)] == ['1.jpg', '2.jpg', '10.jpg']


def test_build_dataset_script(tmp_path, capsys):
  spec = importlib.util.spec_from_file_location(
      'build_dataset', pathlib.Path(__file__).parents[1] / 'scripts' / 'build_dataset.py')
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  root = tmp_path / 'manual'
  synthetic.write_ferv39k(root, clips_per_class=1, seed=3)
  script.main(['--dataset', 'ferv39k', '--manual_dir', str(root), '--data_dir', str(tmp_path / 'data'),
               '--configs', 'px16', '--workers', '1'])
  out = capsys.readouterr().out
  assert 'ferv39k/px16: built' in out and 'train           7 clips' in out and 'skipped 0 clips' in out
  with pytest.raises(SystemExit) as exit_info:
    script.main(['--dataset', 'dfew', '--manual_dir', str(root), '--data_dir', str(tmp_path / 'data')])
  assert exit_info.value.code == 1
  assert 'Clip/clip_224x224' in capsys.readouterr().err


def test_already_built_from_other_clips_fails_naming_the_difference_and_overwrite(small_dfew, tmp_path):
  """A build from a half-copied tree must not pass as the full dataset once the folders are back (issue 18)."""
  clip_root = small_dfew / 'Clip' / 'clip_224x224'
  moved = tmp_path / 'moved'
  moved.mkdir()
  for folder in sorted(clip_root.iterdir())[:2]:
    folder.rename(moved / folder.name)
  build_lib.build('dfew', small_dfew, tmp_path / 'data', ['fold1'], image_size=SIZE, workers=1, show_progress=False)
  for folder in moved.iterdir():
    folder.rename(clip_root / folder.name)
  with pytest.raises(ValueError, match='records stored.*clips in the manual dir') as error:
    build_lib.build('dfew', small_dfew, tmp_path / 'data', ['fold1'], image_size=SIZE, workers=1,
                    show_progress=False)
  assert '--overwrite' in str(error.value)
  report, = build_lib.build('dfew', small_dfew, tmp_path / 'data', ['fold1'], image_size=SIZE, workers=1,
                            show_progress=False, overwrite=True)
  assert sum(len(datasets.data_source(f'dfew/fold1_px{SIZE}', split, tmp_path / 'data')) for split in report.splits) == 7
  report, = build_lib.build('dfew', small_dfew, tmp_path / 'data', ['fold1'], image_size=SIZE, workers=1,
                            show_progress=False)
  assert report.status == 'already built'


def test_already_built_with_the_same_counts_but_other_labels_fails(small_dfew, tmp_path):
  build_lib.build('dfew', small_dfew, tmp_path / 'data', ['fold1'], image_size=SIZE, workers=1, show_progress=False)
  csv = next((small_dfew / 'EmoLabel_DataSplit').glob('train*/set_1.csv'))
  lines = csv.read_text().splitlines()
  video, label = lines[1].split(',')
  lines[1] = f'{video},{int(label) % 7 + 1}'
  csv.write_text('\n'.join(lines) + '\n')
  with pytest.raises(ValueError, match='(?s)fingerprint of the split lists.*built from .*--overwrite'):
    build_lib.build('dfew', small_dfew, tmp_path / 'data', ['fold1'], image_size=SIZE, workers=1,
                    show_progress=False)


def test_a_split_missing_many_clips_warns_with_count_and_percentage(small_dfew, tmp_path, capsys):
  clip_root = small_dfew / 'Clip' / 'clip_224x224'
  shutil.rmtree(sorted(clip_root.iterdir())[0])
  report, = build_lib.build('dfew', small_dfew, tmp_path / 'data', ['fold1'], image_size=SIZE, workers=1,
                            show_progress=False)
  err = capsys.readouterr().err
  assert re.search(r'warning: dfew/fold1_px32 \w+: 1 of \d+ listed clips \(\d+\.\d %\) skipped', err), err
  assert report.warnings and report.warnings[0] in build_lib.format_summary([report])
