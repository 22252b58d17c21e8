"""The contrastive objective against a plain NumPy transcription of Eq. 1-3, and the
sharded loss/gradients against the single-device full batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vldeformer_jax.losses import contrastive_loss, cosine_loss, sharded_contrastive_loss
from vldeformer_jax.sharding import make_mesh


def numpy_eq123(t, v, nt=None, nv=None, tau=0.005):
  """Eq. 1-3 of the paper, literally: loops over i and j, float64."""
  cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
  n = len(t)
  lt = lv = 0.0
  for i in range(n):
    den_t = sum(np.exp(cos(t[i], v[j]) / tau) + (np.exp(cos(t[i], nv[j]) / tau)
                                                 if nv is not None else 0.0)
                for j in range(n))
    den_v = sum(np.exp(cos(v[i], t[j]) / tau) + (np.exp(cos(v[i], nt[j]) / tau)
                                                 if nt is not None else 0.0)
                for j in range(n))
    lt += -np.log(np.exp(cos(t[i], v[i]) / tau) / den_t)
    lv += -np.log(np.exp(cos(v[i], t[i]) / tau) / den_v)
  return lt / n + lv / n


@pytest.mark.parametrize("with_negatives", [False, True])
def test_contrastive_loss_equals_numpy_eq123(with_negatives):
  rng = np.random.default_rng(0)
  # Temperature 0.5 keeps float64 exp() finite in the literal transcription; the
  # paper's 0.005 is checked against a log-domain version below.
  t, v, nt, nv = (rng.normal(size=(6, 5)) for _ in range(4))
  negs = (nt, nv) if with_negatives else (None, None)
  got = contrastive_loss(*(None if x is None else jnp.asarray(x, jnp.float32)
                           for x in (t, v, *negs)), temperature=0.5)
  np.testing.assert_allclose(float(got), numpy_eq123(t, v, *negs, tau=0.5), rtol=1e-5)


def test_contrastive_loss_at_paper_temperature_and_in_bfloat16():
  rng = np.random.default_rng(1)
  t, v, nt, nv = (rng.normal(size=(8, 16)).astype(np.float32) for _ in range(4))
  norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  tau = 0.005
  s_tv = norm(t) @ norm(v).T / tau
  s_tnv = norm(t) @ norm(nv).T / tau
  s_vt = norm(v) @ norm(t).T / tau
  s_vnt = norm(v) @ norm(nt).T / tau
  lse = lambda a: np.log(np.exp(a - a.max(1, keepdims=True)).sum(1)) + a.max(1)
  expected = (np.mean(lse(np.concatenate([s_tv, s_tnv], 1)) - np.diag(s_tv))
              + np.mean(lse(np.concatenate([s_vt, s_vnt], 1)) - np.diag(s_vt)))
  got = contrastive_loss(t, v, nt, nv, temperature=tau)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  bf16 = contrastive_loss(*(jnp.asarray(x, jnp.bfloat16) for x in (t, v, nt, nv)),
                          temperature=tau)
  assert np.isfinite(float(bf16))
  assert abs(float(bf16) - expected) / expected < 0.05


def test_cosine_loss_and_shape_errors():
  t = jnp.array([[1.0, 0.0], [0.0, 2.0]])
  v = jnp.array([[2.0, 0.0], [1.0, 0.0]])
  np.testing.assert_allclose(float(cosine_loss(t, v)), 0.5)
  with pytest.raises(ValueError, match="neg_image has shape"):
    contrastive_loss(t, v, t, jnp.zeros((3, 2)))


@pytest.mark.parametrize("with_negatives", [False, True])
def test_sharded_loss_and_gradients_equal_single_device(with_negatives):
  assert jax.device_count() >= 8
  rng = np.random.default_rng(2)
  arrays = [jnp.asarray(rng.normal(size=(16, 12)), jnp.float32) for _ in range(4)]
  if not with_negatives:
    arrays[2:] = [None, None]
  mesh = make_mesh(8)
  tau = 0.05

  def single(t, v, nt, nv):
    return contrastive_loss(t, v, nt, nv, temperature=tau)

  def sharded(t, v, nt, nv):
    return sharded_contrastive_loss(t, v, nt, nv, mesh=mesh, temperature=tau)

  argnums = (0, 1, 2, 3) if with_negatives else (0, 1)
  l1, g1 = jax.value_and_grad(single, argnums=argnums)(*arrays)
  from jax.sharding import NamedSharding, PartitionSpec as P
  placed = [None if a is None else jax.device_put(a, NamedSharding(mesh, P("data")))
            for a in arrays]
  l8, g8 = jax.jit(jax.value_and_grad(sharded, argnums=argnums))(*placed)
  np.testing.assert_allclose(float(l8), float(l1), atol=1e-5)
  for a, b in zip(g1, g8):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
  assert len(g8[0].sharding.device_set) == 8  # gradients stay sharded
