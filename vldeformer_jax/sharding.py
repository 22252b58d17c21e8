"""Device mesh and sharding rules.

One 1-D mesh axis, 'data', spans every device of every process. Batches are sharded
along it; parameters are replicated, or with FSDP sharded along the same axis (ZeRO-3
style: XLA gathers them for the forward pass). The contrastive loss that spans the
global batch (`losses.sharded_contrastive_loss`) gathers along this axis.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D ('data',) mesh over all devices (or the first `num_devices`)."""
  devices = jax.devices()
  n = num_devices or len(devices)
  if n > len(devices):
    raise ValueError(f"asked for {n} devices, only {len(devices)} available")
  return Mesh(np.asarray(devices[:n]), (DATA,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_shardings(params: Any, mesh: Mesh, fsdp: bool = False,
                    min_fsdp_size: int = 2 ** 14) -> Any:
  """Replicated parameters, or (fsdp) each large array sharded along its largest axis
  that the number of devices divides; small arrays stay replicated."""
  n = mesh.shape[DATA]

  def rule(x) -> NamedSharding:
    if not fsdp or n == 1 or np.prod(x.shape) < min_fsdp_size:
      return replicated(mesh)
    for axis in np.argsort(x.shape)[::-1]:
      if x.shape[axis] % n == 0:
        spec = [None] * len(x.shape)
        spec[axis] = DATA
        return NamedSharding(mesh, P(*spec))
    return replicated(mesh)

  return jax.tree.map(rule, params)


def global_batch(local: Any, mesh: Mesh) -> Any:
  """This process's share of the global batch (NumPy) -> global arrays sharded on 'data'."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)
