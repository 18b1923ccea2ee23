"""STT on DFEW, one fold (Ma et al. 2022, Tab. 3: 5-fold mean UAR 54.58, WAR 66.65).

    python -m dferjax.main --config configs/stt_dfew.py:fold=1 --workdir runs/stt_dfew_fold1 \
        --config.init_from.backbone=weights/resnet18_ms1m

Paper settings: ResNet18 (MS-Celeb-1M) through layer3, N=4 blocks, 8 heads, d=512, 16 frames (S=8 x T=2) of
112 px, compact softmax CE with beta=0.2, SGD lr 0.01 (momentum 0.9, wd 1e-4 as in the authors' public code),
lr / 10 every 40 epochs, 100 epochs, batch 32. Arguments: fold (1-5), image_size, loss ('compact', or Tab. 2's
'cross_entropy' and 'label_smoothing').
"""
from dferjax import configlib

STT_LOSSES = {'compact': dict(name='compact', beta=0.2), 'cross_entropy': dict(name='cross_entropy'),
              'label_smoothing': dict(name='label_smoothing', smoothing=0.1)}

# How STT is computed, not what (each an exact re-expression of the default, docs/performance.md); here so that
# --config.model.<field>=... can pick one.
IMPLEMENTATION = dict(attention_impl='xla', attention_layout='tokens_heads', attention_pad_multiple=1,
                      max_pool_impl='reduce_window', stem_conv_impl='conv', norm_impl='flax')


def get_config(arg=None):
  args = configlib.parse_arg(arg, fold=1, image_size=112, loss='compact')
  if args.loss not in STT_LOSSES:
    raise ValueError(f'configs/stt_dfew.py: loss={args.loss!r} not in {sorted(STT_LOSSES)}')
  config = configlib.base_config()
  config.model_name = 'stt'
  config.model = dict(num_frames=16, embed_dim=512, num_layers=4, num_heads=8, mlp_ratio=4.0,
                      drop_path_rate=0.1, backbone_stage=3, backbone_width=64, **IMPLEMENTATION)
  suffix = '' if args.image_size == 112 else f'_px{args.image_size}'
  config.dataset.name = f'dfew/fold{args.fold}{suffix}'
  config.input.sampler = configlib.segment_sampler(num_segments=8, frames_per_segment=2)
  config.input.image_size = args.image_size
  config.input.augment = 'stt'  # random-sized crop + flip, the same for every frame (refs.md §1.0)
  config.loss = STT_LOSSES[args.loss]
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 0.01
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = 'step'
  config.optimizer.step_epochs = 40
  config.optimizer.step_factor = 0.1
  config.num_epochs = 100
  config.batch_size = 32
  config.init_from.backbone = ''  # required: the MS-Celeb-1M ResNet18 (or 'none' for random on purpose)
  return config.lock()
