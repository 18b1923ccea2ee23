"""CEFLNet on DFEW, one fold (Liu et al., Information Sciences 2022, Tab. 5: 5-fold WAR 65.35; UAR 51.14 from a
survey's table, refs.md §5).

    python -m dferjax.main --config configs/ceflnet_dfew.py:fold=1 --workdir runs/ceflnet_dfew_fold1 \
        --config.init_from.backbone=weights/resnet18_ms1m

Paper settings (Sec. 4.1, Tab. 1; the public code where the paper is silent, refs.md §1.6): 7 snippets x 5 frames
from each clip resampled to 105 frames (training: a random 75-frame window and 5 random frames, sorted, of each
15-frame snippet; test: window start 15, frames 0, 3, ..., 12), 224 px (the `px224` builds), no augmentation and
no normalisation; a full ResNet18 pretrained on faces: the code loads `Resnet18_pytorch.pth.tar` with the
MS-Celeb-1M checkpoint's recipe, dropping `module.fc` and `module.feature`, which only that checkpoint has, so
convert `Resnet18_MS1M_pytorch.pth.tar` (refs.md §3.1) with `python -m dferjax.convert`; cross-entropy; Adam
lr 1e-4, weight decay 1e-4, batch 8, 120 epochs. The code's schedule: a cosine with T_max = 160 epochs (Tab. 1's
"maximum number of iterations 160") stepped per epoch, times a 10-epoch linear warm-up, so the last epoch still
has lr 1.5e-5. In training the backbone runs per (snippet, frame) slot, each slot with its own BatchNorm batch
statistics and the running ones updated 35 times a step, as the code does (dferjax/models/ceflnet.py). The
best epoch on the test fold is kept (config.best_metric='war'), as the code keeps its best test accuracy.

Arguments: fold (1-5); bn ('per_slot', the paper's; 'joint': one set of statistics for all 35 x 8 frames, faster
on a GPU); relation ('code', default, which Tab. 8's parameter count confirms; 'paper': Eq. 2-3 as printed);
remat (recompute the backbone's activations in the backward pass: same numbers, less memory).
"""
from dferjax import configlib


def get_config(arg=None):
  args = configlib.parse_arg(arg, fold=1, bn='per_slot', relation='code', remat=False)
  config = configlib.base_config()
  config.model_name = 'ceflnet'
  config.model = dict(num_frames=35, num_snippets=7, frames_per_snippet=5, backbone_width=64, num_heads=4,
                      attention_dropout=0.1, relation_dropout=0.5, classifier_dropout=0.4, classifier_dims=(256, 128),
                      relation_form=args.relation, backbone_batch_norm=args.bn, remat_backbone=args.remat)
  config.dataset.name = f'dfew/fold{args.fold}_px224'
  config.input.sampler = dict(name='snippets', num_snippets=7, snippet_span=15, snippet_stride=10,
                              frames_per_snippet=5, resampled_length=105, num_window_starts=30, test_window_start=15)
  config.input.image_size = 224
  config.input.augment = 'none'
  config.loss = dict(name='cross_entropy')
  config.optimizer.name = 'adam'
  config.optimizer.learning_rate = 1e-4
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = 'cosine'
  config.optimizer.cosine_epochs = 160
  config.optimizer.warmup_epochs = 10
  config.num_epochs = 120
  config.batch_size = 8
  config.eval_batch_size = 16
  config.init_from.backbone = ''  # required: the MS-Celeb-1M ResNet18 (or 'none' for random on purpose)
  return config.lock()
