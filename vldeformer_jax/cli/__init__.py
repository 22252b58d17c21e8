"""Command-line helpers shared by `bin/` tools: one clear line for a slip in a flag or a
problem with a path, and compiled programs kept on disk between runs.

Each tool's `main` parses its flags (`parser`) and runs its body through `run`, which
turns the library's error types (bad values, data and path problems, missing optional
packages, memory) into one line `bin/TOOL: error: ...` and exit status 1; flag misuse
stays argparse's (status 2). Anything else is a bug and keeps its traceback.

`ml_collections.config_flags` reports a missing or broken `--config` file, and a
mistyped `--config.KEY=VALUE` override, as a traceback. `config_file_error` and
`config_override_error` check the file and the overrides first and say what is wrong
in one line (the key's nearest valid ones, the file's line).

`enable_compilation_cache` turns on JAX's persistent compilation cache for the tools
that compile (train, eval, index, search, serve, report).
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import logging
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from vldeformer_jax import fileio

# What a tool reports in one line: the library's errors about values, data and paths
# (ValueError covers DataError, OutputError, IndexFormatError, ...), a missing optional
# package, memory, and training's non-finite stop.
TOOL_ERRORS = (ValueError, OSError, KeyError, ImportError, MemoryError,
               FloatingPointError)


def parser(tool: str, doc: str | None) -> argparse.ArgumentParser:
  """`bin/TOOL`'s argument parser: its usage and errors name `bin/TOOL`."""
  return argparse.ArgumentParser(prog=f"bin/{tool}", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


def add_overwrite_flag(p: argparse.ArgumentParser, what: str) -> None:
  """`--overwrite`: replace `what` when it exists and is not the tool's own output
  (`fileio.check_output`)."""
  p.add_argument(fileio.OVERWRITE_FLAG, action="store_true",
                 help=f"replace {what} even when it is not this tool's earlier output")


def check_file_outputs(tool: str, outputs: dict[str, str | None],
                       overwrite: bool) -> None:
  """`fileio.check_output` for each file `bin/TOOL` will write (flag -> path; None:
  not written this run), before its work starts."""
  for option, path in outputs.items():
    if path:
      fileio.check_output(path, is_dir=False, what=f"a bin/{tool} {option} file",
                          option=option, overwrite=overwrite)


def missing_dir(dirs: dict[str, str | None]) -> str | None:
  """`--flag PATH: no such directory` for the first input directory (flag -> path;
  None: not given) that is not one; None when all are."""
  for flag, path in dirs.items():
    if path is not None and not Path(path).is_dir():
      return f"{flag} {path}: no such directory"
  return None


def fail(tool: str, message: str) -> int:
  """Prints `bin/TOOL: error: message` (a `tool` with a slash, e.g. scripts/demo.sh,
  as it is); returns the exit status 1."""
  print(f"{tool if '/' in tool else f'bin/{tool}'}: error: {message}", file=sys.stderr)
  return 1


def error_line(e: BaseException) -> str:
  """What a tool prints for one of `TOOL_ERRORS`: the message, with the path an
  `OSError` names and a word for an empty one."""
  if isinstance(e, KeyError) and e.args:
    return str(e.args[0])
  if isinstance(e, OSError) and e.filename is not None and e.strerror:
    other = f" -> {e.filename2}" if e.filename2 is not None else ""
    return f"{e.filename}{other}: {e.strerror}"
  if isinstance(e, MemoryError) and not str(e):
    return "out of memory: lower the batch size"
  return str(e) or type(e).__name__


def out_of_device_memory(e: BaseException) -> bool:
  """Whether `e` is XLA's report of an allocation that failed (a `JaxRuntimeError`
  with status RESOURCE_EXHAUSTED): on a CPU the host's memory, on an accelerator its
  own."""
  return isinstance(e, RuntimeError) and str(e).startswith("RESOURCE_EXHAUSTED")


def run(tool: str, body: Callable[[], int | None],
        batch_flag: str = "--batch_size") -> int:
  """Runs a tool's body: its exit status (None: 0), or 1 after one line for any of
  `TOOL_ERRORS` and for XLA running out of memory (naming `batch_flag`, the flag that
  sizes what the device holds)."""
  try:
    return body() or 0
  except TOOL_ERRORS as e:
    return fail(tool, error_line(e))
  except RuntimeError as e:
    if not out_of_device_memory(e):
      raise
    first = str(e).splitlines()[0]
    return fail(tool, f"out of memory ({first}); lower {batch_flag}")


def _config_file_arg(argv: Sequence[str], flag: str) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith(f"--{flag}="):
      return a.split("=", 1)[1]
    if a == f"--{flag}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


class _NoGetConfig(AttributeError):
  """A config file without a `get_config` function."""


def _load_config(spec: str) -> Any:
  """`path[:arg]` -> `get_config(arg)` of that Python file, as config_flags loads it."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_checked_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not callable(getattr(module, "get_config", None)):
    raise _NoGetConfig("defines no get_config()")
  return module.get_config(arg) if arg else module.get_config()


def config_file_error(argv: Sequence[str], flag: str = "config") -> str | None:
  """What is wrong with the `--FLAG path[:arg]` config file, in one line (missing, not
  a file, a syntax error, no `get_config`, or an exception from it, with the file's
  line); None when it loads, or when no such flag is given."""
  spec = _config_file_arg(argv, flag)
  if spec is None:
    return None
  path = spec.partition(":")[0]
  where = f"--{flag} {spec}"
  if not Path(path).exists():
    return f"{where}: no such file"
  if not Path(path).is_file():
    return f"{where}: not a file"
  try:
    _load_config(spec)
  except SyntaxError as e:
    return f"{where}: line {e.lineno}: {e.msg}"
  except _NoGetConfig as e:
    return f"{where}: {e}"
  except Exception as e:  # noqa: BLE001 - any exception of the user's file
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if Path(f.filename).resolve() == Path(path).resolve()]
    line = f" (line {frames[-1].lineno})" if frames else ""
    return f"{where}: {type(e).__name__}: {e}{line}"
  return None


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
  the config file is missing or unloadable: `config_file_error` says why)."""
  spec = _config_file_arg(argv, flag)
  if spec is None or not Path(spec.partition(":")[0]).is_file():
    return None
  try:
    config = _load_config(spec)
  except Exception:  # noqa: BLE001 - config_file_error reports the file's own error
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
