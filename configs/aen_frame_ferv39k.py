"""AEN's frame-level guide network on single frames of FERV39K's training clips (see configs/aen_frame_dfew.py).

    python -m dferjax.main --config configs/aen_frame_ferv39k.py --workdir runs/aen_frame_ferv39k \
        --config.init_from.backbone=weights/resnet18_ms1m
"""
from configs import aen_frame_dfew


def get_config(arg=None):
  config = aen_frame_dfew.get_config(arg)
  with config.unlocked():
    config.dataset.name = 'ferv39k/px112'
  return config
