"""Copying flax variables into a PyTorch transcription: the one loader every `torch_*.py` module uses.

Each transcription says where a flax variable goes (`key_of(path) -> state_dict key`); this module does the
layout changes (conv HWIO -> OIHW, Dense [in, out] -> [out, in], torch's leading 1s) and refuses anything that
does not fit exactly, so a parity test never runs on half-copied weights.
"""
from typing import Callable

import numpy as np
import torch


def flax_leaves(tree, prefix=()):
  """(path, array) for every leaf of a nested dict of variables."""
  for name, value in tree.items():
    if hasattr(value, 'items'):
      yield from flax_leaves(value, prefix + (name,))
    else:
      yield prefix + (name,), value


def load_flax_variables(model: torch.nn.Module, variables, key_of: Callable[[tuple[str, ...]], str]) -> None:
  """Copies flax {'params', 'batch_stats'} into `model` in place. Every torch parameter and buffer (but
  num_batches_tracked) must be filled exactly once, from a variable of the same shape up to torch's leading
  1s; `key_of` raises KeyError for a variable with no torch place."""
  state = model.state_dict()
  new_state, problems = {}, []
  for collection in ('params', 'batch_stats'):
    for path, value in flax_leaves(variables.get(collection, {})):
      try:
        key = key_of(path)
      except KeyError:
        problems.append(f'no torch place for {"/".join(path)}')
        continue
      value = np.array(value, dtype=np.float32)  # a writable copy
      if path[-1] == 'kernel':  # 4-D conv HWIO -> OIHW; Dense [in, out] and Conv1d [W, I, O] reverse their axes
        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
      if key not in state:
        problems.append(f'unexpected {key} (from {"/".join(path)})')
        continue
      shape = tuple(state[key].shape)
      leading = len(shape) - value.ndim
      if leading < 0 or shape[leading:] != value.shape or any(size != 1 for size in shape[:leading]):
        problems.append(f'shape {key}: flax {value.shape} vs torch {shape}')
      elif key in new_state:
        problems.append(f'{key} filled twice (again from {"/".join(path)})')
      else:
        new_state[key] = torch.from_numpy(np.ascontiguousarray(value)).reshape(shape)
  problems += [f'missing {key}' for key in state if key not in new_state and not key.endswith('num_batches_tracked')]
  if problems:
    raise ValueError(f'flax variables do not fit the torch {type(model).__name__}:\n  ' + '\n  '.join(problems))
  model.load_state_dict(new_state, strict=False)
