"""Where a profiled step spends its device time: kernel time per step by category and the top kernels, from the
Chrome-trace file jax.profiler writes (`*.trace.json.gz`, e.g. from `bench_train.py --profile_dir` or
scripts/gpu_bench.sh's `profile` stage).

    python scripts/profile_summary.py runs/gpu_bench/profile.trace.json.gz --steps 5

Kernels inside CUDA graphs carry only their graph's name as HLO op, so this groups by kernel name: enough to
split cuDNN convolutions, cuBLAS/Triton matmuls, reductions, transposes and elementwise fusions.
"""
import argparse
import collections
import gzip
import json
from typing import Any

# First match wins: (category, substrings of the lower-case kernel name).
CATEGORIES = (
    ('transpose', ('transpose',)),
    ('convolution (cuDNN)', ('conv', 'xmma', 'cudnn', 'implicit_gemm', 'fprop', 'dgrad', 'wgrad')),
    ('matmul (cuBLAS/Triton)', ('gemm', 'nvjet', 'cutlass', 'matmul', 'dot')),
    ('scatter', ('scatter',)),
    ('reduce_window', ('reduce_window',)),
    ('reduction', ('reduce', 'reduction')),
    ('memset/memcpy', ('memset', 'memcpy')),
    ('elementwise fusion', ('fusion', 'convert', 'broadcast', 'concatenate')),
)


def category(kernel: str) -> str:
  name = kernel.lower()
  for label, keys in CATEGORIES:
    if any(key in name for key in keys):
      return label
  return 'other'


def device_events(trace: dict[str, Any], module: str | None) -> list[dict]:
  """Complete events of the first '/device:' process, optionally of one XLA module (args.hlo_module)."""
  processes = {e['pid']: e['args']['name'] for e in trace['traceEvents']
               if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  devices = sorted(pid for pid, name in processes.items() if name.startswith('/device:'))
  if not devices:
    raise ValueError(f'no /device: process in the trace (processes: {sorted(processes.values())}); '
                     'profile on an accelerator')
  return [e for e in trace['traceEvents'] if e.get('ph') == 'X' and e['pid'] == devices[0]
          and (module is None or e.get('args', {}).get('hlo_module') == module)]


def summarize(trace: dict[str, Any], steps: int, module: str | None = 'jit_train_step', top: int = 20) -> dict:
  """Per-step kernel milliseconds by category and by kernel name."""
  events = device_events(trace, module)
  if not events:
    raise ValueError(f'no device events of module {module!r} in the trace; pass --module')
  by_kernel, by_category = collections.Counter(), collections.Counter()
  for event in events:
    by_kernel[event['name']] += event['dur']
    by_category[category(event['name'])] += event['dur']
  total = sum(by_kernel.values())
  per_step_ms = lambda microseconds: microseconds / steps / 1e3
  return {'steps': steps, 'module': module, 'kernels_per_step': len(events) / steps,
          'step_ms': per_step_ms(total),
          'categories': [(name, per_step_ms(time), time / total) for name, time in by_category.most_common()],
          'top_kernels': [(name, per_step_ms(time), time / total) for name, time in by_kernel.most_common(top)]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('trace', help='a *.trace.json.gz written by jax.profiler')
  parser.add_argument('--steps', type=int, required=True, help='steps the trace holds (bench_train: --window)')
  parser.add_argument('--module', default='jit_train_step', help="XLA module to count ('' for all)")
  parser.add_argument('--top', type=int, default=20)
  args = parser.parse_args()
  with gzip.open(args.trace, 'rt') as f:
    trace = json.load(f)
  summary = summarize(trace, args.steps, args.module or None, args.top)
  print(f"{summary['module']}: {summary['step_ms']:.2f} ms of kernels per step, "
        f"{summary['kernels_per_step']:.0f} kernels per step")
  print('| category | ms/step | share |\n|---|---|---|')
  for name, milliseconds, share in summary['categories']:
    print(f'| {name} | {milliseconds:.2f} | {100 * share:.1f}% |')
  print('\n| kernel | ms/step | share |\n|---|---|---|')
  for name, milliseconds, share in summary['top_kernels']:
    print(f'| {name[:90]} | {milliseconds:.2f} | {100 * share:.1f}% |')


if __name__ == '__main__':
  main()
