"""JPEG vs raw uint8 frame storage in the DFEW builder: bytes per frame, read + decode time per 16 sampled frames.

python /work/notes/bench_frame_storage.py [--clips 8] [--frames 64]
Two sources: the synthetic faces, and a real photograph (matplotlib's grace_hopper.jpg) made into clips of
moving, zooming square face crops, which compresses like real face video (texture, not flat colour).
"""
import argparse
import os
import pathlib
import tempfile
import time

import cv2
import matplotlib.cbook
import numpy as np
import tensorflow_datasets as tfds

from dferjax.data import synthetic
from tfds_builders.dfew import Dfew


def photo_clip(photo, num_frames, rng):
  """Square crops drifting over the face region of the photo, resized to 224 (a hand-held face track)."""
  height, width = photo.shape[:2]
  side = int(min(height, width) * rng.uniform(0.55, 0.7))
  x0, y0 = rng.uniform(0, width - side * 1.1), rng.uniform(0, height - side * 1.1)
  frames = []
  for i in range(num_frames):
    scale = 1 + 0.08 * np.sin(i / 9)
    s = int(side / scale)
    x = int(np.clip(x0 + 12 * np.sin(i / 7), 0, width - s))
    y = int(np.clip(y0 + 10 * np.cos(i / 11), 0, height - s))
    crop = photo[y:y + s, x:x + s]
    frames.append(cv2.resize(crop, (224, 224), interpolation=cv2.INTER_AREA))
  return frames


def write_tree(root, source, clips, frames_per_clip):
  rng = np.random.default_rng(0)
  photo = cv2.imread(matplotlib.cbook.get_sample_data('grace_hopper.jpg', asfileobj=False))
  ids = [f'{k + 1:05d}' for k in range(clips)]
  for k, clip_id in enumerate(ids):
    if source == 'photo':
      frames = [cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in photo_clip(photo, frames_per_clip, rng)]
    else:
      frames, _, _ = synthetic.render_clip(synthetic.CLASS_NAMES[k % 7], frames_per_clip, rng)
    synthetic.write_frames(root / 'Clip' / 'clip_224x224' / clip_id, frames, lambda i, c=clip_id: f'{c}_{i:05d}.jpg')
  for split, members in (('train', ids[:-1]), ('test', ids[-1:])):
    folder = root / 'EmoLabel_DataSplit' / f'{split}(single-labeled)'
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'set_1.csv').write_text('video_name,label\n' + ''.join(f'{int(c)},1\n' for c in members))


def decode_sampled(record, index):
  frames = record['frames']
  if isinstance(frames, np.ndarray) and frames.dtype == np.uint8:
    return frames[index]
  return np.stack([cv2.cvtColor(cv2.imdecode(np.frombuffer(frames[i], np.uint8), cv2.IMREAD_COLOR),
                                cv2.COLOR_BGR2RGB) for i in index])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--clips', type=int, default=8)
  parser.add_argument('--frames', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=60)
  parser.add_argument('--sizes', default='32,48,112,224')
  args = parser.parse_args()
  tfds.display_progress_bar(False)
  cv2.setNumThreads(1)
  print(f'| source | size | storage | bytes/frame | read+decode ms / 16 of {args.frames} frames |')
  print('|---|---|---|---|---|')
  with tempfile.TemporaryDirectory() as tmp:
    for source in ('photo', 'synthetic'):
      manual = pathlib.Path(tmp) / source
      write_tree(manual, source, args.clips, args.frames)
      for size in map(int, args.sizes.split(',')):
        for encoding in ('jpeg', 'raw'):
          builder = Dfew(config=Dfew.config_from_name(f'fold1_px{size}_{encoding}'), data_dir=os.path.join(tmp, 'data', source))
          builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
          files = list(pathlib.Path(builder.data_path).glob('*.array_record*'))
          per_frame = sum(f.stat().st_size for f in files) / (args.clips * args.frames)
          source_ = builder.as_data_source('train')
          index = np.linspace(0, args.frames - 1, 16).astype(int)
          decode_sampled(source_[0], index)  # warm the page cache
          start = time.perf_counter()
          for r in range(args.repeats):
            decode_sampled(source_[r % len(source_)], index)
          ms = (time.perf_counter() - start) / args.repeats * 1e3
          print(f'| {source} | {size} | {encoding} | {per_frame / 1024:.1f} KiB | {ms:.2f} |')


if __name__ == '__main__':
  main()
