"""STT on FERV39K (train/test), the DFEW recipe unchanged as in Former-DFER's FERV39K runs.

    python -m dferjax.main --config configs/stt_ferv39k.py --workdir runs/stt_ferv39k
"""
import os

from dferjax import configlib


def get_config(arg=None):
  config = configlib.load_config(os.path.join(os.path.dirname(__file__), 'stt_dfew.py'), arg)
  with config.unlocked():
    config.dataset.name = 'ferv39k/px112'
  return config
