"""Command-line helpers shared by `bin/` tools: one clear line for a slip in a flag.

`ml_collections.config_flags` reports a mistyped `--config.KEY=VALUE` override as a
bare `AttributeError: "'KEY'"` traceback. `config_override_error` checks the overrides
against the config file's keys first and names the key and the nearest valid ones.
"""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path
from typing import Any, Sequence


def _config_file_arg(argv: Sequence[str], flag: str) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith(f"--{flag}="):
      return a.split("=", 1)[1]
    if a == f"--{flag}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _load_config(spec: str) -> Any:
  """`path[:arg]` -> `get_config(arg)` of that Python file, as config_flags loads it."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_checked_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _keys(config: Any, prefix: str = "") -> list[str]:
  out = []
  for key in config.keys():
    value = config[key]
    out.append(prefix + key)
    if hasattr(value, "keys") and callable(value.keys):
      out += _keys(value, f"{prefix}{key}.")
  return out


def config_override_error(argv: Sequence[str], flag: str = "config") -> str | None:
  """The first `--FLAG.KEY[=VALUE]` whose KEY the config file does not have, as one
  line naming the nearest valid keys; None when every override names a real key (or
  the config file is missing or unloadable: config_flags then reports that itself)."""
  spec = _config_file_arg(argv, flag)
  if spec is None or not Path(spec.partition(":")[0]).is_file():
    return None
  try:
    config = _load_config(spec)
  except Exception:  # noqa: BLE001 - config_flags will report the file's own error
    return None
  valid = _keys(config)
  for a in argv:
    if not a.startswith(f"--{flag}."):
      continue
    key = a[len(flag) + 3:].split("=", 1)[0]
    if key not in valid:
      near = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
      hint = (f"did you mean {' or '.join(f'--{flag}.{k}' for k in near)}?" if near else
              f"valid keys: {', '.join(sorted(k for k in valid if '.' not in k))}")
      return f"--{flag}.{key}: no such key in {spec.partition(':')[0]}; {hint}"
  return None
