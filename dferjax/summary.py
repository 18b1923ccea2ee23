"""A config's model size and forward cost, from shapes alone: nothing of paper size is ever allocated.

    python -m dferjax.summary --config configs/stt_dfew.py[:args] [--config.field=value ...] [--batch_size 1] [--json]

Prints the trainable parameter count (total and per top-level module of `variables['params']`), the BatchNorm
running statistics apart (buffers in torch, not parameters), and the eval-mode forward cost per clip two ways:

- GMACs (`gmacs_per_clip`): multiply-accumulates of every matmul (dot_general) and convolution in the forward's
  jaxpr, counted exactly from their shapes, split by op in `gmacs_per_clip_by_op`. This is the figure papers
  print, usually under the name "FLOPs" (thop, fvcore and ptflops count one multiply-add as one, and count a
  convolution's zero-padding taps). Attention's two matmuls are included, as fvcore counts them; thop, which
  counts only nn.Module layers, leaves them out.
- GFLOPs (`gflops_per_clip`): XLA's cost analysis of the lowered (not compiled) HLO, where one multiply-add is
  2 flops. Halved (`xla_half_gmacs_per_clip`) it is only a rough MAC count, off both ways: it adds elementwise
  work (softmax, normalisation, GELU, residual adds), but it leaves out the taps of a convolution window that
  fall on padding (a 3x3 SAME conv on a 7x7 map counts 361 of 441 window positions), and ResNet's small maps
  make that the larger effect: for STT flops / 2 is 10% below the exact count.

The lowering is for the CPU backend whatever the machine: jax on GPU gives no cost analysis for a lowered
program, and the count does not depend on the backend anyway.

Paper STT (configs/stt_dfew.py, one 16x112x112 clip, batch 1): 19,769,415 params (the paper's 19.77 M) plus
4,480 BN statistics; 19.30 GMACs (5.71 conv + 13.58 matmul), 34.70 GFLOPs by XLA (17.35 by flops / 2). By hand:
ResNet18 to layer3 ~0.35 GMACs a frame, the 1x1 patch embedding 0.1 G a clip, each of the 4 blocks 3.39 G. The
XLA forward is a third of the 102.8 GFLOP per clip that scripts/bench_train.py measured for a train step.
"""
from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Callable

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp

from dferjax import benchmarking

_RNG_NAMES = ('params', 'dropout', 'drop_path')


def abstract_variables(model, input_shape, dtype=jnp.float32):
  """The model's variables as ShapeDtypeStructs: init traced, never run."""
  video = jax.ShapeDtypeStruct(tuple(input_shape), dtype)
  rngs = {name: jax.random.key(0) for name in _RNG_NAMES}
  return jax.eval_shape(functools.partial(model.init, train=False), rngs, video)


def _size(tree) -> int:
  return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def count_parameters(variables, frozen: tuple[str, ...] = ()) -> dict[str, Any]:
  """Trainable parameters, total and per top-level module, and the BatchNorm statistics kept apart; the
  top-level modules in `frozen` (a model's `frozen_params`, e.g. AEN's guide) are counted apart too.

  Works on arrays or ShapeDtypeStructs. Collections other than params and batch_stats are not expected in
  these models; if one appears it is counted under `other_variables` rather than silently dropped.
  """
  params = variables.get('params', {})
  by_module = {name: _size(subtree) for name, subtree in params.items() if name not in frozen}
  other = {name: _size(tree) for name, tree in variables.items() if name not in ('params', 'batch_stats')}
  counts = {'params': sum(by_module.values()), 'params_by_module': by_module,
            'batch_stats': _size(variables.get('batch_stats', {}))}
  if frozen_sizes := {name: _size(params[name]) for name in frozen if name in params}:
    counts['frozen_params'] = frozen_sizes
  if other:
    counts['other_variables'] = other
  return counts


_MAC_OPS = ('conv', 'matmul')


def _jaxpr_macs(jaxpr) -> dict[str, int]:
  """Multiply-accumulates of conv_general_dilated ('conv') and dot_general ('matmul'), into nested jaxprs."""
  total = dict.fromkeys(_MAC_OPS, 0)

  def add(counts, times=1):
    for op in _MAC_OPS:
      total[op] += times * counts[op]

  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs_shape = eqn.invars[0].aval.shape
      # Each output element is one dot product over the contracting dims (batch dims are in the output).
      total['matmul'] += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs_shape[d] for d in lhs_contract)
    elif name == 'conv_general_dilated':
      rhs_shape = eqn.invars[1].aval.shape
      out_feature_dim = eqn.params['dimension_numbers'].rhs_spec[0]
      # Each output element sums kernel window x input features per group, padding taps included (as thop).
      total['conv'] += math.prod(eqn.outvars[0].aval.shape) * (math.prod(rhs_shape) // rhs_shape[out_feature_dim])
    elif name == 'cond':  # one branch runs: the costliest bounds it
      add(max((_jaxpr_macs(branch.jaxpr) for branch in eqn.params['branches']), key=lambda c: sum(c.values())))
    elif name == 'scan':
      add(_jaxpr_macs(eqn.params['jaxpr'].jaxpr), eqn.params['length'])
    else:  # jit, custom_jvp/vjp, remat, ... (a while loop's body counts once: its trip count is unknown)
      for sub in jax_core.jaxprs_in_params(eqn.params):
        add(_jaxpr_macs(sub))
  return total


def count_macs(fn: Callable, *args) -> dict[str, int]:
  """Exact conv and matmul multiply-accumulates of `fn(*args)` ({'conv', 'matmul', 'total'}); args may be
  ShapeDtypeStructs. The number thop/fvcore-style counters report; elementwise ops and reductions are not MACs.
  """
  counts = _jaxpr_macs(jax.make_jaxpr(fn)(*args).jaxpr)
  return {**counts, 'total': sum(counts.values())}


def forward_cost(model, input_shape, variables=None) -> dict[str, Any]:
  """Eval-mode forward cost of `model.apply(variables, video, train=False)` on float32 `input_shape`.

  Returns totals for the batch (`macs` {'conv', 'matmul', 'total'}, `xla_flops`) and per clip
  (`gmacs_per_clip`: exact conv + matmul MACs, `gmacs_per_clip_by_op`; `gflops_per_clip`: XLA's count, 2 per
  multiply-add; `xla_half_gmacs_per_clip`: that / 2). The XLA figures are None if its cost analysis gives nothing.
  """
  input_shape = tuple(input_shape)
  if variables is None:
    variables = abstract_variables(model, input_shape)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)
  video = jax.ShapeDtypeStruct(input_shape, jnp.float32)

  def forward(variables, video):
    return model.apply(variables, video, train=False)

  traced = jax.jit(forward).trace(abstract, video)
  macs = _jaxpr_macs(traced.jaxpr.jaxpr)
  macs['total'] = sum(macs.values())
  flops = benchmarking.xla_flops(traced.lower(lowering_platforms=('cpu',)))
  per_clip = lambda count: None if count is None else count / input_shape[0] / 1e9
  return {'macs': macs, 'xla_flops': flops, 'gmacs_per_clip': per_clip(macs['total']),
          'gmacs_per_clip_by_op': {op: per_clip(macs[op]) for op in _MAC_OPS},
          'gflops_per_clip': per_clip(flops), 'xla_half_gmacs_per_clip': None if flops is None else per_clip(flops) / 2}


def summarize(config, batch_size: int = 1) -> dict[str, Any]:
  """Parameter counts and forward cost per clip of `config`'s model, lowered at `batch_size` clips."""
  from dferjax import train  # pylint: disable=import-outside-toplevel
  model = train.build_model(config)
  notes = []
  if getattr(model, 'attention_impl', 'xla') != 'xla':
    # The cuDNN kernel does the same arithmetic but does not lower for CPU; count the XLA version.
    notes.append(f'attention_impl={model.attention_impl!r} counted as its XLA equivalent')
    model = model.clone(attention_impl='xla')
  input_shape = tuple(train.video_shape(config, batch_size))
  variables = abstract_variables(model, input_shape)
  cost = forward_cost(model, input_shape, variables)
  return {'model_name': config.model_name, 'dtype': str(config.dtype), 'input_shape': list(input_shape[1:]),
          'batch_size': batch_size, **count_parameters(variables, train.frozen_params(model)),
          'gmacs_per_clip': cost['gmacs_per_clip'], 'gmacs_per_clip_by_op': cost['gmacs_per_clip_by_op'],
          'gflops_per_clip': cost['gflops_per_clip'],
          'xla_half_gmacs_per_clip': cost['xla_half_gmacs_per_clip'], 'notes': notes}


def format_summary(summary: dict[str, Any]) -> str:
  """The human-readable table the CLI prints."""
  fmt = lambda x, digits=3: 'n/a' if x is None else f'{x:.{digits}f}'
  clip = 'x'.join(str(n) for n in summary['input_shape'])
  lines = [f"{summary['model_name']}: one clip {clip} ({summary['dtype']} compute), eval-mode forward",
           f"{'parameters':<28}{summary['params']:>14,}  ({summary['params'] / 1e6:.2f} M)"]
  lines += [f'  {name:<26}{count:>14,}' for name, count in summary['params_by_module'].items()]
  for name, count in summary.get('frozen_params', {}).items():
    lines.append(f"{'frozen ' + name:<28}{count:>14,}  (not trained, not counted above)")
  lines.append(f"{'BatchNorm statistics':<28}{summary['batch_stats']:>14,}  (running mean/var, not parameters)")
  for name, count in summary.get('other_variables', {}).items():
    lines.append(f"{'collection ' + name:<28}{count:>14,}")
  lines += [
      f"{'GMACs per clip':<28}{fmt(summary['gmacs_per_clip']):>14}  conv + matmul multiply-accumulates "
      '(the figure papers report, often calling it FLOPs)',
      f"{'  conv / matmul':<28}{fmt(summary['gmacs_per_clip_by_op']['conv']):>14} / "
      f"{fmt(summary['gmacs_per_clip_by_op']['matmul'])}",
      f"{'GFLOPs per clip':<28}{fmt(summary['gflops_per_clip']):>14}  XLA cost analysis: 1 multiply-add = 2 flops, "
      'elementwise ops included',
      f"{'  XLA GFLOPs / 2':<28}{fmt(summary['xla_half_gmacs_per_clip']):>14}  MACs by halving: rough "
      '(elementwise ops in, conv padding taps out)']
  lines += [f'note: {note}' for note in summary['notes']]
  return '\n'.join(lines)


def _main():
  """Flags are defined here, not at import, so importing this module never clashes with main.py's --config."""
  if 'JAX_PLATFORMS' not in os.environ:  # shapes only: never start an accelerator (jax is imported already)
    jax.config.update('jax_platforms', 'cpu')
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flag = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py[:args]).',
                                                lock_config=True)
  batch_flag = flags.DEFINE_integer('batch_size', 1, 'Clips in the lowered forward; results are per clip.')
  json_flag = flags.DEFINE_bool('json', False, 'Print one JSON object instead of the table.')
  flags.mark_flags_as_required(['config'])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if batch_flag.value < 1:
      raise app.UsageError(f'--batch_size must be positive, got {batch_flag.value}')
    summary = summarize(config_flag.value, batch_flag.value)
    print(json.dumps(summary) if json_flag.value else format_summary(summary))

  from dferjax import cli  # pylint: disable=import-outside-toplevel
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  _main()
