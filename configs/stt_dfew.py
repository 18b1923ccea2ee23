"""STT on DFEW, one fold (Ma et al. 2022, Tab. 3: 5-fold mean UAR 54.58, WAR 66.65).

    python -m dferjax.main --config configs/stt_dfew.py:fold=1 --workdir runs/stt_dfew_fold1 \
        --config.init_from.backbone=weights/resnet18_msceleb

Paper settings: ResNet18 (MS-Celeb-1M) through layer3, N=4 blocks, 8 heads, d=512, 16 frames (S=8 x T=2) of
112 px, compact softmax CE with beta=0.2, SGD lr 0.01 (momentum 0.9, wd 1e-4 as in the authors' public code),
lr / 10 every 40 epochs, 100 epochs, batch 32.
"""
from dferjax import configlib


def get_config(arg=None):
  args = configlib.parse_arg(arg, fold=1, image_size=112)
  config = configlib.base_config()
  config.model_name = 'stt'
  config.model = dict(num_frames=16, embed_dim=512, num_layers=4, num_heads=8, mlp_ratio=4.0,
                      drop_path_rate=0.1, backbone_stage=3, backbone_width=64)
  suffix = '' if args.image_size == 112 else f'_px{args.image_size}'
  config.dataset.name = f'dfew/fold{args.fold}{suffix}'
  config.input.image_size = args.image_size
  config.loss.name = 'compact'
  config.loss.beta = 0.2
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 0.01
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = 'step'
  config.optimizer.step_epochs = 40
  config.num_epochs = 100
  config.batch_size = 32
  return config.lock()
