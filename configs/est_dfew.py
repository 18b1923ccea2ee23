"""EST on DFEW, one fold (Liu et al., Pattern Recognition 2023, Tab. 4: 5-fold WAR 65.85).

    python -m dferjax.main --config configs/est_dfew.py:fold=1 --workdir runs/est_dfew_fold1 \
        --config.init_from.backbone=weights/resnet18_ferplus

Paper settings: 7 snippets x 5 frames from each clip resampled to 105 frames, 224 px (the `px224` builds); a
ResNet18 pretrained on FER+ (the public code's default, refs.md §3.2; convert it with `python -m
dferjax.convert`); AA-SFE, a 3 + 3 layer transformer with 4 heads; SSOP with 10 fixed orders, loss
CE + 0.1428 (~ 1/7, the code's lambda) x CE(order); Adam lr 1e-4 with cosine annealing and warm-up, batch 8.
The code's schedule: weight decay 1e-4, cosine with T_max = 160 stepped per epoch and a 10-epoch linear warm-up,
160 epochs. No augmentation besides the random snippet sampling (refs.md §1.7).

Arguments: fold (1-5); ssop (default on; `ssop=false` is Tab. 5's ablation without the order head);
positions ('slot', default: shuffled snippets take the positions of their slots; 'original': the public code,
which makes the transformer's output independent of the order, see dferjax/models/est.py).
"""
from dferjax import configlib


def get_config(arg=None):
  args = configlib.parse_arg(arg, fold=1, ssop=True, positions='slot')
  config = configlib.base_config()
  config.model_name = 'est'
  config.model = dict(num_frames=35, num_snippets=7, backbone_width=64, num_heads=4, num_encoder_layers=3,
                      num_decoder_layers=3, hidden_dim=2048, dropout_rate=0.1, classifier_dims=(128, 64),
                      classifier_dropout=0.4, ssop=args.ssop, snippet_positions=args.positions,
                      order_head_dims=(2048, 512))
  config.dataset.name = f'dfew/fold{args.fold}_px224'
  config.input.sampler = dict(name='snippets', num_snippets=7, snippet_span=15, snippet_stride=10,
                              frames_per_snippet=5, resampled_length=105, num_window_starts=30, test_window_start=15)
  config.input.image_size = 224
  config.input.augment = 'none'
  if args.ssop:
    config.input.transforms = {'draw_permutation': {'num_permutations': 10}}
    config.loss = dict(name='order', order_weight=0.1428)
  else:
    config.loss = dict(name='cross_entropy')
  config.optimizer.name = 'adam'
  config.optimizer.learning_rate = 1e-4
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = 'cosine'
  config.optimizer.cosine_epochs = 160
  config.optimizer.warmup_epochs = 10
  config.num_epochs = 160
  config.batch_size = 8
  config.eval_batch_size = 16
  config.init_from.backbone = ''  # required: the FER+ ResNet18 (or 'none' for random on purpose)
  return config.lock()
