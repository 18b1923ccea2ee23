"""FERV39K builder: configs px112 (default), px224 and any px{size}[_{jpeg|raw}]; splits train / test."""
import pathlib

import tensorflow_datasets as tfds

from tfds_builders import common

LAYOUT = """\
  <manual_dir>/
    2_ClipsforFaceCrop/<Scene>/<Emotion>/<4-digit clip>/*.jpg     (e.g. 2_ClipsforFaceCrop/Action/Happy/0267/)
    4_setups/All_scenes/train_All.csv, test_All.csv
  CSV: no header, one clip per line, space-separated: `Action/Happy/0267 Happy`
  (the clip's path under 2_ClipsforFaceCrop, then Angry|Disgust|Fear|Happy|Neutral|Sad|Surprise)."""


def read_setup_csv(path: pathlib.Path) -> list[tuple[int, str, int]]:
  """Lines of a FERV39K setup file as (line number, clip id 'Action/Happy/0267', label 0..6)."""
  rows, seen = [], {}
  with open(path, encoding='utf-8-sig') as file:
    for line_number, line in enumerate(file, start=1):
      fields = line.split()
      if not fields:
        continue
      if len(fields) != 2:
        raise ValueError(f'{path}:{line_number}: malformed line {line.rstrip()!r}: expected '
                         '"<Scene>/<Emotion>/<clip> <Emotion>" (two space-separated fields)')
      relative, emotion = fields
      parts = relative.replace('\\', '/').strip('/').split('/')
      if any(part in ('', '.', '..') for part in parts):
        raise ValueError(f'{path}:{line_number}: malformed clip path {relative!r}')
      label = common.emotion_label(emotion)
      if label is None:
        raise ValueError(f'{path}:{line_number}: unknown label {emotion!r}; '
                         f'expected one of {common.EMOTION_NAMES_HELP}')
      clip_id = '/'.join(parts)
      if clip_id in seen:
        raise ValueError(f'{path}:{line_number}: clip {clip_id} listed twice (first on line {seen[clip_id]})')
      seen[clip_id] = line_number
      rows.append((line_number, clip_id, label))
  return rows


class Ferv39k(common.ClipBuilder):
  """FERV39K: 38,935 clips from 22 scenes; All_scenes setup, 31,088 train / 7,847 test."""
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'All_scenes train/test setup; frames of 2_ClipsforFaceCrop resized at build time.'}
  LAYOUT = LAYOUT
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Request FERV39K at https://wangyanckxx.github.io/Proj_CVPR2022_FERV39k.html and unzip the face-crop clips and
the setups into the manual dir:
{LAYOUT}
Listed clips whose folder is missing or empty are skipped and counted.
Build without TensorFlow/Beam: python scripts/build_dataset.py --dataset ferv39k --manual_dir <dir> --data_dir <dir>"""
  DESCRIPTION = ('FERV39K clips (7 classes, DFEW order happy, sad, neutral, angry, surprise, disgust, fear), '
                 'All_scenes setup.')
  HOMEPAGE = 'https://wangyanckxx.github.io/Proj_CVPR2022_FERV39k.html'
  CITATION = """@inproceedings{wang2022ferv39k,
  title={FERV39k: A Large-Scale Multi-Scene Dataset for Facial Expression Recognition in Videos},
  author={Wang, Yan and Sun, Yixuan and Huang, Yiwen and Liu, Zhongying and Gao, Shuyong and Zhang, Wei and
          Ge, Weifeng and Zhang, Wenqiang},
  booktitle={CVPR}, pages={20922--20931}, year={2022}}"""

  def scan(self, manual_dir) -> common.Scan:
    manual_dir = pathlib.Path(manual_dir)
    clip_root = manual_dir / '2_ClipsforFaceCrop'
    common.require_dir(clip_root, 'FERV39K face clips', LAYOUT)
    scan = common.Scan(splits={})
    for split in ('train', 'test'):
      path = manual_dir / '4_setups' / 'All_scenes' / f'{split}_All.csv'
      common.require_file(path, f'FERV39K {split} setup', LAYOUT)
      scan.splits[split] = []
      for _, clip_id, label in read_setup_csv(path):
        scan.add(split, clip_id, label, clip_root.joinpath(*clip_id.split('/')))
    scan.check_not_empty(str(manual_dir), clip_root)
    return scan


Ferv39k.BUILDER_CONFIGS = [Ferv39k.make_config(image_size=size) for size in (112, 224)]
