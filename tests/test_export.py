"""dferjax.export: a run's checkpoint as a state dict that loads strictly into the PyTorch transcription of every
transcribed model and gives the flax model's evaluation logits; loud errors for what cannot be exported."""
from functools import partial
import json
import re
import shutil

import jax
import numpy as np
import pytest

from dferjax import checkpoint as checkpoint_lib
from dferjax import export, models, predict
import workdir_helpers
from workdir_helpers import fails_in_one_line, tiny_workdir  # noqa: F401  (a fixture)

torch = pytest.importorskip('torch')


def _flax_eval(run, video, **inputs):
  """The run's model in eval mode, as train.eval_step calls it: (logits, aux)."""
  apply = jax.jit(partial(run.steps.model.apply, train=False))  # compiled: 6x faster than eager on first use
  return apply({'params': run.state.params, 'batch_stats': run.state.batch_stats}, video, **inputs)


def _video(config, batch: int = 2, seed: int = 0):
  from dferjax import train
  uint8 = np.random.default_rng(seed).integers(0, 256, size=train.video_shape(config, batch), dtype=np.uint8)
  return uint8.astype(np.float32) / 255


def _torch_video(video):
  return torch.from_numpy(video).permute(0, 1, 4, 2, 3).contiguous()


@pytest.mark.parametrize('model_name', sorted(export.TRANSCRIPTIONS))
def test_exported_state_dict_loads_strictly_and_gives_the_same_logits(tmp_path, tiny_workdir, model_name):
  config = workdir_helpers.tiny_config(model_name)
  workdir = tiny_workdir(model_name)
  output = tmp_path / 'out' / 'model.pt'
  description = export.main(['--workdir', workdir, '--output', str(output)])
  assert description['step'] == 3 and description['model_name'] == model_name
  assert json.loads(export.description_path(output).read_text()) == description

  state_dict = torch.load(output, weights_only=True)
  assert any(key.endswith('running_var') for key in state_dict)  # BatchNorm statistics travel
  fresh = export.build_torch_model(model_name, description['arguments'])
  assert fresh.load_state_dict(state_dict, strict=True)  # no missing or unexpected keys
  torch_model = export.load_exported(output)

  run = predict.load_run(workdir)
  video = _video(config)
  inputs = {'permutation': np.array([3, 7], np.int32)} if run.steps.model.model_inputs else {}
  want, _ = _flax_eval(run, video, **inputs)
  with torch.no_grad():
    torch_inputs = {name: torch.from_numpy(value).long() for name, value in inputs.items()}
    got = torch_model(_torch_video(video), **torch_inputs)
  got = (got[0] if isinstance(got, tuple) else got).numpy()
  want = np.asarray(want)
  np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))  # NR-DFERNet's filter drops neutral as -inf
  finite = np.isfinite(want)
  assert finite.sum() >= want.size - want.shape[0] and np.abs(want[finite]).max() > 0.1  # real, non-trivial logits
  np.testing.assert_allclose(got[finite], want[finite], atol=1e-4)


def test_exported_batch_statistics_are_the_checkpoint_s(tmp_path, tiny_workdir):
  """The running statistics in the file are the checkpoint's (perturbed far from 0 / 1), not a fresh model's."""
  workdir = tiny_workdir('stt')
  export.export(workdir, str(tmp_path / 'stt.pt'))
  state = predict.load_run(workdir).state
  state_dict = torch.load(tmp_path / 'stt.pt', weights_only=True)
  np.testing.assert_allclose(state_dict['backbone.bn1.running_var'].numpy(),
                             np.asarray(state.batch_stats['backbone']['bn1']['var']), rtol=1e-6)
  np.testing.assert_allclose(state_dict['backbone.bn1.running_mean'].numpy(),
                             np.asarray(state.batch_stats['backbone']['bn1']['mean']), rtol=1e-6)


def test_a_model_without_transcription_fails_naming_it(tmp_path, capsys, monkeypatch):
  from contract_model import OrderNet
  monkeypatch.setitem(models.MODELS, 'order_net', OrderNet)
  config = workdir_helpers.tiny_config('stt')
  config.model_name, config.model = 'order_net', dict(num_frames=4)
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'config.json').write_text(json.dumps(checkpoint_lib.config_to_json(config)))
  error = fails_in_one_line(capsys, export.main, ['--workdir', str(tmp_path / 'run'), '--output', str(tmp_path / 'x.pt')])
  assert re.match(r"error: model 'order_net' has no PyTorch transcription in dferjax/reference .*transcribed: "
                  rf"{re.escape(str(sorted(export.TRANSCRIPTIONS)))}", error), error
  assert not (tmp_path / 'x.pt').exists()


def test_a_workdir_without_checkpoint_fails_in_one_line(tmp_path, capsys, tiny_workdir):
  shutil.copytree(tiny_workdir('stt'), tmp_path / 'run', ignore=shutil.ignore_patterns('checkpoints'))
  error = fails_in_one_line(capsys, export.main, ['--workdir', str(tmp_path / 'run'), '--output', str(tmp_path / 'x.pt')])
  assert re.match(r'error: .*run holds no checkpoint', error), error
  error = fails_in_one_line(capsys, export.main, ['--workdir', str(tmp_path / 'no'), '--output', str(tmp_path / 'x.pt')])
  assert re.match(r'error: .*config\.json does not exist', error), error


def test_a_field_the_transcription_cannot_hold_fails_naming_it(monkeypatch):
  monkeypatch.setitem(export.TRANSCRIPTIONS, 'stt', export.Transcription('dferjax.reference.torch_stt', 'STT',
                                                                         renames=(('num_heads', 'heads'),)))
  with pytest.raises(ValueError, match=r"has no argument for the stt fields \['num_heads'\]"):
    export.torch_arguments(workdir_helpers.tiny_config('stt'))


def test_every_registered_model_is_transcribed_or_refused_loudly():
  """A model added to the registry either exports or fails naming the transcribed ones, never silently."""
  for name in models.MODELS:
    if name in export.TRANSCRIPTIONS:
      continue
    with pytest.raises(ValueError, match='has no PyTorch transcription'):
      export._transcription(name)  # pylint: disable=protected-access
