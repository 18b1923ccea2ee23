"""AEN on FERV39K, train/test (Lee et al. 2023, Tab. 5: 7-class UAR 38.18 / WAR 47.88, 3-class 61.33 / 64.79).

    python -m dferjax.main --config configs/aen_frame_ferv39k.py --workdir runs/aen_frame_ferv39k \
        --config.init_from.backbone=weights/resnet18_ms1m
    python -m dferjax.main --config configs/aen_ferv39k.py --workdir runs/aen_ferv39k \
        --config.init_from.guide=runs/aen_frame_ferv39k

The DFEW recipe unchanged, as Former-DFER's FERV39K runs. The arguments are aen_dfew's.
"""
from configs import aen_dfew


def get_config(arg=None):
  config = aen_dfew.get_config(arg)
  with config.unlocked():
    config.dataset.name = 'ferv39k/px112'
  return config
