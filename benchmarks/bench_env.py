"""The opening every benchmark script shares: environment defaults (set before JAX,
TensorFlow or the tokenizers are imported), then the repository on `sys.path` so the
scripts run from a checkout without installing it.

  import bench_env
  REPO = bench_env.setup()            # CPU benchmarks
  REPO = bench_env.setup(cpu=False)   # the GPU ones pick their platform themselves
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def setup(cpu: bool = True) -> Path:
  if cpu:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  # Benchmarks time compiles: no persistent compilation cache (a user's
  # JAX_COMPILATION_CACHE_DIR would turn it on in every process) unless a script asks.
  for key, value in (("TF_CPP_MIN_LOG_LEVEL", "2"), ("HF_HUB_OFFLINE", "1"),
                     ("TOKENIZERS_PARALLELISM", "false"),
                     ("JAX_ENABLE_COMPILATION_CACHE", "false")):
    os.environ.setdefault(key, value)
  for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
      sys.path.insert(0, str(path))
  return REPO


def positive_int(text: str) -> int:
  """An argparse type for counts (rounds, steps): an int of at least 1, or an error
  argparse reports with the flag's name."""
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
  return value


def children_cpu() -> float:
  """CPU seconds (user + system) of this process's waited-for children so far."""
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def timed_run(cmd: list[str], env: dict[str, str], cwd: Path, what: str
              ) -> tuple[float, float]:
  """(wall s, CPU s) of one child process running `cmd`; a failure ends the benchmark
  with `what` and the child's last output."""
  start, cpu = time.perf_counter(), children_cpu()
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
  wall = time.perf_counter() - start
  if proc.returncode:
    raise SystemExit(f"{what} failed ({proc.returncode}):\n"
                     f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
  return wall, children_cpu() - cpu
