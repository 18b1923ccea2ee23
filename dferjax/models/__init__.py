"""Model registry: `build(model_name, num_classes, **fields)` -> a linen Module (docs/contracts.md)."""
import dataclasses

import flax.linen as nn

from dferjax.models.aen import AEN, AENFrame
from dferjax.models.ceflnet import CEFLNet
from dferjax.models.est import EST
from dferjax.models.nr_dfernet import NRDFERNet
from dferjax.models.stt import STT

MODELS = {'stt': STT, 'nr_dfernet': NRDFERNet, 'ceflnet': CEFLNet, 'est': EST, 'aen': AEN, 'aen_frame': AENFrame}

_NOT_FIELDS = ('parent', 'name', 'num_classes')


def model_fields(cls) -> list[str]:
  """Hyperparameter fields a config may set for `cls` (num_classes comes from the dataset)."""
  return sorted(f.name for f in dataclasses.fields(cls) if f.name not in _NOT_FIELDS)


def build(model_name: str, num_classes: int, **fields) -> nn.Module:
  if model_name not in MODELS:
    raise ValueError(f'model_name {model_name!r} not in {sorted(MODELS)}')
  cls = MODELS[model_name]
  valid = model_fields(cls)
  if unknown := sorted(set(fields) - set(valid)):
    raise ValueError(f'{unknown} are not {cls.__name__} fields; valid fields: {valid}')
  return cls(num_classes=num_classes, **fields)
