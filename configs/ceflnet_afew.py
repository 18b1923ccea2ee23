"""CEFLNet on AFEW (Liu et al. 2022, Tab. 4: 53.98 % on AFEW's validation split).

    python -m dferjax.main --config configs/ceflnet_afew.py --workdir runs/ceflnet_afew \
        --config.init_from.backbone=weights/resnet18_ms1m

The paper trains on AFEW's training split and reports its validation split ("only used the Training/Val set"),
with the DFEW recipe; neither it nor the code starts from a DFEW model (the code's one script takes the lists
and the face ResNet18), so this config starts from the same MS-Celeb-1M backbone. To fine-tune from a DFEW run
instead, pass --config.init_from.workdir=runs/ceflnet_dfew_fold1 (then no backbone is needed). The arguments are
ceflnet_dfew's.
"""
from configs import ceflnet_dfew


def get_config(arg=None):
  config = ceflnet_dfew.get_config(arg)
  with config.unlocked():
    config.dataset.name = 'afew/px224'
    config.dataset.eval_split = 'validation'
  return config
