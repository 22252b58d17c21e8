"""Approximate search for million-scale galleries with FAISS (an optional dependency).

`FaissIndex` wraps "flat" (exact inner product), "ivf" (IVF-Flat, nlist / nprobe) and
"hnsw" (HNSW-Flat, M / efSearch); an index directory may store one of the images
(`faiss_file_name`, `stored_faiss_index`). `measure_recall` measures an approximate
index's recall@k against exact search on given queries.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from vldeformer_jax.retrieval.exact import ExactIndex, Searcher
from vldeformer_jax.retrieval.index import IndexFormatError, RetrievalIndex

FAISS_KINDS: tuple[str, ...] = ("flat", "ivf", "hnsw")
# The approximate kinds, worth storing beside an index (bin/index --faiss).
APPROXIMATE_KINDS: tuple[str, ...] = tuple(k for k in FAISS_KINDS if k != "flat")
FAISS_INSTALL_HINT = "pip install -e '.[faiss]'"


def import_faiss():
  """The faiss module, or an ImportError that says how to install it."""
  try:
    import faiss  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"FAISS is not installed ({e}); install it with "
                      f"`{FAISS_INSTALL_HINT}`") from None
  return faiss


def default_nlist(num_rows: int) -> int:
  """IVF lists: ~4 sqrt(N), with >= 39 training points per list (FAISS's minimum)."""
  return int(max(1, min(round(4 * np.sqrt(num_rows)), num_rows // 39)))


class FaissIndex:
  """Inner-product search with FAISS: "flat" (exact), "ivf" (IVF-Flat) or "hnsw".

  Args:
    gallery: [N, d] float32 embeddings (L2-normalised for cosine search).
    kind: one of `FAISS_KINDS`.
    nlist: IVF lists (default `default_nlist(N)`); trained on `gallery` (FAISS samples
      at most 256 points per list).
    nprobe: IVF lists visited per query (default max(1, nlist // 8)); more is slower
      and more accurate.
    hnsw_m: HNSW neighbours per node.
    ef_construction, ef_search: HNSW build / search beam widths.
    seed: seed of the IVF k-means.
  """

  def __init__(self, gallery: np.ndarray, kind: str = "flat", *, nlist: int | None = None,
               nprobe: int | None = None, hnsw_m: int = 32, ef_construction: int = 200,
               ef_search: int = 128, seed: int = 0):
    faiss = import_faiss()
    if kind not in FAISS_KINDS:
      raise ValueError(f"kind must be one of {FAISS_KINDS}, got {kind!r}")
    gallery = np.ascontiguousarray(gallery, np.float32)
    if gallery.ndim != 2 or not len(gallery):
      raise ValueError(f"gallery must be a non-empty [N, d] array, got {gallery.shape}")
    n, d = gallery.shape
    self.kind = kind
    if kind == "flat":
      index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
      nlist = nlist or default_nlist(n)
      if not 1 <= nlist <= n:
        raise ValueError(f"nlist must be in [1, {n}] (the gallery size), got {nlist}")
      quantizer = faiss.IndexFlatIP(d)
      index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
      index.cp.seed = seed
      index.train(gallery)  # (FAISS's Python wrapper keeps `quantizer` alive.)
    else:
      index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
      index.hnsw.efConstruction = ef_construction
    index.add(gallery)
    self.index = index
    self.configure(nprobe=max(1, nlist // 8) if kind == "ivf" and not nprobe else nprobe,
                   ef_search=ef_search if kind == "hnsw" else None)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "FaissIndex":
    """Reads an index written by `save` (FAISS's own binary format, no pickle)."""
    faiss = import_faiss()
    if not Path(path).is_file():
      raise FileNotFoundError(f"{path}: no such FAISS index")
    self = cls.__new__(cls)
    try:
      self.index = faiss.read_index(str(path))
    except RuntimeError as e:
      raise IndexFormatError(f"{path}: not a readable FAISS index ({e})") from None
    self.kind = ("ivf" if isinstance(self.index, faiss.IndexIVF) else
                 "hnsw" if isinstance(self.index, faiss.IndexHNSW) else "flat")
    return self

  def configure(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """Changes the search-time accuracy knobs (IVF nprobe, HNSW efSearch)."""
    if nprobe is not None:
      if self.kind != "ivf":
        raise ValueError(f"nprobe applies to an ivf index, this one is {self.kind}")
      if not 1 <= nprobe <= self.index.nlist:
        raise ValueError(f"nprobe must be in [1, nlist={self.index.nlist}], got {nprobe}")
      self.index.nprobe = nprobe
    if ef_search is not None:
      if self.kind != "hnsw":
        raise ValueError(f"ef_search applies to an hnsw index, this one is {self.kind}")
      if ef_search < 1:
        raise ValueError(f"ef_search must be >= 1, got {ef_search}")
      self.index.hnsw.efSearch = ef_search

  def save(self, path: str | os.PathLike) -> None:
    import_faiss().write_index(self.index, str(path))

  @property
  def num_rows(self) -> int:
    return int(self.index.ntotal)

  @property
  def dim(self) -> int:
    return int(self.index.d)

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores float32 [q, k'], indices int64 [q, k']), k' = min(k, N). An approximate
    index may find fewer than k' rows: the missing entries have index -1, score -inf."""
    queries = np.ascontiguousarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[1] != self.dim:
      raise ValueError(f"queries must be [q, {self.dim}], got {queries.shape}")
    if k < 1:
      raise ValueError(f"k must be >= 1, got {k}")
    scores, indices = self.index.search(queries, min(k, self.num_rows))
    indices = indices.astype(np.int64)
    return np.where(indices < 0, -np.inf, scores).astype(np.float32), indices


def faiss_file_name(kind: str) -> str:
  """The file an index directory stores its FAISS index of the images of `kind` in."""
  if kind not in FAISS_KINDS:
    raise ValueError(f"kind must be one of {FAISS_KINDS}, got {kind!r}")
  return f"faiss_{kind}.index"


def stored_faiss_index(index_path: str | os.PathLike, index: RetrievalIndex, kind: str
                       ) -> FaissIndex | None:
  """The FAISS image index of `kind` saved in an index directory, or None if absent;
  one that does not fit the index's images is an `IndexFormatError`."""
  path = Path(index_path) / faiss_file_name(kind)
  if not path.is_file():
    return None
  approx = FaissIndex.load(path)
  if (approx.num_rows, approx.dim) != (index.num_images, index.hidden_size):
    raise IndexFormatError(f"{path}: holds {approx.num_rows} x {approx.dim} vectors, the "
                           f"index {index.num_images} x {index.hidden_size}; rebuild it")
  return approx


def measure_recall(approx: Searcher, gallery: np.ndarray, queries: np.ndarray,
                   k: int = 10, exact: Searcher | None = None) -> float:
  """Recall@k of `approx` against exact search: the mean over queries of the fraction
  of the exact top-k that `approx` also returns in its top-k, in [0, 1]."""
  queries = np.asarray(queries, np.float32)
  if not len(queries):
    raise ValueError("no queries to measure recall on")
  exact = exact or ExactIndex(gallery)
  _, want = exact.search(queries, k)
  _, got = approx.search(queries, k)
  return recall_at_k(want, got)


def recall_at_k(want: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> float:
  """The mean over queries of the fraction of the exact ids `want[i]` that `got[i]`
  also holds (ids < 0 are missing entries), in [0, 1]."""
  hits = [len(set(np.asarray(w).tolist()) & set(np.asarray(g)[np.asarray(g) >= 0]
                                                .tolist())) for w, g in zip(want, got)]
  return float(np.sum(hits) / sum(len(w) for w in want))
