"""AEN fine-tuned on AFEW from a DFEW fold-1 run (Lee et al. 2023, Tab. 4: 7-class UAR 50.88 / WAR 54.64, 3-class
67.49 / 67.38).

    python -m dferjax.main --config configs/aen_afew.py --workdir runs/aen_afew \
        --config.init_from.workdir=runs/aen_dfew_fold1

As its baseline Former-DFER: every weight of the DFEW fold-1 model (best checkpoint), the frozen guide included,
is the starting point; lr 0.001, 20 epochs. AFEW is reported on its validation split. The arguments are aen_dfew's.
"""
from configs import aen_dfew


def get_config(arg=None):
  config = aen_dfew.get_config(arg)
  with config.unlocked():
    config.dataset.name = 'afew/px112'
    config.dataset.eval_split = 'validation'
    config.optimizer.learning_rate = 0.001
    config.num_epochs = 20
    config.init_from.workdir = 'runs/aen_dfew_fold1'
  return config
