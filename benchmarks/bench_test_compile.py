#!/usr/bin/env python
"""What the tests' XLA flags save: in-process train-step tests under each code generator.

tests/conftest.py compiles the tests' programs with XLA's elemental CPU emitters
(`--xla_cpu_use_fusion_emitters=false`, `TEST_XLA_FLAGS`) rather than XLA's default
MLIR fusion emitters; both at -O0 (`jax_disable_most_optimizations`). Each round runs
the same pytest selection (default: the sharded train-step tests of tests/test_train.py,
every tier) once per side, the order alternating, each in a fresh temporary directory,
so that both start from an empty compilation cache:
  elemental  the tests as they run (conftest's TEST_XLA_FLAGS)
  fusion     VLD_TEST_XLA_FLAGS="" (XLA's defaults)
Timed: the whole pytest process (one worker). Medians; cores = CPU time / wall time.

  .venv/bin/python benchmarks/bench_test_compile.py [--rounds 2] [--tests SELECTION]
      [--write-benchmarks]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import bench_env  # noqa: E402  (benchmarks/ is on sys.path: run as a script)

REPO = bench_env.setup()

import report  # noqa: E402

SELECTION = "tests/test_train.py::test_sharded_step_equals_single_device"
SIDES = {"elemental": {}, "fusion": {"VLD_TEST_XLA_FLAGS": ""}}


def run_tests(selection: str, side: str, basetemp: Path) -> tuple[float, float]:
  """(wall s, CPU s) of one pytest process over `selection`, compiling as `side`."""
  env = {**os.environ, **SIDES[side], "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-m", "", "-p", "no:cacheprovider",
         f"--basetemp={basetemp}", *selection.split()]
  return bench_env.timed_run(cmd, env, REPO, f"[test_compile] pytest ({side})")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--rounds", type=bench_env.positive_int, default=2)
  ap.add_argument("--tests", default=SELECTION, help="pytest node ids, space-separated")
  ap.add_argument("--write-benchmarks", action="store_true")
  a = ap.parse_args()
  root = Path(tempfile.mkdtemp(prefix="vld_test_compile_"))
  walls, cpus = report.alternate(
      a.rounds, tuple(SIDES),
      lambda side, r: run_tests(a.tests, side, root / f"{side}_{r}"), "test_compile")
  body = "\n".join([
      f"`pytest -n 0 -m '' {a.tests}` (every tier, one process, an empty compilation "
      f"cache each run), {a.rounds} rounds, the order alternating. elemental = the tests "
      "as conftest compiles them (`--xla_cpu_use_fusion_emitters=false`, -O0); fusion = "
      "XLA's default emitters (VLD_TEST_XLA_FLAGS=\"\"), -O0.",
      "", *report.two_sides(walls, cpus, "elemental", "fusion", "per run")])
  report.publish("test_compile", "The tests' code generator: elemental against fusion "
                 "emitters", body, a.write_benchmarks, "test_compile")


if __name__ == "__main__":
  main()
