"""AEN on DFEW, one fold (Lee et al. 2023, Tab. 3: 5-fold mean 7-class UAR 56.66 / WAR 69.37, 3-class 74.60 /
74.96).

    python -m dferjax.main --config configs/aen_dfew.py:fold=1 --workdir runs/aen_dfew_fold1 \
        --config.init_from.guide=runs/aen_frame_dfew_fold1

The frame-level network (configs/aen_frame_dfew.py) starts the backbone and, frozen, guides the losses. Paper
settings (Sec. 4.3, "the same as the baseline", Former-DFER: refs.md §1.1): 16 frames (8 segments x 2) of 112 px,
ResNet18, alpha = 0.7, beta = (1.4, 0.6), lambda1 = 0.4, lambda2 = 0.5; SGD lr 0.01 (momentum 0.9, wd 1e-4),
lr / 10 every 40 epochs, 100 epochs, batch 32; the prototype's augmentation (crop and flip, one affine rotation per
clip, colour jitter per frame). Arguments: fold (1-5), image_size, variant ('paper', or 'prototype': the public
prototype's backbone stages, S2AC fusion order and softmax axis, log-probability prediction and losses, refs.md
§1.5; its guide must come from aen_frame_dfew.py:variant=prototype).
"""
from dferjax import configlib

PAPER_MODEL = dict(num_frames=16, backbone_stage_sizes=(2, 2, 2, 2), backbone_width=64, low_stage=1, middle_stage=3,
                   low_channels=1, middle_channels=16, num_layers=3, num_heads=8, head_dim=64, mlp_dim=1024,
                   s2ac_order='paper', s2ac_softmax='row', alpha=0.7, prediction_space='probability', guide=True)
PROTOTYPE_MODEL = dict(PAPER_MODEL, backbone_stage_sizes=(2, 1, 2, 2), s2ac_order='prototype', s2ac_softmax='column',
                       prediction_space='log_probability')
VARIANTS = {
    'paper': (PAPER_MODEL, dict(name='aen', alpha=0.7, ta_weight=0.4, ga_weight=0.5, level_weights=(1.4, 0.6))),
    'prototype': (PROTOTYPE_MODEL, dict(name='aen_prototype')),
}


def get_config(arg=None):
  args = configlib.parse_arg(arg, fold=1, image_size=112, variant='paper')
  if args.variant not in VARIANTS:
    raise ValueError(f'configs/aen_dfew.py: variant={args.variant!r} not in {sorted(VARIANTS)}')
  model, loss = VARIANTS[args.variant]
  config = configlib.base_config()
  config.model_name = 'aen'
  config.model = model
  suffix = '' if args.image_size == 112 else f'_px{args.image_size}'
  config.dataset.name = f'dfew/fold{args.fold}{suffix}'
  config.input.sampler = configlib.segment_sampler(num_segments=8, frames_per_segment=2)
  config.input.image_size = args.image_size
  config.input.augment = 'aen'
  config.loss = loss
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 0.01
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = 'step'
  config.optimizer.step_epochs = 40
  config.optimizer.step_factor = 0.1
  config.num_epochs = 100
  config.batch_size = 32
  config.init_from.guide = ''  # required: the frame-level run (or 'none' for a random guide)
  return config.lock()
