"""Any model's recipe on clips listed in text files (dferjax/data/clip_list.py), with no TFDS build: the public
code's annotation lists (Former-DFER's `<clip folder> <frame count> <label>`) or a dataset of one's own.

    python -m dferjax.main --workdir runs/stt_list_fold1 --config.init_from.backbone=weights/resnet18_ms1m \
        --config 'configs/clip_list.py:recipe=stt_dfew,train=annotation/DFEW_set_1_train.txt,test=annotation/DFEW_set_1_test.txt'
    # the five folds: {fold} in the list paths becomes each fold's number
    python scripts/run_folds.py --workdir runs/stt_list \
        --config 'configs/clip_list.py:recipe=stt_dfew,train=lists/set_{fold}_train.txt,test=lists/set_{fold}_test.txt' \
        -- --config.init_from.backbone=weights/resnet18_ms1m
    # classes of its own: labels 0.. in this order (or these names)
    python -m dferjax.main --workdir runs/stt_mine --config.init_from.backbone=weights/resnet18_ms1m \
        --config 'configs/clip_list.py:recipe=stt_dfew,train=mine/train.txt,test=mine/test.txt,classes=calm+tense+amused'

Arguments: recipe (a config in configs/ whose model, input and optimiser settings are used: stt_dfew,
nr_dfernet_dfew, est_dfew, ceflnet_dfew, ..., or the path of a config file of one's own; its dataset is
replaced), train and test (the list files; default Former-DFER's fold-1 lists, annotation/DFEW_set_1_*.txt),
root (where relative clip folders start; '' = each list file's folder), classes ('+'-separated names; default
DFEW's seven, tfds_builders.labels.CLASS_NAMES), fold (recorded so that `dferjax.evaluate --folds` and
scripts/run_folds.py make the fold table; `{fold}` in train, test and root becomes it).
"""
import importlib

import ml_collections

from dferjax import configlib


def get_config(arg=None):
  args = configlib.parse_arg(arg, recipe='stt_dfew', train='annotation/DFEW_set_1_train.txt',
                             test='annotation/DFEW_set_1_test.txt', root='', classes='', fold=0)
  if args.recipe.endswith('.py'):  # a config file of one's own
    config = configlib.load_config(args.recipe)
  else:
    try:
      recipe = importlib.import_module(f'configs.{args.recipe}')
    except ModuleNotFoundError:
      raise ValueError(f'configs/clip_list.py: recipe={args.recipe!r} is not a config in configs/ (e.g. stt_dfew, '
                       'nr_dfernet_dfew, est_dfew, ceflnet_dfew) nor a .py file') from None
    config = recipe.get_config()
  in_fold = lambda text: text.replace('{fold}', str(args.fold))
  with config.unlocked():
    config.dataset = ml_collections.ConfigDict(dict(
        name='clip_list', data_dir='', train_split='train', eval_split='test',
        min_frames=config.dataset.min_frames,  # the recipe's (NR-DFERNet leaves out clips under 16 frames)
        clip_lists={'train': in_fold(args.train), 'test': in_fold(args.test)}, clip_root=in_fold(args.root),
        fold=args.fold))
    if args.classes:
      config.class_names = tuple(name.strip() for name in args.classes.split('+'))
      config.num_classes = len(config.class_names)
  return config
