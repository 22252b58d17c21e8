"""The paper's ablation (Table 5) over seeds: trains every row, evaluates it, tabulates.

  bin/ablate --config configs/demo.py --seeds 3 --out demo_output/table5
  bin/ablate --config configs/vinvl_coco.py --seeds 3 --out ablation_coco \\
      --split test --protocol coco1k --config.data_dir=/data/coco_ir ...

Rows (--rows, default all): vldeformer, no_contrastive (variant cosine), no_avg_pool
(cls), no_pretrain (random_init), no_decompose (the config's init_model evaluated as it
is, once) and no_hard_negatives (no_negatives; not a row of the paper). --extra_row
NAME=VARIANTS adds a row of your own (e.g. tau_0.1=temperature=0.1), trained like the
others. Each (row, seed) runs bin/train as a child process with --config FILE:ARG,
the row's variant and seed=N, then bin/eval (--split and --protocol: default the
config's eval_split and eval_protocol); every --config.KEY=VALUE goes to every run.
Writes OUT/NAME.md, OUT/NAME.json and OUT/NAME.png (mean and range over seeds, the
paper's COCO 1k figures beside) after each run. Rerunning resumes: a finished run is
not run again, a killed one resumes from its checkpoints. Exits 1 when a run failed
(the others are kept and tabulated), 2 for bad flags.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Sequence

from vldeformer_jax import ablation, evaluation
from vldeformer_jax.cli import config_override_error


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(prog="bin/ablate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="a configs/*.py file[:arg]")
  p.add_argument("--out", required=True, help="runs and tables go here")
  p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per trained row")
  p.add_argument("--rows", help="comma-separated rows (default: all, then every "
                                 "--extra_row)")
  p.add_argument("--extra_row", action="append", default=[], metavar="NAME=VARIANTS",
                 help="a row of your own: config variants (config.apply_variants)")
  p.add_argument("--split", help="the split evaluated (default: the config's eval_split)")
  p.add_argument("--protocol", choices=sorted(evaluation.PROTOCOLS),
                 help="R@K protocol (default: the config's eval_protocol)")
  p.add_argument("--name", default="table5", help="the tables' file name, without suffix")
  args, overrides = p.parse_known_args(argv)
  bad = [o for o in overrides if not (o.startswith("--config.") and "=" in o)]
  if bad:
    p.error(f"unrecognized arguments: {' '.join(bad)} (overrides: --config.KEY=VALUE)")
  if args.seeds < 1:
    p.error("--seeds must be >= 1")
  if (error := config_override_error(["--config", args.config, *overrides])):
    p.error(error)
  try:
    extra = [ablation.extra_row(spec) for spec in args.extra_row]
  except ValueError as e:
    p.error(str(e))
  known = {r.name: r for r in (*ablation.TABLE5_ROWS, *extra)}
  names = ([*ablation.ROW_NAMES, *(r.name for r in extra)] if args.rows is None
           else [n.strip() for n in args.rows.split(",") if n.strip()])
  unknown = [n for n in names if n not in known]
  if unknown or not names:
    p.error(f"--rows: unknown row {unknown[0] if unknown else '(none given)'}; rows: "
            f"{', '.join(known)}")
  rows = [known[n] for n in dict.fromkeys(names)]
  command = "bin/ablate " + shlex.join(argv)
  try:
    result = ablation.ablate(args.config, overrides, rows, range(args.seeds),
                             Path(args.out), args.split, args.protocol, args.name,
                             command)
  except (ValueError, FileNotFoundError) as e:
    print(f"bin/ablate: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("bin/ablate: interrupted; rerun the same command to resume", file=sys.stderr)
    return 130
  for path in result["paths"]:
    print(f"wrote {path}")
  if result["failed"]:
    print(f"bin/ablate: {len(result['failed'])} run(s) failed: "
          f"{', '.join(result['failed'])} (see their logs; rerun to retry)",
          file=sys.stderr)
    return 1
  return 0
