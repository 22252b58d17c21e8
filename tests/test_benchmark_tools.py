"""The benchmarks' shared pieces (benchmarks/report.py, bench_env.py): the alternating
side-by-side runs, their table, a timed child process, and count flags refused by
name."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import bench_env  # noqa: E402
import report  # noqa: E402


def test_alternate_swaps_the_order_every_round():
  calls = []

  def run(side, r):
    calls.append((r, side))
    return (10.0 if side == "a" else 20.0) + r, 1.5 * ((10.0 if side == "a" else 20.0) + r)

  walls, cpus = report.alternate(3, ("a", "b"), run, "t")
  assert calls == [(0, "a"), (0, "b"), (1, "b"), (1, "a"), (2, "a"), (2, "b")]
  assert walls == {"a": [10.0, 11.0, 12.0], "b": [20.0, 21.0, 22.0]}
  assert cpus["b"] == [30.0, 31.5, 33.0]


def test_two_sides_reports_medians_cores_and_ratios():
  lines = report.two_sides({"new": [10.0, 12.0, 11.0], "old": [20.0, 22.0, 21.0]},
                           {"new": [15.0, 18.0, 16.5], "old": [20.0, 22.0, 21.0]},
                           "new", "old", "per run")
  assert lines[2] == "| new | 10.0, 12.0, 11.0 | 11.0 | 16.5 | 1.50 |"
  assert lines[3] == "| old | 20.0, 22.0, 21.0 | 21.0 | 21.0 | 1.00 |"
  assert lines[-1] == ("- new / old: wall **0.52** (10.0 s less per run), CPU **0.79** "
                       "(4.5 CPU s less).")


@pytest.mark.parametrize("script,args", [
    ("bench_setup.py", ["--rounds", "0"]),
    ("bench_restart.py", ["--rounds", "0"]),
    ("bench_bytecode.py", ["--steps", "0"]),
    ("bench_test_compile.py", ["--rounds", "0"]),
    ("bench_train_start.py", ["--before", "HEAD", "--rounds", "-2"])])
def test_a_count_below_one_is_refused_naming_the_flag(script, args):
  proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args],
                        capture_output=True, text=True, cwd=REPO)
  assert proc.returncode == 2
  flag, value = args[-2], args[-1]
  assert f"argument {flag}: must be at least 1, got {value}" in proc.stderr


def test_timed_run_counts_the_childs_cpu_and_names_a_failure(tmp_path):
  busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
  wall, cpu = bench_env.timed_run([sys.executable, "-c", busy], {}, tmp_path, "busy")
  assert cpu >= 0.3 and wall > 0
  with pytest.raises(SystemExit, match=r"the child failed \(3\):\nout\n\nerr"):
    bench_env.timed_run([sys.executable, "-c", "import sys; print('out'); "
                         "sys.stderr.write('err'); sys.exit(3)"], {}, tmp_path, "the child")
