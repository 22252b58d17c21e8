"""Exact top-k inner-product search in JAX, over a gallery placed on the device(s) once.

`ExactIndex` scores the queries against chunks of the gallery with a jitted matmul and
keeps a running top-k, so at most [queries, chunk] scores exist at a time (the chunk is
chosen per query batch from a score budget); each chunk's top-k is taken per block of
columns, then over the blocks' candidates (`_blocked_top_k`, exact).
`ExactIndex.search_texts` runs the text encoder, the L2 norm and the search as one
jitted program (token ids in, top-k out). The gallery may be stored in bfloat16 /
float16. With a mesh, the gallery rows are sharded on the 'data' axis: each device
keeps the top-k of its own rows and the per-device results are merged at the end.

Results are ordered by score (descending), and equal scores by gallery index
(ascending): the lowest index wins a tie, so results do not depend on the chunk size or
the number of devices. Padding rows never appear in results (they score -inf and sort
after every real row, and k is capped at N).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vldeformer_jax.sharding import DATA

if TYPE_CHECKING:
  from vldeformer_jax.encoder import VLDeformer

_NO_INDEX = np.iinfo(np.int32).max  # Index of the empty entries a top-k starts from.


class Searcher(Protocol):
  """Anything that returns the top-k inner products of queries against a gallery."""

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """queries [q, d] -> (scores float32 [q, k'], indices int64 [q, k']), k' <= k."""


def _best_k(scores: jax.Array, index: jax.Array, k: int
            ) -> tuple[jax.Array, jax.Array]:
  """The k best candidates [..., k] of [..., n], ordered by score (descending) then
  index (ascending), whatever order the candidates come in."""
  neg, index = jax.lax.sort((-scores, index), dimension=scores.ndim - 1, num_keys=2)
  return -neg[..., :k], index[..., :k]


def _merge_top_k(scores_a: jax.Array, index_a: jax.Array, scores_b: jax.Array,
                 index_b: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The k best of two candidate lists [..., ka] and [..., kb]."""
  return _best_k(jnp.concatenate([scores_a, scores_b], axis=-1),
                 jnp.concatenate([index_a, index_b], axis=-1), k)


def _blocked_top_k(scores: jax.Array, index: jax.Array, k: int, block: int
                   ) -> tuple[jax.Array, jax.Array]:
  """Top-k of scores [q, n] with column indices `index` [n] (ascending), in two stages:
  the top-k of every block of `block` columns, then the best k of those candidates.

  Exact: a row in the overall top-k is beaten by fewer than k rows of the gallery, so
  by fewer than k rows of its own block, so it is in its block's top-k (ties: a
  block's `top_k` keeps its lowest index first, and the final `_best_k` orders by
  (score, index), the same total order as a one-stage top-k). One top-k over a
  million columns is a long serial reduction on a GPU; q x n / block short ones run
  in parallel and leave only n / block x k candidates to sort.
  """
  q, n = scores.shape
  if n <= block:
    top_s, top_j = jax.lax.top_k(scores, min(k, n))  # ties: lowest index first
    return top_s, index[top_j]
  blocks = -(-n // block)
  pad = blocks * block - n
  scores = jnp.pad(scores, ((0, 0), (0, pad)), constant_values=-jnp.inf)
  index = jnp.pad(index, (0, pad), constant_values=_NO_INDEX).reshape(blocks, block)
  top_s, top_j = jax.lax.top_k(scores.reshape(q, blocks, block), min(k, block))
  top_i = jnp.take_along_axis(index[None], top_j, axis=2)  # [q, blocks, k]
  return _best_k(top_s.reshape(q, -1), top_i.reshape(q, -1), k)


def _local_top_k(queries: jax.Array, rows: jax.Array, first_row: jax.Array,
                 num_valid: jax.Array, k: int, chunk: int, block: int
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Top-k of queries [q, d] over gallery rows [n, d] whose global indices start at
  `first_row`: `n // chunk` full chunks in a scan, then the remaining rows; each
  chunk's top-k by `_blocked_top_k`. Rows at global index >= num_valid are padding.
  A half-precision gallery is scored with the queries rounded to its dtype and
  float32 accumulation.
  Returns (scores [q, k], indices int32 [q, k], all real scores finite: bool [])."""
  q, n = queries.shape[0], rows.shape[0]
  chunk = min(chunk, n)
  full_precision = rows.dtype == jnp.float32
  queries = queries.astype(rows.dtype)

  def score(carry, start, chunk_rows):
    best_s, best_i, finite = carry
    size = chunk_rows.shape[0]
    s = jax.lax.dot_general(queries, chunk_rows, (((1,), (1,)), ((), ())),
                            precision=(jax.lax.Precision.HIGHEST if full_precision
                                       else None),
                            preferred_element_type=jnp.float32)  # [q, size]
    index = first_row + start + jnp.arange(size, dtype=jnp.int32)  # [size]
    valid = index < num_valid
    finite &= jnp.all(jnp.isfinite(s) | ~valid[None, :])
    s = jnp.where(s == 0, 0.0, s)  # -0.0 -> 0.0, so the sort sees one zero.
    s = jnp.where(valid[None, :], s, -jnp.inf)
    top_s, top_i = _blocked_top_k(s, index, k, block)
    return (*_merge_top_k(best_s, best_i, top_s, top_i, k), finite)

  carry = (jnp.full((q, k), -jnp.inf, jnp.float32),
           jnp.full((q, k), _NO_INDEX, jnp.int32), jnp.array(True))
  full = n // chunk
  chunks = rows[:full * chunk].reshape(full, chunk, rows.shape[-1])  # [m, chunk, d]
  starts = jnp.arange(full, dtype=jnp.int32) * chunk
  carry, _ = jax.lax.scan(lambda c, xs: (score(c, *xs), None), carry, (starts, chunks))
  if n % chunk:
    carry = score(carry, jnp.int32(full * chunk), rows[full * chunk:])
  return carry


def _search_body(k: int, chunk: int, block: int, mesh: Mesh | None) -> Callable:
  """(queries [q, d], gallery [D * n, d], num_valid) -> top-k, to be jitted alone
  (`_search_fn`) or after the text encoder (`_text_search_fn`)."""
  if mesh is None:
    def run(queries, gallery, num_valid):
      return _local_top_k(queries, gallery, jnp.int32(0), num_valid, k, chunk, block)
    return run

  def local(queries, rows, num_valid):
    first = jax.lax.axis_index(DATA).astype(jnp.int32) * rows.shape[0]
    s, i, finite = _local_top_k(queries, rows, first, num_valid, k, chunk, block)
    all_s = jax.lax.all_gather(s, DATA, axis=1, tiled=True)  # [q, D * k]
    all_i = jax.lax.all_gather(i, DATA, axis=1, tiled=True)
    best_s, best_i = _best_k(all_s, all_i, k)
    finite = jax.lax.pmin(finite.astype(jnp.int32), DATA) > 0
    return best_s, best_i, finite

  return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(DATA), P()),
                       out_specs=(P(), P(), P()), check_vma=False)


@functools.lru_cache(maxsize=64)
def _search_fn(k: int, chunk: int, block: int, mesh: Mesh | None) -> Callable:
  """Jitted (queries [q, d], gallery [D * n, d], num_valid) -> top-k."""
  return jax.jit(_search_body(k, chunk, block, mesh))


@functools.lru_cache(maxsize=64)
def _text_search_fn(encode: Callable, k: int, chunk: int, block: int,
                    mesh: Mesh | None) -> Callable:
  """Jitted (params, text batch, gallery, num_valid) -> top-k: the encoder, the L2
  norm and the search in one program, so nothing returns to the host in between.
  Padding rows of the batch (no tokens) become zero queries."""
  search = _search_body(k, chunk, block, mesh)

  def run(params, batch, gallery, num_valid):
    r = encode({"params": params}, **batch)  # [q, d] float32
    norms = jnp.linalg.norm(r, axis=-1, keepdims=True)
    real = batch["token_mask"].any(axis=1, keepdims=True)
    return search(jnp.where(real, r / jnp.maximum(norms, 1e-12), 0.0), gallery,
                  num_valid)

  return jax.jit(run)


def _bucket(n: int, limit: int) -> int:
  """Smallest power of two >= n, at most `limit` (few query shapes get compiled)."""
  return min(1 << max(n - 1, 0).bit_length(), max(limit, n))


# Scores [queries, chunk] held at once per device by default (float32: 64 MiB). One
# query then scores up to 16M rows in a single step, which is what is fast on CPU (a
# scan over 16k-row chunks measured 1.2-1.7x slower for one query over 1M rows), and a
# batch of 1,024 queries 16,384 rows per step, as the fixed chunk did before (a 4M
# budget, i.e. 4,096-row steps, ran 1.2x slower in one run of 50k queries x 10k images).
DEFAULT_MAX_SCORES = 1 << 24
# Columns per first-stage top-k in `_blocked_top_k` (see there).
DEFAULT_TOPK_BLOCK = 4096
GALLERY_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")


class ExactIndex:
  """A gallery placed on the device(s) once, for repeated exact top-k search.

  The gallery [N, d] is padded to a multiple of D rows (D devices in `mesh`, or 1) and,
  with a mesh, row-sharded on 'data' (device i holds a contiguous block of rows); each
  device is filled straight from `gallery`, so a memory-mapped gallery is never copied
  whole on the host. Scores are float32 dot products at full precision (XLA may round
  the last bit differently for another query batch shape, so two scores within an ulp
  of each other can swap order between calls with different numbers of queries).
  A "bfloat16" or "float16" gallery halves memory and bandwidth; its scores are those
  of the rounded vectors, so the top-k is exact for them and approximate for the
  float32 gallery (`measure_recall` says how close). Half precision is for GPUs and
  TPUs: on a CPU without bfloat16 matmuls it ran ~8x slower (1M x 384, one query).

  `search` takes query embeddings; `search_texts` takes texts and runs the encoder,
  the L2 norm and the search as one compiled program.

  Args:
    gallery: [N, d] embeddings (L2-normalised for cosine search).
    chunk_size: gallery rows scored at a time per device; None picks it per query
      batch so that queries x chunk stays within `max_scores`.
    mesh: a ('data',) mesh to shard the rows over, or None for the default device.
    max_scores: the score budget per device when `chunk_size` is None.
    dtype: the stored gallery's dtype, one of `GALLERY_DTYPES`.
    topk_block: columns per first-stage top-k (`_blocked_top_k`).
  """

  def __init__(self, gallery: np.ndarray | jax.Array, chunk_size: int | None = None,
               mesh: Mesh | None = None, max_scores: int = DEFAULT_MAX_SCORES,
               dtype: str = "float32", topk_block: int = DEFAULT_TOPK_BLOCK):
    if np.ndim(gallery) != 2 or gallery.shape[0] < 1:
      raise ValueError(
          f"gallery must be a non-empty [N, d] array, got {np.shape(gallery)}")
    if chunk_size is not None and chunk_size < 1:
      raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if max_scores < 1:
      raise ValueError(f"max_scores must be >= 1, got {max_scores}")
    if dtype not in GALLERY_DTYPES:
      raise ValueError(f"dtype must be one of {GALLERY_DTYPES}, got {dtype!r}")
    if topk_block < 1:
      raise ValueError(f"topk_block must be >= 1, got {topk_block}")
    self.num_rows, self.dim = (int(x) for x in gallery.shape)
    self.mesh = mesh
    self.chunk_size, self.max_scores, self.topk_block = chunk_size, max_scores, topk_block
    self.dtype = dtype
    devices = 1 if mesh is None else mesh.shape[DATA]
    self.rows_per_device = -(-self.num_rows // devices)
    rows = self.rows_per_device * devices  # padded rows
    if rows >= _NO_INDEX:
      raise ValueError(f"{self.num_rows} gallery rows (padded: {rows}) exceed the int32 "
                       "row indices of exact search; split the gallery")
    sharding = (jax.sharding.SingleDeviceSharding(jax.devices()[0]) if mesh is None
                else NamedSharding(mesh, P(DATA)))
    store = jnp.dtype(dtype)

    def block(index: tuple[slice, ...]) -> np.ndarray:
      start, stop, _ = index[0].indices(rows)
      out = np.zeros((stop - start, self.dim), store)
      real = np.asarray(gallery[start:min(stop, self.num_rows)], np.float32)
      out[:len(real)] = real
      return out

    self.gallery = jax.make_array_from_callback((rows, self.dim), sharding, block)
    self.query_sharding = (None if mesh is None else NamedSharding(mesh, P()))
    self._placed_params: tuple[Any, Any] | None = None  # (params, on the mesh)
    self._num_valid = jnp.int32(self.num_rows)  # on the device once, not per call

  def chunk_for(self, num_queries: int) -> int:
    """Gallery rows per step for a batch of `num_queries` (padded) queries."""
    chunk = self.chunk_size or max(1, self.max_scores // max(num_queries, 1))
    return min(chunk, self.rows_per_device)

  def _check_k(self, k: int) -> int:
    if k < 1:
      raise ValueError(f"k must be >= 1, got {k}")
    return min(k, self.num_rows)

  def _results(self, out: tuple[jax.Array, jax.Array, jax.Array], num: int
               ) -> tuple[np.ndarray, np.ndarray]:
    scores, indices, finite = jax.device_get(out)  # one fetch for the three
    if not finite:
      raise ValueError("non-finite similarity scores: the queries or the gallery "
                       "contain NaN or Inf")
    return np.asarray(scores)[:num], np.asarray(indices)[:num].astype(np.int64)

  def search(self, queries: np.ndarray, k: int, query_batch: int = 1024
             ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each query: (scores float32 [q, k'], indices int64 [q, k']), with
    k' = min(k, N); ordered by score, ties by lowest gallery index."""
    queries = np.asarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[1] != self.dim:
      raise ValueError(f"queries must be [q, {self.dim}], got {queries.shape}")
    k = self._check_k(k)
    scores, indices = [], []
    for start in range(0, len(queries), query_batch):
      part = queries[start:start + query_batch]
      padded = np.zeros((_bucket(len(part), query_batch), self.dim), np.float32)
      padded[:len(part)] = part
      q = (padded if self.query_sharding is None
           else jax.device_put(padded, self.query_sharding))
      fn = _search_fn(k, self.chunk_for(len(padded)), self.topk_block, self.mesh)
      s, i = self._results(fn(q, self.gallery, self._num_valid), len(part))
      scores.append(s)
      indices.append(i)
    if not scores:
      return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate(scores), np.concatenate(indices)

  def search_texts(self, model: "VLDeformer", texts: Sequence[str], k: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows for each text, like `search(l2_normalize(model.encode_text(texts)))`
    but as one compiled call: token ids in, top-k out. The texts go through the
    encoder as one batch (at most `model.batch_size` of them)."""
    k = self._check_k(k)
    batch = model.text_batch(texts)
    params = model.params
    if self.mesh is not None or model.mesh is not None:
      # Everything the program reads goes where the gallery is (params once).
      where = self.query_sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
      if self._placed_params is None or self._placed_params[0] is not params:
        self._placed_params = (params, jax.device_put(params, where))
      params = self._placed_params[1]
      batch = jax.device_put(batch, where)
    rows = batch["input_ids"].shape[0]
    fn = _text_search_fn(model.encode_fn, k, self.chunk_for(rows), self.topk_block,
                         self.mesh)
    return self._results(fn(params, batch, self.gallery, self._num_valid), len(texts))


def exact_search(queries: np.ndarray, gallery: np.ndarray | jax.Array, k: int,
                 chunk_size: int | None = None, mesh: Mesh | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k inner products of queries [q, d] against gallery [N, d].

  Returns (scores float32 [q, min(k, N)], indices int64 [q, min(k, N)]), ordered by
  score (descending) with ties broken by the lowest gallery index. See `ExactIndex`.
  """
  return ExactIndex(gallery, chunk_size, mesh).search(queries, k)
