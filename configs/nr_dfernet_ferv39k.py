"""NR-DFERNet on FERV39K (train/test): the DFEW recipe unchanged (the paper reports no FERV39K run).

    python -m dferjax.main --config configs/nr_dfernet_ferv39k.py --workdir runs/nr_dfernet_ferv39k

The arguments are nr_dfernet_dfew's (oversample, code).
"""
from configs import nr_dfernet_dfew


def get_config(arg=None):
  config = nr_dfernet_dfew.get_config(arg)
  with config.unlocked():
    config.dataset.name = 'ferv39k/px112'
  return config
