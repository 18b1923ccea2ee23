"""Tiny workdirs of every model (config.json and one checkpoint of perturbed weights), written in a second without
training: what `dferjax.predict` and `dferjax.export` read."""
import json
import os

import jax
import numpy as np
import pytest

from dferjax import checkpoint as checkpoint_lib
from dferjax import configlib, train

# model fields, sampler, frame size and clip transforms: each model's smallest complete form.
TINY_RUNS = {
    'stt': (dict(num_frames=4, embed_dim=32, num_layers=1, num_heads=2, mlp_ratio=2.0, drop_path_rate=0.1,
                 backbone_stage=3, backbone_width=8),
            configlib.segment_sampler(num_segments=2, frames_per_segment=2), 32, {}),
    # 48 px: 3 x 3 stem maps, 2 x 2 fused maps; 8 frames give 7 vectors and 3 snippets of 3.
    'nr_dfernet': (dict(num_frames=8, stem_width=8, num_spatial_layers=1, num_temporal_layers=1, num_heads=2,
                        head_dim=8, spatial_mlp_dim=32, temporal_mlp_dim=32),
                   configlib.segment_sampler(num_segments=4, frames_per_segment=2), 48, {}),
    # SSOP on, so the model takes the batch field 'permutation' from the draw_permutation transform.
    'est': (dict(num_frames=14, num_snippets=7, backbone_width=8, num_heads=2, num_encoder_layers=1,
                 num_decoder_layers=1, hidden_dim=32, classifier_dims=(16,), order_head_dims=(16,), ssop=True),
            dict(name='snippets', frames_per_snippet=2), 32, {'draw_permutation': {}}),
    'ceflnet': (dict(num_frames=14, num_snippets=7, frames_per_snippet=2, backbone_width=8, num_heads=2,
                     classifier_dims=(16, 8), slot_unroll=14),
                dict(name='snippets', frames_per_snippet=2), 32, {}),
    'aen': (dict(num_frames=4, backbone_width=8, low_channels=1, middle_channels=4, num_layers=1, num_heads=2,
                 head_dim=8, mlp_dim=16),
            configlib.segment_sampler(num_segments=2, frames_per_segment=2), 32, {}),
    # The frame-level guide network: one frame per clip.
    'aen_frame': (dict(num_frames=1, backbone_width=8, middle_channels=4),
                  configlib.segment_sampler(num_segments=1, frames_per_segment=1), 32, {}),
}


def tiny_config(model_name: str, **model_overrides):
  fields, sampler, image_size, transforms = TINY_RUNS[model_name]
  config = configlib.base_config()
  config.model_name = model_name
  config.model = {**fields, **model_overrides}
  config.dataset.name = 'dfew/fold1_px32'
  config.input.sampler = sampler
  config.input.image_size = image_size
  config.input.transforms = transforms
  config.eval_batch_size = 4
  return config


def random_state(abstract_state, seed: int):
  """Every variable drawn at random (no init to compile): kernels at 1 / sqrt(fan-in), norms' scales and BatchNorm
  variances in [0.5, 1.5], biases, BatchNorm means and embeddings N(0, 0.1), so that a dropped or misplaced
  variable shows in the logits."""
  rng = np.random.default_rng(seed)

  def draw(path, spec):
    name = getattr(path[-1], 'key', getattr(path[-1], 'name', ''))  # dict keys; a train state's fields
    if name == 'kernel':
      value = rng.normal(scale=1 / np.sqrt(np.prod(spec.shape[:-1])), size=spec.shape)
    elif name in ('scale', 'var'):
      value = rng.uniform(0.5, 1.5, size=spec.shape)
    else:
      value = rng.normal(scale=0.1, size=spec.shape)
    return value.astype(spec.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract_state)


def write_workdir(workdir, config, *, step: int = 3, seed: int = 0):
  """config.json and one checkpoint at `step` (kept as the best) of random weights."""
  os.makedirs(workdir, exist_ok=True)
  config_json = checkpoint_lib.config_to_json(config)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config_json, f, indent=2)
  steps = train.make_steps(config, steps_per_epoch=None)
  state = random_state(steps.abstract_state, seed)
  checkpoints = checkpoint_lib.Checkpoints(str(workdir))
  checkpoints.save(step, state, None, config_json, metrics={'uar': 0.5, 'war': 0.5})
  checkpoints.wait()
  checkpoints.close()
  return state


@pytest.fixture(scope='session')
def tiny_workdir(tmp_path_factory):
  """model name -> the path of its tiny workdir, written once per test session (import this fixture into a test
  module to use it)."""
  written = {}

  def workdir(model_name: str) -> str:
    if model_name not in written:
      path = tmp_path_factory.mktemp(f'run_{model_name}')
      write_workdir(path, tiny_config(model_name), seed=1)
      written[model_name] = str(path)
    return written[model_name]
  return workdir


def fails_in_one_line(capsys, main, argv) -> str:
  """Runs a command's main(argv) that must fail: exit status 1 and one `error: ...` line on stderr, returned."""
  with pytest.raises(SystemExit) as exit_info:
    main(argv)
  assert exit_info.value.code == 1
  stderr = capsys.readouterr().err
  assert stderr.startswith('error: ') and stderr.count('\n') == 1, stderr
  return stderr
