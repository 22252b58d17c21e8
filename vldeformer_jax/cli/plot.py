"""Training curves of bin/train runs, overlaid, and R@K bar charts of bin/eval results.

  bin/plot WORKDIR [WORKDIR...] [--out curves.png]
  bin/plot WORKDIR --recall before=eval_before.json after=eval_after.json \
           --recall_out recall.png

The curves (one PNG, one colour per run, labelled by workdir name): training loss,
learning rate, and R@1/5/10 in both directions at each evaluation, read from each
workdir's metrics.jsonl. --recall LABEL=FILE draws the individual encoder's R@K of each
bin/eval --output file as a bar chart, bars in the order given.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from vldeformer_jax import cli


def _plot(args: argparse.Namespace, recall_files: dict[str, str]) -> None:
  from vldeformer_jax import plots
  cli.check_file_outputs("plot", {"--out": args.out if args.workdirs else None,
                                  "--recall_out": args.recall_out if recall_files
                                  else None}, args.overwrite)
  if args.workdirs:
    runs = {label: plots.read_run(w)
            for label, w in zip(plots.run_labels(args.workdirs), args.workdirs)}
    print(f"wrote {plots.save(plots.plot_curves(runs), args.out)}")
  if recall_files:
    results = {label: plots.read_recall(path) for label, path in recall_files.items()}
    print(f"wrote {plots.save(plots.plot_recall_bars(results), args.recall_out)}")


def main(argv: Sequence[str] | None = None) -> int:
  p = cli.parser("plot", __doc__)
  p.add_argument("workdirs", nargs="*", metavar="WORKDIR", help="bin/train workdirs")
  p.add_argument("--out", default="curves.png", help="the curves PNG to write")
  p.add_argument("--recall", nargs="+", default=[], metavar="LABEL=FILE",
                 help="bin/eval --output files to chart, each with its label")
  p.add_argument("--recall_out", default="recall.png", help="the bar chart PNG to write")
  cli.add_overwrite_flag(p, "--out and --recall_out")
  args = p.parse_args(argv)
  if not args.workdirs and not args.recall:
    p.error("give at least one WORKDIR or --recall LABEL=FILE")
  recall_files = {}
  for item in args.recall:
    label, sep, path = item.partition("=")
    if not sep or not label or not path:
      p.error(f"--recall {item!r}: expected LABEL=FILE")
    recall_files[label] = path
  return cli.run("plot", lambda: _plot(args, recall_files))
