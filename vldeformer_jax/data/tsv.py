"""TSV files with a line index: any row read by offset, never the whole file.

One concern: random access to the rows of a large TSV. A `.lineidx` beside the file
holds each row's byte offset (Oscar's format); it is built by one streaming pass when
missing, checked when present, and every read checks that the row ends where the next
begins, so a stale index is a `DataError` naming its file and line, not a wrong row.
Rows are read with `os.pread` on a descriptor opened lazily per process, so one
`TsvFile` serves several threads and a pickled or forked copy opens its own. What the
columns mean is the readers' business (`readers.py`).
"""

from __future__ import annotations

import logging
import mmap
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np

from vldeformer_jax.data.errors import DataError, check_choice

logger = logging.getLogger(__name__)

LineidxCheck = Literal["quick", "full"]


def _write_atomic(path: Path, data: bytes) -> None:
  """Writes `data` to `path` through a temporary file and a rename (atomic on POSIX)."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except FileNotFoundError:
      pass
    raise


def scan_line_offsets(path: str | os.PathLike) -> np.ndarray:
  """The byte offset of every line of `path` (a full streaming read), int64 [rows]."""
  offsets = []
  position = 0
  with open(path, "rb") as f:
    for line in f:
      offsets.append(position)
      position += len(line)
  return np.asarray(offsets, dtype=np.int64)


def format_lineidx(offsets: np.ndarray) -> bytes:
  """The `.lineidx` text of `offsets`: one decimal offset per line (Oscar's format)."""
  return "".join(f"{int(o)}\n" for o in offsets).encode("ascii")


def _first_offset_not_at_line_start(mm: mmap.mmap, offsets: np.ndarray) -> int | None:
  """Index of the first offset (after the first) not preceded by a newline, or None."""
  data = np.frombuffer(mm, dtype=np.uint8)
  bad = np.nonzero(data[offsets[1:] - 1] != ord("\n"))[0]
  del data  # Release the buffer so the mmap can close.
  return int(bad[0]) + 1 if len(bad) else None


class TsvFile:
  """Row-level random access to a TSV file through its `.lineidx` of row offsets.

  A missing lineidx is built by one streaming pass and written atomically next to the
  TSV (kept in memory if the directory is read-only). An existing one is checked:
  "quick" checks that the offsets increase, each starts a line and the last row ends
  the file; "full" rescans the file and compares every offset. Every read also checks
  that the row ends exactly where the next one starts. A lineidx that does not match is
  a `DataError` naming the lineidx file and line, or, with `rebuild_bad_lineidx`,
  rebuilt with a warning.

  Pickle- and fork-safe: the file descriptor is opened lazily per process.
  """

  def __init__(self, path: str | os.PathLike, *,
               lineidx_path: str | os.PathLike | None = None,
               check_lineidx: LineidxCheck = "quick", rebuild_bad_lineidx: bool = False,
               write_lineidx: bool = True):
    check_choice("check_lineidx", check_lineidx, ("quick", "full"))
    self.path = Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(f"{self.path}: no such TSV file")
    self.lineidx_path = (Path(lineidx_path) if lineidx_path is not None
                         else self.path.with_suffix(".lineidx"))
    self.size = self.path.stat().st_size
    self._fd: int | None = None
    self._pid: int | None = None
    self._lock = threading.Lock()
    self.offsets = self._load_offsets(check_lineidx, rebuild_bad_lineidx, write_lineidx)

  # Pickling / processes.
  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state["_fd"] = None
    state["_pid"] = None
    del state["_lock"]
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _descriptor(self) -> int:
    pid = os.getpid()
    if self._fd is not None and self._pid == pid:
      return self._fd
    with self._lock:
      if self._fd is None or self._pid != pid:
        if self._fd is not None:  # Inherited through fork: the child's own copy.
          try:
            os.close(self._fd)
          except OSError:
            pass
        self._fd = os.open(self.path, os.O_RDONLY)
        self._pid = pid
      return self._fd

  def close(self) -> None:
    if self._fd is not None and self._pid == os.getpid():
      os.close(self._fd)
    self._fd = None
    self._pid = None

  def __del__(self):
    try:
      self.close()
    except Exception:  # Interpreter shutdown.
      pass

  def __len__(self) -> int:
    return len(self.offsets)

  # The line index.
  def _load_offsets(self, check: str, rebuild_bad: bool, write: bool) -> np.ndarray:
    if not self.lineidx_path.exists():
      logger.info("%s missing: building it from %s", self.lineidx_path, self.path)
      return self._rebuild(write)
    try:
      offsets = self._parse_lineidx()
      self._check_offsets(offsets, check)
      return offsets
    except DataError as e:
      if not rebuild_bad:
        raise DataError(e.path, e.problem + "; delete the lineidx or pass "
                        "rebuild_bad_lineidx=True to rebuild it", kind=e.kind,
                        line=e.line) from None
      logger.warning("%s; rebuilding %s", e, self.lineidx_path)
      return self._rebuild(write)

  def _rebuild(self, write: bool) -> np.ndarray:
    offsets = scan_line_offsets(self.path)
    if write:
      try:
        _write_atomic(self.lineidx_path, format_lineidx(offsets))
      except OSError as e:
        logger.warning("could not write %s (%s); keeping the index in memory",
                       self.lineidx_path, e)
    return offsets

  def _parse_lineidx(self) -> np.ndarray:
    lines = self.lineidx_path.read_bytes().split(b"\n")
    while lines and not lines[-1].strip():
      lines.pop()
    offsets = np.empty(len(lines), dtype=np.int64)
    for i, text in enumerate(lines):
      text = text.strip()
      if not text.isdigit():
        raise DataError(self.lineidx_path, f"expected a byte offset, got {text[:40]!r}",
                        kind="bad_lineidx", line=i + 1)
      offsets[i] = int(text)
    return offsets

  def _lineidx_error(self, line: int, problem: str) -> DataError:
    return DataError(self.lineidx_path, f"does not match {self.path.name}: {problem}",
                     kind="bad_lineidx", line=line)

  def _check_offsets(self, offsets: np.ndarray, check: str) -> None:
    n = len(offsets)
    if n == 0:
      if self.size:
        raise self._lineidx_error(1, f"no offsets for a {self.size}-byte file")
      return
    if self.size == 0:
      raise self._lineidx_error(1, f"{n} offsets for an empty file")
    if offsets[0] != 0:
      raise self._lineidx_error(1, f"first offset is {offsets[0]}, not 0")
    steps = np.diff(offsets)
    if (steps <= 0).any():
      i = int(np.argmax(steps <= 0)) + 1
      raise self._lineidx_error(i + 1, f"offset {offsets[i]} does not increase")
    if offsets[-1] >= self.size:
      raise self._lineidx_error(n, f"offset {offsets[-1]} is past the end of the file "
                                f"({self.size} bytes)")
    if check == "full":
      actual = scan_line_offsets(self.path)
      m = min(len(actual), n)
      differ = np.nonzero(actual[:m] != offsets[:m])[0]
      if len(differ):
        i = int(differ[0])
        raise self._lineidx_error(i + 1, f"offset {offsets[i]} but row {i} starts at "
                                  f"byte {actual[i]}")
      if len(actual) != n:
        raise self._lineidx_error(m + 1, f"{n} offsets but the file has "
                                  f"{len(actual)} rows")
      return
    with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0,
                                                access=mmap.ACCESS_READ) as mm:
      i = _first_offset_not_at_line_start(mm, offsets)
      if i is not None:
        raise self._lineidx_error(i + 1, f"offset {offsets[i]} is not at a line start")
      newline = mm.find(b"\n", int(offsets[-1]))
      if newline not in (-1, self.size - 1):
        raise self._lineidx_error(n, f"last offset {offsets[-1]} is not the last row: "
                                  "the file has more rows than the lineidx (wrong count)")

  # Reading rows.
  def line_number(self, row: int) -> int:
    """The 1-based line of row `row` in the TSV."""
    return row + 1

  def _span(self, row: int) -> tuple[int, int]:
    if not 0 <= row < len(self.offsets):
      raise IndexError(f"{self.path}: row {row} out of range [0, {len(self.offsets)})")
    start = int(self.offsets[row])
    end = int(self.offsets[row + 1]) if row + 1 < len(self.offsets) else self.size
    return start, end

  def read_row(self, row: int) -> bytes:
    """The bytes of row `row` without its line ending; checks the row's extent."""
    start, end = self._span(row)
    data = os.pread(self._descriptor(), end - start, start)
    if len(data) != end - start:
      raise DataError(self.path, f"file shrank: read {len(data)} of {end - start} bytes",
                      kind="truncated_row", line=self.line_number(row))
    last = row + 1 == len(self.offsets)
    newline = data.find(b"\n")
    if (newline != -1 and newline != len(data) - 1) or (newline == -1 and not last):
      raise self._lineidx_error(
          min(row + 2, len(self.offsets)),
          f"row {row} (line {row + 1}) does not end where the next offset says; the "
          "lineidx skips rows or the TSV changed")
    if data.endswith(b"\n"):
      data = data[:-1]
    if data.endswith(b"\r"):
      data = data[:-1]
    return data

  def read_first_column(self, row: int) -> str:
    """Column 0 of row `row`, reading only a small prefix of the row when possible."""
    start, end = self._span(row)
    length = min(end - start, 4096)
    head = os.pread(self._descriptor(), length, start)
    tab = head.find(b"\t")
    if tab == -1:
      head = self.read_row(row)
      tab = head.find(b"\t")
      if tab == -1:
        raise DataError(self.path, "truncated row: no tab-separated columns",
                        kind="truncated_row", line=self.line_number(row))
    try:
      return head[:tab].decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataError(self.path, f"image id is not UTF-8 ({e})", kind="bad_row",
                      line=self.line_number(row)) from None


def split_row(tsv: TsvFile, row: int, min_columns: int, what: str) -> list[bytes]:
  """The columns of row `row`; fewer than `min_columns` is a truncated `what` row."""
  columns = tsv.read_row(row).split(b"\t")
  if len(columns) < min_columns:
    raise DataError(tsv.path, f"truncated row: {len(columns)} tab-separated column(s), "
                    f"a {what} row needs at least {min_columns}", kind="truncated_row",
                    line=tsv.line_number(row))
  return columns

