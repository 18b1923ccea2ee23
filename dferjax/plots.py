"""Confusion-matrix and learning-curve figures and PNGs.

A leaf module (it imports neither `writers` nor `reports`), so `writers` can draw TensorBoard's confusion image
without importing `reports`, which imports `writers`. Figures use matplotlib's object API with the Agg canvas
(no pyplot, no global backend state), so they work headless and from any thread.
"""
from collections.abc import Mapping, Sequence
import math
import os
import pathlib

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

DPI = 100


def confusion_figure(confusion, class_names: Sequence[str], normalize: bool = True, title: str = '') -> Figure:
  """A heat map of confusion [C, C] (rows = true, columns = predicted) with counts in the cells.

  With `normalize` the colours are row-normalised (per-class recall on the diagonal) and cells also
  show that percentage; otherwise colours are raw counts.
  """
  confusion = np.asarray(confusion)
  num_classes = len(class_names)
  if confusion.shape != (num_classes, num_classes):
    raise ValueError(f'confusion has shape {confusion.shape}, expected ({num_classes}, {num_classes}) for '
                     f'class_names {list(class_names)}')
  support = confusion.sum(axis=1, keepdims=True)
  row_fraction = confusion / np.maximum(support, 1)  # a class with no clips shows a zero row
  shown = row_fraction if normalize else confusion
  side = 2.5 + 0.8 * num_classes
  figure = Figure(figsize=(side + 1.0, side), dpi=DPI)
  FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  image = axes.imshow(shown, cmap='Blues', vmin=0, vmax=1 if normalize else max(int(confusion.max()), 1))
  figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label='row fraction' if normalize else 'clips')
  threshold = 0.5 * (1 if normalize else max(int(confusion.max()), 1))
  for true_class in range(num_classes):
    for predicted_class in range(num_classes):
      count = int(confusion[true_class, predicted_class])
      text = f'{count}\n{100 * row_fraction[true_class, predicted_class]:.1f}%' if normalize else str(count)
      axes.text(predicted_class, true_class, text, ha='center', va='center', fontsize=8,
                color='white' if shown[true_class, predicted_class] > threshold else 'black')
  axes.set_xticks(range(num_classes), class_names, rotation=45, ha='right')
  axes.set_yticks(range(num_classes), class_names)
  axes.set_xlabel('predicted')
  axes.set_ylabel('true')
  if title:  # which checkpoint the matrix is of: a PNG alone cannot say
    axes.set_title(title, fontsize=9)
  figure.tight_layout()
  return figure


def render_rgb(figure: Figure) -> np.ndarray:
  """uint8 [height, width, 3] pixels of a figure (for TensorBoard images)."""
  canvas = FigureCanvasAgg(figure)
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _save(figure: Figure, path: str | os.PathLike) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, format='png', dpi=DPI)
  return path


def plot_confusion_matrix(confusion, class_names: Sequence[str], path: str | os.PathLike,
                          normalize: bool = True, title: str = '') -> pathlib.Path:
  """Writes the confusion matrix [C, C] as a PNG (counts, and row-normalised % with `normalize`), titled with
  `title` (e.g. the checkpoint it shows)."""
  return _save(confusion_figure(confusion, class_names, normalize, title), path)


def plot_learning_curves(records: Sequence[Mapping], path: str | os.PathLike) -> pathlib.Path:
  """Writes a PNG of train loss (left) and eval UAR/WAR in % (right) against epoch (`learning_curves_figure`)."""
  return _save(learning_curves_figure(records), path)


def learning_curves_figure(records: Sequence[Mapping]) -> Figure:
  """Train loss (left) and eval UAR/WAR in % (right) against epoch; WAR dashed with hollow markers over a solid
  UAR, so both stay visible where they coincide (balanced test sets).

  `records`: metric records as returned by `writers.read_records(workdir)`; train records need 'loss',
  eval records (any split but 'train') 'uar' and 'war'.
  """
  train = [record for record in records if record['split'] == 'train' and record.get('loss') is not None]
  evals = [record for record in records if record['split'] != 'train' and record.get('uar') is not None]
  if not train and not evals:
    raise ValueError("no train records with 'loss' and no eval records with 'uar' to plot")
  figure = Figure(figsize=(11, 4), dpi=DPI)
  FigureCanvasAgg(figure)
  loss_axes, recall_axes = figure.subplots(1, 2)
  if train:
    loss_axes.plot([record['epoch'] for record in train], [record['loss'] for record in train], label='train loss')
  for split in dict.fromkeys(record['split'] for record in records if record['split'] != 'train'):
    if split_evals := [record for record in evals if record['split'] == split]:
      epochs = [record['epoch'] for record in split_evals]
      if any(record.get('loss') is not None for record in split_evals):
        losses = [math.nan if record.get('loss') is None else record['loss'] for record in split_evals]
        loss_axes.plot(epochs, losses, marker='.', label=f'{split} loss')
      recall_axes.plot(epochs, [100 * record['uar'] for record in split_evals], marker='.', linewidth=2.5,
                       label=f'{split} UAR')
      recall_axes.plot(epochs, [100 * record['war'] for record in split_evals], marker='o', markerfacecolor='none',
                       linestyle='--', linewidth=1.2, label=f'{split} WAR')
  loss_axes.set(xlabel='epoch', ylabel='loss', title='loss')
  recall_axes.set(xlabel='epoch', ylabel='%', title='UAR / WAR')
  for axes in (loss_axes, recall_axes):
    axes.grid(alpha=0.3)
    if axes.lines:
      axes.legend()
  figure.tight_layout()
  return figure
