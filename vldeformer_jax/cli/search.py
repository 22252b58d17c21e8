"""Searches a `bin/index` index: text -> images, or an indexed image -> captions.

  bin/search --index test.index "a dog on a skateboard" -k 10
  bin/search --index test.index --model MODEL_DIR "a dog on a skateboard" --faiss hnsw
  bin/search --index test.index --image 391895 -k 5

Prints one result per line: rank, image id, cosine score and the image's tags (or, with
--image, the caption and the id of the image it belongs to). --model defaults to the
model the index was built with; --image needs no model (it uses stored captions).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

from vldeformer_jax import cli
from vldeformer_jax.retrieval.faiss_index import FAISS_KINDS


def add_model_flags(p: argparse.ArgumentParser) -> None:
  """--index, --model and --allow_model_mismatch: how bin/search and bin/serve pick
  the index and the model to query it with (`retrieval.open_index`)."""
  p.add_argument("--index", required=True, help="index directory or .npz (bin/index)")
  p.add_argument("--model", default=None,
                 help="model directory (default: the one the index was built with)")
  p.add_argument("--allow_model_mismatch", action="store_true",
                 help="go on when the model's weights differ from those the index was "
                      "built with (its scores are then not the model's)")


def _search(args: argparse.Namespace) -> int:
  import jax
  from vldeformer_jax import retrieval, sharding
  cli.enable_compilation_cache()
  index, model, _ = retrieval.open_index(args.index, args.model,
                                         need_model=args.image is None,
                                         allow_model_mismatch=args.allow_model_mismatch)
  if args.image is not None:
    if not index.has_captions:
      return cli.fail("search", f"--index {args.index} holds no captions (built with "
                      "--no_captions)")
    try:
      row = index.row(args.image)
    except KeyError as e:
      return cli.fail("search", f"--image: {e.args[0]}")
    gallery, what = index.caption_embeddings, f"{len(index.captions)} captions"
  else:
    gallery, what = index.image_embeddings, f"{index.num_images} images"
  if args.faiss:
    searcher = None
    if args.image is None and Path(args.index).is_dir():
      searcher = retrieval.stored_faiss_index(args.index, index, args.faiss)
    how = f"FAISS {args.faiss}" + (" (stored)" if searcher else "")
    if searcher is None:
      searcher = retrieval.FaissIndex(gallery, args.faiss, nlist=args.nlist)
    searcher.configure(nprobe=args.nprobe, ef_search=args.ef_search)
  else:
    mesh = sharding.make_mesh() if jax.device_count() > 1 else None
    searcher, how = retrieval.ExactIndex(gallery, mesh=mesh), "exact"
  if args.image is None:
    print(f"# text -> image: {args.query!r} ({how} search over {what})")
    for rank, hit in enumerate(retrieval.search_text(model, index, args.query, args.k,
                                                     searcher), 1):
      print(f"{rank}\t{hit.image_id}\t{hit.score:.4f}\t{hit.tags}")
  else:
    print(f"# image -> text: image {index.image_ids[row]} ({how} search over {what}); "
          f"tags: {index.tags[row]}")
    for rank, hit in enumerate(retrieval.search_image(index, args.image, args.k,
                                                      searcher), 1):
      print(f"{rank}\t{hit.image_id}\t{hit.score:.4f}\t{hit.caption}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  p = cli.parser("search", __doc__)
  p.add_argument("query", nargs="?", default=None, help="text query")
  add_model_flags(p)
  p.add_argument("-k", type=int, default=10, help="results to print")
  p.add_argument("--image", default=None, help="image id: print its closest captions")
  p.add_argument("--faiss", choices=FAISS_KINDS, default=None,
                 help="search with FAISS (a stored index when bin/index built one) "
                      "instead of exact JAX search")
  p.add_argument("--nlist", type=int, default=None, help="IVF lists (--faiss ivf)")
  p.add_argument("--nprobe", type=int, default=None,
                 help="IVF lists probed (--faiss ivf)")
  p.add_argument("--ef_search", type=int, default=None, help="HNSW beam (--faiss hnsw)")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(message)s")

  def fail(message: str) -> int:
    return cli.fail("search", message)

  if (args.query is None) == (args.image is None):
    return fail("give either a text query or --image ID (not both)")
  if args.k < 1:
    return fail(f"-k must be >= 1, got {args.k}")
  if not Path(args.index).exists():
    return fail(f"--index {args.index}: no such index (build one with bin/index)")
  if (error := cli.missing_dir({"--model": args.model})):
    return fail(error)
  if args.nprobe is not None and args.faiss != "ivf":
    return fail("--nprobe needs --faiss ivf")
  if args.ef_search is not None and args.faiss != "hnsw":
    return fail("--ef_search needs --faiss hnsw")
  return cli.run("search", lambda: _search(args))
