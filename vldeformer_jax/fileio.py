"""Atomic writes of output directories (model dirs, retrieval indexes), and where the
project keeps what it can rebuild (`user_cache_dir`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

CACHE_DIR_ENV = "VLD_CACHE_DIR"


def user_cache_dir(name: str) -> Path:
  """`$VLD_CACHE_DIR/name`, or `~/.cache/vldeformer_jax/name`: the project's caches (the
  WordNet copy, compiled programs), each in its own folder."""
  base = os.environ.get(CACHE_DIR_ENV) or "~/.cache/vldeformer_jax"
  return Path(base).expanduser().resolve() / name


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
  """Yields a fresh temporary directory beside `path`; when the block succeeds it
  replaces `path` in one rename, so readers never see a half-written directory and a
  crash leaves the old one intact."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
  tmp.chmod(0o755)
  try:
    yield tmp
    old = None
    if path.exists():
      old = path.with_name(f".{path.name}.old-{os.getpid()}")
      os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
