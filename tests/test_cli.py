"""Shared bin/ helpers: a mistyped --config.KEY gets one line naming the key and the
nearest valid ones; the compilation cache's directory follows JAX's settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vldeformer_jax.cli import config_override_error

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.py")


def test_config_override_error_names_the_key_and_the_nearest():
  assert config_override_error(["--config", DEMO, "--config.temperature=0.1",
                                "--config.model.hidden_size=8"]) is None
  msg = config_override_error([f"--config={DEMO}", "--config.temprature=0.1"])
  assert msg.startswith("--config.temprature: no such key in ")
  assert "did you mean --config.temperature" in msg
  msg = config_override_error([f"--config={DEMO}:no_negatives", "--config.model.hiden_size=8"])
  assert "--config.model.hidden_size" in msg
  msg = config_override_error([f"--config={DEMO}", "--config.zzzzzz=1"])
  assert "valid keys: " in msg and "temperature" in msg
  assert config_override_error(["--config=missing.py", "--config.x=1"]) is None


def test_bin_train_reports_a_mistyped_key_in_one_line(tmp_path):
  proc = subprocess.run([sys.executable, str(REPO / "bin" / "train"), "--config", DEMO,
                         "--workdir", str(tmp_path), "--config.bogus=1"],
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2
  assert "bin/train: error: --config.bogus: no such key in" in proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.fixture
def jax_cache_config():
  """Restores JAX's compilation-cache settings after a test changes them (nothing is
  compiled while they are changed)."""
  import jax
  keys = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
          "jax_compilation_cache_max_size")
  saved = {k: getattr(jax.config, k) for k in keys}
  yield jax.config
  for k, v in saved.items():
    jax.config.update(k, v)


def test_compilation_cache_default_dir_and_jax_settings(jax_cache_config, tmp_path,
                                                        monkeypatch):
  from vldeformer_jax.cli import COMPILATION_CACHE_MAX_BYTES, enable_compilation_cache
  config = jax_cache_config
  monkeypatch.setenv("VLD_CACHE_DIR", str(tmp_path / "cache"))
  # No JAX setting: the project's cache directory, created, with a size bound.
  config.update("jax_enable_compilation_cache", True)
  config.update("jax_compilation_cache_dir", None)
  want = tmp_path / "cache" / "xla"
  assert enable_compilation_cache() == str(want) and want.is_dir()
  assert config.jax_compilation_cache_dir == str(want)
  assert config.jax_compilation_cache_max_size == COMPILATION_CACHE_MAX_BYTES
  # JAX_COMPILATION_CACHE_DIR (JAX's own setting) wins, and its size is left alone.
  config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
  config.update("jax_compilation_cache_max_size", -1)
  assert enable_compilation_cache() == str(tmp_path / "mine")
  assert config.jax_compilation_cache_max_size == -1
  # JAX_ENABLE_COMPILATION_CACHE=false: off.
  config.update("jax_enable_compilation_cache", False)
  config.update("jax_compilation_cache_dir", None)
  assert enable_compilation_cache() is None and config.jax_compilation_cache_dir is None
  # A cache directory that cannot be made: off, with a warning, not a crash.
  config.update("jax_enable_compilation_cache", True)
  (tmp_path / "file").write_text("")
  monkeypatch.setenv("VLD_CACHE_DIR", str(tmp_path / "file"))
  assert enable_compilation_cache() is None and config.jax_compilation_cache_dir is None


def _raises(error: BaseException):
  def body():
    raise error
  return body


@pytest.mark.parametrize("error,line", [
    (ValueError("--out x: exists"), "--out x: exists"),
    (FileNotFoundError(2, "No such file or directory", "/x/y"),
     "/x/y: No such file or directory"),
    (PermissionError(13, "Permission denied", "/x", None, "/z"),
     "/x -> /z: Permission denied"),
    (KeyError("image id 4 is not in the index"), "image id 4 is not in the index"),
    (ImportError("needs faiss: pip install faiss-cpu"),
     "needs faiss: pip install faiss-cpu"),
    (MemoryError(), "out of memory: lower the batch size"),
    (FloatingPointError("non-finite loss at step 3"), "non-finite loss at step 3"),
])
def test_run_turns_the_librarys_errors_into_one_line(error, line, capsys):
  from vldeformer_jax import cli
  assert cli.run("index", _raises(error)) == 1
  assert capsys.readouterr().err == f"bin/index: error: {line}\n"


def test_run_reports_xla_out_of_memory_naming_the_batch_flag(capsys):
  import jax
  from vldeformer_jax import cli
  oom = jax.errors.JaxRuntimeError(
      "RESOURCE_EXHAUSTED: Out of memory allocating 188722373952 bytes.\ndetails")
  assert cli.run("train", _raises(oom), batch_flag="--config.batch_size") == 1
  assert capsys.readouterr().err == (
      "bin/train: error: out of memory (RESOURCE_EXHAUSTED: Out of memory allocating "
      "188722373952 bytes.); lower --config.batch_size\n")


def test_run_leaves_bugs_their_traceback():
  import jax
  from vldeformer_jax import cli
  for bug in (TypeError("bug"), RuntimeError("bug"),
              jax.errors.JaxRuntimeError("INTERNAL: bug")):
    with pytest.raises(type(bug)):
      cli.run("index", _raises(bug))
  assert cli.run("index", lambda: None) == 0 and cli.run("index", lambda: 3) == 3
