"""STT on FERV39K (train/test), the DFEW recipe unchanged as in Former-DFER's FERV39K runs.

    python -m dferjax.main --config configs/stt_ferv39k.py --workdir runs/stt_ferv39k \
        --config.init_from.backbone=weights/resnet18_ms1m
"""
from configs import stt_dfew


def get_config(arg=None):
  config = stt_dfew.get_config(arg)
  with config.unlocked():
    config.dataset.name = 'ferv39k/px112'
  return config
