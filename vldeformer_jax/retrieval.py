"""Offline image index and fast cross-modal search with an individually-encoding model.

VLDeformer encodes images and texts separately, so a gallery is encoded once:

    index = build_index(model, data)           # every image (and caption) once
    save_index(index, "coco_test.index")       # a directory, or a single .npz file
    index = load_index("coco_test.index", hidden_size=model.config.hidden_size)
    hits = search_text(model, index, "a dog on a skateboard", k=10)  # one encoder pass
    hits = search_image(index, image_id, k=5)  # image -> text, stored captions only

Similarity is cosine: the index stores L2-normalised embeddings (and the norms they
had, so the raw r_v / r_t can be recovered), and search is a dot product.

Exact search (`ExactIndex`, `exact_search`) is a jitted matmul + top-k over chunks of
the gallery with a running top-k merge, so at most [queries, chunk] scores exist at a
time (the chunk is chosen per query batch from a score budget); each chunk's top-k is
taken per block of columns, then over the blocks' candidates (`_blocked_top_k`, exact).
`ExactIndex.search_texts` runs the text encoder, the L2 norm and the search as one
jitted program (token ids in, top-k out); `search_texts` / `search_text` use it. The
gallery may be stored in bfloat16 / float16. With a mesh, the gallery rows are sharded on
the 'data' axis: each device keeps the top-k of its own rows and the per-device
results are merged at the end. Results are ordered by score (descending), and equal
scores by gallery index (ascending): the lowest index wins a tie, so results do not
depend on the chunk size or the number of devices. Padding rows never appear in
results (they score -inf and sort after every real row, and k is capped at N).

For million-scale galleries `FaissIndex` wraps FAISS (optional dependency): "flat"
(exact inner product), "ivf" (IVF-Flat, nlist/nprobe) and "hnsw" (HNSW-Flat, M /
efSearch); `measure_recall` measures an approximate index's recall@k against exact
search on given queries.

The on-disk format holds no pickles: NumPy `.npy`/`.npz` arrays (strings as UTF-8
bytes plus offsets) and a JSON metadata file, read with `allow_pickle=False`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vldeformer_jax.data import readers
from vldeformer_jax.fileio import atomic_directory
from vldeformer_jax.sharding import DATA

if TYPE_CHECKING:
  from vldeformer_jax.encoder import VLDeformer

logger = logging.getLogger(__name__)

FORMAT = "vldeformer_jax.index"
VERSION = 1
METADATA_FILE = "index.json"
NPZ_METADATA_KEY = "metadata_json"
FAISS_KINDS: tuple[str, ...] = ("flat", "ivf", "hnsw")
FAISS_INSTALL_HINT = "pip install -e '.[faiss]'"
_NO_INDEX = np.iinfo(np.int32).max  # Index of the empty entries a top-k starts from.


class IndexFormatError(ValueError):
  """An index file that is missing, malformed or does not fit the model."""


# ----------------------------------------------------------------------------------
# The index.


class ImageHit(NamedTuple):
  """A text -> image result."""
  image_id: str
  tags: str
  score: float


class CaptionHit(NamedTuple):
  """An image -> text result: a stored caption and the image it belongs to."""
  caption: str
  image_id: str
  score: float


@dataclasses.dataclass
class RetrievalIndex:
  """Encoded gallery images and (optionally) the split's captions.

  Attributes:
    image_embeddings: [N, d] float32, L2-normalised r_v (cosine = dot product).
    image_norms: [N] float32, the norm of each r_v before normalising.
    image_ids: N canonical image ids.
    tags: N tag strings the images were encoded with.
    caption_embeddings: [C, d] float32, L2-normalised r_t, or None.
    caption_norms: [C] float32, or None.
    captions: C caption texts, or None.
    caption_to_image: [C] int64, the row of each caption's image, or None.
    metadata: JSON-able facts about how the index was built (model dir, split, ...).
  """

  image_embeddings: np.ndarray
  image_norms: np.ndarray
  image_ids: list[str]
  tags: list[str]
  caption_embeddings: np.ndarray | None = None
  caption_norms: np.ndarray | None = None
  captions: list[str] | None = None
  caption_to_image: np.ndarray | None = None
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    n, d = _check_matrix(self.image_embeddings, "image_embeddings")
    _check_lengths({"image_norms": len(self.image_norms),
                    "image_ids": len(self.image_ids), "tags": len(self.tags)},
                   n, "image_embeddings")
    caption_parts = (self.caption_embeddings, self.caption_norms, self.captions,
                     self.caption_to_image)
    given = [x is not None for x in caption_parts]
    if any(given) and not all(given):
      raise ValueError("caption_embeddings, caption_norms, captions and caption_to_image "
                       "must be given together")
    if self.has_captions:
      c, dc = _check_matrix(self.caption_embeddings, "caption_embeddings")
      if dc != d:
        raise ValueError(f"caption_embeddings have dim {dc}, image_embeddings {d}")
      _check_lengths({"caption_norms": len(self.caption_norms),
                      "captions": len(self.captions),
                      "caption_to_image": len(self.caption_to_image)},
                     c, "caption_embeddings")
      if c and (self.caption_to_image.min() < 0 or self.caption_to_image.max() >= n):
        raise ValueError(f"caption_to_image holds a row outside [0, {n})")
    self._rows: dict[str, int] | None = None

  @property
  def num_images(self) -> int:
    return self.image_embeddings.shape[0]

  @property
  def hidden_size(self) -> int:
    return self.image_embeddings.shape[1]

  @property
  def has_captions(self) -> bool:
    return self.caption_embeddings is not None

  def row(self, image_id: Any) -> int:
    """The row of an image id (int or str, canonicalised like the readers do)."""
    if self._rows is None:
      self._rows = {k: i for i, k in enumerate(self.image_ids)}
    key = readers.canonical_image_id(image_id)
    if key not in self._rows:
      where = self.metadata.get("split")
      raise KeyError(f"image id {key} is not in the index ({self.num_images} images"
                     + (f" of split {where!r})" if where else ")"))
    return self._rows[key]

  def raw_image_embeddings(self) -> np.ndarray:
    """The un-normalised r_v [N, d]."""
    return self.image_embeddings * self.image_norms[:, None]


def _check_matrix(x: Any, name: str) -> tuple[int, int]:
  if not isinstance(x, np.ndarray) or x.ndim != 2 or x.dtype != np.float32:
    raise ValueError(f"{name} must be a float32 [n, d] array, got "
                     f"{getattr(x, 'dtype', type(x).__name__)} {np.shape(x)}")
  return x.shape


def _check_lengths(lengths: dict[str, int], n: int, of: str) -> None:
  for name, length in lengths.items():
    if length != n:
      raise ValueError(f"{name} has {length} entries but {of} has {n} rows")


def l2_normalize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(x / ||x|| row-wise as float32 [n, d], the norms [n]); zero rows stay zero."""
  x = np.asarray(x, np.float32)
  norms = np.linalg.norm(x, axis=-1)
  return (x / np.maximum(norms, 1e-12)[..., None]).astype(np.float32), norms.astype(
      np.float32)


def image_inputs(example: readers.RetrievalExample, max_regions: int,
                 features_path: str | os.PathLike = "<features>"
                 ) -> tuple[str, np.ndarray]:
  """(tag string, regions) of an image as training encodes it: the first `max_regions`
  objects (tag k goes with region row k); unequal counts are a `DataError`."""
  if example.tags and len(example.tags) != len(example.regions):
    raise readers.DataError(
        features_path, f"{len(example.tags)} tags in the predictions but "
        f"{len(example.regions)} regions in the features: objects (tag + region) "
        "cannot be paired", kind="tag_region_mismatch", key=example.image_id)
  return " ".join(example.tags[:max_regions]), example.regions[:max_regions]


def build_index(model: "VLDeformer", data: readers.VinVLRetrievalData,
                with_captions: bool = True, batch_size: int | None = None, *,
                model_dir: str | os.PathLike | None = None) -> RetrievalIndex:
  """Encodes every image of `data` (and, with `with_captions`, every caption) once.

  Images are read and encoded `batch_size` at a time (default: the model's), so only
  one batch of region features is in memory. A bad image follows `data.on_error`
  ("error" raises, "skip" leaves it out and records it in `data.report`).

  Args:
    model: the encoder.
    data: the split to index.
    with_captions: also encode the captions (needed for image -> text search).
    batch_size: images per encoder call.
    model_dir: recorded in the metadata (default: the model's vocabulary folder, which
      is the model directory for `load_pretrained` models).
  """
  batch_size = batch_size or model.batch_size
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if not len(data):
    raise ValueError(f"split {data.split!r} of {data.data_dir} has no images to index")
  max_regions = model.config.max_regions
  images, captions, owners = [], [], []
  image_ids, tags, caption_texts = [], [], []
  pending: list[tuple[str, str, np.ndarray, list[str]]] = []
  start = last_log = time.monotonic()

  def flush(final: bool = False) -> None:
    nonlocal last_log
    if not pending:
      return
    images.append(model.encode_image([p[1] for p in pending], [p[2] for p in pending]))
    texts = [c for p in pending for c in p[3]]
    if with_captions and texts:
      captions.append(model.encode_text(texts))
    for image_id, tag_string, _, caps in pending:
      if with_captions:
        owners.extend([len(image_ids)] * len(caps))
        caption_texts.extend(caps)
      image_ids.append(image_id)
      tags.append(tag_string)
    pending.clear()
    now = time.monotonic()
    if final or now - last_log > 30:
      logger.info("encoded %d/%d images (%.0f s)", len(image_ids), len(data), now - start)
      last_log = now

  for example in data.examples():
    try:
      tag_string, regions = image_inputs(example, max_regions, data.features.path)
    except readers.DataError as e:
      if data.on_error == "error":
        raise
      data.report.record(e)  # Logged; summarised in the metadata's skipped_images.
      continue
    pending.append((example.image_id, tag_string, regions, example.captions))
    if len(pending) == batch_size:
      flush()
  flush(final=True)
  if not image_ids:
    raise ValueError(f"no image of split {data.split!r} of {data.data_dir} could be "
                     f"read: {data.report.summary()}")

  image_emb, image_norms = l2_normalize(np.concatenate(images))
  caption_parts: dict[str, Any] = {}
  if with_captions:
    d = image_emb.shape[1]
    raw = np.concatenate(captions) if captions else np.zeros((0, d), np.float32)
    caption_emb, caption_norms = l2_normalize(raw)
    caption_parts = dict(caption_embeddings=caption_emb, caption_norms=caption_norms,
                         captions=caption_texts,
                         caption_to_image=np.asarray(owners, np.int64))
  metadata = {
      "model_dir": str(Path(model_dir or model.vocab_file.parent).resolve()),
      "data_dir": str(Path(data.data_dir).resolve()),
      "split": data.split,
      "img_keys_file": None if data.keys_path is None else str(data.keys_path),
      "hidden_size": int(image_emb.shape[1]),
      "pooling": model.config.pooling,
      "skipped_images": len(data) - len(image_ids),
  }
  return RetrievalIndex(image_emb, image_norms, image_ids, tags, metadata=metadata,
                        **caption_parts)


# ----------------------------------------------------------------------------------
# Saving and loading.


def _pack_strings(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Strings -> (UTF-8 bytes uint8 [total], offsets int64 [n + 1])."""
  encoded = [s.encode("utf-8") for s in strings]
  offsets = np.zeros(len(encoded) + 1, np.int64)
  np.cumsum([len(b) for b in encoded], out=offsets[1:])
  return np.frombuffer(b"".join(encoded), np.uint8).copy(), offsets


def _unpack_strings(blob: np.ndarray, offsets: np.ndarray, source: str) -> list[str]:
  if (blob.ndim != 1 or offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0
      or offsets[-1] != len(blob) or np.any(np.diff(offsets) < 0)):
    raise IndexFormatError(f"{source}: string offsets do not fit the string bytes")
  data = np.asarray(blob, np.uint8).tobytes()
  try:
    return [data[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:])]
  except UnicodeDecodeError as e:
    raise IndexFormatError(f"{source}: not UTF-8 ({e})") from None


_STRING_FIELDS = ("image_ids", "tags", "captions")
_ARRAY_FIELDS = ("image_embeddings", "image_norms", "caption_embeddings",
                 "caption_norms", "caption_to_image")
_CAPTION_FIELDS = ("caption_embeddings", "caption_norms", "captions", "caption_to_image")


def _to_arrays(index: RetrievalIndex) -> dict[str, np.ndarray]:
  arrays: dict[str, np.ndarray] = {}
  for name in _ARRAY_FIELDS:
    value = getattr(index, name)
    if value is not None:
      arrays[name] = np.ascontiguousarray(value)
  for name in _STRING_FIELDS:
    value = getattr(index, name)
    if value is not None:
      arrays[f"{name}_utf8"], arrays[f"{name}_offsets"] = _pack_strings(value)
  return arrays


def _metadata(index: RetrievalIndex) -> dict[str, Any]:
  return {**index.metadata, "format": FORMAT, "version": VERSION,
          "hidden_size": index.hidden_size, "num_images": index.num_images,
          "num_captions": len(index.captions) if index.has_captions else None,
          "normalized": True}


def save_index(index: RetrievalIndex, path: str | os.PathLike) -> Path:
  """Writes `index` to a directory (one .npy per array + index.json) or, for a path
  ending in .npz, one uncompressed .npz; atomically (temp + rename). An existing index
  is replaced; any other existing file or non-empty directory is an error."""
  path = Path(path)
  _check_replaceable(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  arrays = _to_arrays(index)
  meta = json.dumps(_metadata(index), indent=2) + "\n"
  if path.suffix == ".npz":
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
    try:
      with os.fdopen(fd, "wb") as f:
        meta_bytes = np.frombuffer(meta.encode(), np.uint8)
        np.savez(f, **arrays, **{NPZ_METADATA_KEY: meta_bytes})
      os.chmod(tmp, 0o644)
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)
    return path
  with atomic_directory(path) as tmp_dir:
    for name, value in arrays.items():
      np.save(tmp_dir / f"{name}.npy", value, allow_pickle=False)
    (tmp_dir / METADATA_FILE).write_text(meta)
  return path


def _check_replaceable(path: Path) -> None:
  if not path.exists():
    return
  if path.is_dir():
    if any(path.iterdir()) and not (path / METADATA_FILE).is_file():
      raise IndexFormatError(f"{path}: exists and is not an index; refusing to "
                             "replace it")
  elif path.suffix != ".npz":
    raise IndexFormatError(f"{path}: exists and is not an index; refusing to "
                           "replace it")


class _Files:
  """Reads the named arrays of an index directory or .npz, naming the file on errors."""

  def __init__(self, path: Path, mmap: bool):
    self.path = path
    self.npz = None
    if path.is_dir():
      meta_path = path / METADATA_FILE
      if not meta_path.is_file():
        raise IndexFormatError(f"{path}: not an index directory (no {METADATA_FILE}); "
                               "build one with bin/index")
      self.meta_source = str(meta_path)
      self.meta_text = meta_path.read_text()
    else:
      try:
        self.npz = np.load(path, allow_pickle=False)
      except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise IndexFormatError(f"{path}: not a readable .npz index ({e})") from None
      if not hasattr(self.npz, "files") or NPZ_METADATA_KEY not in self.npz.files:
        raise IndexFormatError(f"{path}: not an index .npz (no {NPZ_METADATA_KEY} entry)")
      self.meta_source = f"{path}[{NPZ_METADATA_KEY}]"
      self.meta_text = self._read(NPZ_METADATA_KEY).tobytes().decode("utf-8", "replace")
    self.mmap = mmap

  def where(self, name: str) -> str:
    return str(self.path / f"{name}.npy") if self.npz is None else f"{self.path}[{name}]"

  def has(self, name: str) -> bool:
    if self.npz is None:
      return (self.path / f"{name}.npy").is_file()
    return name in self.npz.files

  def _read(self, name: str) -> np.ndarray:
    if not self.has(name):
      raise IndexFormatError(f"{self.where(name)}: missing from the index")
    try:
      if self.npz is None:
        return np.load(self.path / f"{name}.npy", allow_pickle=False,
                       mmap_mode="r" if self.mmap else None)
      return self.npz[name]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
      raise IndexFormatError(f"{self.where(name)}: unreadable ({e})") from None

  def array(self, name: str, dtype: Any, ndim: int) -> np.ndarray:
    x = self._read(name)
    if x.dtype != dtype or x.ndim != ndim:
      raise IndexFormatError(f"{self.where(name)}: expected a {ndim}-d {np.dtype(dtype)} "
                             f"array, got {x.dtype} {x.shape}")
    return x

  def strings(self, name: str) -> list[str]:
    blob = self.array(f"{name}_utf8", np.uint8, 1)
    offsets = self.array(f"{name}_offsets", np.int64, 1)
    return _unpack_strings(blob, offsets, self.where(f"{name}_offsets"))

  def close(self) -> None:
    if self.npz is not None:
      self.npz.close()


def index_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """The metadata of an index (model dir, split, sizes) without reading its arrays."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such index (build one with bin/index)")
  files = _Files(path, mmap=True)
  try:
    meta = json.loads(files.meta_text)
  except json.JSONDecodeError as e:
    raise IndexFormatError(f"{files.meta_source}: not JSON ({e})") from None
  finally:
    files.close()
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise IndexFormatError(f"{files.meta_source}: not a vldeformer_jax index")
  return meta


def load_index(path: str | os.PathLike, hidden_size: int | None = None,
               mmap: bool = True) -> RetrievalIndex:
  """Reads an index written by `save_index` (directory or .npz).

  Args:
    path: the index.
    hidden_size: the model's hidden size; embeddings of another width are an
      `IndexFormatError` naming the embeddings file.
    mmap: memory-map the embeddings of a directory index instead of reading them.

  Raises:
    FileNotFoundError: no such path.
    IndexFormatError: a missing or malformed file (named in the message).
  """
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such index (build one with bin/index)")
  files = _Files(path, mmap)
  try:
    try:
      meta = json.loads(files.meta_text)
    except json.JSONDecodeError as e:
      raise IndexFormatError(f"{files.meta_source}: not JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
      raise IndexFormatError(f"{files.meta_source}: not a vldeformer_jax index")
    if meta.get("version") != VERSION:
      raise IndexFormatError(f"{files.meta_source}: index format version "
                             f"{meta.get('version')}, this code reads {VERSION}")
    emb = files.array("image_embeddings", np.float32, 2)
    stored = meta.get("hidden_size")
    if emb.shape[1] != stored:
      raise IndexFormatError(f"{files.where('image_embeddings')}: embeddings have dim "
                             f"{emb.shape[1]} but {files.meta_source} says {stored}")
    if hidden_size is not None and emb.shape[1] != hidden_size:
      raise IndexFormatError(
          f"{files.where('image_embeddings')}: embeddings have dim {emb.shape[1]} but "
          f"the model's hidden size is {hidden_size}; the index was built with "
          f"{meta.get('model_dir')} (rebuild it with bin/index --model ...)")
    if emb.shape[0] != meta.get("num_images"):
      raise IndexFormatError(
          f"{files.where('image_embeddings')}: {emb.shape[0]} rows but "
          f"{files.meta_source} says {meta.get('num_images')} images")
    parts: dict[str, Any] = dict(
        image_embeddings=emb, image_norms=files.array("image_norms", np.float32, 1),
        image_ids=files.strings("image_ids"), tags=files.strings("tags"))
    if meta.get("num_captions") is not None:
      parts.update(caption_embeddings=files.array("caption_embeddings", np.float32, 2),
                   caption_norms=files.array("caption_norms", np.float32, 1),
                   captions=files.strings("captions"),
                   caption_to_image=files.array("caption_to_image", np.int64, 1))
      if len(parts["captions"]) != meta["num_captions"]:
        raise IndexFormatError(f"{files.where('captions_offsets')}: "
                               f"{len(parts['captions'])} captions but "
                               f"{files.meta_source} says {meta['num_captions']}")
    meta = {k: v for k, v in meta.items()
            if k not in ("format", "version", "num_images", "num_captions", "normalized")}
    try:
      return RetrievalIndex(**parts, metadata=meta)
    except ValueError as e:
      raise IndexFormatError(f"{path}: inconsistent index: {e}") from None
  finally:
    files.close()


# ----------------------------------------------------------------------------------
# Exact search.


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


# ----------------------------------------------------------------------------------
# FAISS.


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


# ----------------------------------------------------------------------------------
# Queries.


def check_model_fits(model: "VLDeformer", index: RetrievalIndex) -> None:
  """An `IndexFormatError` naming the index's model unless the widths agree."""
  if model.config.hidden_size != index.hidden_size:
    raise IndexFormatError(
        f"the index holds {index.hidden_size}-d embeddings but the model's hidden size "
        f"is {model.config.hidden_size}; the index was built with "
        f"{index.metadata.get('model_dir')}")


def search_texts(model: "VLDeformer", index: RetrievalIndex, queries: Sequence[str],
                 k: int = 10, searcher: Searcher | None = None) -> list[list[ImageHit]]:
  """The k images that best match each query (one text-encoder pass + a dot product).

  `searcher` searches `index.image_embeddings` (default: a fresh `ExactIndex`; build
  one once, or a `FaissIndex`, for repeated queries). With an `ExactIndex` and a model
  that gives its text batches (`VLDeformer.text_batch`), each batch of at most
  `model.batch_size` queries is one compiled call (`ExactIndex.search_texts`);
  otherwise the queries are encoded, normalised, then searched.
  """
  queries = list(queries)
  for query in queries:
    if not isinstance(query, str) or not query.strip():
      raise ValueError(f"query must be a non-empty string, got {query!r}")
  check_model_fits(model, index)
  searcher = searcher or ExactIndex(index.image_embeddings)
  scores, rows = [], []
  if isinstance(searcher, ExactIndex) and hasattr(model, "text_batch"):
    for start in range(0, len(queries), model.batch_size):
      s, r = searcher.search_texts(model, queries[start:start + model.batch_size], k)
      scores += list(s)
      rows += list(r)
  elif queries:
    q, _ = l2_normalize(model.encode_text(queries))  # [n, d]
    scores, rows = searcher.search(q, k)
  return [[ImageHit(index.image_ids[r], index.tags[r], float(s))
           for s, r in zip(ss, rr) if r >= 0] for ss, rr in zip(scores, rows)]


def search_text(model: "VLDeformer", index: RetrievalIndex, query: str, k: int = 10,
                searcher: Searcher | None = None) -> list[ImageHit]:
  """The k images that best match `query`; see `search_texts`."""
  return search_texts(model, index, [query], k, searcher)[0]


def search_images(index: RetrievalIndex, image_ids: Sequence[Any], k: int = 10,
                  searcher: Searcher | None = None) -> list[list[CaptionHit]]:
  """The k stored captions closest to each indexed image (no encoder pass).

  `searcher` searches `index.caption_embeddings` (default: a fresh `ExactIndex`).
  An unknown id is a `KeyError` naming it.
  """
  if not index.has_captions:
    raise ValueError("the index holds no captions (it was built with "
                     "with_captions=False); image -> text search needs them")
  if not len(index.captions):
    raise ValueError("the index holds no captions to search")
  rows = [index.row(image_id) for image_id in image_ids]
  if not rows:
    return []
  searcher = searcher or ExactIndex(index.caption_embeddings)
  scores, found = searcher.search(index.image_embeddings[rows], k)
  return [[CaptionHit(index.captions[r], index.image_ids[index.caption_to_image[r]],
                      float(s)) for s, r in zip(ss, rr) if r >= 0]
          for ss, rr in zip(scores, found)]


def search_image(index: RetrievalIndex, image_id: Any, k: int = 10,
                 searcher: Searcher | None = None) -> list[CaptionHit]:
  """The k stored captions closest to an indexed image; see `search_images`."""
  return search_images(index, [image_id], k, searcher)[0]
