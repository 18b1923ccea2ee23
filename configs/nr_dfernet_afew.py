"""NR-DFERNet fine-tuned on AFEW from a DFEW fold-1 run (Li et al. 2022, Tab. 4: UAR 48.37, WAR 53.54).

    python -m dferjax.main --config configs/nr_dfernet_afew.py --workdir runs/nr_dfernet_afew \
        --config.init_from.workdir=runs/nr_dfernet_dfew_fold1

As the paper: every weight of the DFEW fold-1 model (its best checkpoint) starts the run; lr 3e-4 decayed
exponentially over 30 epochs (to a hundredth, as on DFEW); reported on AFEW's validation split. The arguments
are nr_dfernet_dfew's.
"""
from configs import nr_dfernet_dfew


def get_config(arg=None):
  config = nr_dfernet_dfew.get_config(arg)
  with config.unlocked():
    config.dataset.name = 'afew/px112'
    config.dataset.eval_split = 'validation'
    config.optimizer.learning_rate = 3e-4
    if config.optimizer.schedule == 'exponential':
      config.optimizer.decay_rate = 0.01 ** (1 / 30)
    config.num_epochs = 30
    config.init_from.workdir = 'runs/nr_dfernet_dfew_fold1'
  return config
