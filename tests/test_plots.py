"""Confusion-matrix and learning-curve PNGs: sized, not blank, and clear errors on bad input."""
import subprocess
import sys

from matplotlib import image as mpl_image
import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from dferjax import plots
from dferjax import writers
from tfds_builders.labels import CLASS_NAMES, NUM_CLASSES


def random_confusion(rng, num_clips=200, accuracy=0.6):
  labels = rng.integers(0, NUM_CLASSES, size=num_clips)
  predictions = np.where(rng.random(num_clips) < accuracy, labels, rng.integers(0, NUM_CLASSES, size=num_clips))
  return sk_metrics.confusion_matrix(labels, predictions, labels=range(NUM_CLASSES))


def test_confusion_png(tmp_path):
  confusion = random_confusion(np.random.default_rng(0))
  for normalize in (True, False):
    path = plots.plot_confusion_matrix(confusion, CLASS_NAMES, tmp_path / f'plots/confusion_{normalize}.png',
                                       normalize=normalize)
    assert path.stat().st_size > 10_000
    pixels = mpl_image.imread(path)
    assert 500 <= pixels.shape[0] <= 1200 and 500 <= pixels.shape[1] <= 1400 and pixels.shape[2] in (3, 4)
    assert pixels[..., :3].std() > 0.05  # not a blank canvas
  rgb = plots.render_rgb(plots.confusion_figure(confusion, CLASS_NAMES))
  assert rgb.dtype == np.uint8 and rgb.shape[2] == 3
  with pytest.raises(ValueError, match=r'expected \(7, 7\)'):
    plots.plot_confusion_matrix(confusion[:6, :6], CLASS_NAMES, tmp_path / 'bad.png')


def test_learning_curves_png(tmp_path):
  rng = np.random.default_rng(1)
  with writers.MetricWriter(tmp_path, enabled=True, tensorboard=False) as writer:
    for epoch in range(1, 5):
      writer.write('train', epoch * 10, epoch, {'loss': 2.0 / epoch})
      writer.write_eval(epoch * 10, epoch, random_confusion(rng), CLASS_NAMES, loss=1.5 / epoch)
  path = plots.plot_learning_curves(writers.read_records(tmp_path), tmp_path / 'curves.png')
  pixels = mpl_image.imread(path)
  assert pixels.shape[:2] == (400, 1100)
  assert pixels[..., :3].std() > 0.05
  with pytest.raises(ValueError, match='no train records'):
    plots.plot_learning_curves([{'split': 'train', 'step': 1, 'epoch': 0}], tmp_path / 'empty.png')


def test_plots_imports_neither_writers_nor_reports():
  """writers imports plots for TensorBoard's confusion image; an import back would make a circle."""
  code = 'import sys; import dferjax.plots; print(sorted(m for m in sys.modules if m.startswith("dferjax")))'
  loaded = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
  assert 'dferjax.plots' in loaded and 'writers' not in loaded and 'reports' not in loaded
