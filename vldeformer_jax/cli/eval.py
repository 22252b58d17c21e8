"""R@K of a model on a split, as the literature reports it (the paper's Table 2).

  bin/eval --model DIR --data_dir DIR --split test --protocol coco5k|coco1k|flickr1k|all \
           --output results.json [--mode individual|joint] [--rerank M]

individual: every image and caption encoded once (VLDeformer). joint: the cross-encoder
on all pairs (the VinVL baseline); --joint_max_images N scores the first N images and
extrapolates the time for all. --rerank M re-scores each query's top-M with the joint
model (LightningDOT-style); --rerank_similarity_weight W adds W x the encoder's cosine
similarity to the joint score (ALBEF/BLIP-style fusion).
"""

from __future__ import annotations

import argparse
from typing import Sequence

from vldeformer_jax import cli, evaluation, fileio
from vldeformer_jax.data.errors import ON_ERROR_POLICIES
from vldeformer_jax.data.sources import DATA_SOURCES


def _evaluate(args: argparse.Namespace) -> None:
  cli.check_file_outputs("eval", {"--output": args.output}, args.overwrite)
  cli.enable_compilation_cache()
  report = evaluation.evaluate_model_dir(
      args.model, args.data_dir, args.split, args.protocol, args.mode, args.rerank,
      args.joint_max_images, args.batch_size, args.max_images, args.data_source,
      args.on_error, args.rerank_similarity_weight, args.tags_only, args.rerank_model,
      args.rerank_mode)
  print(evaluation.format_table(report))
  if args.output:
    print(f"wrote {fileio.write_marked_json(args.output, report, 'bin/eval')}")


def main(argv: Sequence[str] | None = None) -> int:
  p = cli.parser("eval", __doc__)
  p.add_argument("--model", required=True, help="a bin/convert or bin/train model dir")
  p.add_argument("--data_dir", required=True, help="released VinVL retrieval layout")
  p.add_argument("--split", default="test")
  p.add_argument("--protocol", default="all", choices=sorted(evaluation.PROTOCOLS))
  p.add_argument("--mode", default="individual", choices=evaluation.MODES)
  p.add_argument("--rerank", type=int, default=0, metavar="M",
                 help="re-rank each query's top-M with the joint scorer")
  p.add_argument("--rerank_model", default=None, metavar="DIR",
                 help="re-rank with this model's joint scorer (e.g. a distillation "
                      "teacher) instead of --model's own")
  p.add_argument("--rerank_mode", default="joint", choices=evaluation.MODES,
                 help="re-rank by the joint scorer, or by --rerank_model's individual "
                      "embeddings (how a decomposed teacher orders the candidates)")
  p.add_argument("--rerank_similarity_weight", type=float, default=0.0, metavar="W",
                 help="re-ranked score = joint score + W x cosine similarity (ALBEF/BLIP "
                      "style; 1/temperature of training is a natural W; 0: joint only)")
  p.add_argument("--joint_max_images", type=int, default=0,
                 help="joint mode: score only the first N images (time extrapolated)")
  p.add_argument("--max_images", type=int, default=0, help="use only the first N images")
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--data_source", default="raw", choices=DATA_SOURCES)
  p.add_argument("--on_error", default="error", choices=ON_ERROR_POLICIES)
  p.add_argument("--tags_only", action="store_true",
                 help="encode images from their tags alone (region features left out): "
                      "what a tag-only shortcut reaches")
  p.add_argument("--output", help="write the report here as JSON")
  cli.add_overwrite_flag(p, "--output")
  args = p.parse_args(argv)
  for flag in ("rerank", "joint_max_images", "max_images"):
    if getattr(args, flag) < 0:
      p.error(f"--{flag} must be >= 0")
  if not 0 <= args.rerank_similarity_weight < float("inf"):
    p.error("--rerank_similarity_weight must be a finite number >= 0")
  if args.batch_size < 1:
    p.error("--batch_size must be >= 1")
  if args.rerank_model and not args.rerank:
    p.error("--rerank_model re-ranks: give --rerank M too")
  if args.rerank and args.mode != "individual":
    p.error("--rerank re-ranks the individual encoder's results: use --mode individual")
  if (error := cli.missing_dir({"--model": args.model, "--data_dir": args.data_dir})):
    return cli.fail("eval", error)
  return cli.run("eval", lambda: _evaluate(args))
