"""Re-evaluates a run's checkpoint, or collects DFEW's five folds into the papers' table. Each evaluated clip's
label, prediction and class probabilities (and the per-clip outputs a model declares, such as CEFLNet's salient
snippet) go to <workdir>/clips_<split>_step<N>.jsonl (dferjax/clip_report.py).

    python -m dferjax.evaluate --workdir runs/stt_dfew_fold1 [--step best|selected|latest|N]
    python -m dferjax.evaluate --folds runs/stt_dfew_fold1,runs/stt_dfew_fold2,... [--select_by war]
    python -m dferjax.evaluate --workdir runs/stt_dfew_fold1 --dataset afew/px112     # across datasets
    python -m dferjax.evaluate --folds runs/stt_dfew_fold1,... --dataset ferv39k/px112  # each fold's, and the mean
    python -m dferjax.evaluate --workdir runs/stt_dfew_fold1 --clip_list mine/test.txt  # clips of one's own

The fold tables show both protocols: the best test epoch (the papers') and, for runs with a validation hold-out
(config.validation), the test evaluation of the checkpoint selected on it. `--dataset` evaluates a run's checkpoint on
another built dataset (every builder labels the same seven classes in one order), on its reported split unless
`--split` names one; `--clip_list` on the clips of a list file (dferjax/data/clip_list.py); with `--folds`, each
fold's checkpoint is evaluated and the mean over folds follows. Re-evaluating warns
(environment.DatasetChangedWarning) when the dataset read now is not the build the run trained on.

Expected errors print one `error: ...` message and exit 1 (--verbose: the traceback).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys

from absl import app, flags, logging
import ml_collections

from dferjax import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'A dferjax workdir to re-evaluate.')
_STEP = flags.DEFINE_string('step', 'best', "'best' (on test), 'selected' (on the validation hold-out), 'latest' "
                             'or a step number.')
_SPLIT = flags.DEFINE_string('split', None, 'Split to evaluate (default: the config eval_split).')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Override config.dataset.data_dir.')
_DATASET = flags.DEFINE_string('dataset', None, "Evaluate on another built dataset than the run's, e.g. 'afew/px112' "
                               "or 'ferv39k/px112' (default split: the dataset's reported one, --split to change).")
_CLIP_LIST = flags.DEFINE_string('clip_list', None, "Evaluate on the clips of a list file (dferjax/data/clip_list.py) "
                                 "labelled with the run's classes, e.g. a test set of one's own.")
_CLIP_ROOT = flags.DEFINE_string('clip_root', '', "With --clip_list: where its relative clip folders start (default: "
                                 "the list file's folder).")
_FOLDS = flags.DEFINE_list('folds', None, 'Workdirs of the 5 DFEW folds, to collect into one table (each run\'s fold is '
                           'read from its config; duplicated or missing folds fail).')
_SELECT_BY = flags.DEFINE_enum('select_by', 'war', ['war', 'uar'],
                               'Fold table: per fold, the epoch with the best test metric (the public repos\' protocol).')
_LAST = flags.DEFINE_bool('last', False, 'Fold table: use the last epoch instead of the best.')
_LATEX = flags.DEFINE_bool('latex', False, 'Print the tables as LaTeX (booktabs) tabulars, the other lines as comments.')
_VERBOSE = flags.DEFINE_bool('verbose', False, "Show the libraries' INFO logs and the traceback of an expected error "
                               '(else one message).')


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} does not exist: is {workdir!r} a dferjax workdir?')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def evaluate_checkpoint(workdir: str, step: str = 'best', split: str | None = None, data_dir: str | None = None,
                        dataset: str | None = None, compiled: dict | None = None, clip_list: str | None = None,
                        clip_root: str = '') -> dict:
  """Restores one checkpoint of `workdir` (`choose_step`) and evaluates it on a split of the run's dataset, of
  `dataset` (another built one) or on the clips of the list file `clip_list`; returns the metrics. Runs whose
  configs are equal but for `init_from` share the jitted steps kept in `compiled` (one compilation for five folds
  evaluated on one dataset)."""
  from dferjax import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
  from dferjax import clip_report, train  # pylint: disable=import-outside-toplevel
  from dferjax.data import inputs  # pylint: disable=import-outside-toplevel
  from dferjax import environment  # pylint: disable=import-outside-toplevel
  config = load_run_config(workdir)
  if data_dir:
    config.dataset.data_dir = data_dir
  if dataset and clip_list:
    raise ValueError('give --dataset or --clip_list, not both')
  if clip_list:
    if split not in (None, 'test'):
      raise ValueError(f'--split {split}: a --clip_list is one split (its clips); leave --split out')
    dataset, split = clip_list, retarget_to_list(config, clip_list, clip_root)
  elif dataset and dataset != config.dataset.name:
    reported_split = retarget(config, dataset)
    split = split or reported_split
  else:
    dataset = None  # the run's own
    environment.warn_if_dataset_changed(workdir, config)
  other_dataset = dataset is not None
  checkpoints = checkpoint_lib.Checkpoints(workdir, best_metric=config.best_metric, read_only=True)
  try:
    chosen = choose_step(checkpoints, step, config, workdir)
    compiled = {} if compiled is None else compiled
    # Runs that differ only in where their training started (init_from: AEN's guide of each fold, a DFEW run for
    # AFEW) compile the same steps: the weights are the checkpoint's.
    key = json.dumps({name: value for name, value in config.to_dict().items() if name != 'init_from'},
                     sort_keys=True, default=str)
    if key not in compiled:
      steps = train.make_steps(config, steps_per_epoch=None)  # evaluation only: no optimizer
      compiled[key] = steps, clip_report.make_predict(steps, config)
    steps, predict = compiled[key]
    state = checkpoint_lib.restore_for_evaluation(checkpoints, chosen, steps.abstract_state)
  finally:
    checkpoints.close()
  split = split or config.dataset.eval_split
  target = os.path.splitext(os.path.basename(clip_list))[0] if clip_list else dataset
  name = evaluation_name(split, target if other_dataset else None)
  with train.device_memory_errors(config), \
       contextlib.closing(inputs.eval_reader(config, inputs.split_source(config, split))) as reader:
    result = train.evaluate(steps, state, config, reader)
    result['step'] = chosen
    if other_dataset:
      result.update(dataset=dataset, split=split)
    result.update(clip_report.report(steps, state, config, reader, clips_stem(workdir, name, chosen), predict))
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  if jax.process_index() == 0:
    from dferjax import plots  # pylint: disable=import-outside-toplevel  # matplotlib only here
    result['confusion_plot'] = str(plots.plot_confusion_matrix(
        np.asarray(result['confusion']), config.class_names, os.path.join(workdir, f'confusion_{name}_step{chosen}.png'),
        title=f'{dataset if other_dataset else config.dataset.name} {split}, step {chosen}: '
              f'UAR {100 * result["uar"]:.1f}% WAR {100 * result["war"]:.1f}%'))
  return result


def evaluation_name(split: str, target: str | None = None) -> str:
  """An evaluation's part of its files' names: the split, after the other dataset or list file it is of
  (`target`), made safe for a file name ('test[:50%]' -> 'test__50__')."""
  return re.sub(r'[^\w-]', '_', f'{target}_{split}' if target else split)


def clips_stem(workdir: str, name: str, step: int) -> str:
  """<workdir>/clips_<evaluation_name>_step<N>: the per-clip file of an evaluation, without its .jsonl."""
  return os.path.join(workdir, f'clips_{name}_step{step}')


def evaluate_folds(workdirs, dataset: str | None, step: str = 'best', split: str | None = None,
                   data_dir: str | None = None, clip_list: str | None = None, clip_root: str = '',
                   latex: bool = False) -> str:
  """Each DFEW fold run's checkpoint evaluated on another dataset (or a clip list): the table with the mean and
  std over folds."""
  from dferjax import reports  # pylint: disable=import-outside-toplevel
  names = reports.fold_names_from_configs(workdirs)  # from each run's config, not its position
  results, compiled = {}, {}
  for name, workdir in sorted(zip(names, workdirs)):
    results[name] = evaluate_checkpoint(workdir, step, split, data_dir, dataset, compiled, clip_list, clip_root)
    print(f'{"% " * latex}{name}: {workdir} step {results[name]["step"]}', flush=True)
  return (f'{len(results)} folds, --step {step}{on_what(results[name])}:\n'
          + reports.format_results_table(results, reports.class_names_of(workdirs), latex=latex))


def retarget(config: ml_collections.ConfigDict, dataset: str) -> str:
  """Points a run's config at another built dataset; returns that dataset's reported split. The run's input recipe
  (sampler, frame size, min_frames) stays: the model sees the clips as it was evaluated in training."""
  from dferjax.data import datasets  # pylint: disable=import-outside-toplevel
  builder_name, _ = datasets.split_name(dataset)  # fails naming the known datasets
  if tuple(config.class_names) != datasets.CLASS_NAMES:
    raise ValueError(f'--dataset {dataset}: the run was trained on the classes {tuple(config.class_names)}, '
                     f'{dataset} labels {datasets.CLASS_NAMES}')
  if not config.dataset.get('data_dir'):
    raise ValueError(f'--dataset {dataset}: the run read {config.dataset.name!r}, which names no TFDS data dir; give '
                     '--data_dir (where scripts/build_dataset.py built it)')
  config.dataset.name = dataset
  if 'synthetic' in config.dataset:  # the demo's own data; the named dataset is read from config.dataset.data_dir
    del config.dataset['synthetic']
  return datasets.REPORTED_SPLITS[builder_name]


def retarget_to_list(config: ml_collections.ConfigDict, list_file: str, clip_root: str = '') -> str:
  """Points a run's config at the clips of one list file, labelled with the run's classes; returns its split."""
  from dferjax.data import clip_list  # pylint: disable=import-outside-toplevel
  config.dataset = ml_collections.ConfigDict(dict(
      name=clip_list.NAME, data_dir='', train_split='test', eval_split='test', min_frames=config.dataset.min_frames,
      clip_lists={'test': list_file}, clip_root=clip_root))
  return 'test'


def choose_step(checkpoints, step: str, config: ml_collections.ConfigDict, workdir: str) -> int:
  """The checkpoint that `--step` names. A checkpoint damaged since it was written (a file truncated or removed,
  against `checkpoint_files/<step>.json`) is skipped with a warning when the step is implicit (best, selected,
  latest: the best or newest intact one instead) and fails when named by number. Nothing in the workdir moves."""
  from dferjax import reports, writers  # pylint: disable=import-outside-toplevel
  from dferjax.data import validation  # pylint: disable=import-outside-toplevel
  damaged = checkpoints.damaged_steps()
  intact = [saved for saved in checkpoints.all_steps() if saved not in damaged]
  if step.isdigit():
    chosen = int(step)
    if chosen not in checkpoints.all_steps():
      raise ValueError(f'--step {chosen}: {workdir} holds steps {checkpoints.all_steps()}')
    if chosen in damaged:
      raise ValueError(f'--step {chosen}: checkpoint {checkpoints.directory}/{chosen} is damaged ({damaged[chosen]}); '
                       f'the intact steps are {intact}')
    return chosen
  if step == 'best':
    chosen, metric = checkpoints.best_step() or checkpoints.latest_step(), config.best_metric
  elif step == 'selected':
    record = reports.select_record(writers.read_records(workdir), 'selected', config.best_metric,
                                   config.dataset.eval_split)
    if record is None:
      raise ValueError(f'--step selected: {workdir} holds out no validation part (config.validation.fraction=0)')
    chosen, metric = record['step'], validation.checkpoint_metric(config)
  elif step == 'latest':
    chosen, metric = checkpoints.latest_step(), None
  else:
    raise ValueError(f"--step {step!r}: expected 'best', 'selected', 'latest' or a step number ({workdir} holds "
                     f'steps {checkpoints.all_steps()})')
  if chosen is None:
    raise FileNotFoundError(f'{workdir} holds no checkpoint')
  if chosen not in damaged:
    return chosen
  damage = f'checkpoint {checkpoints.directory}/{chosen} ({step}) is damaged ({damaged[chosen]})'
  if not intact:
    raise ValueError(f'{damage}, and no intact checkpoint is left in {checkpoints.directory}')
  instead = checkpoints.best_step_among(intact, metric) if metric else None
  if instead is not None:
    why = f'the best intact one by {metric}'
  else:
    instead = max(intact)
    why = 'the newest intact one' + (f' (no intact checkpoint saved {metric})' if metric else '')
  sys.stderr.write(f'warning: {damage}: evaluating step {instead}, {why}\n')
  return instead


def main(argv):
  del argv
  if not _VERBOSE.value:  # the libraries' INFO logs (Orbax, TFDS: a screenful per evaluation), as in dferjax.main
    logging.set_verbosity(logging.WARNING)
  cli.run(run_command, verbose=_VERBOSE.value)


def run_command():
  from dferjax import reports  # pylint: disable=import-outside-toplevel
  if bool(_WORKDIR.value) == bool(_FOLDS.value):
    raise app.UsageError('give exactly one of --workdir and --folds')
  latex = _LATEX.value
  if _WORKDIR.value:
    result = evaluate_checkpoint(_WORKDIR.value, _STEP.value, _SPLIT.value, _DATA_DIR.value, _DATASET.value,
                                 clip_list=_CLIP_LIST.value, clip_root=_CLIP_ROOT.value)
    lines = [f'{_WORKDIR.value} step {result["step"]}{on_what(result)}:',
             reports.format_results_table({os.path.basename(_WORKDIR.value.rstrip('/')): result},
                                          reports.class_names_of([_WORKDIR.value]), with_mean=False, latex=latex)]
    if 'clip_report' in result:  # process 0
      lines.append(f'per clip: {result["clip_report"]}\nconfusion matrix: {result["confusion_plot"]}\n'
                   f'{result["clip_summary"]}')
    text = '\n'.join(lines)
  elif _DATASET.value or _CLIP_LIST.value:
    text = evaluate_folds(_FOLDS.value, _DATASET.value, _STEP.value, _SPLIT.value, _DATA_DIR.value, _CLIP_LIST.value,
                          _CLIP_ROOT.value, latex=latex)
  else:
    names = reports.fold_names_from_configs(_FOLDS.value)  # from each run's config, not its position
    text = reports.fold_report(_FOLDS.value, reports.class_names_of(_FOLDS.value), select_by=_SELECT_BY.value,
                               last=_LAST.value, fold_names=names, latex=latex)
  print(reports.latex_comments(text) if latex else text)


def on_what(result: dict) -> str:
  return f' on {result["dataset"]} {result["split"]}' if 'dataset' in result else ''


if __name__ == '__main__':
  app.run(main)
