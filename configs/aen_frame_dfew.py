"""AEN's frame-level guide network, pre-trained on single frames of a DFEW fold's training clips.

    python -m dferjax.main --config configs/aen_frame_dfew.py:fold=1 --workdir runs/aen_frame_dfew_fold1 \
        --config.init_from.backbone=weights/resnet18_ms1m

AEN (Sec. 4.3) pre-trains its backbone as a 2D FER network on RAF-DB; that network then starts AEN's backbone and,
frozen, gives the per-frame emotion probabilities of the guided losses (configs/aen_dfew.py takes this workdir as
--config.init_from.guide). Its RAF-DB checkpoint is not published (refs.md §3.3), so this config trains the same
network (ResNet through layer3, the 784-d squeeze, a frame classifier: models.aen.AENFrame) on one random frame per
training clip (the centre frame at test), each frame labelled with its clip's emotion. With a RAF-DB image list
instead, see the README (config.dataset for image lists). Recipe of the prototype's 2D_pretrain.py (refs.md §1.5):
SGD lr 1e-4 (momentum 0.9), lr / 10 every 20 epochs, 100 epochs; batch 64 frames. Arguments: fold (1-5),
image_size, variant ('paper': ResNet18; 'prototype': stages (2, 1, 2, 2), which the AEN config must match).
"""
from dferjax import configlib

VARIANT_STAGES = {'paper': (2, 2, 2, 2), 'prototype': (2, 1, 2, 2)}


def get_config(arg=None):
  args = configlib.parse_arg(arg, fold=1, image_size=112, variant='paper')
  if args.variant not in VARIANT_STAGES:
    raise ValueError(f'configs/aen_frame_dfew.py: variant={args.variant!r} not in {sorted(VARIANT_STAGES)}')
  config = configlib.base_config()
  config.model_name = 'aen_frame'
  config.model = dict(num_frames=1, backbone_stage_sizes=VARIANT_STAGES[args.variant], backbone_width=64,
                      middle_stage=3, middle_channels=16)
  suffix = '' if args.image_size == 112 else f'_px{args.image_size}'
  config.dataset.name = f'dfew/fold{args.fold}{suffix}'
  config.input.sampler = configlib.segment_sampler(num_segments=1, frames_per_segment=1)
  config.input.image_size = args.image_size
  config.input.augment = 'stt'
  config.loss = dict(name='cross_entropy')
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 1e-4
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = 'step'
  config.optimizer.step_epochs = 20
  config.optimizer.step_factor = 0.1
  config.num_epochs = 100
  config.batch_size = 64
  config.init_from.backbone = ''  # required: a converted ResNet18 (layer4 is not used), or 'none'
  return config.lock()
