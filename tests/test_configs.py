"""Every config loads, is locked, and maps onto its model's fields; argument parsing rejects typos."""
import glob
import os

import pytest

from dferjax import configlib, models

CONFIG_FILES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), '..', 'configs', '*.py')))


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_config_loads_locked_and_builds_its_model(path):
  config = configlib.load_config(path)
  with pytest.raises(AttributeError, match='does not exist'):
    config.learning_rate_typo = 1.0
  with pytest.raises(AttributeError):
    config.optimizer.lr = 0.1
  models.build(config.model_name, config.num_classes, **config.model.to_dict())  # unknown fields would raise


def test_stt_dfew_has_the_paper_settings():
  config = configlib.load_config(os.path.join(os.path.dirname(__file__), '..', 'configs', 'stt_dfew.py'), 'fold=3')
  assert config.dataset.name == 'dfew/fold3'
  assert (config.optimizer.name, config.optimizer.learning_rate, config.optimizer.momentum) == ('sgd', 0.01, 0.9)
  assert (config.optimizer.weight_decay, config.optimizer.step_epochs, config.optimizer.step_factor) == (1e-4, 40, 0.1)
  assert (config.num_epochs, config.batch_size, config.input.image_size) == (100, 32, 112)
  assert config.input.num_segments * config.input.frames_per_segment == 16
  assert (config.loss.name, config.loss.beta) == ('compact', 0.2)
  assert (config.model.num_layers, config.model.num_heads, config.model.embed_dim) == (4, 8, 512)


def test_parse_arg_types_and_errors():
  parsed = configlib.parse_arg('fold=3,tiny', fold=1, tiny=False, size=112)
  assert (parsed.fold, parsed.tiny, parsed.size) == (3, True, 112)
  with pytest.raises(ValueError, match="'flod' is not one of"):
    configlib.parse_arg('flod=2', fold=1)


def test_missing_config_file_is_named():
  with pytest.raises(FileNotFoundError, match='nope.py'):
    configlib.load_config('configs/nope.py')
