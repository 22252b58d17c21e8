"""Encodes every image (and caption) of a split once into a retrieval index.

  bin/index --model MODEL_DIR --data_dir DATA_DIR --split test --out test.index
  bin/index ... --out test.npz                  # one .npz file instead of a directory
  bin/index ... --faiss ivf --nlist 4096        # also store a FAISS index of the images

Search it with `bin/search --index test.index "a dog on a skateboard"`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

from vldeformer_jax import cli
from vldeformer_jax.data.errors import ON_ERROR_POLICIES
from vldeformer_jax.retrieval.faiss_index import APPROXIMATE_KINDS


def _index(args: argparse.Namespace) -> int:
  from vldeformer_jax import encoder, retrieval
  from vldeformer_jax.data import readers
  retrieval.check_index_output(args.out, option="--out", overwrite=args.overwrite)
  cli.enable_compilation_cache()
  model = encoder.load_pretrained(args.model, batch_size=args.batch_size)
  data = readers.VinVLRetrievalData(args.data_dir, args.split,
                                    img_keys_file=args.img_keys_file,
                                    feature_dim=model.config.img_feature_dim,
                                    on_error=args.on_error)
  index = retrieval.build_index(model, data, with_captions=not args.no_captions,
                                batch_size=args.batch_size, model_dir=args.model)
  out = retrieval.save_index(index, args.out, overwrite=args.overwrite)
  if args.faiss:
    approx = retrieval.FaissIndex(index.image_embeddings, args.faiss, nlist=args.nlist)
    approx.save(out / retrieval.faiss_file_name(args.faiss))
  captions = f" and {len(index.captions)} captions" if index.has_captions else ""
  print(f"indexed {index.num_images} images{captions} of split {args.split!r} "
        f"({index.hidden_size}-d) -> {out}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  p = cli.parser("index", __doc__)
  p.add_argument("--model", required=True,
                 help="model directory (bin/convert, bin/train)")
  p.add_argument("--data_dir", required=True, help="VinVL/Oscar retrieval data directory")
  p.add_argument("--split", required=True, help="split to index, e.g. test or train")
  p.add_argument("--out", required=True,
                 help="index to write: a directory, or a file ending in .npz (new, "
                      "empty, or an earlier index, which is replaced)")
  p.add_argument("--batch_size", type=int, default=64, help="images per encoder call")
  p.add_argument("--img_keys_file", default=None,
                 help="image ids to index (a file in --data_dir or a path), e.g. "
                      "test_img_keys_1k.tsv; default {split}_img_keys.tsv")
  p.add_argument("--no_captions", action="store_true",
                 help="leave out the captions (no image -> text search)")
  p.add_argument("--on_error", choices=ON_ERROR_POLICIES, default="error",
                 help="bad images: stop, or skip them with a report")
  p.add_argument("--faiss", choices=APPROXIMATE_KINDS, default=None,
                 help="also build and store an approximate FAISS index of the images")
  p.add_argument("--nlist", type=int, default=None, help="IVF lists (with --faiss ivf)")
  cli.add_overwrite_flag(p, "--out")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  logging.getLogger("faiss.loader").setLevel(logging.WARNING)

  if args.batch_size < 1:
    return cli.fail("index", f"--batch_size must be >= 1, got {args.batch_size}")
  if (error := cli.missing_dir({"--model": args.model, "--data_dir": args.data_dir})):
    return cli.fail("index", error)
  if args.faiss and Path(args.out).suffix == ".npz":
    return cli.fail("index", "--faiss needs a directory --out (a .npz index cannot hold "
                    "it)")
  return cli.run("index", lambda: _index(args))
