"""scripts/profile_summary.py on traces in jax.profiler's Chrome-trace format."""
import gzip
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'scripts', 'profile_summary.py')


def load_profile_summary():
  spec = importlib.util.spec_from_file_location('profile_summary', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def kernel(name, duration_us, module='jit_train_step', pid=1):
  return {'ph': 'X', 'pid': pid, 'tid': 14, 'ts': 0.0, 'dur': duration_us, 'name': name,
          'args': {'hlo_module': module, 'hlo_op': 'command_buffer_1'}}


def gpu_trace():
  return {'traceEvents': [
      {'ph': 'M', 'pid': 1, 'name': 'process_name', 'args': {'name': '/device:GPU:0'}},
      {'ph': 'M', 'pid': 7, 'name': 'process_name', 'args': {'name': '/host:CPU'}},
      kernel('sm90_xmma_fprop_implicit_gemm_bf16bf16_nhwc', 3000), kernel('nvjet_sm90_tst_128x160', 2000),
      kernel('input_add_reduce_fusion_2', 1000), kernel('wrapped_transpose_19', 500),
      kernel('input_scatter_fusion', 300), kernel('loop_add_fusion_8', 200),
      kernel('nvjet_sm90_tst_128x160', 2000),  # the same kernel in the second step
      kernel('loop_multiply_fusion', 9999, module='jit_eval_step'),
      kernel('host work', 5000, pid=7)]}


def test_categories_and_per_step_times():
  profile_summary = load_profile_summary()
  summary = profile_summary.summarize(gpu_trace(), steps=2)
  assert summary['step_ms'] == pytest.approx(9.0 / 2)  # 9,000 us of train-step kernels over 2 steps
  categories = {name: milliseconds for name, milliseconds, _ in summary['categories']}
  assert categories == pytest.approx({'matmul (cuBLAS/Triton)': 2.0, 'convolution (cuDNN)': 1.5,
                                      'reduction': 0.5, 'transpose': 0.25, 'scatter': 0.15,
                                      'elementwise fusion': 0.1})
  assert summary['top_kernels'][0][:2] == ('nvjet_sm90_tst_128x160', pytest.approx(2.0))
  assert sum(share for _, _, share in summary['categories']) == pytest.approx(1.0)
  assert profile_summary.summarize(gpu_trace(), steps=1, module=None)['step_ms'] == pytest.approx(18.999)


def test_clear_errors(tmp_path):
  profile_summary = load_profile_summary()
  with pytest.raises(ValueError, match='no /device: process'):
    profile_summary.summarize({'traceEvents': gpu_trace()['traceEvents'][1:]}, steps=1)
  with pytest.raises(ValueError, match="module 'jit_other'"):
    profile_summary.summarize(gpu_trace(), steps=1, module='jit_other')
  path = tmp_path / 'profile.trace.json.gz'
  with gzip.open(path, 'wt') as f:
    json.dump(gpu_trace(), f)
  printed = subprocess.run([sys.executable, SCRIPT, str(path), '--steps=2'], check=True, capture_output=True,
                           text=True).stdout
  assert 'jit_train_step: 4.50 ms of kernels per step' in printed and '| transpose | 0.25 | 5.6% |' in printed
