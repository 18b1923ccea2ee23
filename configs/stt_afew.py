"""STT fine-tuned on AFEW from a DFEW fold-1 run (Ma et al. 2022, Tab. 4: UAR 49.11, WAR 54.23).

    python -m dferjax.main --config configs/stt_afew.py --workdir runs/stt_afew \
        --config.init_from.workdir=runs/stt_dfew_fold1

As Former-DFER and STT: every weight of the DFEW fold-1 model (best checkpoint) is the starting point, lr 0.001,
20 epochs; add --config.init_from.reset_classifier to start the classifier afresh. AFEW is reported on its
validation split. The arguments are stt_dfew's.
"""
from configs import stt_dfew


def get_config(arg=None):
  config = stt_dfew.get_config(arg)
  with config.unlocked():
    config.dataset.name = 'afew/px112'
    config.dataset.eval_split = 'validation'
    config.optimizer.learning_rate = 0.001
    config.num_epochs = 20
    config.init_from.workdir = 'runs/stt_dfew_fold1'
  return config
