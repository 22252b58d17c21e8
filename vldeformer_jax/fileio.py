"""What the tools write, and how: one rule for output paths (`check_output`), atomic
writes of files and directories, the marker our file outputs carry, and where the
project keeps what it can rebuild (`user_cache_dir`).

The rule (`check_output`), checked by every writing tool before its work starts and
again by the library function that writes: an output path may be new, an empty
directory, or the tool's own earlier output (which is replaced, or resumed); anything
else is refused with one line naming the path and `--overwrite`, the flag that
replaces it. A file where a directory is expected (or the reverse), or a place that
cannot be written, is refused too, whatever the flag. What counts as a tool's own
output is recognised from the files: model directories, indexes, workdirs by their
layout; PNG, HTML and JSON files by the marker `generator(tool)` written into them
(`is_generated`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

CACHE_DIR_ENV = "VLD_CACHE_DIR"
OVERWRITE_FLAG = "--overwrite"
GENERATOR = "vldeformer_jax"


class OutputError(ValueError):
  """An output path a tool must not write: the message names it and, where one would
  allow it, the flag."""


def user_cache_dir(name: str) -> Path:
  """`$VLD_CACHE_DIR/name`, or `~/.cache/vldeformer_jax/name`: the project's caches (the
  WordNet copy, compiled programs), each in its own folder."""
  base = os.environ.get(CACHE_DIR_ENV) or "~/.cache/vldeformer_jax"
  return Path(base).expanduser().resolve() / name


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
  """A JSON object from a file (a config.json); a missing file is a
  `FileNotFoundError`, anything else unreadable a `ValueError`, each naming `path`."""
  path = Path(path)
  try:
    raw = json.loads(path.read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: no such file") from None
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(raw, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
  return raw


# ----------------------------------------------------------------------------------
# Our own files.


def generator(tool: str) -> str:
  """The marker `tool` (e.g. "bin/plot") writes into a file output: a PNG's
  "Software" text, an HTML `<meta name="generator">`, a JSON object's first key
  "generator"."""
  return f"{GENERATOR} {tool}"


_MARKED_TEXT = re.compile(
    rb'^\s*\{\s*"generator"\s*:\s*"' + GENERATOR.encode() + rb'[ "]'
    rb'|<meta name="generator" content="' + GENERATOR.encode() + rb'[ "]')
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HEAD_BYTES = 4096


def _png_software(head: bytes) -> str | None:
  """The "Software" tEXt of a PNG, from the chunks before its image data."""
  pos = len(_PNG_SIGNATURE)
  while pos + 8 <= len(head):
    length, kind = struct.unpack(">I4s", head[pos:pos + 8])
    if kind == b"IDAT":
      return None
    if kind == b"tEXt":
      key, _, text = head[pos + 8:pos + 8 + length].partition(b"\0")
      if key == b"Software":
        return text.decode("latin-1")
    pos += 12 + length
  return None


def is_generated(path: str | os.PathLike) -> bool:
  """Whether the file at `path` carries the marker of one of our tools (`generator`)."""
  try:
    with open(path, "rb") as f:
      head = f.read(_HEAD_BYTES)
  except OSError:
    return False
  if head.startswith(_PNG_SIGNATURE):
    return (_png_software(head) or "").startswith(GENERATOR + " ")
  return _MARKED_TEXT.search(head) is not None


# ----------------------------------------------------------------------------------
# The rule.


def _nearest_existing(path: Path) -> Path:
  while not os.path.lexists(path) and path != path.parent:
    path = path.parent
  return path


def _check_writable(path: Path, where: str) -> None:
  """A one-line `OutputError` when `path` cannot be created (or replaced) for lack of
  a directory or of permission. Root passes permission checks except on a read-only
  filesystem, as its writes would."""
  above = _nearest_existing(path.parent)
  if not above.is_dir():
    raise OutputError(f"{where}: {above} is a file, not a directory")
  places = [above] + ([path] if path.is_dir() else [])
  for place in places:
    if not os.access(place, os.W_OK | os.X_OK):
      reason = "read-only file system" if _read_only_fs(place) else "permission denied"
      raise OutputError(f"{where}: cannot write in {place} ({reason})")


def _read_only_fs(path: Path) -> bool:
  try:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
  except OSError:
    return False


def check_output(path: str | os.PathLike, *, is_dir: bool, what: str,
                 is_own: Callable[[Path], bool] = is_generated,
                 option: str | None = None, overwrite: bool | None = False) -> Path:
  """Checks that a tool may write its output at `path` (before the work starts).

  New paths and empty directories are fine, and so is the tool's own earlier output
  (`is_own(path)`), which the tool replaces or resumes. Anything else is an
  `OutputError` naming the path: with `overwrite=False` it names `--overwrite`, with
  True it is allowed (the writer replaces it atomically), with None (a tool that
  resumes its output and never replaces it: bin/train's workdir, bin/build_data's
  --out) it asks for another path. A file where a directory is expected (or the
  reverse) and a place that cannot be written are errors whatever the flag.

  Args:
    path: the output.
    is_dir: the output is a directory (else a file).
    what: the kind of output, for the message ("a model directory").
    is_own: recognises the tool's own earlier output.
    option: the flag or argument that gave `path` ("--out"), named in the message.
    overwrite: see above.
  """
  path = Path(path)
  where = f"{option} {path}" if option else str(path)
  if os.path.lexists(path):
    if path.is_dir() != is_dir:
      raise OutputError(f"{where}: is a {'directory' if path.is_dir() else 'file'}; "
                        f"expected {what}")
    foreign = not (is_dir and not any(path.iterdir())) and not is_own(path)
    if foreign and overwrite is None:
      raise OutputError(f"{where}: not empty and not {what}; it is never replaced: "
                        f"give {option or 'it'} a new or empty directory")
    if foreign and not overwrite:
      raise OutputError(f"{where}: exists and is not {what}; pass {OVERWRITE_FLAG} to "
                        "replace it")
  _check_writable(path, where)
  return path


# ----------------------------------------------------------------------------------
# Atomic writes.


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
  """Swaps two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False
  where the system or filesystem cannot."""
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError):
    return False
  if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
               _RENAME_EXCHANGE) == 0:
    return True
  if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
    return False
  raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(a))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
  """Yields a fresh temporary directory beside `path`; when the block succeeds it
  replaces `path` in one step (the two swapped, then the old one removed), so
  readers never see a half-written directory and a crash leaves the old one or the
  new one at `path`, never neither (where the system cannot swap, two renames)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
  tmp.chmod(0o755)
  try:
    yield tmp
    if not os.path.lexists(path):
      os.replace(tmp, path)
    elif not _exchange(tmp, path):
      old = path.with_name(f".{path.name}.old-{os.getpid()}")
      os.replace(path, old)
      os.replace(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
  finally:
    if tmp.is_dir():  # the old directory after a swap, or a failed new one
      shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.lexists(tmp):
      tmp.unlink()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
  """Yields a temporary path beside `path` (same suffix) to write; when the block
  succeeds it replaces `path` in one rename."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix,
                             dir=path.parent)
  os.close(fd)
  try:
    yield Path(tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  finally:
    if os.path.lexists(tmp):
      os.unlink(tmp)


def write_marked_json(path: str | os.PathLike, data: dict[str, Any], tool: str) -> Path:
  """Writes `data` as indented JSON, marked as `tool`'s output (the first key is
  "generator": `is_generated` reads it), atomically."""
  with atomic_file(path) as tmp:
    tmp.write_text(json.dumps({"generator": generator(tool), **data}, indent=2) + "\n")
  return Path(path)
