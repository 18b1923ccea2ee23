"""PyTorch ResNet18 checkpoints -> Orbax backbone: parity with torch, round trip, clear errors (and the command's
one-line messages instead of tracebacks)."""
import argparse
from functools import partial
import pathlib
import shlex
import subprocess
import sys

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from dferjax import convert  # noqa: E402
from dferjax import models  # noqa: E402
from dferjax.models.resnet import ResNet  # noqa: E402
from dferjax.reference import torch_stt  # noqa: E402


def _random_resnet(seed, **kwargs):
  """torchvision-layout ResNet with random weights and random BN affine + running statistics."""
  torch.manual_seed(seed)
  model = torch_stt.ResNet(**kwargs)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0, 0.1)
        module.running_mean.normal_(0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
        module.num_batches_tracked.fill_(1000)
  return model.eval()


def _save_ms1m_format(model, path):
  """As Resnet18_MS1M_pytorch.pth.tar (refs.md §3.1): DataParallel prefix, 256-d embedding, 87,020-id head."""
  state = {f'module.{key}': value for key, value in model.state_dict().items()}
  state['module.feature.weight'] = torch.randn(256, 512)
  state['module.feature.bias'] = torch.randn(256)
  state['module.fc.weight'] = torch.randn(87_020, 256)
  state['module.fc.bias'] = torch.randn(87_020)
  torch.save({'epoch': 30, 'arch': 'resnet18', 'best_prec1': torch.tensor(91.5), 'state_dict': state}, path)


def test_ms1m_checkpoint_converts_and_matches_torch(tmp_path, capsys):
  torch_model = _random_resnet(0, num_classes=None)
  _save_ms1m_format(torch_model, tmp_path / 'Resnet18_MS1M_pytorch.pth.tar')
  convert.main(['--input', str(tmp_path / 'Resnet18_MS1M_pytorch.pth.tar'), '--output', str(tmp_path / 'ms1m')])
  printed = capsys.readouterr().out
  assert "ignoring entries beside state_dict: ['arch', 'best_prec1', 'epoch']" in printed
  assert 'dropped module.fc.weight (87020, 256)' in printed
  assert 'dropped module.feature.weight (256, 512)' in printed
  assert '11,176,512 params' in printed

  backbone = convert.load_backbone(tmp_path / 'ms1m')
  images = np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    want = torch_model.features(torch.from_numpy(images).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  with jax.default_matmul_precision('highest'):
    got = jax.jit(partial(ResNet().apply, train=False))(backbone, images)
  assert got.shape == want.shape == (2, 2, 2, 512)
  np.testing.assert_allclose(got, want, atol=1e-4)  # features reach ~10 in magnitude
  np.testing.assert_allclose(got.mean(axis=(1, 2)), want.mean(axis=(1, 2)), atol=1e-4)  # pooled 512-d feature


def test_data_beside_the_state_dict_is_read_as_data(tmp_path, capsys):
  """What training scripts save beside the weights: numpy scalars and dtypes, the argparse Namespace."""
  state = {'conv1.weight': torch.ones(2, 3), 'bn1.num_batches_tracked': torch.tensor(7)}
  torch.save({'epoch': 40, 'best_prec1': np.float64(91.5), 'best_acc': np.array([0.5], np.float32)[0],
              'label_dtype': np.dtype(np.int64), 'args': argparse.Namespace(lr=0.1, arch='resnet18'),
              'state_dict': state}, tmp_path / 'with_data.pth')
  read = convert.read_state_dict(tmp_path / 'with_data.pth')
  assert "ignoring entries beside state_dict: ['args', 'best_acc', 'best_prec1', 'epoch', 'label_dtype']" in \
      capsys.readouterr().out
  np.testing.assert_array_equal(read['conv1.weight'], np.ones((2, 3), np.float32))
  assert read['bn1.num_batches_tracked'] == 7


def test_plain_state_dict_round_trip(tmp_path, capsys):
  torch_model = _random_resnet(1, width=16)  # with its fc head, as torchvision saves it
  torch.save(torch_model.state_dict(), tmp_path / 'resnet18.pth')
  convert.main(['--input', str(tmp_path / 'resnet18.pth'), '--output', str(tmp_path / 'out')])
  assert 'dropped fc.weight (1000, 128)' in capsys.readouterr().out
  backbone = convert.load_backbone(tmp_path / 'out')
  state = torch_model.state_dict()
  flat = traverse_util.flatten_dict(backbone)
  assert len(flat) == 100  # 122 torchvision entries - fc - 20 num_batches_tracked
  for (_, *path), value in flat.items():
    want = state[convert.torch_key(path)].numpy()
    if path[-1] == 'kernel':
      want = want.transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(value, want)

  with pytest.raises(FileExistsError, match='--overwrite'):
    convert.convert_checkpoint(tmp_path / 'resnet18.pth', tmp_path / 'out')
  with pytest.raises(SystemExit, match='^error: .*out exists; pass --overwrite'):
    convert.main(['--input', str(tmp_path / 'resnet18.pth'), '--output', str(tmp_path / 'out')])
  convert.main(['--input', str(tmp_path / 'resnet18.pth'), '--output', str(tmp_path / 'out'), '--overwrite'])


def test_not_a_resnet18_lists_the_problems(tmp_path):
  resnet34 = torch_stt.ResNet(stage_sizes=(3, 4, 6, 3), width=8)
  torch.save({'state_dict': resnet34.state_dict()}, tmp_path / 'resnet34.pth')
  with pytest.raises(ValueError, match=r'resnet34.pth: not a torchvision ResNet[\s\S]*unexpected keys: '
                     r'layer1.2.bn1.bias'):
    convert.convert_checkpoint(tmp_path / 'resnet34.pth', tmp_path / 'x')
  with pytest.raises(SystemExit, match=r'^error: .*resnet34.pth: not a torchvision ResNet'):
    convert.main(['--input', str(tmp_path / 'resnet34.pth'), '--output', str(tmp_path / 'x')])

  torch.save({'foo': torch.zeros(3)}, tmp_path / 'random.pth')
  with pytest.raises(ValueError, match=r'100 missing keys: bn1.bias, .*conv1.weight[\s\S]*1 unexpected keys: foo'):
    convert.convert_checkpoint(tmp_path / 'random.pth', tmp_path / 'x')

  state = torch_stt.ResNet(width=8).state_dict()
  state['layer1.0.conv1.weight'] = torch.zeros(8, 8, 5, 5)
  with pytest.raises(ValueError, match=r'1 shape mismatches: layer1.0.conv1.weight \(8, 8, 5, 5\), '
                     r'expected \(8, 8, 3, 3\)'):
    convert.convert_state_dict({key: value.numpy() for key, value in state.items()})
  assert not (tmp_path / 'x').exists()


def test_unreadable_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='nothere.pth'):
    convert.read_state_dict(tmp_path / 'nothere.pth')
  (tmp_path / 'text.pth').write_text('not a checkpoint')
  with pytest.raises(ValueError, match='text.pth: torch.load'):
    convert.read_state_dict(tmp_path / 'text.pth')
  torch.save({'state_dict': {'conv1.weight': torch.zeros(1)}, 'optimizer': torch.optim.SGD}, tmp_path / 'obj.pth')
  with pytest.raises(ValueError, match='obj.pth: torch.load') as error:
    convert.read_state_dict(tmp_path / 'obj.pth')
  assert 'torch.optim.sgd.SGD was not an allowed global' in str(error.value)
  assert len(str(error.value).splitlines()) == 1  # torch's advice paragraphs are left out
  # The message's own remedy, run as a user who trusts the file would: its tensors alone, which then read.
  remedy = str(error.value).split('convert that: ', 1)[1]
  subprocess.run(shlex.split(remedy.replace('python', sys.executable, 1)), check=True, timeout=120)
  assert convert.read_state_dict(tmp_path / 'obj.state_dict.pth')['conv1.weight'].shape == (1,)
  with pytest.raises(FileNotFoundError, match='a directory, not a checkpoint file'):
    convert.read_state_dict(tmp_path)
  torch.save({'conv1.weight': torch.zeros(1), 'note': 'x'}, tmp_path / 'mixed.pth')
  with pytest.raises(ValueError, match=r"not tensors: \['note'\]"):
    convert.read_state_dict(tmp_path / 'mixed.pth')
  with pytest.raises(FileNotFoundError, match='no backbone checkpoint'):
    convert.load_backbone(tmp_path / 'missing_dir')


def _run_cli(*args):
  """`python -m dferjax.convert` in a fresh process, as a user runs it."""
  repo = pathlib.Path(__file__).resolve().parents[1]  # `-m` finds dferjax in the working directory
  return subprocess.run([sys.executable, '-m', 'dferjax.convert', *map(str, args)], capture_output=True, text=True,
                        cwd=repo, timeout=300, check=False)


@pytest.mark.parametrize('case', ['missing', 'random_bytes', 'linear', 'resnet_in_a_list', 'directory',
                                  'output_exists'])
def test_cli_errors_are_messages_not_tracebacks(tmp_path, case):
  path, output, want = tmp_path / f'{case}.pth', tmp_path / 'out', 'not a torchvision ResNet'
  if case == 'missing':
    want = 'no such checkpoint file'
  elif case == 'random_bytes':
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    want = 'torch.load(weights_only=True) cannot read it'
  elif case == 'linear':
    torch.save(torch.nn.Linear(8, 4).state_dict(), path)
    want = r'2 unexpected keys: bias, weight'
  elif case == 'resnet_in_a_list':
    torch.save([_random_resnet(5, width=8).state_dict()], path)
    want = 'expected a state_dict (a dict of tensors), got list'
  elif case == 'directory':
    path.mkdir()
    want = 'a directory, not a checkpoint file'
  else:
    torch.save(_random_resnet(6, width=8).state_dict(), path)
    output.mkdir()
    want = 'exists; pass --overwrite'
  result = _run_cli('--input', path, '--output', output)
  assert result.returncode == 1, result.stderr
  assert 'Traceback' not in result.stderr
  message = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(message) == 1 and str(path) in message[0] and want in result.stderr, result.stderr
  assert case == 'output_exists' or not output.exists()


def test_cli_bad_arguments_print_usage(tmp_path):
  result = _run_cli('--input', tmp_path / 'x.pth')
  assert result.returncode == 2 and 'the following arguments are required: --output' in result.stderr
  assert 'Traceback' not in result.stderr


def _zeros_like_model(model, video_shape):
  abstract = jax.eval_shape(partial(model.init, train=False), jax.random.key(0),
                            jax.ShapeDtypeStruct(video_shape, jnp.float32))
  return jax.tree.map(lambda spec: jnp.zeros(spec.shape, spec.dtype), abstract)


def test_merge_backbone_into_stt(tmp_path):
  torch_model = _random_resnet(2, width=16)
  backbone, _ = convert.convert_state_dict({k: v.numpy() for k, v in torch_model.state_dict().items()})
  model = models.build('stt', 7, num_frames=2, embed_dim=32, num_layers=1, num_heads=2, backbone_width=16)
  variables = _zeros_like_model(model, (1, 2, 32, 32, 3))
  merged = convert.merge_backbone(variables, backbone)  # layer4 of the checkpoint is not used by STT
  assert 'layer4_0' not in merged['params']['backbone']
  np.testing.assert_array_equal(merged['params']['backbone']['layer3_1']['conv2']['kernel'],
                                backbone['params']['layer3_1']['conv2']['kernel'])
  np.testing.assert_array_equal(merged['batch_stats']['backbone']['bn1']['var'], backbone['batch_stats']['bn1']['var'])
  assert merged['params']['head'] is variables['params']['head']
  assert jax.tree.structure(merged) == jax.tree.structure(variables)

  narrow = _random_resnet(3, width=8)
  narrow_backbone, _ = convert.convert_state_dict({k: v.numpy() for k, v in narrow.state_dict().items()})
  with pytest.raises(ValueError, match=r'45 shape mismatches: .*conv1/kernel: checkpoint \(7, 7, 3, 8\) vs model '
                     r'\(7, 7, 3, 16\)'):
    convert.merge_backbone(variables, narrow_backbone)
  short = convert.convert_state_dict(
      {k: v.numpy() for k, v in _random_resnet(4, stage_sizes=(2, 1, 2, 2), width=16).state_dict().items()},
      stage_sizes=(2, 1, 2, 2))[0]
  with pytest.raises(ValueError, match=r'missing: layer2_1/bn1/bias'):
    convert.merge_backbone(variables, short)
  with pytest.raises(ValueError, match=r"no params\['backbone'\]"):
    convert.merge_backbone({'params': {}, 'batch_stats': {}}, backbone)


def test_a_run_names_the_backbone_it_loads_and_the_config_field_that_does_not_fit(tmp_path, capsys):
  import os
  from dferjax import checkpoint as checkpoint_lib
  from dferjax import configlib, train
  torch.save(_random_resnet(7, width=16).state_dict(), tmp_path / 'resnet18_w16.pth')
  convert.main(['--input', str(tmp_path / 'resnet18_w16.pth'), '--output', str(tmp_path / 'w16')])
  config = configlib.load_config(os.path.join(os.path.dirname(__file__), 'tiny_config.py'))  # backbone_width=8
  with config.unlocked():
    config.init_from.backbone = str(tmp_path / 'w16')
  steps = train.make_steps(config, steps_per_epoch=None)
  state = steps.init(jax.random.key(0))
  with pytest.raises(ValueError, match=r"(?s)config.init_from.backbone=.*w16' does not fit the model built from "
                     r"config.model.backbone_stage=3, config.model.backbone_width=8: .*shape mismatches"):
    checkpoint_lib.initial_state(config, state, steps.model, steps.state_sharding)
  with config.unlocked():
    config.model.backbone_width = 16
  steps = train.make_steps(config, steps_per_epoch=None)
  capsys.readouterr()
  checkpoint_lib.initial_state(config, steps.init(jax.random.key(0)), steps.model, steps.state_sharding)
  assert (f'loaded backbone {tmp_path / "w16"} (100 tensors, 702,096 parameters, from resnet18_w16.pth)'
          in capsys.readouterr().out)
