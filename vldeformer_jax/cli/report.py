"""A qualitative retrieval report like the paper's Fig. 4, as one HTML page.

  bin/report --model DIR --data_dir DIR --split test --out report.html
  bin/report --model DIR --data_dir DIR --out report.html \
             --queries "a dog lying on a couch" "a red bus" --num_cases 10 --top_m 20
  bin/report --model DIR --data_dir DIR --out report.html --queries_file queries.txt

Per query: the top-k images (default 5) of the individual encoder, each drawn as its
detector boxes labelled with tags on a blank canvas of the image's size (there are no
pixels in the features), the ground truth framed in green (a query equal to a caption
of the split has that caption's image as ground truth). Without --queries/--queries_file
the first caption of --num_queries images spread over the split is used. Then the cases
the joint scorer gets right at rank 1 and the encoder does not: each of the split's
captions (--scan: the first N) has its encoder top-M re-scored with the joint scorer
(captions x M joint pairs: the slow part on CPU).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from vldeformer_jax import cli


def main(argv: Sequence[str] | None = None) -> int:
  p = cli.parser("report", __doc__)
  p.add_argument("--model", required=True, help="a bin/convert or bin/train model dir")
  p.add_argument("--data_dir", required=True, help="released VinVL retrieval layout")
  p.add_argument("--split", default="test")
  p.add_argument("--out", required=True, help="the HTML file to write")
  p.add_argument("--queries", nargs="+", default=[], help="query texts")
  p.add_argument("--queries_file", help="a file with one query per line")
  p.add_argument("--num_queries", type=int, default=5,
                 help="queries taken from the split's captions when none are given")
  p.add_argument("--num_cases", type=int, default=5,
                 help="joint-right / encoder-wrong cases to show (0: skip the search)")
  p.add_argument("--top_m", type=int, default=10,
                 help="encoder candidates re-scored by the joint scorer per caption")
  p.add_argument("--top_k", type=int, default=5, help="images shown per ranking")
  p.add_argument("--scan", type=int, default=0,
                 help="look for cases among the first N captions (0: all)")
  p.add_argument("--max_images", type=int, default=0, help="use the first N images")
  p.add_argument("--max_boxes", type=int, default=0,
                 help="draw only the N most confident boxes per image (0: all)")
  p.add_argument("--batch_size", type=int, default=64)
  cli.add_overwrite_flag(p, "--out")
  args = p.parse_args(argv)
  for flag in ("top_m", "top_k", "batch_size"):
    if getattr(args, flag) < 1:
      p.error(f"--{flag} must be >= 1")
  for flag in ("num_queries", "num_cases", "scan", "max_images", "max_boxes"):
    if getattr(args, flag) < 0:
      p.error(f"--{flag} must be >= 0")
  queries = list(args.queries)
  if args.queries_file:
    try:
      lines = Path(args.queries_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
      reason = getattr(e, "strerror", None) or e
      p.error(f"--queries_file {args.queries_file}: {reason}")
    queries += [line.strip() for line in lines if line.strip()]
  if (error := cli.missing_dir({"--model": args.model, "--data_dir": args.data_dir})):
    p.error(error)

  def write() -> None:
    from vldeformer_jax import report
    cli.enable_compilation_cache()
    summary = report.write_report(
        args.model, args.data_dir, args.out, args.split, queries, args.num_queries,
        args.num_cases, args.top_m, args.top_k, args.scan, args.max_images,
        args.max_boxes, args.batch_size, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))

  return cli.run("report", write)
