"""The 'hash32' dropout PRNG: threefry's key tree, uniform and independent bits."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vldeformer_jax import prng


def test_keys_are_threefry_keys():
  ours, fry = jax.random.key(7, impl=prng.HASH32), jax.random.key(7, impl="threefry2x32")
  assert jax.random.key_data(ours).shape == (2,)
  np.testing.assert_array_equal(jax.random.key_data(ours), jax.random.key_data(fry))
  for derive in (lambda k: jax.random.split(k, 3), lambda k: jax.random.fold_in(k, 11)):
    np.testing.assert_array_equal(jax.random.key_data(derive(ours)),
                                  jax.random.key_data(derive(fry)))


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.uint16, jnp.uint32, jnp.uint64])
def test_bits_are_uniform(dtype):
  with jax.enable_x64(dtype == jnp.uint64):
    bits = np.asarray(jax.random.bits(jax.random.key(0, impl=prng.HASH32), (1 << 18,),
                                      dtype))
  assert bits.dtype == dtype
  width = np.iinfo(dtype).bits
  # Each bit position is set half the time (binomial sd of the share: 0.001).
  shares = [((bits >> b) & 1).mean() for b in range(width)]
  assert max(abs(s - 0.5) for s in shares) < 0.006, shares
  # As many distinct values as independent uniform draws give: m (1 - (1 - 1/m)^n).
  m, n = 2.0 ** width, len(bits)
  expected = m * -np.expm1(n * np.log1p(-1 / m))
  assert abs(len(np.unique(bits)) / expected - 1) < 0.01


def test_uniform_floats_and_dropout_rate():
  key = jax.random.key(3, impl=prng.HASH32)
  u = np.asarray(jax.random.uniform(key, (1 << 20,)))
  counts, _ = np.histogram(u, bins=20, range=(0, 1))
  assert np.abs(counts / len(u) - 0.05).max() < 0.002  # ~10 sd of a bin's share
  x = jnp.ones((64, 64, 64))
  y = nn.Dropout(0.1).apply({}, x, deterministic=False, rngs={"dropout": key})
  kept = np.asarray(y) != 0
  assert abs(kept.mean() - 0.9) < 0.003
  np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.9, rtol=1e-6)


def test_masks_of_different_keys_and_neighbouring_indices_are_independent():
  key = jax.random.key(5, impl=prng.HASH32)
  draw = lambda k: np.asarray(jax.random.bernoulli(k, 0.5, (1 << 18,)), np.float64)
  a, b = draw(key), draw(jax.random.fold_in(key, 1))
  c, d = jax.random.split(key)
  for x, y in ((a, b), (draw(c), draw(d)), (a[:-1], a[1:])):  # keys, layers, neighbours
    assert abs(np.corrcoef(x, y)[0, 1]) < 0.01
  np.testing.assert_array_equal(draw(key), a)  # deterministic


def test_unknown_name_is_an_error():
  assert prng.impl("rbg") == "rbg" and prng.impl("hash32") is prng.HASH32
  with pytest.raises(ValueError, match="philox"):
    prng.impl("philox")
