"""Command-line helpers shared by `bin/` tools: one clear line for a slip in a flag, and
compiled programs kept on disk between runs.

`ml_collections.config_flags` reports a mistyped `--config.KEY=VALUE` override as a
bare `AttributeError: "'KEY'"` traceback. `config_override_error` checks the overrides
against the config file's keys first and names the key and the nearest valid ones.

`enable_compilation_cache` turns on JAX's persistent compilation cache for the tools
that compile (train, eval, index, search, serve, report).
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
from pathlib import Path
from typing import Any, Sequence

from vldeformer_jax import fileio


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


# The default cache's size: JAX evicts the least recently used programs past it.
COMPILATION_CACHE_MAX_BYTES = 4 << 30


def enable_compilation_cache() -> str | None:
  """Keeps compiled XLA programs on disk (JAX's persistent compilation cache), so that
  a rerun, a resume after a kill, or another tool on the same model and shapes loads
  each program instead of compiling it again (BENCHMARKS.md, "Restart"). Programs that
  compile in under a second are not kept (JAX's default).

  JAX's own settings win: `JAX_COMPILATION_CACHE_DIR` moves the cache and
  `JAX_ENABLE_COMPILATION_CACHE=false` turns it off. Otherwise the cache is
  `$VLD_CACHE_DIR/xla` (default ~/.cache/vldeformer_jax/xla), at most
  `COMPILATION_CACHE_MAX_BYTES`. Call it before the first compile, after
  `jax.distributed.initialize` (JAX then has one process compile and write each
  program). Returns the directory, or None when off.
  """
  import jax
  if not jax.config.jax_enable_compilation_cache:
    return None
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  directory = fileio.user_cache_dir("xla")
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    logging.warning("compilation cache off: cannot create %s (%s)", directory, e)
    return None
  jax.config.update("jax_compilation_cache_dir", str(directory))
  jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_MAX_BYTES)
  return str(directory)
