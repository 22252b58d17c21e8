#!/usr/bin/env python
"""The install step of scripts/setup.sh: uv (what it runs now) against pip (before).

Each round creates a fresh virtual environment and installs this package with its dev
extras (`-e '.[dev]'`) once per side, the order alternating between rounds, each from
a cold cache (pip --no-cache-dir; uv with an empty cache directory), so both download
and unpack everything as on a fresh machine:
  pip   python -m pip install -e '.[dev]'                      (setup.sh before)
  uv    python -m pip install uv && uv pip install --compile-bytecode -e '.[dev]'
        (setup.sh now)
$PIP_FIND_LINKS goes to both (pip reads it; uv gets --find-links, as setup.sh does).
Both write the installed modules' bytecode, pip by default, uv told to (without it,
each later process compiles what it imports, wherever PYTHONDONTWRITEBYTECODE is set).
Timed: venv creation and install, as a whole. Then checks that both environments hold
the same packages (`pip freeze`, uv itself aside) and counts their .pyc files.

  python3 benchmarks/bench_setup.py [--rounds 2] [--write-benchmarks]

Needs network access to the package index (minutes per pip round).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_env  # noqa: E402  (benchmarks/ is on sys.path: run as a script)

REPO = bench_env.setup()

import report  # noqa: E402


def install(side: str, venv: Path) -> tuple[float, float]:
  """Creates `venv` and installs REPO[dev] into it as `side` does; (wall s, CPU s)."""
  find_links = [a for place in os.environ.get("PIP_FIND_LINKS", "").split()
                for a in ("--find-links", place)]
  python = str(venv / "bin" / "python")
  target = f"{REPO}[dev]"
  commands = [[sys.executable, "-m", "venv", str(venv)]]
  env = dict(os.environ)
  if side == "pip":
    commands.append([python, "-m", "pip", "install", "-q", "--no-cache-dir", "-e", target])
  else:
    cache = venv.parent / f"{venv.name}_uv_cache"
    env["UV_CACHE_DIR"] = str(cache)
    commands += [[python, "-m", "pip", "install", "-q", "--no-cache-dir", "uv"],
                 [str(venv / "bin" / "uv"), "pip", "install", "-q", "--python", python,
                  *find_links, "--compile-bytecode", "-e", target]]
  start, cpu = time.perf_counter(), bench_env.children_cpu()
  for command in commands:
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode:
      raise SystemExit(f"[setup] {side}: {' '.join(command)} failed:\n{proc.stderr[-3000:]}")
  return time.perf_counter() - start, bench_env.children_cpu() - cpu


def packages(venv: Path) -> set[str]:
  """`pip freeze` of `venv`, uv and this package's own (editable) line aside."""
  out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "freeze"],
                       capture_output=True, text=True, check=True).stdout
  return {line for line in out.splitlines()
          if line and not line.startswith(("uv==", "-e ", "vldeformer"))}


def bytecode_files(venv: Path) -> int:
  """How many .pyc files `venv`'s site-packages holds."""
  return sum(1 for _ in venv.glob("lib/python*/site-packages/**/*.pyc"))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--rounds", type=bench_env.positive_int, default=2)
  ap.add_argument("--write-benchmarks", action="store_true")
  a = ap.parse_args()
  root = Path(tempfile.mkdtemp(prefix="vld_setup_"))
  walls: dict[str, list[float]] = {"uv": [], "pip": []}
  cpus: dict[str, list[float]] = {"uv": [], "pip": []}
  frozen: dict[str, set[str]] = {}
  pyc: dict[str, int] = {}
  try:
    for r in range(a.rounds):
      for side in (("uv", "pip") if r % 2 == 0 else ("pip", "uv")):
        venv = root / f"{side}_{r}"
        wall, cpu = install(side, venv)
        walls[side].append(wall)
        cpus[side].append(cpu)
        frozen[side] = packages(venv)
        pyc[side] = bytecode_files(venv)
        print(f"[setup] round {r} {side}: {wall:.1f} s, {cpu:.1f} CPU s", flush=True)
        shutil.rmtree(venv)
        shutil.rmtree(root / f"{venv.name}_uv_cache", ignore_errors=True)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  differ = sorted(frozen["uv"] ^ frozen["pip"])
  med = {k: statistics.median(v) for k, v in walls.items()}
  cpu_med = {k: statistics.median(v) for k, v in cpus.items()}
  body = "\n".join([
      "A fresh virtual environment and `-e '.[dev]'` installed into it, each side from a "
      f"cold cache, {a.rounds} rounds, the order alternating: pip = `pip install` "
      "(scripts/setup.sh before), uv = `pip install uv` + `uv pip install "
      "--compile-bytecode` (now); both write the modules' bytecode.",
      "", "| side | runs (s) | median s | median CPU s |", "|---|---|---|---|",
      *(f"| {k} | {', '.join(f'{x:.1f}' for x in walls[k])} | {med[k]:.1f} | "
        f"{cpu_med[k]:.1f} |" for k in ("uv", "pip")),
      "", f"- uv / pip: wall **{med['uv'] / med['pip']:.2f}** "
      f"({med['pip'] - med['uv']:.0f} s less per fresh set-up), CPU "
      f"**{cpu_med['uv'] / cpu_med['pip']:.2f}**.",
      f"- The same packages: {len(frozen['uv'])} in `pip freeze` of each, uv aside"
      if not differ else f"- The environments differ: {', '.join(differ)}",
      f"- .pyc files in site-packages: uv {pyc['uv']}, pip {pyc['pip']}."])
  report.publish("setup", "scripts/setup.sh: the install step", body, a.write_benchmarks, "setup")
  if differ:
    raise SystemExit(1)


if __name__ == "__main__":
  main()
