"""DFEW builder: configs fold1..fold5 (112 px), fold1_px224..fold5_px224, and any fold{k}_px{size}[_{jpeg|raw}].

Frames come from Clip/clip_224x224/<id>/ (all of them, in order); splits from the official single-label CSVs.
"""
import csv
import pathlib
import re

import tensorflow_datasets as tfds

from tfds_builders import common

_SPLIT_FOLDER_SPELLINGS = ('single-labeled', 'single_labeled')  # MAE-DFER's code / the release's zip names
LAYOUT = """\
  <manual_dir>/
    Clip/clip_224x224/00001/00001_00001.jpg, 00001_00002.jpg, ...   (one folder per clip, 5-digit ids)
    EmoLabel_DataSplit/train(single-labeled)/set_1.csv ... set_5.csv
    EmoLabel_DataSplit/test(single-labeled)/set_1.csv ... set_5.csv
  (the folders may also be spelled `train(single_labeled)`, `test(single_labeled)`)
  CSV: header `video_name,label`, rows like `2522,6`: video_name without zero padding,
  label 1..7 = Happy, Sad, Neutral, Angry, Surprise, Disgust, Fear."""


def _name_grammar() -> str:
  return 'fold{1..5}[_px{size}][_jpeg|_raw], e.g. fold1, fold3_px224, fold1_px48'


def read_split_csv(path: pathlib.Path) -> list[tuple[int, str, int]]:
  """Rows of an official split CSV as (line number, clip id '02522', label 0..6).

  Tolerates a BOM, whitespace around fields, extra columns and blank lines; anything else fails naming file:line.
  """
  with open(path, newline='', encoding='utf-8-sig') as file:
    reader = csv.reader(file)
    header = next(reader, None)
    columns = [column.strip().lstrip('\ufeff').lower() for column in header or []]
    if 'video_name' not in columns or 'label' not in columns:
      raise ValueError(f'{path}:1: header {header} must name the columns video_name and label '
                       '(DFEW official split CSV: `video_name,label`)')
    video_column, label_column = columns.index('video_name'), columns.index('label')
    rows, seen = [], {}
    for row in reader:
      line = reader.line_num
      if not any(field.strip() for field in row):
        continue
      if len(row) != len(columns):
        raise ValueError(f'{path}:{line}: malformed row {",".join(row)!r}: expected {len(columns)} fields '
                         f'({",".join(columns)})')
      video, label = row[video_column].strip(), row[label_column].strip()
      if not video.isdigit():
        raise ValueError(f'{path}:{line}: malformed row {",".join(row)!r}: video_name {video!r} is not an integer')
      if not re.fullmatch(r'[+-]?\d+', label):
        raise ValueError(f'{path}:{line}: malformed row {",".join(row)!r}: label {label!r} is not an integer')
      if not 1 <= int(label) <= 7:
        raise ValueError(f'{path}:{line}: unknown label {label}: DFEW labels are 1..7 = '
                         'Happy, Sad, Neutral, Angry, Surprise, Disgust, Fear')
      clip_id = f'{int(video):05d}'
      if clip_id in seen:
        raise ValueError(f'{path}:{line}: clip {clip_id} listed twice (first on line {seen[clip_id]})')
      seen[clip_id] = line
      rows.append((line, clip_id, int(label) - 1))
  return rows


def split_csv_path(manual_dir: pathlib.Path, split: str, fold: int) -> pathlib.Path:
  """EmoLabel_DataSplit/<split>(single-labeled|single_labeled)/set_<fold>.csv, whichever spelling exists."""
  candidates = [manual_dir / 'EmoLabel_DataSplit' / f'{split}({spelling})' / f'set_{fold}.csv'
                for spelling in _SPLIT_FOLDER_SPELLINGS]
  for path in candidates:
    if path.is_file():
      return path
  raise FileNotFoundError(f'DFEW {split} split of fold {fold} not found: expected {candidates[0]} '
                          f'(or {candidates[1]}). Expected layout:\n{LAYOUT}')


class Dfew(common.ClipBuilder):
  """DFEW: 16,372 in-the-wild clips, 11,697 single-labelled with faces; 5-fold cross-validation."""
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Official 5-fold single-label splits, all frames of clip_224x224, resized at build time.'}
  LAYOUT = LAYOUT
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Request DFEW at https://dfew-dataset.github.io/ and unzip the face clips (Clip/clip_224x224) and the
single-label splits (EmoLabel_DataSplit) into the manual dir:
{LAYOUT}
Clips listed in a CSV whose folder is missing or empty (no face detected) are skipped and counted.
Build without TensorFlow/Beam: python scripts/build_dataset.py --dataset dfew --manual_dir <dir> --data_dir <dir>"""
  DESCRIPTION = ('DFEW dynamic facial expression clips (7 classes, DFEW order happy, sad, neutral, angry, surprise, '
                 'disgust, fear). Test = the fold\'s official test CSV, train = its train CSV.')
  HOMEPAGE = 'https://dfew-dataset.github.io/'
  CITATION = """@inproceedings{jiang2020dfew,
  title={DFEW: A Large-Scale Database for Recognizing Dynamic Facial Expressions in the Wild},
  author={Jiang, Xingxun and Zong, Yuan and Zheng, Wenming and Tang, Chuangao and Xia, Wanchuang and
          Lu, Cheng and Liu, Jiateng},
  booktitle={ACM Multimedia}, pages={2881--2889}, year={2020}}"""

  @classmethod
  def parse_config_name(cls, name: str) -> dict:
    match = re.fullmatch(r'fold(\d+)(?:_px(\d+))?(?:_(jpeg|raw))?', name)
    if not match or not 1 <= int(match[1]) <= 5:
      raise ValueError(f'DFEW config {name!r}: expected {_name_grammar()}')
    return {'fold': int(match[1]), 'image_size': int(match[2] or 112), 'frame_encoding': match[3]}

  @classmethod
  def config_name(cls, *, image_size: int, frame_encoding: str, fold: int | None = None) -> str:
    if fold is None:
      raise ValueError(f'DFEW configs need a fold: {_name_grammar()}')
    size = '' if image_size == 112 else f'_px{image_size}'
    return f'fold{fold}{size}{common.encoding_suffix(image_size, frame_encoding)}'

  def scan(self, manual_dir) -> common.Scan:
    manual_dir = pathlib.Path(manual_dir)
    fold = self.builder_config.fold
    clip_root = manual_dir / 'Clip' / 'clip_224x224'
    common.require_dir(clip_root, 'DFEW face clips', LAYOUT)
    scan = common.Scan(splits={})
    listed = {}
    for split in ('train', 'test'):
      path = split_csv_path(manual_dir, split, fold)
      scan.splits[split] = []
      for line, clip_id, label in read_split_csv(path):
        if clip_id in listed:
          raise ValueError(f'{path}:{line}: clip {clip_id} is also in {listed[clip_id]}: '
                           'train and test must be disjoint')
        listed[clip_id] = f'{path}:{line}'
        scan.add(split, clip_id, label, clip_root / clip_id)
    scan.check_not_empty(f'fold {fold} under {manual_dir}', clip_root)
    return scan


Dfew.BUILDER_CONFIGS = [Dfew.make_config(fold=fold, image_size=size) for size in (112, 224) for fold in range(1, 6)]
