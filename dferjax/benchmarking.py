"""Shared benchmark helpers: machine and version facts, a windowed timing loop, XLA FLOPs and peak-FLOP/s
tables, the largest-batch search, JSON and table output (scripts/bench_train.py and its PyTorch side
dferjax/reference/torch_bench.py, scripts/bench_input.py); jax is imported only where a helper needs it.

Timing syncs once per window of several steps (`time_windows`), never per step, so an accelerator's queue
stays full as in a real training loop; the figure is the median over windows of the per-step time.
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Sequence

# Dense (no 2:4 sparsity) per-chip peaks in FLOP/s, from the vendors' data sheets. First match wins, so the
# specific names come first; every lower-case substring of a key must occur in the lower-case device_kind
# (e.g. 'NVIDIA H100 80GB HBM3' is the SXM part, 'NVIDIA H100 PCIe', 'TPU v5 lite' is v5e).
# 'float32' is what XLA runs float32 dots/convs at by default: TF32 tensor cores on NVIDIA Ampere and newer,
# one bf16 pass on TPU (docs.jax.dev "Matmul precision").
PEAK_FLOPS: tuple[tuple[tuple[str, ...], str, dict[str, float]], ...] = (
    (('h100', 'pcie'), 'NVIDIA H100 PCIe', {'bfloat16': 756e12, 'float32': 378e12}),
    (('h100', 'nvl'), 'NVIDIA H100 NVL', {'bfloat16': 835e12, 'float32': 418e12}),
    (('h100',), 'NVIDIA H100 SXM', {'bfloat16': 989e12, 'float32': 495e12}),
    (('h200', 'nvl'), 'NVIDIA H200 NVL', {'bfloat16': 835e12, 'float32': 418e12}),
    (('h200',), 'NVIDIA H200 SXM', {'bfloat16': 989e12, 'float32': 495e12}),
    (('a100',), 'NVIDIA A100 (SXM and PCIe)', {'bfloat16': 312e12, 'float32': 156e12}),
    (('tpu v4',), 'TPU v4', {'bfloat16': 275e12, 'float32': 275e12}),
    (('tpu v5 lite',), 'TPU v5e', {'bfloat16': 197e12, 'float32': 197e12}),
    (('tpu v5e',), 'TPU v5e', {'bfloat16': 197e12, 'float32': 197e12}),
    (('tpu v5',), 'TPU v5p', {'bfloat16': 459e12, 'float32': 459e12}),  # 'TPU v5' and 'TPU v5p'
)


def peak_flops(device_kind: str, dtype: str) -> tuple[float | None, str | None]:
  """(dense peak FLOP/s per device, the table row's name) for a jax `device_kind`; (None, None) if unknown."""
  kind = device_kind.lower()
  for keys, name, peaks in PEAK_FLOPS:
    if all(key in kind for key in keys):
      if dtype not in peaks:
        raise ValueError(f'dtype {dtype!r} has no peak in the table; expected one of {sorted(peaks)}')
      return peaks[dtype], name
  return None, None


def xla_flops(stage) -> float | None:
  """FLOPs of one call of a lowered (or compiled) XLA program: a lowered one is the global program, a compiled
  one after SPMD partitioning is one device's share.

  Pass the `Lowered` stage: its cost analysis runs on the HLO before the backend rewrites it (on CPU; jax on
  GPU returns none for a lowered program, so bench_train.py lowers for CPU in a separate worker). After GPU
  compilation convolutions are cuDNN custom calls whose FLOPs XLA does not count (the paper STT's train step
  reads 2.5 instead of 103 GFLOP per clip on an H200), so a compiled executable's count is only right on CPU/TPU.
  `cost_analysis()` returned a list with one dict per program in older jax, a dict in newer ones, and may be
  None or lack 'flops' on some backends.
  """
  analysis = stage.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or 'flops' not in analysis:
    return None
  flops = float(analysis['flops'])
  return flops if flops > 0 else None


def compiled_memory_bytes(compiled) -> dict[str, int] | None:
  """Arguments, outputs, temporaries of a compiled executable per device; `total` counts donated buffers once."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  memory = {'argument': int(stats.argument_size_in_bytes), 'output': int(stats.output_size_in_bytes),
            'alias': int(stats.alias_size_in_bytes), 'temp': int(stats.temp_size_in_bytes)}
  memory['total'] = memory['argument'] + memory['output'] + memory['temp'] - memory['alias']
  return memory


def device_peak_bytes(device) -> int | None:
  """The XLA allocator's peak bytes in use on `device` since the process started (None where not reported)."""
  stats = device.memory_stats()
  if not stats or 'peak_bytes_in_use' not in stats:
    return None
  return int(stats['peak_bytes_in_use'])


def is_resource_exhausted(error: BaseException) -> bool:
  """An out-of-memory error from XLA (at compile or at run time) or from torch."""
  text = f'{type(error).__name__}: {error}'
  return any(marker in text for marker in ('RESOURCE_EXHAUSTED', 'Out of memory', 'out of memory',
                                           'OutOfMemoryError'))


def time_windows(step: Callable[[], Any], sync: Callable[[], Any], *, steps: int, warmup: int,
                 window: int) -> dict[str, Any]:
  """Runs `step()` `warmup` times, then `steps` more in windows of `window`, calling `sync()` only after each
  window; returns the median per-step time over windows (and each window's, for the spread)."""
  if steps < 1 or window < 1 or warmup < 0:
    raise ValueError(f'need steps >= 1, window >= 1, warmup >= 0; got {steps}, {window}, {warmup}')
  for _ in range(warmup):
    step()
  sync()
  per_step = []
  remaining = steps
  while remaining > 0:
    count = min(window, remaining)
    start = time.perf_counter()
    for _ in range(count):
      step()
    sync()
    per_step.append((time.perf_counter() - start) / count)
    remaining -= count
  return {'step_time_s': statistics.median(per_step), 'window_step_times_s': per_step, 'timed_steps': steps,
          'steps_per_window': window, 'warmup_steps': warmup}


def throughput(timing: dict[str, Any], batch_size: int) -> dict[str, Any]:
  """`time_windows`' timing with the clips per second it implies."""
  return {**timing, 'clips_per_s': batch_size / timing['step_time_s']}


def largest_fitting(fits: Callable[[int], bool], start: int, *, multiple: int = 1,
                    limit: int = 1 << 16) -> dict[str, Any]:
  """The largest n (a multiple of `multiple`, <= `limit`) with `fits(n)`, assuming fitting is monotone:
  doubling from `start` until a failure, then bisection. {'largest': 0} if not even `multiple` fits."""
  if start < multiple or start % multiple:
    raise ValueError(f'start={start} must be a positive multiple of multiple={multiple}')
  tried = []

  def probe(n):
    ok = bool(fits(n))
    tried.append((n, ok))
    return ok

  fitting, failing = 0, None
  n = start
  while n <= limit:
    if not probe(n):
      failing = n
      break
    fitting, n = n, n * 2
  if failing is None:
    return {'largest': fitting, 'limit_reached': True, 'tried': tried}
  while failing - fitting > multiple:
    middle = (fitting + failing) // 2 // multiple * multiple
    if middle <= fitting:
      break
    if probe(middle):
      fitting = middle
    else:
      failing = middle
  return {'largest': fitting, 'limit_reached': False, 'tried': tried}


def cpu_model() -> str:
  """The CPU's marketing name ('model name' of /proc/cpuinfo on Linux, platform.processor() elsewhere)."""
  if os.path.isfile('/proc/cpuinfo'):
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
  """Host facts that change benchmark numbers: CPU model, cores this process may use, memory."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  info = {'hostname': socket.gethostname(), 'platform': platform.platform(), 'cpu_model': cpu_model(),
          'cpu_count': os.cpu_count(), 'cores_visible': cores}
  if hasattr(os, 'sysconf') and 'SC_PHYS_PAGES' in os.sysconf_names:
    info['memory_gib'] = round(os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30, 1)
  return info


def jax_device_info() -> dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel
  devices = jax.devices()
  return {'platform': devices[0].platform, 'device_kind': devices[0].device_kind, 'device_count': len(devices),
          'process_count': jax.process_count(), 'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'jax_disable_most_optimizations': bool(jax_option('jax_disable_most_optimizations')),
          'compilation_cache_dir': jax_option('jax_compilation_cache_dir') or None}


def jax_option(name: str):
  """A jax config option's value, None where this jax has no such option (the accessors moved between versions)."""
  import jax  # pylint: disable=import-outside-toplevel
  values = getattr(jax.config, 'values', None)
  if isinstance(values, dict) and name in values:
    return values[name]
  return getattr(jax.config, name, None)


def package_versions(names: Iterable[str] = ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'torch')) -> dict[str, str]:
  versions = {'python': sys.version.split()[0]}
  for name in names:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = 'not installed'
  return versions


def _json_default(value):
  if hasattr(value, 'item'):  # numpy / jax scalars
    return value.item()
  if hasattr(value, 'tolist'):
    return value.tolist()
  raise TypeError(f'{type(value).__name__} is not JSON serialisable')


def write_json(path: str, report: dict[str, Any]) -> None:
  """Writes `report` (numpy scalars allowed; NaN/inf become null) atomically, creating the folder."""
  def clean(value):
    if isinstance(value, float) and not math.isfinite(value):
      return None
    if isinstance(value, dict):
      return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
      return [clean(v) for v in value]
    return value
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  temporary = path + '.tmp'
  with open(temporary, 'w') as f:
    json.dump(clean(report), f, indent=2, default=_json_default)
    f.write('\n')
  os.replace(temporary, path)


def format_number(value, digits: int = 3) -> str:
  """Short human form: '-' for missing, 3 significant digits, thousands without exponent."""
  if value is None:
    return '-'
  if isinstance(value, str):
    return value
  if isinstance(value, int):
    return str(value)
  if value == 0 or not math.isfinite(value):
    return str(value)
  if abs(value) >= 10**digits:
    return f'{value:,.0f}'
  return f'{value:.{digits}g}'


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
  """A markdown table of `rows` with `columns` = (header, key) pairs; values via `format_number`."""
  cells = [[format_number(row.get(key)) for _, key in columns] for row in rows]
  headers = [header for header, _ in columns]
  widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
  lines = ['| ' + ' | '.join(h.ljust(w) for h, w in zip(headers, widths)) + ' |',
           '|' + '|'.join('-' * (w + 2) for w in widths) + '|']
  lines += ['| ' + ' | '.join(c.rjust(w) for c, w in zip(row, widths)) + ' |' for row in cells]
  return '\n'.join(lines)
