"""Converts checkpoints between PyTorch (VinVL/Oscar, Hugging Face BERT) and our format.

  bin/convert SRC_DIR MODEL_DIR                 # PyTorch -> vldeformer_jax model dir
  bin/convert --to-pytorch MODEL_DIR OUT_DIR    # model dir -> pytorch_model.bin (Oscar keys)

The output folder must be new, empty, or this command's earlier output (replaced as a
whole, atomically); --overwrite replaces anything else.
"""

from __future__ import annotations

import argparse
import logging
from typing import Sequence

from vldeformer_jax import cli, convert
from vldeformer_jax.config import POOLINGS


def _convert(args: argparse.Namespace) -> int:
  if args.to_pytorch:
    out = convert.export_to_pytorch(args.src, args.dst, overwrite=args.overwrite)
    print(f"wrote {out / 'pytorch_model.bin'}")
    return 0
  overrides = {k: v for k, v in (("img_feature_dim", args.img_feature_dim),
                                 ("pooling", args.pooling)) if v is not None}
  report = convert.convert_to_model_dir(args.src, args.dst, seed=args.seed,
                                        overwrite=args.overwrite, **overrides)
  print(report.summary())
  print(f"wrote {args.dst}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  p = cli.parser("convert", __doc__)
  p.add_argument("src", help="checkpoint folder (or model dir with --to-pytorch)")
  p.add_argument("dst", help="output folder (a new or empty one, or an earlier output "
                             "of this command, which is replaced)")
  p.add_argument("--to-pytorch", action="store_true",
                 help="write a model dir back as a PyTorch state dict with Oscar names")
  p.add_argument("--seed", type=int, default=0,
                 help="seed for the parts a text-only checkpoint lacks")
  p.add_argument("--img_feature_dim", type=int, default=None,
                 help="region feature size for a text-only checkpoint (default 2054)")
  p.add_argument("--pooling", choices=POOLINGS, default=None,
                 help="pooling stored in the model's config (default: mean)")
  cli.add_overwrite_flag(p, "DST")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  return cli.run("convert", lambda: _convert(args))
