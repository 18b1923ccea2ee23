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


def test_confusion_png_says_which_checkpoint_it_shows(tmp_path, monkeypatch):
  from dferjax import configlib, train
  with writers.MetricWriter(tmp_path, enabled=True, tensorboard=False) as writer:
    for epoch, accuracy in ((1, 0.3), (2, 0.9), (3, 0.5)):
      writer.write('train', epoch * 10, epoch, {'loss': 1.0})
      writer.write_eval(epoch * 10, epoch, random_confusion(np.random.default_rng(epoch), accuracy=accuracy),
                        CLASS_NAMES)
  titles = []
  monkeypatch.setattr(plots, 'plot_confusion_matrix', lambda *args, title='', **kwargs: titles.append(title))
  config = configlib.base_config()
  last = writers.read_records(tmp_path, 'test')[-1]
  train.write_final_reports(str(tmp_path), config, last, best_step=20, head_names=[])
  assert len(titles) == 1 and titles[0].startswith('test, best WAR: step 20 (epoch 2), UAR ')
  figure = plots.confusion_figure(random_confusion(np.random.default_rng(0)), CLASS_NAMES, title=titles[0])
  assert figure.axes[0].get_title() == titles[0]


def test_uar_and_war_curves_stay_visible_when_they_coincide():
  records = [{'split': 'test', 'step': epoch, 'epoch': epoch, 'uar': 0.5, 'war': 0.5} for epoch in (1, 2, 3)]
  recall_axes = plots.learning_curves_figure(records).axes[1]
  uar, war = recall_axes.lines
  assert list(uar.get_ydata()) == list(war.get_ydata())
  assert uar.get_linestyle() != war.get_linestyle() and uar.get_marker() != war.get_marker()
  assert war.get_markerfacecolor() == 'none'  # hollow: the UAR marker shows through
