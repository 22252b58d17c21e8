"""The paper's speed study (Sec. 4.4) on this machine: Fig. 5 and Table 4.

  bin/bench                                    # MiniLM-size random weights, defaults
  bin/bench --random minilm,base --output speed.json --plot speed.png
  bin/bench --model MODEL_DIR --gallery_sizes 10000,100000 --queries 1000
  bin/bench --write_benchmarks                 # also writes BENCHMARKS.md "speed_study"
  bin/bench --random base --queries 300 --output base.json
  bin/bench --write_benchmarks --merge base.json   # tables of both runs together
  bin/bench --from_json speed.json --plot speed.png # re-render, measure nothing

(a) all-pairs text-to-image retrieval on --sizes images x 5 captions: the individual
encoder (encode every image and caption once, cosine similarity + top-k) against the
joint scorer on every pair, extrapolated from --joint_batches measured batches of
--batch_size pairs (as the paper did for VinVL); encoding beyond --max_encode images
is scaled linearly from the first --max_encode. (b) single-query response: one caption
against N precomputed image embeddings (--gallery_sizes), --queries distinct captions
(--large_queries of them for N >= 1M): avg/min/max/P95/P99.99 ms and memory. (c) the
same query path in PyTorch (transformers BertModel, same weights), timed in alternating
blocks with (b); --no_torch skips it. Inputs are synthetic (no dataset needed). On a
GPU the same command runs there (JAX picks the accelerator). Flags are spelled with
underscores like every bin/ tool's; the old dashed spellings still work.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

from vldeformer_jax import cli

REPO = Path(__file__).resolve().parents[2]


def int_list(text: str) -> list[int]:
  try:
    values = [int(float(x)) for x in text.split(",") if x.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
  return values


def dtype_list(text: str) -> list[str]:
  values = [x.strip() for x in text.split(",") if x.strip()]
  bad = [v for v in values if v not in ("bfloat16", "float16")]
  if bad:
    raise argparse.ArgumentTypeError(f"expected bfloat16 and/or float16, got {text!r}")
  return values


def flag(p, name: str, **kwargs) -> None:
  """`--name` (underscored, as every bin/ tool spells flags), and the old dashed
  spelling as an alias that --help does not show."""
  p.add_argument(f"--{name}", **kwargs)
  if "_" in name:
    same = {k: v for k, v in kwargs.items() if k in ("action", "type", "metavar")}
    p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS, **same)


def measure(args: argparse.Namespace, specs: list) -> dict:
  """Runs the study."""
  from vldeformer_jax import speed
  report = speed.run_study(
      specs, args.sizes, args.gallery_sizes, args.queries, args.large_queries,
      batch_size=args.batch_size, max_encode=args.max_encode,
      joint_batches=args.joint_batches, rounds=args.rounds, k=args.k,
      with_torch=not args.no_torch, skip_all_pairs=args.skip_all_pairs,
      torch_threads=args.torch_threads, seed=args.seed,
      gallery_dtypes=args.gallery_dtypes, log=lambda line: print(line, flush=True))
  report["meta"]["command"] = shlex.join(["bin/bench", *sys.argv[1:]])
  return report


def _bench(args: argparse.Namespace, specs: list, merged: list[dict],
           report: dict | None) -> int:
  """Measures (unless `report` is an earlier run's), then writes what was asked for;
  the output paths are checked before anything is measured."""
  from vldeformer_jax import speed_report
  cli.check_file_outputs("bench", {"--output": args.output, "--plot": args.plot},
                         args.overwrite)
  report = report or measure(args, specs)
  speed_report.merge_runs(report, merged)
  body = speed_report.publish(report, plot=args.plot, output=args.output,
                              relative_to=REPO)
  if args.write_benchmarks:
    sys.path.insert(0, str(REPO))
    from benchmarks.report import write_section
    write_section(speed_report.SECTION, speed_report.TITLE, body,
                  extra_versions=speed_report.versions())
    print(f"wrote the '{speed_report.SECTION}' section of BENCHMARKS.md")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  p = cli.parser("bench", __doc__)
  src = p.add_mutually_exclusive_group()
  src.add_argument("--model", help="a bin/convert or bin/train model directory")
  src.add_argument("--random", default=None,
                   help="random weights at these named sizes, comma-separated: "
                        "base, minilm, tiny, micro (default: minilm)")
  p.add_argument("--sizes", type=int_list, default=[1000, 5000, 10000],
                 help="(a) numbers of images, 5 captions each")
  flag(p, "gallery_sizes", type=int_list, default=[10_000, 100_000, 1_000_000],
       help="(b)/(c) gallery sizes N")
  p.add_argument("--queries", type=int, default=1000, help="(b)/(c) distinct queries")
  flag(p, "large_queries", type=int, default=200,
       help="(b)/(c) queries for N >= 1,000,000 (0: --queries)")
  flag(p, "batch_size", type=int, default=64,
       help="encoder and joint batch size (the paper: 400)")
  flag(p, "max_encode", type=int, default=1000,
       help="(a) encode at most this many images (and their captions); larger sizes "
            "are scaled linearly")
  flag(p, "joint_batches", type=int, default=3,
       help="(a) measured joint batches to extrapolate the all-pairs time from")
  p.add_argument("--rounds", type=int, default=10,
                 help="(b)/(c) alternating timing blocks per path")
  p.add_argument("-k", type=int, default=10, help="results per query")
  flag(p, "torch_threads", type=int, default=0,
       help="PyTorch threads (0: the faster of 1 and all cores, per N)")
  flag(p, "gallery_dtypes", type=dtype_list, default=[],
       help="(b) also time ours with the gallery in these dtypes (bfloat16, float16; "
            "comma-separated) and measure their recall@k")
  flag(p, "no_torch", action="store_true", help="skip (c)")
  flag(p, "skip_all_pairs", action="store_true", help="skip (a)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--output", help="write all measurements here as JSON")
  p.add_argument("--plot", help="write the all-pairs plot (Fig. 5) here as PNG")
  flag(p, "from_json", metavar="JSON",
       help="measure nothing: re-render the tables, plot and section of an earlier "
            "run's --output")
  p.add_argument("--merge", action="append", default=[], metavar="JSON",
                 help="add the models of an earlier run's --output to the tables, plot "
                      "and BENCHMARKS.md section (repeatable)")
  cli.add_overwrite_flag(p, "--output and --plot")
  flag(p, "write_benchmarks", action="store_true",
       help="write the 'speed_study' section of BENCHMARKS.md (it shows the plot when "
            "--plot is inside the repository)")
  args = p.parse_args(argv)
  for name in ("queries", "batch_size", "max_encode", "joint_batches", "rounds", "k"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1")
  for name in ("large_queries", "torch_threads"):
    if getattr(args, name) < 0:
      p.error(f"--{name} must be >= 0")
  if args.model:
    if (error := cli.missing_dir({"--model": args.model})):
      p.error(error)
    specs = [("dir", args.model)]
  else:
    sizes = [s.strip() for s in (args.random or "minilm").split(",") if s.strip()]
    from vldeformer_jax.config import MODEL_SIZES
    bad = [s for s in sizes if s not in MODEL_SIZES]
    if bad or not sizes:
      p.error(f"--random takes {', '.join(sorted(MODEL_SIZES))}; got {args.random!r}")
    specs = [("random", s) for s in sizes]

  from vldeformer_jax import speed_report

  def read(option: str, path: str, whole: bool) -> dict:
    try:
      return speed_report.read_report(path, whole)
    except ValueError as e:
      p.error(f"{option} {path}: {e}")

  merged = [read("--merge", path, whole=False) for path in args.merge]
  report = read("--from_json", args.from_json, whole=True) if args.from_json else None
  return cli.run("bench", lambda: _bench(args, specs, merged, report))
