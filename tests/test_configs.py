"""Every config loads, is locked, and maps onto its model's fields; argument parsing rejects typos; the base is
model-neutral and each paper config states its recipe; the input, loss and frame-count checks name the field."""
import glob
import os

import pytest

from dferjax import checkpoint as checkpoint_lib
from dferjax import configlib, losses, train
from dferjax.data import sampling

CONFIGS = os.path.join(os.path.dirname(__file__), '..', 'configs')
CONFIG_FILES = sorted(path for path in glob.glob(os.path.join(CONFIGS, '*.py'))
                      if not path.endswith('__init__.py'))


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_config_loads_locked_and_builds_its_model_loss_and_sampler(path):
  config = configlib.load_config(path)
  with pytest.raises(AttributeError, match='does not exist'):
    config.learning_rate_typo = 1.0
  with pytest.raises(AttributeError):
    config.optimizer.lr = 0.1
  model = train.build_model(config)  # unknown fields would raise
  configlib.check_known_fields(config)  # every field it sets is one the trainer reads
  losses.build_loss(config.loss)
  train.check_frames(model, config)  # the sampler gives the model's frame count
  assert config.dataset.name and config.model_name


def test_stt_dfew_has_the_paper_settings():
  config = configlib.load_config(os.path.join(CONFIGS, 'stt_dfew.py'), 'fold=3')
  assert config.dataset.name == 'dfew/fold3'
  assert (config.optimizer.name, config.optimizer.learning_rate, config.optimizer.momentum) == ('sgd', 0.01, 0.9)
  assert (config.optimizer.weight_decay, config.optimizer.step_epochs, config.optimizer.step_factor) == (1e-4, 40, 0.1)
  assert (config.num_epochs, config.batch_size, config.input.image_size) == (100, 32, 112)
  assert sampling.make_sampler(config.input.sampler) == sampling.SegmentSampler(8, 2, 'zeros')
  assert losses.build_loss(config.loss) == losses.CompactLoss(beta=0.2)
  assert (config.model.num_layers, config.model.num_heads, config.model.embed_dim) == (4, 8, 512)
  assert config.input.augment == 'stt'
  ablation = configlib.load_config(os.path.join(CONFIGS, 'stt_dfew.py'), 'loss=label_smoothing')
  assert losses.build_loss(ablation.loss) == losses.LabelSmoothing(smoothing=0.1)


def test_derived_configs_import_their_dfew_config():
  afew = configlib.load_config(os.path.join(CONFIGS, 'stt_afew.py'))
  dfew = configlib.load_config(os.path.join(CONFIGS, 'stt_dfew.py'))
  assert (afew.dataset.name, afew.dataset.eval_split, afew.num_epochs) == ('afew/px112', 'validation', 20)
  assert afew.model == dfew.model and afew.loss == dfew.loss and afew.input == dfew.input
  with open(os.path.join(CONFIGS, 'stt_afew.py')) as f:
    assert 'from configs import stt_dfew' in f.read()


def test_base_config_is_model_neutral_and_demo_fields_stay_in_the_demo():
  base = configlib.base_config()
  assert base.model_name == '' and base.dataset.name == '' and not base.model
  assert (base.loss.name, base.input.augment, base.optimizer.schedule) == ('cross_entropy', 'none', 'constant')
  assert 'synthetic' not in base.dataset
  assert 'synthetic' not in configlib.load_config(os.path.join(CONFIGS, 'stt_dfew.py')).dataset
  assert 'synthetic' in configlib.load_config(os.path.join(CONFIGS, 'demo_synthetic.py')).dataset


def test_paper_config_without_a_backbone_fails_naming_the_flag():
  config = configlib.load_config(os.path.join(CONFIGS, 'stt_dfew.py'))
  with pytest.raises(ValueError, match='--config.init_from.backbone=none'):
    checkpoint_lib.check_starting_point(config)
  for field, value in (('backbone', 'none'), ('backbone', 'weights/msceleb'), ('workdir', 'runs/dfew')):
    with config.unlocked():
      config.init_from.backbone = ''
      config.init_from[field] = value
    checkpoint_lib.check_starting_point(config)


def test_input_and_loss_fields_are_checked_against_their_classes():
  config = configlib.load_config(os.path.join(CONFIGS, 'stt_dfew.py'))
  with config.unlocked():
    config.input.sampler.frames_per_snippet = 5
  with pytest.raises(ValueError, match=r"\['frames_per_snippet'\] are not fields of the 'segments' sampler"):
    train.video_shape(config, 1)
  with pytest.raises(ValueError, match=r"\['smoothing'\] are not fields of the 'compact' loss"):
    losses.build_loss({'name': 'compact', 'smoothing': 0.1})
  with pytest.raises(ValueError, match=r"config.loss.name='focal' not in"):
    losses.build_loss({'name': 'focal'})


def test_frame_count_mismatch_names_both_fields():
  config = configlib.load_config(os.path.join(CONFIGS, 'stt_dfew.py'))
  with config.unlocked():
    config.input.sampler.num_segments = 4
  with pytest.raises(ValueError, match=r'config.model.num_frames=16 but config.input.sampler .* gives 8 frames'):
    train.check_frames(train.build_model(config), config)


def test_a_field_set_in_a_config_file_that_nothing_reads_is_refused():
  """A config file is plain Python: `config.optimizer.lr = 0.1` there would be ignored, training at the default."""
  config = configlib.load_config('configs/stt_dfew.py')
  with config.unlocked():
    config.optimizer.lr = 0.1
    config.input.image_szie = 48
    config.model.anything = 1  # the model's own fields are checked by the model (test above)
  with pytest.raises(ValueError) as error:
    configlib.check_known_fields(config)
  assert str(error.value) == (
      'the config sets fields no part of dferjax reads (a misspelling is ignored otherwise): config.input has no '
      "field 'image_szie' (its fields: augment, class_balanced, image_size, num_threads, num_workers, prefetch, "
      'sampler, transforms); did you mean config.input.image_size?; config.optimizer has no field \'lr\' (its fields: '
      'cosine_epochs, decay_rate, grad_clip_norm, learning_rate, momentum, name, schedule, step_epochs, step_factor, '
      'warmup_epochs, weight_decay); did you mean config.optimizer.learning_rate?')


def test_parse_arg_types_and_errors():
  parsed = configlib.parse_arg('fold=3,tiny', fold=1, tiny=False, size=112)
  assert (parsed.fold, parsed.tiny, parsed.size) == (3, True, 112)
  with pytest.raises(ValueError, match="'flod' is not one of"):
    configlib.parse_arg('flod=2', fold=1)


def test_missing_config_file_is_named():
  with pytest.raises(FileNotFoundError, match='nope.py'):
    configlib.load_config('configs/nope.py')


def test_the_demo_dataset_never_takes_the_place_of_a_real_build(monkeypatch, tmp_path):
  """The demo builds `dfew/fold1_px48` from synthetic clips: never where a real DFEW build of that name lives."""
  from dferjax.data import datasets, inputs, synthetic
  demo = configlib.load_config(os.path.join(CONFIGS, 'demo_synthetic.py'))
  with demo.unlocked():
    demo.dataset.data_dir = str(tmp_path)
  used = []
  monkeypatch.setattr(synthetic, 'ensure_built', lambda name, data_dir, **fields: used.append(data_dir))
  monkeypatch.setattr(datasets, 'data_source', lambda name, split, data_dir: used.append(data_dir) or [])
  inputs.data_sources(demo)
  assert len(used) == 3 and {os.path.normpath(d) for d in used} == {str(tmp_path / 'synthetic')}
  real = configlib.load_config(os.path.join(CONFIGS, 'stt_dfew.py'))
  with real.unlocked():
    real.dataset.data_dir = str(tmp_path)
  assert inputs.data_dir(real) == str(tmp_path)


def test_only_the_order_blind_demo_reads_the_order_free_set_in_its_own_folder():
  """CEFLNet cannot tell a motion from its time-reverse, so its demo reads the order-free classes, built apart from
  the default set the other demos share (the two would otherwise refuse each other's folder)."""
  from dferjax.data import inputs
  for model in ('stt', 'nr_dfernet', 'est', 'ceflnet'):
    demo = configlib.load_config(os.path.join(CONFIGS, 'demo_synthetic.py'), f'model={model}')
    motions = 'order_free' if model == 'ceflnet' else 'time_reversed'
    assert demo.dataset.synthetic.motions == motions
    folder = 'synthetic_order_free' if model == 'ceflnet' else 'synthetic'
    assert inputs.data_dir(demo) == os.path.join('data/tfds', folder)
