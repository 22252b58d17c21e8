"""The PRNG implementations `config.dropout_rng` names, for the dropout masks.

JAX's own are 'threefry2x32' (jax.random's default), 'rbg' and 'unsafe_rbg' (XLA's
RngBitGenerator). On XLA:CPU none of them vectorises: each random value costs about
10 ns, the same for 8, 16 or 32-bit draws (4.7M dropout values took 45-55 ms; one
MiniLM demo step draws ~250 ms of dropout bits in a ~2 s step; BENCHMARKS.md).

'hash32' is threefry2x32 for everything that makes keys (seed, split, fold_in: the
same key tree as 'threefry2x32', so Flax's per-layer and per-module keys keep
threefry's quality) and draws the bits themselves with a keyed integer hash of each
element's index: two rounds of MurmurHash3's 32-bit finaliser with the key's two words
mixed in, which XLA fuses into one vectorised loop (~0.5 ns per value on this CPU).
Those bits are uniform and decorrelated across indices and keys (tests check the rate
and the independence of masks), enough for dropout; they are not a general-purpose or
cryptographic stream. Like the others it is deterministic on a given backend, so runs
resume exactly.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import random as jex_random

BUILTIN = ("threefry2x32", "rbg", "unsafe_rbg")
NAMES = BUILTIN + ("hash32",)


def _fmix32(x: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _hash_bits32(key: jax.Array, shape: tuple[int, ...], stream: int) -> jax.Array:
  n = math.prod(shape)
  if n > 2**32:
    raise ValueError(f"hash32 draws at most 2**32 values per key, asked for {n}")
  index = jax.lax.iota(jnp.uint32, n).reshape(shape)
  k0, k1 = key[0], key[1] ^ jnp.uint32(stream * 0x9E3779B9 & 0xFFFFFFFF)
  return _fmix32(_fmix32(index ^ k0) + k1)


def _hash_random_bits(key: jax.Array, bit_width: int, shape: tuple[int, ...]
                      ) -> jax.Array:
  """uint{bit_width} [shape]: bits of `key` (one threefry key, uint32 [2])."""
  low = _hash_bits32(key, shape, 0)
  if bit_width == 64:
    high = _hash_bits32(key, shape, 1).astype(jnp.uint64)
    return (high << 32) | low.astype(jnp.uint64)
  return low.astype({8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[bit_width])


_THREEFRY = jex_random.threefry_prng_impl
HASH32 = jex_random.define_prng_impl(
    key_shape=_THREEFRY.key_shape, seed=_THREEFRY.seed, split=_THREEFRY.split,
    fold_in=_THREEFRY.fold_in, random_bits=_hash_random_bits, name="hash32",
    tag="h32")


def impl(name: str) -> Any:
  """What `jax.random.key(..., impl=)` takes for a `config.dropout_rng` name."""
  if name == "hash32":
    return HASH32
  if name in BUILTIN:
    return name
  raise ValueError(f"unknown PRNG {name!r}: one of {NAMES}")
