"""The device mesh and the shardings every step uses: data-parallel over one `data` axis, state replicated.

One code path serves one device, many devices and many hosts: host-local batches become global arrays with
`jax.make_array_from_process_local_data`, so no step ever needs `pmap`.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


def make_mesh() -> jax.sharding.Mesh:
  # Auto axes: linen's Dropout and BatchNorm do not support Explicit sharding.
  return jax.make_mesh((jax.device_count(),), ('data',), axis_types=(AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def check_batch_size(global_batch_size: int, field: str = 'batch_size') -> int:
  """Returns the per-host batch size, failing early when the batch does not split over devices and hosts."""
  if global_batch_size < 1:
    raise ValueError(f'config.{field}={global_batch_size}: a batch needs at least one clip')
  if global_batch_size % jax.device_count():
    raise ValueError(f'config.{field}={global_batch_size} must be a multiple of the device count '
                     f'{jax.device_count()} (data parallelism splits the batch over devices)')
  return global_batch_size // jax.process_count()


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global jax.Arrays sharded along the batch axis."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
