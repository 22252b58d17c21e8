"""Loading torch pickles (checkpoints, Oscar's captions files) without running their code.

A pickle runs code only through the globals it names. `load_torch` first lists those
globals by parsing opcodes (nothing executes) and refuses any outside the caller's
allow-list; only then does it hand the same bytes to `torch.load(weights_only=True)`,
torch's restricted unpickler, as a second line. Callers turn the two errors below into
their own (a `CheckpointError`, a `DataError`) so the message names their file.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import zipfile
from pathlib import Path
from typing import Any, Callable

# Globals of a plain mapping of lists and strings (a captions file).
PLAIN_GLOBALS = frozenset({"collections.OrderedDict"})
# Globals `torch.save` writes for a state dict of tensors (zip and legacy formats).
_TENSOR_REBUILDERS = frozenset({"torch._utils._rebuild_tensor_v2",
                                "torch._utils._rebuild_parameter"})
_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE",
                         "SHORT_BINSTRING", "BINSTRING", "STRING"})


class UnsafePickleError(ValueError):
  """The pickle names code outside the allow-list (nothing was run)."""


class UnreadablePickleError(ValueError):
  """The bytes are not a torch file that the weights-only loader can read."""


def plain_global(name: str) -> bool:
  return name in PLAIN_GLOBALS


def tensor_global(name: str) -> bool:
  """What a state dict of tensors may reference: an OrderedDict, the tensor and
  parameter rebuilders and the typed storages (`torch.FloatStorage`, ...)."""
  return (name in PLAIN_GLOBALS or name in _TENSOR_REBUILDERS
          or (name.startswith("torch.") and name.count(".") == 1
              and name.endswith("Storage")))


def pickle_globals(data: bytes, max_pickles: int = 4) -> list[str]:
  """The globals ("module.name") the pickle(s) in `data` would import.

  Parses opcodes only (`pickletools.genops`), so nothing in `data` runs. Reads up to
  `max_pickles` pickles in a row (a legacy torch file is several) and stops quietly
  at bytes that are not a pickle (raw tensor data, junk).
  """
  stream = io.BytesIO(data)
  found: list[str] = []
  for _ in range(max_pickles):
    if stream.tell() >= len(data):
      break
    strings: list[str] = []
    try:
      for op, arg, _ in pickletools.genops(stream):
        if op.name in _STRING_OPS:
          strings.append(arg.decode("latin-1") if isinstance(arg, bytes) else str(arg))
        elif op.name in ("GLOBAL", "INST"):
          found.append(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
          found.append(".".join(strings[-2:]) if len(strings) >= 2 else "<unknown>")
    except Exception:  # pylint: disable=broad-except
      break
  return found


def _torch_pickles(data: bytes) -> list[bytes]:
  """The pickle streams of a torch file: `*.pkl` members of a zip, else the bytes."""
  buffer = io.BytesIO(data)
  if zipfile.is_zipfile(buffer):
    with zipfile.ZipFile(buffer) as archive:
      return [archive.read(name) for name in archive.namelist() if name.endswith(".pkl")]
  return [data]


def load_torch(path: str | Path, allowed: Callable[[str], bool]) -> Any:
  """`torch.load(path, weights_only=True)` after refusing any global not `allowed`.

  Raises ImportError without torch, `UnsafePickleError` for code (the message lists
  the offending globals), `UnreadablePickleError` for anything torch cannot read.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"reading {path} needs PyTorch: pip install -e '.[torch]'") from None
  try:
    data = Path(path).read_bytes()
    names = [n for blob in _torch_pickles(data) for n in pickle_globals(blob)]
  except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
    raise UnreadablePickleError(f"not a readable torch file: {e}") from None
  unsafe = sorted({n for n in names if not allowed(n)})
  if unsafe:
    raise UnsafePickleError(f"the pickle references {', '.join(unsafe)}, i.e. code that "
                            "unpickling would run; nothing in it was run")
  try:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    reason = (next((line for line in lines if "Unsupported" in line), "")
              or next((line for line in lines if "WeightsUnpickler" in line), "")
              or (lines or [type(e).__name__])[0])
    if "Unsupported global" in str(e):
      raise UnsafePickleError(f"torch's weights-only loader refused it: {reason}") from None
    raise UnreadablePickleError(f"not a weights-only loadable torch file: {reason}") from None
  except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
    raise UnreadablePickleError(
        f"not a readable torch file: {str(e) or type(e).__name__}") from None
