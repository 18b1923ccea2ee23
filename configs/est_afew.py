"""EST on AFEW (Liu et al. 2023, Tab. 3: 54.26 % on AFEW's validation split).

    python -m dferjax.main --config configs/est_afew.py --workdir runs/est_afew \
        --config.init_from.backbone=weights/resnet18_ferplus

The paper trains on AFEW's training split and reports its validation split with the DFEW recipe; it does not
say it starts from a DFEW model, so this config starts from the FER+ backbone as on DFEW. To fine-tune from a
DFEW run instead, pass --config.init_from.workdir=runs/est_dfew_fold1 (then no backbone is needed). The
arguments are est_dfew's.
"""
from configs import est_dfew


def get_config(arg=None):
  config = est_dfew.get_config(arg)
  with config.unlocked():
    config.dataset.name = 'afew/px224'
    config.dataset.eval_split = 'validation'
  return config
