"""Model summary: STT's public parameter count, MACs counted by hand on small modules, the CLI's JSON."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from dferjax import configlib, summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STT_CONFIG = os.path.join(REPO, 'configs', 'stt_dfew.py')
PAPER_STT_PARAMS = 19_769_415
BLOCK_PARAMS = 4_204_032  # one STT block at d=512, mlp 4x


class ConvDense(nn.Module):
  """One conv and one dense layer: MACs countable by hand."""
  padding: str = 'SAME'
  use_bias: bool = True
  feature_group_count: int = 1

  @nn.compact
  def __call__(self, x, *, train: bool):
    del train
    x = nn.Conv(4, (3, 3), padding=self.padding, use_bias=self.use_bias,
                feature_group_count=self.feature_group_count)(x)
    return nn.Dense(5, use_bias=self.use_bias)(x.reshape(x.shape[0], -1)), {}


def test_conv_and_dense_macs_by_hand():
  cost = summary.forward_cost(ConvDense(), (2, 8, 8, 3))
  conv = 8 * 8 * 3 * 3 * 3 * 4  # out_h * out_w * k * k * cin * cout per image
  dense = (8 * 8 * 4) * 5  # in * out
  assert cost['macs'] == {'conv': 2 * conv, 'matmul': 2 * dense, 'total': 2 * (conv + dense)}
  assert cost['gmacs_per_clip'] * 1e9 == pytest.approx(conv + dense)
  assert cost['gmacs_per_clip_by_op']['conv'] * 1e9 == pytest.approx(conv)
  # XLA leaves out the window taps on SAME padding: on an 8x8 map, (8 * 3 - 2) ** 2 of 8 * 8 * 9 positions;
  # it counts 2 flops a MAC and 1 a bias add, so here its flops / 2 is below the MACs.
  xla_conv = (8 * 3 - 2) ** 2 * 3 * 4
  assert cost['xla_flops'] == 2 * (2 * (xla_conv + dense) + 8 * 8 * 4 + 5)
  assert cost['xla_half_gmacs_per_clip'] < cost['gmacs_per_clip']


def test_xla_counts_two_flops_per_mac_without_padding_or_bias():
  cost = summary.forward_cost(ConvDense(padding='VALID', use_bias=False), (3, 6, 6, 2))
  macs_per_image = 4 * 4 * 3 * 3 * 2 * 4 + (4 * 4 * 4) * 5
  assert cost['macs']['total'] == 3 * macs_per_image
  assert cost['xla_flops'] == 2 * cost['macs']['total']
  assert cost['gflops_per_clip'] == pytest.approx(2 * cost['gmacs_per_clip'])


def test_grouped_conv_and_scan():
  cost = summary.forward_cost(ConvDense(feature_group_count=2), (1, 8, 8, 4))
  assert cost['macs']['conv'] == 8 * 8 * 3 * 3 * (4 // 2) * 4

  def repeated(x, w):  # a scan's body counts once per step
    return jax.lax.scan(lambda carry, _: (carry @ w, None), x, None, length=5)[0]

  spec = jax.ShapeDtypeStruct((3, 7), jnp.float32), jax.ShapeDtypeStruct((7, 7), jnp.float32)
  assert summary.count_macs(repeated, *spec) == {'conv': 0, 'matmul': 5 * 3 * 7 * 7, 'total': 5 * 3 * 7 * 7}


def test_count_parameters_keeps_batch_stats_apart():
  variables = {'params': {'a': {'kernel': jnp.zeros((3, 4)), 'bias': jnp.zeros(4)}, 'b': jnp.zeros(2)},
               'batch_stats': {'bn': {'mean': jnp.zeros(4), 'var': jnp.zeros(4)}}}
  assert summary.count_parameters(variables) == {'params': 18, 'params_by_module': {'a': 16, 'b': 2},
                                                 'batch_stats': 8}


def test_summarize_paper_stt():
  result = summary.summarize(configlib.load_config(STT_CONFIG))
  assert result['params'] == PAPER_STT_PARAMS
  assert sum(result['params_by_module'].values()) == PAPER_STT_PARAMS
  assert result['params_by_module']['block_3'] == BLOCK_PARAMS
  assert result['batch_stats'] == 4480
  assert result['input_shape'] == [16, 112, 112, 3] and result['model_name'] == 'stt'
  # ResNet18 to layer3 (~0.35 GMACs a frame) + 1x1 patch embedding + 4 blocks of ~3.39 GMACs.
  assert result['gmacs_per_clip'] == pytest.approx(19.29544448)
  assert result['gflops_per_clip'] == pytest.approx(34.7, rel=0.1)


def _cli(*args):
  command = [sys.executable, '-m', 'dferjax.summary', f'--config={STT_CONFIG}', '--json', *args]
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode == 0, done.stderr
  return json.loads(done.stdout)  # exactly one JSON object: anything else on stdout fails here


def test_cli_json_and_override():
  full = _cli()
  assert full['params'] == PAPER_STT_PARAMS and full['gmacs_per_clip'] > 0
  smaller = _cli('--config.model.num_layers=2', '--batch_size', '2')
  assert smaller['params'] == PAPER_STT_PARAMS - 2 * BLOCK_PARAMS
  assert 'block_2' not in smaller['params_by_module'] and smaller['batch_size'] == 2
  assert 0 < smaller['gmacs_per_clip'] < full['gmacs_per_clip']
