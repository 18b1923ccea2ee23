"""Image lists (dferjax.data.image_list): single face images as one-frame clips, for AEN's RAF-DB pre-training."""
import os
import pickle

import cv2
import ml_collections
import numpy as np
import pytest

from dferjax import configlib, models, train
from dferjax.data import image_list, inputs, pipeline, synthetic
from tfds_builders.labels import CLASS_NAMES

SIZE = 32


def face(label: int, seed: int = 0) -> np.ndarray:
  """One rendered face of class `label`: uint8 [SIZE, SIZE, 3] RGB."""
  frames, _, _ = synthetic.render_clip(CLASS_NAMES[label], 1, np.random.default_rng([label, seed]), size=SIZE)
  return frames[0]


def write_image(path, rgb):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def write_list(path, lines):
  path.write_text(''.join(f'{line}\n' for line in lines))
  return str(path)


@pytest.fixture(scope='module')
def faces(tmp_path_factory):
  """Two PNG faces per class under <root>/images/, one JPEG; returns (root, {relative path: rgb})."""
  root = tmp_path_factory.mktemp('faces')
  written = {}
  for label in range(len(CLASS_NAMES)):
    for seed in range(2):
      written[f'images/{CLASS_NAMES[label]}_{seed}.png'] = face(label, seed)
  written['images/happy_2.jpg'] = face(0, 2)
  for name, rgb in written.items():
    write_image(root / name, rgb)
  return root, written


def test_records_are_one_frame_clips_with_the_pngs_pixels(faces):
  root, written = faces
  list_file = write_list(root / 'train.txt', [
      '# AEN-style and two-column lines, a comment and a blank line',
      'images/happy_0.png 1 0', '', 'images/fear_1.png 6', '   images/sad_0.png\t1  1  ', 'images/happy_2.jpg 0'])
  source = image_list.ImageListSource(list_file)
  assert len(source) == 4
  for index, (name, label) in enumerate([('happy_0.png', 0), ('fear_1.png', 6), ('sad_0.png', 1)]):
    record = source[index]
    assert record['frames'].dtype == np.uint8 and record['frames'].shape == (1, SIZE, SIZE, 3)
    np.testing.assert_array_equal(record['frames'][0], written[f'images/{name}'])
    assert (record['label'], record['clip_id'], record['num_frames']) == (label, f'images/{name}'.encode(), 1)
  jpeg = source[3]['frames'][0].astype(int)
  assert np.abs(jpeg - written['images/happy_2.jpg']).mean() < 8  # JPEG: close, not equal
  restored = pickle.loads(pickle.dumps(source))  # grain worker processes
  np.testing.assert_array_equal(restored[1]['frames'], source[1]['frames'])


def test_raf_official_labels_map_to_class_names_order(tmp_path, faces):
  root, _ = faces
  lines = [f'{root}/images/happy_0.png {official}' for official in range(1, 8)]  # absolute paths
  source = image_list.ImageListSource(write_list(tmp_path / 'raf.txt', lines), label_order='raf_official')
  # RAF-DB 1..7 = Surprise, Fear, Disgust, Happiness, Sadness, Anger, Neutral (refs.md §2.4)
  assert source.labels.tolist() == [4, 6, 5, 0, 1, 3, 2]
  assert [CLASS_NAMES[label] for label in source.labels] == [
      'surprise', 'fear', 'disgust', 'happy', 'sad', 'angry', 'neutral']


def test_relative_paths_start_at_image_root_or_the_lists_folder(tmp_path, faces):
  root, written = faces
  (tmp_path / 'lists').mkdir()
  elsewhere = write_list(tmp_path / 'lists' / 'test.txt', ['happy_1.png 0'])
  source = image_list.ImageListSource(elsewhere, image_root=str(root / 'images'))
  np.testing.assert_array_equal(source[0]['frames'][0], written['images/happy_1.png'])
  with pytest.raises(FileNotFoundError, match=f'test.txt:1: image {tmp_path}/lists/happy_1.png does not exist'):
    image_list.ImageListSource(elsewhere)


def gray_png(path):
  assert cv2.imwrite(str(path), np.full((20, 24), 90, np.uint8))
  return str(path)


def test_gray_png_becomes_rgb(tmp_path):
  gray_png(tmp_path / 'gray.png')
  frames = image_list.ImageListSource(write_list(tmp_path / 'list.txt', ['gray.png 2']))[0]['frames']
  assert frames.shape == (1, 20, 24, 3) and (frames == 90).all()


@pytest.mark.parametrize('lines, label_order, error, message', [
    (['images/happy_0.png 7'], 'dfew', ValueError, r":2: label '7' is not one of \['0', .*'6'\] "
                                                   r"\(config.dataset.label_order='dfew'\)"),
    (['images/happy_0.png 0'], 'raf_official', ValueError, r":2: label '0' is not one of \['1', .*'7'\]"),
    (['images/happy_0.png happy'], 'dfew', ValueError, r":2: label 'happy' is not one of"),
    (['images/happy_0.png'], 'dfew', ValueError, r':2: expected "<image path> <label>" .* got 1 columns'),
    (['my face.png 1 0'], 'dfew', ValueError, r':2: expected .* got 4 columns'),
    (['images/happy_0.png 16 0'], 'dfew', ValueError, r":2: the middle column is a frame count and must be 1"),
    ([], 'dfew', ValueError, r'list.txt lists no images'),
    (['images/happy_0.png 0'], 'fer2013', ValueError, r"config.dataset.label_order='fer2013' not in"),
    (['images/happy_0.png 0', 'images/nope.png 1', 'images/gone.png 1'], 'dfew', FileNotFoundError,
     r':3: image .*images/nope.png does not exist \(2 of 3 listed images are missing; relative paths start at'),
])
def test_bad_lists_fail_naming_the_file_and_line(faces, tmp_path, lines, label_order, error, message):
  root, _ = faces
  list_file = write_list(root / 'list.txt', ['# header', *lines])
  with pytest.raises(error, match=message) as raised:
    image_list.ImageListSource(list_file, label_order=label_order)
  assert list_file in str(raised.value) or label_order not in image_list.LABEL_MAPS
  assert '\n' not in str(raised.value)


def test_missing_list_file_fails_naming_it(tmp_path):
  with pytest.raises(FileNotFoundError, match=f'image list {tmp_path}/train.txt does not exist'):
    image_list.ImageListSource(str(tmp_path / 'train.txt'))


def test_image_gone_or_unreadable_at_read_time_fails_naming_it_and_the_line(tmp_path, faces):
  _, written = faces
  write_image(tmp_path / 'a.png', written['images/happy_0.png'])
  (tmp_path / 'b.jpg').write_bytes(b'not an image')
  source = image_list.ImageListSource(write_list(tmp_path / 'list.txt', ['a.png 0', 'b.jpg 1']))
  with pytest.raises(ValueError, match=f'list.txt:2: image {tmp_path}/b.jpg is not a decodable image \\(12 bytes\\)'):
    source[1]
  os.remove(tmp_path / 'a.png')
  with pytest.raises(OSError, match=f'list.txt:1: cannot read image {tmp_path}/a.png: No such file'):
    source[0]


def dataset_config(image_lists, **fields):
  config = configlib.base_config()
  config.dataset.name = image_list.NAME
  config.dataset.image_lists = image_lists
  config.dataset.image_root = ''
  config.dataset.label_order = 'dfew'
  for key, value in fields.items():
    config.dataset[key] = value
  return config


def test_config_errors_name_the_fields(faces):
  root, _ = faces
  config = dataset_config({'train': write_list(root / 'ok.txt', ['images/happy_0.png 0'])})
  with pytest.raises(ValueError, match=r"split 'test' is not a key of config.dataset.image_lists \(it has \['train'\]"):
    inputs.data_sources(config)
  del config.dataset['label_order']
  with pytest.raises(ValueError, match=r"config.dataset.name='image_list' needs config.dataset.label_order"):
    inputs.split_source(config, 'train')


def class_lists(root, written):
  """train: every PNG (2 per class); test: one PNG per class."""
  pngs = sorted(name for name in written if name.endswith('.png'))
  label_of = {name: CLASS_NAMES.index(os.path.basename(name).rsplit('_', 1)[0]) for name in pngs}
  train = write_list(root / 'train_all.txt', [f'{name} 1 {label_of[name]}' for name in pngs])
  test = write_list(root / 'test_all.txt', [f'{name} {label_of[name]}' for name in pngs if name.endswith('_0.png')])
  return train, test


def test_pipeline_batches_one_frame_clips(faces):
  root, written = faces
  train_list, test_list = class_lists(root, written)
  config = dataset_config({'train': train_list, 'test': test_list})
  train_source, test_source = inputs.data_sources(config)
  sampler = configlib.segment_sampler(num_segments=1, frames_per_segment=1)
  batch = next(iter(pipeline.eval_batches(test_source, sampler=sampler, image_size=SIZE, batch_size=8)))
  assert batch['video'].shape == (8, 1, SIZE, SIZE, 3) and batch['mask'].tolist() == [True] * 7 + [False]
  np.testing.assert_array_equal(batch['video'][2, 0], written[f'images/{CLASS_NAMES[test_source.labels[2]]}_0.png'])
  assert sorted(batch['label'][:7].tolist()) == list(range(7))
  train_batch = next(iter(pipeline.train_dataset(train_source, sampler=sampler, augment='aen', image_size=24,
                                                 batch_size=4, seed=0, num_threads=1)))
  assert train_batch['video'].shape == (4, 1, 24, 24, 3) and train_batch['video'].dtype == np.uint8


def test_aen_frame_trains_on_an_image_list(tmp_path, faces):
  if 'aen_frame' not in models.MODELS:  # until models/aen.py is committed
    pytest.skip('model aen_frame is not registered in dferjax.models.MODELS')
  root, written = faces
  train_list, test_list = class_lists(root, written)
  config = dataset_config({'train': train_list, 'test': test_list})
  config.model_name = 'aen_frame'
  config.model = ml_collections.ConfigDict(dict(num_frames=1, backbone_stage_sizes=(1, 1, 1, 1), backbone_width=8,
                                                middle_stage=1, middle_channels=2))
  config.input.sampler = configlib.segment_sampler(num_segments=1, frames_per_segment=1)
  config.input.image_size = SIZE
  config.input.augment = 'aen'
  config.input.num_threads = 2
  config.batch_size = 4
  config.eval_batch_size = 8
  config.num_epochs = 1
  config.steps_per_epoch = 2
  config.progress_bar = False
  result = train.train_and_evaluate(config.lock(), str(tmp_path / 'run'))
  assert result['num_clips'] == 7 and 0.0 <= result['war'] <= 1.0
  assert os.path.isfile(tmp_path / 'run' / 'results.json')
