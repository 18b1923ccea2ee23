"""The fields every experiment config shares, and the parsing of `get_config(arg)` arguments.

A config file builds on `base_config()`, sets its paper's whole recipe, and returns a `config.lock()`-ed
ConfigDict, so a misspelt `--config.field=value` override fails naming the field. Derived configs (AFEW,
FERV39K) import their DFEW config (`from configs import stt_dfew`) and change what differs.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from tfds_builders.labels import CLASS_NAMES


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `configs/x.py:fold=3,tiny` style arguments: `key=value` pairs and bare flags (True).

  Only keys present in `defaults` are accepted; values take the type of their default.
  """
  parsed = ml_collections.ConfigDict(defaults)
  if not arg:
    return parsed
  for item in arg.split(','):
    key, sep, value = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise ValueError(f'config argument {key!r} is not one of {sorted(defaults)} (got {arg!r})')
    default = defaults[key]
    if not sep:
      parsed[key] = True
    elif isinstance(default, bool):
      parsed[key] = value.lower() in ('1', 'true', 'yes')
    else:
      try:
        parsed[key] = type(default)(value)
      except ValueError:
        raise ValueError(f'config argument {key}={value!r}: expected {type(default).__name__} (default '
                         f'{default!r}; got {arg!r})') from None
  return parsed


def base_config() -> ml_collections.ConfigDict:
  """The fields every experiment has, with model-neutral values: a config file sets its paper's whole recipe.

  Neutral means: no model, no dataset, plain cross-entropy, no augmentation, a constant learning rate and a
  random initialisation; nothing here is any one paper's choice.
  """
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model_name = ''  # a key of dferjax.models.MODELS
  config.model = ml_collections.ConfigDict()  # fields of the model's Module, one-to-one
  config.num_classes = len(CLASS_NAMES)
  config.class_names = CLASS_NAMES

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = ''  # `<builder>/<builder config>`, e.g. 'dfew/fold1'; see tfds_builders/
  config.dataset.data_dir = 'data/tfds'
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'test'
  config.dataset.min_frames = 0  # > 1: leave out clips with fewer frames, in both splits (NR-DFERNet: 16)

  config.input = ml_collections.ConfigDict()
  # {name, **fields} of dferjax.data.sampling.SAMPLERS: 'segments' (dynamic sampling) or 'snippets'.
  config.input.sampler = ml_collections.ConfigDict(segment_sampler(num_segments=8, frames_per_segment=2))
  config.input.image_size = 112
  config.input.augment = 'none'  # a recipe of dferjax.data.augment.RECIPES
  config.input.transforms = ml_collections.ConfigDict()  # {name: {fields}} of pipeline.CLIP_TRANSFORMS, in order
  config.input.class_balanced = False
  config.input.num_threads = 8  # reader threads (with num_workers=0)
  # > 0: processes that make the batches instead of threads (the same batches): that many for training, and as many
  # per eval split, which read the next evaluation ahead while the model trains
  config.input.num_workers = 0
  config.input.prefetch = 4  # training batches buffered ahead

  config.loss = ml_collections.ConfigDict({'name': 'cross_entropy'})  # {name, **fields} of losses.LOSSES

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'sgd'  # 'sgd' or 'adam'
  config.optimizer.learning_rate = 0.01
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 0.0  # coupled L2 as PyTorch's SGD/Adam weight_decay
  config.optimizer.schedule = 'constant'  # 'step', 'cosine', 'exponential', 'constant'
  config.optimizer.step_epochs = 0  # 'step': lr * step_factor every step_epochs epochs
  config.optimizer.step_factor = 0.1
  config.optimizer.decay_rate = 1.0  # 'exponential': lr * decay_rate ** epoch
  config.optimizer.warmup_epochs = 0
  config.optimizer.cosine_epochs = 0  # T_max of the cosine; 0 = num_epochs
  config.optimizer.grad_clip_norm = 0.0  # 0 = off

  config.num_epochs = 1
  config.batch_size = 32  # global, over all devices and hosts
  config.eval_batch_size = 64
  config.steps_per_epoch = -1  # -1: len(train split) // batch_size, as drop_last=True in the PyTorch loaders
  config.dtype = 'float32'  # compute dtype: 'bfloat16' on GPU/TPU; parameters stay float32

  # The honest protocol (dferjax/data/validation.py): hold out a stratified `fraction` of the training split,
  # chosen by clip id with `seed`, and select a checkpoint on it. 0: off, the papers' protocol on all training
  # clips (the paper configs keep it off so their numbers stay comparable); 0.1 is the suggested fraction.
  config.validation = ml_collections.ConfigDict()
  config.validation.fraction = 0.0
  config.validation.seed = 0

  config.log_every_steps = 50
  config.eval_every_epochs = 1
  config.checkpoint_every_steps = 0  # 0: once per epoch; >0 also every that many steps
  config.keep_checkpoints = 2
  config.best_metric = 'war'  # 'war' or 'uar': which checkpoint to keep as the best
  config.progress_bar = True

  config.init_from = ml_collections.ConfigDict()
  # A `python -m dferjax.convert` output dir; 'none': random on purpose; '' (paper configs that start from a
  # pretrained backbone): required, the run fails at start naming this field.
  config.init_from.backbone = 'none'
  config.init_from.workdir = ''  # a dferjax workdir whose best checkpoint starts this run (AFEW from DFEW fd1)
  config.init_from.step = -1  # -1: the best checkpoint of that workdir
  config.init_from.reset_classifier = False  # keep everything but the model's classifier_names
  # AEN: the workdir of a frame-level run (model_name aen_frame) for its frozen guide and starting backbone;
  # 'none': no guide weights; '' (AEN's paper configs): required.
  config.init_from.guide = 'none'
  return config


# What a resumed run may change: how long it trains and how it logs, evaluates, saves and reads its data. Any
# other field (the dataset and fold, the model, the loss, the optimizer, the input recipe, the seed) would mix two
# experiments in one workdir (checkpoint.check_resumable).
RESUMABLE_FIELDS = ('num_epochs', 'log_every_steps', 'eval_every_epochs', 'checkpoint_every_steps',
                    'keep_checkpoints', 'progress_bar', 'eval_batch_size', 'dataset.data_dir', 'dataset.clip_root',
                    'input.num_threads', 'input.num_workers', 'input.prefetch')


def flatten_config(config_json: dict, prefix: str = '') -> dict:
  """{'optimizer.learning_rate': 0.01, ...}: every leaf of a JSON config under its dotted name."""
  flat = {}
  for key, value in config_json.items():
    if isinstance(value, dict) and value:
      flat.update(flatten_config(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


# Blocks whose fields belong to what they name and are checked there: the model's Module fields, a loss's, a
# sampler's, the clip transforms'; a dataset's own (an image list's files, the synthetic demo's recipe).
OPEN_FIELDS = ('model', 'loss', 'input.sampler', 'input.transforms', 'dataset.image_lists', 'dataset.image_root',
               'dataset.label_order', 'dataset.synthetic', 'dataset.clip_lists', 'dataset.clip_root', 'dataset.fold')


def check_known_fields(config: ml_collections.ConfigDict) -> None:
  """Refuses a field the trainer never reads: `config.optimizer.lr = 0.1` in a config file would otherwise train
  at the default learning rate without a word. Flags are checked as they are parsed (cli.parse_flags); this checks
  what a config file itself sets."""
  from dferjax import cli  # pylint: disable=import-outside-toplevel  # cli imports no jax; configlib stays light
  base, messages = base_config(), []

  def walk(node, known, prefix):
    for key in node.keys():
      name = f'{prefix}{key}'
      if name in OPEN_FIELDS:
        continue
      if key not in known:
        messages.append(cli.unknown_field_message(base, name))
      elif hasattr(node[key], 'keys') and hasattr(known[key], 'keys'):
        walk(node[key], known[key], f'{name}.')

  walk(config, base, '')
  if messages:
    raise ValueError('the config sets fields no part of dferjax reads (a misspelling is ignored otherwise): '
                     + '; '.join(messages))


def check_classes(config: ml_collections.ConfigDict) -> None:
  """config.num_classes must count config.class_names; the built datasets and image lists label the seven
  CLASS_NAMES, so only a clip list (dferjax/data/clip_list.py) may name classes of its own."""
  names = tuple(config.class_names)
  if config.num_classes != len(names):
    raise ValueError(f'config.num_classes={config.num_classes}, but config.class_names names {len(names)} classes '
                     f'{names}: the model has one logit per class name, so set both')
  if names != CLASS_NAMES and config.dataset.name != 'clip_list':
    raise ValueError(f'config.class_names={names}, but {config.dataset.name!r} labels its clips {CLASS_NAMES}: '
                     "only config.dataset.name='clip_list' (dferjax/data/clip_list.py) takes classes of its own")


def segment_sampler(num_segments: int, frames_per_segment: int, short_clip_fallback: str = 'zeros') -> dict:
  """config.input.sampler for dynamic sampling: S segments of T frames (fallback 'zeros': the papers')."""
  return dict(name='segments', num_segments=num_segments, frames_per_segment=frames_per_segment,
              short_clip_fallback=short_clip_fallback)


def from_registry(spec, registry: dict, field: str, kind: str):
  """`registry[name](**fields)` for a config block `{name, **fields}` (a sampler, a loss); unknown names and
  fields fail naming `field` (e.g. 'config.loss') and the valid choices."""
  fields = dict(spec)
  name = fields.pop('name', None)
  if name not in registry:
    raise ValueError(f'{field}.name={name!r} not in {sorted(registry)}')
  cls = registry[name]
  valid = sorted(f.name for f in dataclasses.fields(cls))
  if unknown := sorted(set(fields) - set(valid)):
    raise ValueError(f'{field}: {unknown} are not fields of the {name!r} {kind} ({cls.__name__}); '
                     f'valid fields: {valid}')
  return cls(**fields)


def load_config(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file at `path` (relative paths from the configs/ folder of the caller)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  if spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path!r} does not exist')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
