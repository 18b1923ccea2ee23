"""A one-block STT on 32-px synthetic clips: the end-to-end tests' config (seconds per run on a CPU)."""
from dferjax import configlib


def get_config(arg=None):
  args = configlib.parse_arg(arg, epochs=3, layers=1, fold=1)
  config = configlib.base_config()
  config.model_name = 'stt'
  config.model = dict(num_frames=4, embed_dim=32, num_layers=args.layers, num_heads=2, mlp_ratio=2.0,
                      drop_path_rate=0.1, backbone_stage=3, backbone_width=8)
  config.dataset.name = f'dfew/fold{args.fold}_px32'
  config.dataset.data_dir = ''  # the tests set it
  config.input.sampler = configlib.segment_sampler(num_segments=2, frames_per_segment=2)
  config.input.image_size = 32
  config.input.augment = 'stt'
  config.input.num_threads = 2
  config.loss = dict(name='compact', beta=0.2)
  config.optimizer.learning_rate = 0.01
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = 'step'
  config.optimizer.step_epochs = 2
  config.num_epochs = args.epochs
  config.batch_size = 4
  config.eval_batch_size = 8
  config.steps_per_epoch = 3
  config.log_every_steps = 2
  config.progress_bar = False
  return config.lock()
