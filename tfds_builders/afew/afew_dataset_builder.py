"""AFEW builder: configs px112 (default), px224 and any px{size}[_{jpeg|raw}]; splits train / validation.

The official release ships .avi files; the builder reads frames extracted next to them (one folder per video).
"""
import pathlib

import tensorflow_datasets as tfds

from tfds_builders import common

_SPLITS = (('train', 'Train_AFEW', 'Train'), ('validation', 'Val_AFEW', 'Val'))  # split, folder, clip_id prefix
# Shipped next to the emotion folders in some copies of the release; not emotions.
_NOT_EMOTION_FOLDERS = ('AlignedFaces_LBPTOP_Points', 'AlignedFaces_LBPTOP_Points_Val')
FRAMES_NOT_EXTRACTED = 'frames not extracted (an .avi without a frame folder)'
LAYOUT = """\
  <manual_dir>/
    Train_AFEW/<Emotion>/<video id>/00001.jpg, 00002.jpg, ...   (frames of Train_AFEW/<Emotion>/<video id>.avi)
    Val_AFEW/<Emotion>/<video id>/00001.jpg, ...
  <Emotion> = Angry, Disgust, Fear, Happy, Neutral, Sad, Surprise (Anger, Happiness, Sadness also accepted).
  The .avi files may stay where they are; an .avi without its frame folder is skipped and counted."""


class Afew(common.ClipBuilder):
  """AFEW (EmotiW): movie clips, 773 train / 383 validation videos; papers report the validation set."""
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Train_AFEW -> train, Val_AFEW -> validation; frames resized at build time.'}
  LAYOUT = LAYOUT
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Get AFEW from the EmotiW organisers (https://sites.google.com/site/emotiwchallenge/), unzip Train_AFEW and
Val_AFEW into the manual dir, then extract every video's frames into a folder named like the video, e.g.

  cd <manual_dir>
  for avi in Train_AFEW/*/*.avi Val_AFEW/*/*.avi; do
    mkdir -p "${{avi%.avi}}" && ffmpeg -loglevel error -i "$avi" -q:v 2 "${{avi%.avi}}/%05d.jpg"
  done

(one such command: ffmpeg -i Train_AFEW/Angry/000046280.avi -q:v 2 Train_AFEW/Angry/000046280/%05d.jpg).
The papers train on face crops (detected and aligned per frame, e.g. with RetinaFace or dlib); put those crops
in the frame folders instead of the full frames if you have them. Full frames are centre-cropped to a square.
Expected tree:
{LAYOUT}
Build without TensorFlow/Beam: python scripts/build_dataset.py --dataset afew --manual_dir <dir> --data_dir <dir>"""
  DESCRIPTION = ('AFEW movie clips (7 classes, DFEW order happy, sad, neutral, angry, surprise, disgust, fear); '
                 'the test set has no public labels, so evaluation uses validation.')
  HOMEPAGE = 'https://sites.google.com/site/emotiwchallenge/'
  CITATION = """@article{dhall2012afew,
  title={Collecting Large, Richly Annotated Facial-Expression Databases from Movies},
  author={Dhall, Abhinav and Goecke, Roland and Lucey, Simon and Gedeon, Tom},
  journal={IEEE MultiMedia}, volume={19}, number={3}, pages={34--41}, year={2012}}"""

  def scan(self, manual_dir) -> common.Scan:
    manual_dir = pathlib.Path(manual_dir)
    scan = common.Scan(splits={})
    for split, folder, prefix in _SPLITS:
      split_root = manual_dir / folder
      common.require_dir(split_root, f'AFEW {split} videos', LAYOUT)
      scan.splits[split] = []
      for emotion_dir in sorted(p for p in split_root.iterdir() if p.is_dir()):
        label = common.emotion_label(emotion_dir.name)
        if label is None:
          if emotion_dir.name in _NOT_EMOTION_FOLDERS:
            continue
          raise ValueError(f'{emotion_dir}: unknown emotion folder {emotion_dir.name!r}; expected one of '
                           f'{common.EMOTION_NAMES_HELP}')
        videos = {}
        for entry in emotion_dir.iterdir():
          if entry.is_dir():
            videos[entry.name] = entry
          elif entry.suffix.lower() == '.avi':
            videos.setdefault(entry.stem, None)
        for video_id, frame_dir in sorted(videos.items()):
          clip_id = f'{prefix}/{emotion_dir.name}/{video_id}'
          if frame_dir is None:
            scan.skipped.append((split, clip_id, FRAMES_NOT_EXTRACTED))
          else:
            scan.add(split, clip_id, label, frame_dir)
    scan.check_not_empty(str(manual_dir))
    return scan


Afew.BUILDER_CONFIGS = [Afew.make_config(image_size=size) for size in (112, 224)]
