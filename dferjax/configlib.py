"""The fields every experiment config shares, and the parsing of `get_config(arg)` arguments.

A config file builds on `base_config()`, sets what its paper says, and returns `config.lock()`-ed ConfigDict,
so a misspelt `--config.field=value` override fails naming the field.
"""
from __future__ import annotations

import ml_collections

CLASS_NAMES = ('happy', 'sad', 'neutral', 'angry', 'surprise', 'disgust', 'fear')


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
      parsed[key] = type(default)(value)
  return parsed


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by all experiments: the Former-DFER/STT DFEW recipe (refs.md §1.0, §1.2)."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model_name = 'stt'
  config.model = ml_collections.ConfigDict()  # fields of the model's Module, one-to-one
  config.num_classes = 7
  config.class_names = CLASS_NAMES

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = 'dfew/fold1'  # `<builder>/<builder config>`, see tfds_builders/
  config.dataset.data_dir = 'data/tfds'
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'test'
  # Builds the synthetic DFEW-layout dataset into data_dir if it is missing (demo only).
  config.dataset.synthetic = ml_collections.ConfigDict()
  config.dataset.synthetic.generate_if_missing = False
  config.dataset.synthetic.manual_dir = ''
  config.dataset.synthetic.clips_per_class = 40
  config.dataset.synthetic.seed = 0

  config.input = ml_collections.ConfigDict()
  config.input.sampler = 'segments'  # 'segments' (dynamic sampling) or 'snippets' (CEFLNet/EST)
  config.input.num_segments = 8  # S
  config.input.frames_per_segment = 2  # T: 16 frames
  config.input.short_clip_fallback = 'zeros'  # the papers'; 'edge' is DFER-CLIP's
  config.input.image_size = 112
  config.input.augment = 'stt'  # random-sized crop + flip
  config.input.class_balanced = False
  config.input.num_threads = 8
  config.input.prefetch = 4

  config.loss = ml_collections.ConfigDict()
  config.loss.name = 'compact'  # 'compact' (STT Eq. 17), 'cross_entropy', 'label_smoothing'
  config.loss.beta = 0.2
  config.loss.label_smoothing = 0.1

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'sgd'  # 'sgd' or 'adam'
  config.optimizer.learning_rate = 0.01
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 1e-4  # coupled L2 as PyTorch's SGD/Adam weight_decay
  config.optimizer.schedule = 'step'  # 'step', 'cosine', 'constant'
  config.optimizer.step_epochs = 40  # lr / 10 every 40 epochs
  config.optimizer.step_factor = 0.1
  config.optimizer.warmup_epochs = 0
  config.optimizer.cosine_epochs = 0  # T_max of the cosine; 0 = num_epochs
  config.optimizer.grad_clip_norm = 0.0  # 0 = off

  config.num_epochs = 100
  config.batch_size = 32  # global, over all devices and hosts
  config.eval_batch_size = 64
  config.steps_per_epoch = -1  # -1: len(train split) // batch_size, as drop_last=True in the PyTorch loaders
  config.dtype = 'float32'  # compute dtype: 'bfloat16' on GPU/TPU; parameters stay float32

  config.log_every_steps = 50
  config.eval_every_epochs = 1
  config.checkpoint_every_steps = 0  # 0: once per epoch; >0 also every that many steps
  config.keep_checkpoints = 2
  config.best_metric = 'war'  # 'war' or 'uar': which checkpoint to keep as the best
  config.progress_bar = True

  config.init_from = ml_collections.ConfigDict()
  config.init_from.backbone = ''  # a `python -m dferjax.convert` output dir (MS-Celeb-1M ResNet18)
  config.init_from.workdir = ''  # a dferjax workdir whose best checkpoint starts this run (AFEW from DFEW fd1)
  config.init_from.step = -1  # -1: the best checkpoint of that workdir
  config.init_from.reset_classifier = False  # keep everything but the classifier
  return config


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
