"""Readers for the released VinVL/Oscar retrieval data (the `run_retrieval.py` layout).

A data directory holds:
  * `features.tsv`: one row per image, `image_id \\t num_boxes \\t ... \\t base64`, the
    last column float32 data of shape [num_boxes, feature_dim]; the last 6 dims of a
    region are its normalised box. `features.lineidx` holds the byte offset of each
    row, `imageid2idx.json` maps the image id (a string) to the row index.
  * `predictions.tsv`: `image_id \\t JSON`, the detector's objects (tags).
  * `{split}_captions.pt` (torch pickle) or `{split}_captions.json`: image id -> list
    of captions (or a JSON string of that list).
  * `{split}_img_keys.tsv`, `test_img_keys_1k.tsv`: the image ids of a split.

This module knows what the files hold (box order, features, tags, captions, key
files); the layers under it are generic. Large files are never read into memory: rows
are found through a `.lineidx` and read by offset (`tsv.py`), so one reader can serve
several threads, and a pickled or forked copy opens its own file handle. Every problem
with the data raises `DataError` (`errors.py`), which names the file, the line (or
entry) and what is wrong. `VinVLRetrievalData` ties the files together and applies the
`on_error` policy: "error" raises, "skip" drops the bad image, counts it in a
`SkipReport` and logs it; nothing is skipped silently.

Why one module of ~750 lines: it is one file format, read together. Each part (box
order, features, predictions, captions and key files, the split) is 100-200 lines
and is only ever used through `VinVLRetrievalData`; split further, every reader of
the format would open five files to follow one image.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping

import numpy as np

from vldeformer_jax import safe_pickle
from vldeformer_jax.config import FEATURE_DIM
from vldeformer_jax.data.errors import (ON_ERROR_POLICIES, DataError, OnError,
                                        SkipReport, apply_policy, check_choice)
from vldeformer_jax.data.tsv import LineidxCheck, TsvFile, split_row

logger = logging.getLogger(__name__)

DEFAULT_FEATURE_DIM = FEATURE_DIM
NUM_BOX_DIMS = 6
BoxOrder = Literal["x1y1x2y2wh", "x1y1x2y2hw"]
# "x1y1x2y2wh": [x1/W, y1/H, x2/W, y2/H, w/W, h/H]; "x1y1x2y2hw" swaps the last two.
BOX_ORDERS: tuple[str, ...] = ("x1y1x2y2wh", "x1y1x2y2hw")
CANONICAL_BOX_ORDER = "x1y1x2y2wh"
CaptionsFormat = Literal["auto", "pt", "json"]


# ----------------------------------------------------------------------------------
# Image ids.


def canonical_image_id(image_id: Any) -> str:
  """The string form of an image id; decimal ids lose leading zeros (COCO ints)."""
  if isinstance(image_id, bytes):
    image_id = image_id.decode("utf-8")
  if isinstance(image_id, (bool, np.bool_)):
    raise TypeError(f"image id must be an int or str, got {image_id!r}")
  if isinstance(image_id, (int, np.integer)):
    return str(int(image_id))
  if not isinstance(image_id, str):
    raise TypeError(f"image id must be an int or str, got {type(image_id).__name__}")
  text = image_id.strip()
  if text.isascii() and text.isdigit():
    return str(int(text))
  return text


def index_first_column(tsv: TsvFile, on_error: OnError = "error",
                       report: SkipReport | None = None) -> dict[str, int]:
  """Maps the canonical column-0 image id of every row of `tsv` to its row.

  A row without columns or a repeated id is a `DataError`; under "skip" the row is
  left out of the index (the first of duplicate ids is kept) and reported.
  """
  index: dict[str, int] = {}
  for row in range(len(tsv.offsets)):
    try:
      image_id = canonical_image_id(tsv.read_first_column(row))
      if image_id in index:
        raise DataError(tsv.path, f"duplicate image id, first seen on line "
                        f"{tsv.line_number(index[image_id])}", kind="duplicate_id",
                        line=tsv.line_number(row), key=image_id)
    except DataError as e:
      if e.kind == "bad_lineidx":
        raise
      apply_policy(e, on_error, report)
      continue
    index[image_id] = row
  return index


# ----------------------------------------------------------------------------------
# Box order.


def detect_box_order(features: np.ndarray, atol: float = 0.01) -> str:
  """Which of `BOX_ORDERS` the last 6 dims of `features` ([..., D]) follow.

  In "x1y1x2y2wh" dim D-2 equals x2 - x1 (dims D-4 and D-6); in "x1y1x2y2hw" it equals
  y2 - y1. Only boxes whose width and height differ by more than 2 * atol decide; a
  tolerance of 0.01 admits the "+1 pixel" width convention of some extractors.

  Raises:
    DataError (path "<features>") when no box decides or the boxes follow neither
    order consistently.
  """
  boxes = np.asarray(features, dtype=np.float64).reshape(-1, features.shape[-1])
  if boxes.shape[-1] < NUM_BOX_DIMS:
    raise ValueError(f"features have {boxes.shape[-1]} dims, need >= {NUM_BOX_DIMS}")
  boxes = boxes[:, -NUM_BOX_DIMS:]
  boxes = boxes[np.isfinite(boxes).all(axis=1)]
  width = boxes[:, 2] - boxes[:, 0]
  height = boxes[:, 3] - boxes[:, 1]
  informative = np.abs(width - height) > 2 * atol
  if not informative.any():
    raise DataError("<features>", "cannot detect the box order: no box has width != "
                    "height; pass box_order explicitly", kind="box_order")
  b, w, h = boxes[informative], width[informative], height[informative]
  fits_wh = (np.abs(b[:, 4] - w) <= atol) & (np.abs(b[:, 5] - h) <= atol)
  fits_hw = (np.abs(b[:, 4] - h) <= atol) & (np.abs(b[:, 5] - w) <= atol)
  n = len(b)
  if fits_wh.mean() >= 0.9:
    return "x1y1x2y2wh"
  if fits_hw.mean() >= 0.9:
    return "x1y1x2y2hw"
  raise DataError(
      "<features>", f"box dims follow neither order: of {n} boxes with width != height, "
      f"{int(fits_wh.sum())} fit x1y1x2y2wh and {int(fits_hw.sum())} fit x1y1x2y2hw; "
      "pass box_order explicitly", kind="box_order")


def convert_box_order(features: np.ndarray, from_order: str, to_order: str) -> np.ndarray:
  """`features` with its last two box dims in `to_order` (a copy when they move)."""
  check_choice("from_order", from_order, BOX_ORDERS)
  check_choice("to_order", to_order, BOX_ORDERS)
  if from_order == to_order:
    return features
  out = np.array(features, copy=True)
  out[..., -2], out[..., -1] = features[..., -1], features[..., -2]
  return out


def boxes_of(features: np.ndarray) -> np.ndarray:
  """The box dims (the last 6) of region features [..., D] -> [..., 6]."""
  return features[..., -NUM_BOX_DIMS:]


# ----------------------------------------------------------------------------------
# Region features.


def decode_features(b64: bytes | str, num_boxes: int, feature_dim: int, *,
                    path: str | os.PathLike = "<features>", line: int | None = None,
                    key: str | None = None, check_finite: bool = True) -> np.ndarray:
  """Base64 float32 data -> a writable [num_boxes, feature_dim] array, validated."""
  try:
    raw = base64.b64decode(b64, validate=True)
  except (binascii.Error, ValueError) as e:
    raise DataError(path, f"bad base64 in the feature column ({e})", kind="bad_base64",
                    line=line, key=key) from None
  if len(raw) % 4:
    raise DataError(path, f"feature data is {len(raw)} bytes, not a whole number of "
                    "float32 values", kind="feature_size", line=line, key=key)
  num_values = len(raw) // 4
  if num_values % feature_dim:
    raise DataError(path, f"{num_values} float32 values is not a multiple of "
                    f"feature_dim {feature_dim}", kind="feature_size", line=line, key=key)
  if num_values // feature_dim != num_boxes:
    raise DataError(path, f"num_boxes column says {num_boxes} but the data holds "
                    f"{num_values // feature_dim} regions of {feature_dim} dims",
                    kind="num_boxes_mismatch", line=line, key=key)
  features = np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(
      num_boxes, feature_dim)
  if check_finite and not np.isfinite(features).all():
    region, dim = (int(v[0]) for v in np.nonzero(~np.isfinite(features)))
    raise DataError(path, f"non-finite value {features[region, dim]} in region {region} "
                    f"dim {dim}", kind="non_finite", line=line, key=key)
  return features


def encode_features(features: np.ndarray) -> str:
  """[n, D] floats -> the base64 text of their float32 little-endian bytes."""
  return base64.b64encode(np.ascontiguousarray(features, dtype="<f4").tobytes()).decode(
      "ascii")


def _read_json_file(path: Path) -> Any:
  try:
    text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise DataError(path, f"not UTF-8 text ({e})", kind="bad_json") from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(path, f"broken JSON: {e.msg} (column {e.colno})", kind="bad_json",
                    line=e.lineno) from None


class RegionFeatureReader:
  """Random access by image id to `features.tsv` (region features + box dims).

  Args:
    path: the data directory or the `features.tsv` file; `features.lineidx` and
      `imageid2idx.json` sit next to it (the id map is built by a scan if missing).
    feature_dim: dims per region, the last 6 being the box.
    box_order: how the stored box dims are ordered, one of `BOX_ORDERS`, or "auto" to
      detect it from the first rows (see `detect_box_order`).
    canonical_box_order: the order regions are returned in; None returns them as
      stored.
    check_lineidx, rebuild_bad_lineidx: see `TsvFile`.
    check_finite: NaN/Inf in a row is a `DataError`.
    detect_rows: how many rows "auto" inspects.
    on_error, report: policy for bad rows met while indexing ids without
      `imageid2idx.json` (reading a bad row always raises `DataError`).
  """

  def __init__(self, path: str | os.PathLike, feature_dim: int = DEFAULT_FEATURE_DIM,
               box_order: str = "auto",
               canonical_box_order: str | None = CANONICAL_BOX_ORDER, *,
               check_lineidx: LineidxCheck = "quick", rebuild_bad_lineidx: bool = False,
               check_finite: bool = True, detect_rows: int = 32,
               on_error: OnError = "error", report: SkipReport | None = None):
    path = Path(path)
    if path.is_dir():
      path = path / "features.tsv"
    if feature_dim < NUM_BOX_DIMS:
      raise ValueError(f"feature_dim {feature_dim} < {NUM_BOX_DIMS} box dims")
    check_choice("box_order", box_order, ("auto",) + BOX_ORDERS)
    if canonical_box_order is not None:
      check_choice("canonical_box_order", canonical_box_order, BOX_ORDERS)
    self.feature_dim = feature_dim
    self.check_finite = check_finite
    self.canonical_box_order = canonical_box_order
    self.tsv = TsvFile(path, check_lineidx=check_lineidx,
                       rebuild_bad_lineidx=rebuild_bad_lineidx)
    self.path = self.tsv.path
    self.imageid2idx_path = self.path.parent / "imageid2idx.json"
    self._row_of = self._load_id_map(on_error, report)
    self.box_order = box_order if box_order != "auto" else self._detect_box_order(
        detect_rows)

  def _load_id_map(self, on_error: OnError, report: SkipReport | None) -> dict[str, int]:
    if not self.imageid2idx_path.exists():
      logger.info("%s missing: indexing the image ids of %s", self.imageid2idx_path,
                  self.path)
      return index_first_column(self.tsv, on_error, report)
    raw = _read_json_file(self.imageid2idx_path)
    if not isinstance(raw, dict):
      raise DataError(self.imageid2idx_path, f"expected a JSON object, got "
                      f"{type(raw).__name__}", kind="bad_json")
    row_of: dict[str, int] = {}
    owner: dict[int, str] = {}
    for entry, (key, row) in enumerate(raw.items()):
      image_id = canonical_image_id(key)
      if (isinstance(row, bool) or not isinstance(row, int)
          or not 0 <= row < len(self.tsv)):
        raise DataError(self.imageid2idx_path, f"row index {row!r} is not in [0, "
                        f"{len(self.tsv)}) (the rows of {self.path.name} by "
                        f"{self.tsv.lineidx_path.name})",
                        kind="bad_id_map", where=f"entry {entry}", key=image_id)
      if row in owner or image_id in row_of:
        raise DataError(self.imageid2idx_path, f"row {row} or id given twice",
                        kind="duplicate_id", where=f"entry {entry}", key=image_id)
      row_of[image_id] = row
      owner[row] = image_id
    return row_of

  def _detect_box_order(self, detect_rows: int) -> str:
    n = len(self.tsv)
    if n == 0:
      return self.canonical_box_order or CANONICAL_BOX_ORDER
    rows = np.unique(np.linspace(0, n - 1, min(n, detect_rows)).astype(int))
    samples, first_error = [], None
    for row in rows:
      try:
        samples.append(self.read_row(int(row), convert=False)[1])
      except DataError as e:  # Reported again when the row itself is read.
        first_error = first_error or e
    if not samples:
      raise first_error
    try:
      return detect_box_order(np.concatenate(samples))
    except DataError as e:
      raise DataError(self.path, e.problem, kind=e.kind,
                      where=f"rows {rows[0]}..{rows[-1]}") from None

  def __len__(self) -> int:
    return len(self._row_of)

  def __contains__(self, image_id: Any) -> bool:
    return canonical_image_id(image_id) in self._row_of

  def ids(self) -> list[str]:
    """The image ids with features, in row order."""
    return sorted(self._row_of, key=self._row_of.__getitem__)

  def row_index(self, image_id: Any) -> int:
    key = canonical_image_id(image_id)
    try:
      return self._row_of[key]
    except KeyError:
      raise KeyError(f"image id {key} has no features in {self.path}") from None

  def read_row(self, row: int, convert: bool = True) -> tuple[str, np.ndarray]:
    """(image id, [num_boxes, feature_dim] float32) of row `row`."""
    line = self.tsv.line_number(row)
    columns = split_row(self.tsv, row, 3, "features")
    image_id = canonical_image_id(columns[0].decode("utf-8", "replace"))
    try:
      num_boxes = int(columns[1])
      if num_boxes < 0:
        raise ValueError
    except ValueError:
      raise DataError(self.path, f"num_boxes column {columns[1][:20]!r} is not a "
                      "count", kind="bad_row", line=line, key=image_id) from None
    features = decode_features(columns[-1], num_boxes, self.feature_dim, path=self.path,
                               line=line, key=image_id, check_finite=self.check_finite)
    if convert and self.canonical_box_order is not None:
      features = convert_box_order(features, self.box_order, self.canonical_box_order)
    return image_id, features

  def __getitem__(self, image_id: Any) -> np.ndarray:
    """[num_boxes, feature_dim] float32 regions of `image_id`, boxes canonical."""
    row = self.row_index(image_id)
    found, features = self.read_row(row)
    key = canonical_image_id(image_id)
    if found != key:
      raise DataError(self.imageid2idx_path, f"maps to row {row} but line "
                      f"{self.tsv.line_number(row)} of {self.path.name} holds image id "
                      f"{found}", kind="id_mismatch", key=key)
    return features

  def close(self) -> None:
    self.tsv.close()


# ----------------------------------------------------------------------------------
# Predictions (tags).


@dataclasses.dataclass(frozen=True, eq=False)
class ImageTags:
  """The detector's objects for one image, in file order.

  `image_h`/`image_w` are None for the bare-list JSON shape (Oscar then assumes
  600 x 800).
  """

  image_id: str
  tags: list[str]
  confs: np.ndarray  # [k] float32
  rects: np.ndarray  # [k, 4] float32, [x1, y1, x2, y2] in pixels
  image_h: int | None = None
  image_w: int | None = None

  @property
  def tag_string(self) -> str:
    """The tags joined by spaces, as Oscar feeds them to the text side."""
    return " ".join(self.tags)


def parse_prediction(text: bytes | str, *, path: str | os.PathLike = "<predictions>",
                     line: int | None = None, image_id: str = "") -> ImageTags:
  """One `predictions.tsv` JSON field -> `ImageTags`, validating every object."""
  def error(problem: str, kind: str = "bad_tags") -> DataError:
    return DataError(path, problem, kind=kind, line=line, key=image_id or None)

  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise error(f"broken JSON in the predictions column: {e.msg} (column {e.colno} of "
                "the JSON)", "bad_json") from None
  except UnicodeDecodeError as e:
    raise error(f"predictions column is not UTF-8 ({e})", "bad_json") from None
  image_h = image_w = None
  if isinstance(value, dict):
    if not isinstance(value.get("objects"), list):
      raise error("JSON object has no 'objects' list")
    objects = value["objects"]
    for name in ("image_h", "image_w"):
      size = value.get(name)
      if size is not None and (isinstance(size, bool)
                               or not isinstance(size, (int, float)) or size <= 0):
        raise error(f"{name} is {size!r}, not a positive number")
    image_h = None if value.get("image_h") is None else int(value["image_h"])
    image_w = None if value.get("image_w") is None else int(value["image_w"])
  elif isinstance(value, list):
    objects = value
  else:
    raise error(f"expected a JSON object or list, got {type(value).__name__}")
  tags, confs, rects = [], [], []
  for i, obj in enumerate(objects):
    if not isinstance(obj, dict):
      raise error(f"object {i} is {type(obj).__name__}, not a JSON object")
    label = obj.get("class")
    if not isinstance(label, str) or not label.strip():
      raise error(f"object {i} has no 'class' label")
    conf = obj.get("conf")
    if isinstance(conf, bool) or not isinstance(conf, (int, float)):
      raise error(f"object {i} ({label!r}) has no numeric 'conf'")
    rect = obj.get("rect")
    if (not isinstance(rect, list) or len(rect) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                   for v in rect)):
      raise error(f"object {i} ({label!r}) 'rect' is {rect!r}, not [x1, y1, x2, y2]")
    tags.append(label.strip())
    confs.append(conf)
    rects.append(rect)
  return ImageTags(image_id=image_id, tags=tags,
                   confs=np.asarray(confs, dtype=np.float32).reshape(-1),
                   rects=np.asarray(rects, dtype=np.float32).reshape(-1, 4),
                   image_h=image_h, image_w=image_w)


class PredictionsReader:
  """Random access by image id to `predictions.tsv` (the tags of each image).

  The rows are indexed through `predictions.lineidx` (built on first use, as Oscar's
  TSVFile does) and the image id of each row. A row's JSON is parsed only when asked.
  `on_error`/`report` apply to rows that cannot be indexed (no columns, repeated id).
  """

  def __init__(self, path: str | os.PathLike, *, check_lineidx: LineidxCheck = "quick",
               rebuild_bad_lineidx: bool = False, on_error: OnError = "error",
               report: SkipReport | None = None):
    path = Path(path)
    if path.is_dir():
      path = path / "predictions.tsv"
    self.tsv = TsvFile(path, check_lineidx=check_lineidx,
                       rebuild_bad_lineidx=rebuild_bad_lineidx)
    self.path = self.tsv.path
    self._row_of = index_first_column(self.tsv, on_error, report)

  def __len__(self) -> int:
    return len(self._row_of)

  def __contains__(self, image_id: Any) -> bool:
    return canonical_image_id(image_id) in self._row_of

  def ids(self) -> list[str]:
    return list(self._row_of)

  def read_row(self, row: int) -> ImageTags:
    columns = split_row(self.tsv, row, 2, "predictions")
    image_id = canonical_image_id(columns[0].decode("utf-8", "replace"))
    return parse_prediction(columns[1], path=self.path, line=self.tsv.line_number(row),
                            image_id=image_id)

  def __getitem__(self, image_id: Any) -> ImageTags:
    key = canonical_image_id(image_id)
    try:
      row = self._row_of[key]
    except KeyError:
      raise KeyError(f"image id {key} has no row in {self.path}") from None
    return self.read_row(row)

  def close(self) -> None:
    self.tsv.close()


# ----------------------------------------------------------------------------------
# Captions and image keys.


def _torch_load_captions(path: Path) -> Any:
  """A torch-pickled captions file, loaded without ever running code from it: only
  plain containers may be referenced (`safe_pickle.PLAIN_GLOBALS`)."""
  try:
    return safe_pickle.load_torch(path, safe_pickle.plain_global)
  except ImportError:
    raise ImportError(
        f"reading {path} needs PyTorch (pip install 'vldeformer_jax[torch]'); or put "
        f"the same mapping in {path.with_suffix('.json').name}") from None
  except safe_pickle.UnsafePickleError as e:
    raise DataError(path, f"refused: {e} (captions are plain dicts, lists and strings)",
                    kind="unsafe_pickle") from None
  except safe_pickle.UnreadablePickleError as e:
    raise DataError(path, str(e), kind="bad_captions") from None


def parse_captions(raw: Any, path: str | os.PathLike, *, on_error: OnError = "error",
                   report: SkipReport | None = None) -> dict[str, list[str]]:
  """Validates an image-id -> captions mapping as loaded from a .pt or .json file.

  A value may be a list of strings or a JSON string of that list (Oscar accepts both).
  An entry with a broken JSON string, a non-list, an empty list or an empty caption
  is a `DataError` (or, under "skip", left out and reported).
  """
  check_choice("on_error", on_error, ON_ERROR_POLICIES)
  if not isinstance(raw, Mapping):
    raise DataError(path, f"expected a mapping image id -> captions, got "
                    f"{type(raw).__name__}", kind="bad_captions")
  captions: dict[str, list[str]] = {}
  for entry, (key, value) in enumerate(raw.items()):
    where = f"entry {entry}"
    try:
      image_id = canonical_image_id(key)
    except TypeError as e:
      apply_policy(DataError(path, str(e), kind="bad_captions", where=where), on_error,
                   report)
      continue

    def error(problem: str, kind: str = "bad_captions") -> DataError:
      return DataError(path, problem, kind=kind, where=where, key=image_id)

    try:
      if isinstance(value, str):
        try:
          value = json.loads(value)
        except json.JSONDecodeError as e:
          raise error(f"captions are a string but not valid JSON: {e.msg} (column "
                      f"{e.colno})", "bad_json") from None
      if not isinstance(value, (list, tuple)):
        raise error(f"captions are {type(value).__name__}, not a list of strings")
      if not value:
        raise error("empty caption list", "empty_captions")
      for i, caption in enumerate(value):
        if not isinstance(caption, str):
          raise error(f"caption {i} is {type(caption).__name__}, not a string")
        if not caption.strip():
          raise error(f"caption {i} is empty", "empty_captions")
      if image_id in captions:
        raise error("image id given twice", "duplicate_id")
    except DataError as e:
      apply_policy(e, on_error, report)
      continue
    captions[image_id] = [c.strip() for c in value]
  return captions


def load_captions(path: str | os.PathLike, *, on_error: OnError = "error",
                  report: SkipReport | None = None) -> dict[str, list[str]]:
  """Reads `{split}_captions.pt` (weights-only) or `.json`; see `parse_captions`."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such captions file")
  if path.suffix == ".json":
    raw = _read_json_file(path)
  elif path.suffix in (".pt", ".pth", ".bin"):
    raw = _torch_load_captions(path)
  else:
    raise ValueError(f"{path}: captions must be a .pt or .json file")
  return parse_captions(raw, path, on_error=on_error, report=report)


def find_captions_file(data_dir: str | os.PathLike, split: str,
                       captions_format: CaptionsFormat = "auto") -> Path:
  """`{split}_captions.json` or `.pt` in `data_dir`; "auto" prefers JSON (no pickle)."""
  check_choice("captions_format", captions_format, ("auto", "pt", "json"))
  data_dir = Path(data_dir)
  candidates = {"json": data_dir / f"{split}_captions.json",
                "pt": data_dir / f"{split}_captions.pt"}
  order = ["json", "pt"] if captions_format == "auto" else [captions_format]
  for fmt in order:
    if candidates[fmt].is_file():
      return candidates[fmt]
  names = " or ".join(candidates[f].name for f in order)
  raise FileNotFoundError(f"{data_dir}: no {names} for split {split!r}")


def read_image_keys(path: str | os.PathLike, *, on_error: OnError = "error",
                    report: SkipReport | None = None) -> list[tuple[int, str]]:
  """(line number, canonical image id) of each line of an `*_img_keys*.tsv` file."""
  check_choice("on_error", on_error, ON_ERROR_POLICIES)
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such image-key file")
  lines = path.read_text(encoding="utf-8").splitlines()
  while lines and not lines[-1].strip():
    lines.pop()
  keys: list[tuple[int, str]] = []
  first_line: dict[str, int] = {}
  for number, text in enumerate(lines, start=1):
    text = text.strip()
    if not text or len(text.split()) != 1:
      apply_policy(DataError(path, f"expected one image id per line, got {text!r}",
                             kind="bad_row", line=number), on_error, report)
      continue
    image_id = canonical_image_id(text)
    if image_id in first_line:
      apply_policy(DataError(path, f"duplicate image id, first on line "
                             f"{first_line[image_id]}", kind="duplicate_id", line=number,
                             key=image_id), on_error, report)
      continue
    first_line[image_id] = number
    keys.append((number, image_id))
  return keys


# ----------------------------------------------------------------------------------
# A split of the data.


@dataclasses.dataclass(frozen=True, eq=False)
class RetrievalExample:
  """One image of a split with everything both encoders need.

  Attributes:
    image_id: canonical string id (decimal ids without leading zeros).
    captions: the image's captions (COCO/Flickr: 5).
    tags: detector labels in `predictions.tsv` order (empty when tags are not used).
    regions: [num_boxes, feature_dim] float32; the last 6 dims are the box in the
      reader's canonical order.
    boxes: [num_boxes, 6] float32, the box dims of `regions`.
  """

  image_id: str
  captions: list[str]
  tags: list[str]
  regions: np.ndarray
  boxes: np.ndarray

  @property
  def tag_string(self) -> str:
    return " ".join(self.tags)


class VinVLRetrievalData:
  """One split of a VinVL/Oscar retrieval data directory, checked for consistency.

  Image ids come from `img_keys_file` (default `{split}_img_keys.tsv` when present,
  else the captions' keys, as Oscar's training split does). At construction every id
  must have captions, features and (with `use_tags`) tags; row contents (base64, sizes,
  NaN, JSON) are checked when an example is read. `on_error="error"` raises
  `DataError`; "skip" drops the image, records the problem in `self.report` and logs
  it (and the summary at the end of each pass that skipped something).

  Args:
    data_dir: the directory with captions and image-key files.
    split: "train", "minival", "test", ...
    img_keys_file: a file name in `data_dir` (e.g. "test_img_keys_1k.tsv") or a path.
    features_file: default `data_dir/features.tsv`.
    predictions_file: default `predictions.tsv` next to the features (Oscar's rule).
    use_tags: read tags; False gives examples with no tags and needs no predictions.
    captions_format: "auto" (JSON if present, else .pt), "pt" or "json".
    feature_dim, box_order, canonical_box_order, check_finite: see RegionFeatureReader.
    check_lineidx, rebuild_bad_lineidx: see TsvFile.
  """

  def __init__(self, data_dir: str | os.PathLike, split: str, *,
               img_keys_file: str | os.PathLike | None = None,
               features_file: str | os.PathLike | None = None,
               predictions_file: str | os.PathLike | None = None,
               use_tags: bool = True, captions_format: CaptionsFormat = "auto",
               feature_dim: int = DEFAULT_FEATURE_DIM, box_order: str = "auto",
               canonical_box_order: str | None = CANONICAL_BOX_ORDER,
               check_finite: bool = True, on_error: OnError = "error",
               check_lineidx: LineidxCheck = "quick", rebuild_bad_lineidx: bool = False):
    check_choice("on_error", on_error, ON_ERROR_POLICIES)
    self.data_dir = Path(data_dir)
    self.split = split
    self.on_error = on_error
    self.report = SkipReport()
    self.features = RegionFeatureReader(
        Path(features_file) if features_file else self.data_dir / "features.tsv",
        feature_dim, box_order, canonical_box_order, check_lineidx=check_lineidx,
        rebuild_bad_lineidx=rebuild_bad_lineidx, check_finite=check_finite,
        on_error=on_error, report=self.report)
    self.predictions: PredictionsReader | None = None
    if use_tags:
      self.predictions = PredictionsReader(
          Path(predictions_file) if predictions_file
          else self.features.path.parent / "predictions.tsv",
          check_lineidx=check_lineidx, rebuild_bad_lineidx=rebuild_bad_lineidx,
          on_error=on_error, report=self.report)
    self.captions_path = find_captions_file(self.data_dir, split, captions_format)
    all_captions = load_captions(self.captions_path, on_error=on_error,
                                 report=self.report)
    self.keys_path = self._keys_path(img_keys_file)
    self.captions: dict[str, list[str]] = {}
    self.image_ids: list[str] = self._check_ids(all_captions)
    if self.report.total:
      self.report.log()

  def _keys_path(self, img_keys_file: str | os.PathLike | None) -> Path | None:
    if img_keys_file is None:
      default = self.data_dir / f"{self.split}_img_keys.tsv"
      return default if default.is_file() else None
    path = Path(img_keys_file)
    in_data_dir = self.data_dir / path
    return in_data_dir if in_data_dir.is_file() else path

  def _check_ids(self, all_captions: dict[str, list[str]]) -> list[str]:
    if self.keys_path is not None:
      keys = read_image_keys(self.keys_path, on_error=self.on_error, report=self.report)
    else:
      keys = [(None, k) for k in all_captions]
    image_ids = []
    already_reported = self.report.skipped_ids(self.captions_path)
    for line, image_id in keys:
      if image_id not in all_captions and image_id in already_reported:
        continue  # Its captions were bad and have been reported once.
      try:
        if image_id not in all_captions:
          raise DataError(self.keys_path, f"image id has no (valid) captions in "
                          f"{self.captions_path.name}", kind="missing_captions",
                          line=line, key=image_id)
        if image_id not in self.features:
          raise DataError(self.captions_path, f"image id has captions but no features "
                          f"in {self.features.path} "
                          f"({self.features.imageid2idx_path.name})",
                          kind="missing_features", key=image_id,
                          where=None if line is None else f"listed on line {line} of "
                          f"{self.keys_path.name}")
        if self.predictions is not None and image_id not in self.predictions:
          raise DataError(self.captions_path, f"image id has captions but no tags in "
                          f"{self.predictions.path}", kind="missing_tags", key=image_id,
                          where=None if line is None else f"listed on line {line} of "
                          f"{self.keys_path.name}")
      except DataError as e:
        apply_policy(e, self.on_error, self.report)
        continue
      image_ids.append(image_id)
      self.captions[image_id] = all_captions[image_id]
    return image_ids

  def __len__(self) -> int:
    return len(self.image_ids)

  def tags(self, image_id: Any) -> ImageTags | None:
    """The `ImageTags` of an image, or None when tags are not used."""
    if self.predictions is None:
      return None
    return self.predictions[image_id]

  def example(self, image_id: Any) -> RetrievalExample:
    """Reads one image's example; raises `DataError` for bad rows whatever the policy."""
    key = canonical_image_id(image_id)
    if key not in self.captions:
      raise KeyError(f"image id {key} is not in split {self.split!r} of {self.data_dir}")
    regions = self.features[key]
    tags = self.tags(key)
    tag_list = [] if tags is None else tags.tags
    return RetrievalExample(image_id=key, captions=list(self.captions[key]),
                            tags=tag_list, regions=regions, boxes=boxes_of(regions))

  def examples(self, image_ids: Iterable[Any] | None = None
               ) -> Iterator[RetrievalExample]:
    """Examples of `image_ids` (default: the split, in key-file order).

    Under "skip", a bad row is recorded and left out; the report is logged at the end
    of a pass that skipped anything.
    """
    skipped_before = self.report.total
    for image_id in self.image_ids if image_ids is None else image_ids:
      try:
        example = self.example(image_id)
      except DataError as e:
        apply_policy(e, self.on_error, self.report)
        continue
      yield example
    if self.report.total > skipped_before:
      self.report.log()

  def __iter__(self) -> Iterator[RetrievalExample]:
    return self.examples()

  def validate(self) -> SkipReport:
    """Reads every example once (all features and tags); returns the skip report.

    Under "skip", `image_ids` then keeps only the images that read cleanly, so a
    pipeline can shard or count the split exactly.
    """
    readable = [example.image_id for example in self.examples()]
    self.image_ids = readable
    self.captions = {i: self.captions[i] for i in readable}
    return self.report

  def close(self) -> None:
    self.features.close()
    if self.predictions is not None:
      self.predictions.close()
