"""A split prepared once for fast training batches: caption templates, tag ids, regions.

Why. Built from the files each time, a batch at the paper's shapes (1,024 rows, 50
regions x 2,054 dims, both hard negatives) spends its time on work that depends on
the data alone: base64-decoding float32 features, parsing the tags' JSON, tagging
each caption and looking up WordNet antonyms for its text negative. All of it is done
here once per split, with a process pool, and stored beside the data; a batch is then
index arithmetic, a few random draws per row, tokenization (Rust) and NumPy copies.

What is stored, per split, in `<root>/<source>-<split>-<path hash>-<key>/` (`root`
defaults to `<data_dir>/.vldeformer_prepared`; `bin/build_data` writes it):
  meta.json               image ids, caption counts, tag vocabulary, bad images (the
                          `DataError` each raised), the key; written last: a
                          directory without it is an unfinished build
  object_start.npy        int64 [images + 1]: image i owns objects [s[i], s[i+1])
  object_tag.npy          int32 [objects]: each object's tag id in the vocabulary
  mentioned(_start).npy   int32 tag ids occurring in each caption (captions in image
                          order), as `image_negatives.swap_objects` needs them
  templates-C.jsonl(.idx) per caption a line, its `negatives.CaptionTemplate` (chunk C)
                          and the offset of each image's first line
  regions-C.npy           float16 [objects of chunk C, feature_dim], memory-mapped
                          (from a TFDS build too: reading its array_record records
                          costs about 0.4 ms per 50-region image on one core, measured
                          here, so at most ~2,500 images/s per core before any other
                          work; a memory map is a copy)

Staleness. The key is a SHA-256 of the source's identity and contents: for the raw
layout every file the split reads, hashed in full up to 64 MiB and, above that (the
features TSV), by size, modification time and the SHA-256 of its first and last MiB
(hashing 50 GB on every start is not an option); for TFDS its `dataset_info.json`
and `metadata.json`. A changed source gives a new key: the old directory of that
split is removed and the split prepared again.

Resumable. Chunks of `CHUNK_IMAGES` images are written atomically, each as soon as a
worker finishes it; a killed build resumes at the first missing chunk. Processes that
prepare the same split at once (a multi-host run started before `bin/build_data`) each
do the whole work but write the same files atomically, so the result is one split.

Bad rows. Every image is read; one that raises `DataError` (bad base64, JSON, sizes,
NaN, a value outside float16, tag/region counts that differ) is stored with its error
(file, line, kind) and no objects. The pipeline raises it, or skips and counts it,
when the stream reaches that image, as it did when reading the files directly.

Precision: regions are float16 as in the TFDS build (see `tfds_builder`): a relative
error of at most 2**-11; box dims are rounded too (batches are float16 end to end).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from vldeformer_jax import image_negatives, negatives
from vldeformer_jax.data import readers
from vldeformer_jax.data.errors import DataError
from vldeformer_jax.data.sources import SourceSpec, image_objects

logger = logging.getLogger(__name__)

VERSION = 2
CHUNK_IMAGES = 256
DEFAULT_DIRNAME = ".vldeformer_prepared"
_FULL_HASH_LIMIT = 64 * 2**20
_EDGE_BYTES = 2**20
FLOAT16_MAX = float(np.finfo(np.float16).max)


# ----------------------------------------------------------------------------------
# Keys.


def _file_digest(path: Path) -> str:
  """SHA-256 of a file: whole up to 64 MiB, else size + mtime + first and last MiB."""
  h = hashlib.sha256()
  stat = path.stat()
  with open(path, "rb") as f:
    if stat.st_size <= _FULL_HASH_LIMIT:
      for block in iter(lambda: f.read(2**20), b""):
        h.update(block)
    else:
      h.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
      h.update(f.read(_EDGE_BYTES))
      f.seek(stat.st_size - _EDGE_BYTES)
      h.update(f.read(_EDGE_BYTES))
  return h.hexdigest()


def _source_files(spec: SourceSpec) -> list[Path]:
  root = Path(spec.data_dir)
  if spec.data_source == "tfds":
    infos = [p for p in root.rglob("dataset_info.json") if DEFAULT_DIRNAME not in p.parts]
    return sorted(p.parent / n for p in infos for n in ("dataset_info.json",
                                                        "metadata.json")
                  if (p.parent / n).is_file())
  # Not the `.lineidx` files: they index the TSVs (checked against them when read) and
  # reading builds a missing one, which must not make the split it just prepared stale.
  names = ("features.tsv", "imageid2idx.json", "predictions.tsv",
           f"{spec.split}_captions.json", f"{spec.split}_captions.pt",
           f"{spec.split}_img_keys.tsv")
  return [root / n for n in names if (root / n).is_file()]


def source_key(spec: SourceSpec) -> str:
  """The SHA-256 (hex) naming a prepared split: format version, spec, file contents."""
  h = hashlib.sha256(json.dumps([VERSION, dataclasses.asdict(spec) | {"data_dir": ""}],
                                sort_keys=True).encode())
  for path in _source_files(spec):
    h.update(f"{path.name}:{_file_digest(path)};".encode())
  return h.hexdigest()


def _stem(spec: SourceSpec) -> str:
  """`<source>-<split>-<hash of the data's path>`: what a prepared split is of."""
  where = hashlib.sha256(os.fspath(Path(spec.data_dir).resolve()).encode())
  return f"{spec.data_source}-{spec.split}-{where.hexdigest()[:8]}"


def split_dir(spec: SourceSpec, root: str | os.PathLike | None = None,
              key: str | None = None) -> Path:
  """Where the prepared split of `spec` lives (`root`: default beside the data):
  `<root>/<source>-<split>-<path hash>-<key>`; another key there is stale."""
  base = Path(root) if root else Path(spec.data_dir) / DEFAULT_DIRNAME
  return base / f"{_stem(spec)}-{(key or source_key(spec))[:16]}"


# ----------------------------------------------------------------------------------
# Building.


def _atomic_write(path: Path, data: bytes) -> None:
  tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # Processes may race.
  tmp.write_bytes(data)
  os.replace(tmp, path)


def _atomic_save(path: Path, array: np.ndarray) -> None:
  tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npy")
  np.save(tmp, array)
  os.replace(tmp, path)


def _error_to_json(e: DataError) -> dict[str, Any]:
  return {"path": e.path, "problem": e.problem, "kind": e.kind, "line": e.line,
          "where": e.where, "key": e.key}


def _error_from_json(d: dict[str, Any]) -> DataError:
  return DataError(d["path"], d["problem"], kind=d["kind"], line=d["line"],
                   where=d["where"], key=d["key"])


@functools.lru_cache(maxsize=2)
def _open(spec: SourceSpec, key: str):
  """The source, opened once per process and build (`key`: its contents' hash)."""
  del key  # Part of the cache key only: a changed source is opened afresh.
  return spec.open()


def _float16_regions(example: readers.RetrievalExample, location: str) -> np.ndarray:
  """The example's regions as float16; a value float16 cannot hold is a `DataError`."""
  regions = example.regions
  if regions.dtype != np.float16 and regions.size and np.abs(regions).max() > FLOAT16_MAX:
    region, dim = (int(v[0]) for v in np.nonzero(np.abs(regions) > FLOAT16_MAX))
    raise DataError(
        location, f"value {regions[region, dim]} in region {region} dim {dim} is "
        "outside the float16 range of the prepared regions", kind="float16_range",
        key=example.image_id)
  return regions.astype(np.float16)


def _chunk_done(out: Path, chunk: int) -> bool:
  return (out / f"chunk-{chunk:05d}.json").is_file()


def _prepare_chunk(spec: SourceSpec, key: str, out: Path, chunk: int, size: int) -> int:
  """Reads chunk `chunk` (of `size` images): writes its templates, tags, regions."""
  source = _open(spec, key)
  lo = chunk * size
  hi = min(lo + size, len(source.image_ids))
  lines, tags, regions, errors, first_line = [], [], [], [], []
  for index in range(lo, hi):
    first_line.append(len(lines))
    try:
      example = (source.read(index, np.float16) if spec.data_source == "tfds"
                 else source.read(index))
      objects = image_objects(example, None, source.location)
      regions.append(_float16_regions(example, source.location))
      templates = [json.dumps(negatives.caption_template(c).to_json()).encode() + b"\n"
                   for c in example.captions]
    except DataError as e:
      errors.append([index, _error_to_json(e)])
      tags.append([])
      continue
    lines += templates
    tags.append(objects.tags)
  first_line.append(len(lines))
  offsets = np.concatenate([[0], np.cumsum([len(x) for x in lines])]).astype(np.int64)
  _atomic_write(out / f"templates-{chunk:05d}.jsonl", b"".join(lines))
  _atomic_save(out / f"templates-{chunk:05d}.idx.npy", offsets)
  _atomic_save(out / f"templates-{chunk:05d}.first.npy", np.array(first_line, np.int64))
  _atomic_save(out / f"regions-{chunk:05d}.npy", np.concatenate(regions) if regions
               else np.zeros((0, spec.feature_dim), np.float16))
  # Written last: the chunk is complete once this file exists.
  _atomic_write(out / f"chunk-{chunk:05d}.json",
                json.dumps({"tags": tags, "errors": errors}).encode())
  return hi - lo


def _mentions(vocab: list[str], captions: list[str]) -> list[list[int]]:
  index = _tag_index(tuple(vocab))
  return [np.flatnonzero(index.matches(c)).tolist() for c in captions]


@functools.lru_cache(maxsize=1)
def _tag_index(vocab: tuple[str, ...]) -> image_negatives._TagIndex:  # pylint: disable=protected-access
  return image_negatives._TagIndex(vocab)  # pylint: disable=protected-access


def _mention_chunk(out: Path, chunk: int, vocab: list[str]) -> int:
  """Writes the vocabulary tag ids occurring in each caption of the chunk's images."""
  data = (out / f"templates-{chunk:05d}.jsonl").read_bytes()
  captions = [json.loads(line)[0] for line in data.splitlines()]
  _atomic_write(out / f"mentioned-{chunk:05d}.json",
                json.dumps(_mentions(vocab, captions)).encode())
  return len(np.load(out / f"templates-{chunk:05d}.first.npy")) - 1  # Its images.


def _run(pool: concurrent.futures.Executor | None, fn: Callable[..., int],
         fn_args: list[tuple], progress: Callable[[int], None]) -> None:
  """Runs `fn(*args)` for each args, on `pool` or (None) in this process."""
  if pool is None:
    for args in fn_args:
      progress(fn(*args))
    return
  for done in concurrent.futures.as_completed([pool.submit(fn, *a) for a in fn_args]):
    progress(done.result())


def prepare(spec: SourceSpec, root: str | os.PathLike | None = None, *,
            workers: int = 0, progress: bool = False,
            chunk_images: int = CHUNK_IMAGES) -> Path:
  """Prepares the split of `spec` (or finishes a killed build); returns its directory.

  Reuses a finished directory with the current key; removes this split's directories
  with another key (stale). `workers > 0` reads and tags in that many processes;
  `progress` shows tqdm bars; `chunk_images` images per chunk (the unit of work and
  of resumption; a build resumes with the chunk size it started with).
  """
  key = source_key(spec)
  out = split_dir(spec, root, key)
  if (out / "meta.json").is_file():
    return out
  for stale in out.parent.glob(f"{_stem(spec)}-*"):
    if stale != out and stale.is_dir():
      logger.info("Removing the stale prepared split %s (its source changed)", stale)
      shutil.rmtree(stale)
  out.mkdir(parents=True, exist_ok=True)
  size_file = out / "chunk_images.json"
  if size_file.is_file():
    chunk_images = json.loads(size_file.read_text())
  else:
    _atomic_write(size_file, json.dumps(chunk_images).encode())
  source = _open(spec, key)
  image_ids, num_captions = list(source.image_ids), np.asarray(source.num_captions)
  chunks = math.ceil(len(image_ids) / chunk_images)

  def bar(desc: str, total: int, initial: int):
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    return tqdm(total=total, initial=initial, desc=desc, unit="image",
                disable=not progress)

  # Spawned, not forked: the caller may hold threads (JAX, TF, the input threads).
  pool = (concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context("spawn"))
          if workers > 0 and chunks > 1 else None)
  try:
    todo = [c for c in range(chunks) if not _chunk_done(out, c)]
    with bar(f"{spec.split}: read, tag", len(image_ids),
             len(image_ids) - sum(min(chunk_images, len(image_ids) - c * chunk_images)
                                  for c in todo)) as b:
      _run(pool, _prepare_chunk, [(spec, key, out, c, chunk_images) for c in todo], b.update)
    infos = [json.loads((out / f"chunk-{c:05d}.json").read_bytes())
             for c in range(chunks)]
    tags = [t for info in infos for t in info["tags"]]
    vocab = sorted({t for ts in tags for t in ts})
    todo = [c for c in range(chunks) if not (out / f"mentioned-{c:05d}.json").is_file()]
    with bar(f"{spec.split}: tags in captions", len(image_ids), len(image_ids) - sum(
        min(chunk_images, len(image_ids) - c * chunk_images) for c in todo)) as b:
      _run(pool, _mention_chunk, [(out, c, vocab) for c in todo], b.update)
  finally:
    if pool is not None:
      pool.shutdown(cancel_futures=True)
  tag_id = {t: k for k, t in enumerate(vocab)}
  sizes = np.array([len(ts) for ts in tags], np.int64)
  _atomic_save(out / "object_start.npy", np.concatenate([[0], np.cumsum(sizes)]))
  _atomic_save(out / "object_tag.npy",
               np.array([tag_id[t] for ts in tags for t in ts], np.int32))
  mentioned = [m for c in range(chunks)
               for m in json.loads((out / f"mentioned-{c:05d}.json").read_bytes())]
  errors = [e for info in infos for e in info["errors"]]
  bad = {i for i, _ in errors}
  want = sum(int(n) for i, n in enumerate(num_captions) if i not in bad)
  if len(mentioned) != want:
    raise RuntimeError(f"{out}: {len(mentioned)} captions tagged, expected {want}")
  counts = [0 if i in bad else int(n) for i, n in enumerate(num_captions)]
  _atomic_save(out / "mentioned_start.npy", np.concatenate(
      [[0], np.cumsum([len(m) for m in mentioned])]).astype(np.int64))
  _atomic_save(out / "mentioned.npy",
               np.array([t for m in mentioned for t in m], np.int32))
  _atomic_save(out / "caption_start.npy",
               np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
  meta = {"version": VERSION, "key": key, "spec": dataclasses.asdict(spec),
          "image_ids": image_ids, "num_captions": num_captions.tolist(),
          "vocab": vocab, "errors": errors, "chunk_images": chunk_images}
  _atomic_write(out / "meta.json", json.dumps(meta).encode())
  # The chunk files stay: processes of a multi-host run may be preparing the same
  # split at once (every write is atomic and the same), and read them until done.
  return out


# ----------------------------------------------------------------------------------
# Reading.


class PreparedSplit:
  """Random access to a prepared split (thread-safe; files opened lazily)."""

  def __init__(self, path: str | os.PathLike, spec: SourceSpec):
    self.path = Path(path)
    meta = json.loads((self.path / "meta.json").read_bytes())
    if meta.get("version") != VERSION:
      raise ValueError(f"{self.path}: prepared with format version "
                       f"{meta.get('version')}, this code reads {VERSION}")
    self.spec = spec
    self.image_ids: list[str] = meta["image_ids"]
    self.num_captions = np.asarray(meta["num_captions"], np.int64)
    self.vocab: list[str] = meta["vocab"]
    self.errors = {int(i): _error_from_json(e) for i, e in meta["errors"]}
    self.chunk_images = int(meta["chunk_images"])
    self.object_start = np.load(self.path / "object_start.npy")
    self.object_tag = np.load(self.path / "object_tag.npy")
    self.caption_start = np.load(self.path / "caption_start.npy")
    self.mentioned = np.load(self.path / "mentioned.npy")
    self.mentioned_start = np.load(self.path / "mentioned_start.npy")
    self._chunks: dict[int, tuple[int, np.ndarray, np.ndarray, np.ndarray]] = {}
    self._lock = threading.Lock()

  def _chunk(self, chunk: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """(templates fd, line offsets, first line per image, regions memmap)."""
    entry = self._chunks.get(chunk)
    if entry is None:
      with self._lock:
        entry = self._chunks.get(chunk)
        if entry is None:
          fd = os.open(self.path / f"templates-{chunk:05d}.jsonl", os.O_RDONLY)
          offsets = np.load(self.path / f"templates-{chunk:05d}.idx.npy")
          first = np.load(self.path / f"templates-{chunk:05d}.first.npy")
          regions = np.load(self.path / f"regions-{chunk:05d}.npy", mmap_mode="r")
          entry = self._chunks[chunk] = (fd, offsets, first, regions)
    return entry

  def tag_ids(self, image: int) -> np.ndarray:
    """int32 [n]: the vocabulary ids of the image's object tags, in file order."""
    return self.object_tag[self.object_start[image]:self.object_start[image + 1]]

  def template(self, image: int, caption: int) -> negatives.CaptionTemplate:
    chunk, row = divmod(image, self.chunk_images)
    fd, offsets, first, _ = self._chunk(chunk)
    k = int(first[row]) + caption
    line = os.pread(fd, int(offsets[k + 1] - offsets[k]), int(offsets[k]))
    return negatives.CaptionTemplate.from_json(json.loads(line))

  def mentioned_ids(self, image: int, caption: int) -> np.ndarray:
    """int32: the vocabulary ids of the tags that occur in the caption."""
    k = int(self.caption_start[image]) + caption
    return self.mentioned[self.mentioned_start[k]:self.mentioned_start[k + 1]]

  def regions(self, image: int, count: int) -> np.ndarray:
    """float16 [min(n, count), feature_dim]: the image's first `count` region rows."""
    chunk = image // self.chunk_images
    _, _, _, regions = self._chunk(chunk)
    first = self.object_start[chunk * self.chunk_images]
    lo = int(self.object_start[image] - first)
    hi = int(min(self.object_start[image + 1] - first, lo + count))
    return regions[lo:hi]

  def close(self) -> None:
    with self._lock:
      for fd, _, _, _ in self._chunks.values():
        os.close(fd)
      self._chunks.clear()


def open_prepared(spec: SourceSpec, root: str | os.PathLike | None = None, *,
                  workers: int = 0) -> PreparedSplit:
  """The prepared split of `spec`, prepared first when missing or stale."""
  return PreparedSplit(prepare(spec, root, workers=workers), spec)


def summary(split: PreparedSplit, limit: int = 20) -> Iterable[str]:
  """Lines naming the bad images (file, line, problem), at most `limit` of them."""
  errors = sorted(split.errors.items())
  for _, error in errors[:limit]:
    yield str(error)
  if len(errors) > limit:
    yield f"... and {len(errors) - limit} more"
