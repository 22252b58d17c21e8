"""Serves a `bin/index` index over HTTP: JSON search endpoints and a search page.

  bin/serve --index test.index                      # model and data from the index
  bin/serve --index test.index --model MODEL_DIR --port 8080
  curl -s localhost:8080/api/search/text -d '{"query": "a dog", "k": 5}'
  curl -s localhost:8080/api/search/image -d '{"image_id": "391895", "k": 5}'

Endpoints, limits and batching: see vldeformer_jax/serving.py. Prints the URL once it
serves (--port 0 picks a free port); stop it with Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Sequence

from vldeformer_jax import cli
from vldeformer_jax.cli.search import add_model_flags
from vldeformer_jax.retrieval.exact import GALLERY_DTYPES


def _serve(args: argparse.Namespace) -> int:
  from vldeformer_jax import serving
  cli.enable_compilation_cache()
  service = serving.Service.load(args.index, args.model, args.data_dir,
                                 max_batch=args.max_batch,
                                 gallery_dtype=args.gallery_dtype,
                                 use_data=not args.no_data,
                                 allow_model_mismatch=args.allow_model_mismatch)
  serving.warm_up(service)
  try:
    asyncio.run(serving.serve(service, args.host, args.port,
                              ready=lambda url: print(f"serving on {url}", flush=True)))
  except KeyboardInterrupt:
    pass
  except OSError as e:  # port taken, address not available
    return cli.fail("serve", f"--host {args.host} --port {args.port}: "
                    f"{cli.error_line(e)}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  p = cli.parser("serve", __doc__)
  add_model_flags(p)
  p.add_argument("--data_dir", default=None,
                 help="the indexed split's data directory, for rerank and the page's "
                      "box drawings (default: the one the index was built from)")
  p.add_argument("--no_data", action="store_true",
                 help="serve without the data directory (no rerank, no drawings)")
  p.add_argument("--host", default="127.0.0.1", help="address to listen on")
  p.add_argument("--port", type=int, default=8080, help="port (0: a free one)")
  p.add_argument("--max_batch", type=int, default=32,
                 help="most queued requests sent to the device as one call")
  p.add_argument("--gallery_dtype", choices=GALLERY_DTYPES,
                 default="float32", help="dtype of the image gallery on the device")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")

  def fail(message: str) -> int:
    return cli.fail("serve", message)

  if not Path(args.index).exists():
    return fail(f"--index {args.index}: no such index (build one with bin/index)")
  if (error := cli.missing_dir({"--model": args.model, "--data_dir": args.data_dir})):
    return fail(error)
  if not 0 <= args.port < 65536:
    return fail(f"--port must be in [0, 65535], got {args.port}")
  if args.max_batch < 1:
    return fail(f"--max_batch must be >= 1, got {args.max_batch}")
  return cli.run("serve", lambda: _serve(args))
