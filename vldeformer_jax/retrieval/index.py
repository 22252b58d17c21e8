"""A retrieval index: encoded gallery images and captions, built once and kept on disk.

VLDeformer encodes images and texts separately, so a gallery is encoded once
(`build_index`) and searched many times. The index stores L2-normalised embeddings (and
the norms they had, so the raw r_v / r_t can be recovered): similarity is cosine, a dot
product. `open_index` opens an index together with the model it was built with.

The on-disk format holds no pickles: NumPy `.npy`/`.npz` arrays (strings as UTF-8
bytes plus offsets) and a JSON metadata file, read with `allow_pickle=False`. The
metadata records the model the index was built with, by path and by a fingerprint of
its weights (`model_dir.fingerprint`): `open_index` refuses another model's weights,
whose scores would be wrong without a word.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import numpy as np

from vldeformer_jax.data import readers, sources
from vldeformer_jax.fileio import atomic_directory, atomic_file, check_output

if TYPE_CHECKING:
  from vldeformer_jax.encoder import VLDeformer

logger = logging.getLogger(__name__)

FORMAT = "vldeformer_jax.index"
VERSION = 1
METADATA_FILE = "index.json"
NPZ_METADATA_KEY = "metadata_json"
INDEX = "an index (bin/index)"
FINGERPRINT_KEY = "model_fingerprint"


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
  """(x / ||x|| row-wise as float32 [n, d], the norms [n]); zero rows stay zero. The
  host-side (NumPy) normalisation of the project: the index, evaluation and the demo;
  inside jitted code, `losses.l2_normalize`."""
  x = np.asarray(x, np.float32)
  norms = np.linalg.norm(x, axis=-1)
  return (x / np.maximum(norms, 1e-12)[..., None]).astype(np.float32), norms.astype(
      np.float32)


def build_index(model: "VLDeformer", data: readers.VinVLRetrievalData,
                with_captions: bool = True, batch_size: int | None = None, *,
                model_dir: str | os.PathLike | None = None) -> RetrievalIndex:
  """Encodes every image of `data` (and, with `with_captions`, every caption) once.

  Images are read and encoded `batch_size` at a time (default: the model's), so only
  one batch of region features is in memory. An image's objects are those training
  and evaluation encode (`sources.image_objects`: the first `max_regions`, tag k with
  region k; unequal counts are a `DataError`). A bad image follows `data.on_error`
  ("error" raises, "skip" leaves it out and records it in `data.report`).

  Args:
    model: the encoder.
    data: the split to index.
    with_captions: also encode the captions (needed for image -> text search).
    batch_size: images per encoder call.
    model_dir: recorded in the metadata with its weights' fingerprint (default: the
      model's vocabulary folder, which is the model directory for `load_pretrained`
      models).
  """
  batch_size = batch_size or model.batch_size
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
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

  # A skipped image is logged and summarised in the metadata's skipped_images.
  for example, objects in sources.each_image(sources.RawSource(data=data), max_regions,
                                             data.on_error):
    pending.append((example.image_id, objects.tag_string, objects.regions,
                    example.captions))
    if len(pending) == batch_size:
      flush()
  flush(final=True)

  image_emb, image_norms = l2_normalize(np.concatenate(images))
  caption_parts: dict[str, Any] = {}
  if with_captions:
    d = image_emb.shape[1]
    raw = np.concatenate(captions) if captions else np.zeros((0, d), np.float32)
    caption_emb, caption_norms = l2_normalize(raw)
    caption_parts = dict(caption_embeddings=caption_emb, caption_norms=caption_norms,
                         captions=caption_texts,
                         caption_to_image=np.asarray(owners, np.int64))
  model_dir = Path(model_dir or model.vocab_file.parent).resolve()
  metadata = {
      "model_dir": str(model_dir),
      FINGERPRINT_KEY: _fingerprint(model_dir),
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


def is_index(path: str | os.PathLike) -> bool:
  """Whether `path` holds an index: a directory of index.json and index files (arrays,
  a stored FAISS index; readable or damaged), or a .npz of this format."""
  path = Path(path)
  if path.is_dir():
    names = {e.name for e in path.iterdir()}
    return METADATA_FILE in names and all(
        n == METADATA_FILE or n.endswith(".npy") or
        (n.startswith("faiss_") and n.endswith(".index")) for n in names)
  try:
    index_metadata(path)
  except (OSError, ValueError):
    return False
  return True


def check_index_output(path: str | os.PathLike, *, option: str | None = None,
                       overwrite: bool = False) -> Path:
  """`fileio.check_output` for an index: a directory, or a file for a path ending in
  .npz; new, empty, or an earlier index (replaced); anything else only with
  `overwrite`."""
  return check_output(path, is_dir=Path(path).suffix != ".npz", what=INDEX,
                      is_own=is_index, option=option, overwrite=overwrite)


def save_index(index: RetrievalIndex, path: str | os.PathLike, *,
               overwrite: bool = False) -> Path:
  """Writes `index` to a directory (one .npy per array + index.json) or, for a path
  ending in .npz, one uncompressed .npz; atomically (temp + rename). An existing index
  is replaced; anything else only with `overwrite` (`check_index_output`)."""
  path = check_index_output(path, overwrite=overwrite)
  arrays = _to_arrays(index)
  meta = json.dumps(_metadata(index), indent=2) + "\n"
  if path.suffix == ".npz":
    with atomic_file(path) as tmp:
      meta_bytes = np.frombuffer(meta.encode(), np.uint8)
      np.savez(tmp, **arrays, **{NPZ_METADATA_KEY: meta_bytes})
    return path
  with atomic_directory(path) as tmp_dir:
    for name, value in arrays.items():
      np.save(tmp_dir / f"{name}.npy", value, allow_pickle=False)
    (tmp_dir / METADATA_FILE).write_text(meta)
  return path


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


def _fingerprint(model_dir: str | os.PathLike) -> str | None:
  """`model_dir.fingerprint` of a model directory; None for one without parameters."""
  # Here, not at the top: the index format itself needs no model code (Flax).
  from vldeformer_jax import model_dir as model_dirs  # pylint: disable=g-import-not-at-top
  if not (Path(model_dir) / model_dirs.PARAMS_FILE).is_file():
    return None
  return model_dirs.fingerprint(model_dir)


def check_model_matches(index_path: str | os.PathLike, meta: dict[str, Any],
                        model_dir: str | os.PathLike,
                        allow_mismatch: bool = False) -> None:
  """Refuses (`IndexFormatError`) a model whose weights are not those the index was
  built with: its scores would be wrong without a word. With `allow_mismatch`, or for
  an index that records no fingerprint (built before they were recorded), a warning."""
  recorded = meta.get(FINGERPRINT_KEY)
  if recorded is None:
    logger.warning("%s records no fingerprint of the model it was built with (an older "
                   "index): cannot check that %s is that model", index_path, model_dir)
    return
  current = _fingerprint(model_dir)
  if current is None or current == recorded:  # None: loading it will say what is wrong
    return
  message = (f"the weights of the model {model_dir} differ from those the index "
             f"{index_path} was built with ({meta.get('model_dir')}): its scores would "
             "be wrong; rebuild the index with bin/index, or pass "
             "--allow_model_mismatch")
  if not allow_mismatch:
    raise IndexFormatError(message)
  logger.warning("%s (--allow_model_mismatch given: going on)",
                 message.rsplit(";", 1)[0])


class OpenedIndex(NamedTuple):
  """An index, the model to query it with and that model's directory (both None when
  the index was opened without a model)."""
  index: RetrievalIndex
  model: "VLDeformer | None"
  model_dir: str | os.PathLike | None


def open_index(index_path: str | os.PathLike,
               model_dir: str | os.PathLike | None = None, *, need_model: bool = True,
               allow_model_mismatch: bool = False, **model_options: Any) -> OpenedIndex:
  """Opens an index with its model (`model_dir`, default the one the index was built
  with), so both tools that query an index (bin/search, bin/serve) pick and check the
  model one way; `need_model=False` opens the index alone (image -> text search).

  `model_options` go to `encoder.load_pretrained` (e.g. `batch_size`). A model
  directory that is gone is a `FileNotFoundError`; an index of another width than the
  model, or built with other weights (`check_model_matches`; unless
  `allow_model_mismatch`), an `IndexFormatError` naming both.
  """
  if not need_model:
    return OpenedIndex(load_index(index_path), None, None)
  # Here, not at the top: the index format itself needs no model code (Flax).
  from vldeformer_jax import encoder  # pylint: disable=g-import-not-at-top
  meta = index_metadata(index_path)
  model_dir = model_dir or meta.get("model_dir")
  if not model_dir or not Path(model_dir).is_dir():
    raise FileNotFoundError(f"the model the index was built with ({model_dir}) is gone; "
                            "pass --model")
  check_model_matches(index_path, meta, model_dir, allow_model_mismatch)
  model = encoder.load_pretrained(model_dir, **model_options)
  return OpenedIndex(load_index(index_path, hidden_size=model.config.hidden_size), model,
                     model_dir)
