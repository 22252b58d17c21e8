"""Device mesh, shardings and the globally-batched contrastive loss.

One 1-D mesh axis, 'data', spans every device of every process. Batches are sharded
along it; parameters are replicated, or with FSDP sharded along the same axis (ZeRO-3
style: XLA gathers them for the forward pass). The contrastive loss runs inside
`jax.shard_map`: each device scores its local rows against the all-gathered columns of
the global batch, so per-device memory is O(local x global) and the loss and gradients
equal the single-device full-batch computation (the transpose of the tiled all_gather
is a psum_scatter that routes gradients back to the owning device).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vldeformer_jax.losses import contrastive_row_losses

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


def sharded_contrastive_loss(text: jax.Array, image: jax.Array,
                             neg_text: jax.Array | None, neg_image: jax.Array | None,
                             *, mesh: Mesh, temperature: float) -> jax.Array:
  """Eq. 1-3 over the global batch; inputs [B, d] sharded along 'data'. Scalar."""
  negatives = [x for x in (neg_text, neg_image) if x is not None]
  has_neg_text, has_neg_image = neg_text is not None, neg_image is not None

  def local(t, v, *negs):
    gather = lambda x: jax.lax.all_gather(x, DATA, tiled=True)
    negs = iter(negs)
    nt = gather(next(negs)) if has_neg_text else None
    nv = gather(next(negs)) if has_neg_image else None
    offset = jax.lax.axis_index(DATA) * t.shape[0]
    lt, lv = contrastive_row_losses(t, v, gather(t), gather(v), nt, nv, offset,
                                    temperature)
    global_rows = t.shape[0] * jax.lax.psum(1, DATA)
    return jax.lax.psum(lt.sum() + lv.sum(), DATA) / global_rows

  spec = P(DATA)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * (2 + len(negatives)),
                       out_specs=P())(text, image, *negatives)
