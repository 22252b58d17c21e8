"""Prepares the released VinVL/Oscar layout for training (and builds its TFDS copy).

  bin/build_data --data_dir RAW --out DIR [--splits train,test] [--workers N]
  bin/build_data --data_dir RAW --out DIR --tfds coco     # also the TFDS copy

Each split is read once, by N processes: region features decoded to float16, tags to
ids, every caption tagged for its text negatives (`vldeformer_jax/data/prepared.py`).
The result goes to DIR; train with `--config.prepared_dir=DIR` (and, for the TFDS
copy, `--config.data_source=tfds --config.data_dir=<the printed path>`). A killed
build resumes where it stopped when run again (the TFDS copy, built by TFDS, restarts
its build). Bad rows are listed with file and line; with `--on_error error` (the
default) they make the command fail, with `skip` they are counted and training skips
them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from vldeformer_jax.data import errors, prepared, readers, tfds_builder
from vldeformer_jax.data.sources import SourceSpec


def _splits(data_dir: Path, wanted: str | None) -> list[str]:
  if wanted:
    return [s for s in wanted.split(",") if s]
  found = {p.name.split("_captions.")[0] for p in data_dir.glob("*_captions.*")}
  return sorted(found)


def _prepare(spec: SourceSpec, out: Path, workers: int) -> list[str]:
  """Prepares one split; returns its bad rows as messages."""
  split = prepared.PreparedSplit(prepared.prepare(spec, out, workers=workers,
                                                  progress=True), spec)
  print(f"{spec.data_source} {spec.split}: {len(split.image_ids)} images, "
        f"{int(split.num_captions.sum())} captions, {len(split.vocab)} tags -> "
        f"{split.path}")
  return list(prepared.summary(split))


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data_dir", required=True, help="the released layout (RAW)")
  p.add_argument("--out", required=True, help="where the prepared splits go (DIR)")
  p.add_argument("--splits", default=None,
                 help="comma-separated (default: every split with a captions file)")
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                 help="processes reading and tagging (default: the CPU count)")
  p.add_argument("--feature_dim", type=int, default=readers.DEFAULT_FEATURE_DIM)
  p.add_argument("--box_order", default="auto",
                 choices=("auto",) + readers.BOX_ORDERS)
  p.add_argument("--on_error", default="error", choices=errors.ON_ERROR_POLICIES)
  p.add_argument("--tfds", metavar="CONFIG", default=None,
                 choices=[c.name for c in tfds_builder.BUILDER_CONFIGS],
                 help="also build the TFDS copy (config coco, flickr30k or demo) in "
                      "DIR/tfds and prepare its splits")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(message)s")
  data_dir, out = Path(args.data_dir), Path(args.out)
  splits = _splits(data_dir, args.splits)
  if not splits:
    print(f"bin/build_data: error: {data_dir}: no {{split}}_captions.pt/.json file",
          file=sys.stderr)
    return 1
  common = dict(feature_dim=args.feature_dim, box_order=args.box_order,
                on_error=args.on_error)
  try:
    bad = []
    for split in splits:
      bad += _prepare(SourceSpec("raw", str(data_dir), split, **common), out,
                      args.workers)
    if bad and args.on_error == "error":
      print("bin/build_data: error: bad rows (fix them, or pass --on_error skip to "
            "leave them out):\n  " + "\n  ".join(bad), file=sys.stderr)
      return 1
    if bad:
      print("skipped bad rows:\n  " + "\n  ".join(bad))
    if args.tfds:
      built = tfds_builder.build_tfds(data_dir, out / "tfds", args.tfds, **common)
      for split in splits:
        _prepare(SourceSpec("tfds", str(built), split, **common), out, args.workers)
      print(f"TFDS copy: {built} (--config.data_source=tfds --config.data_dir={built})")
  except (ValueError, FileNotFoundError) as e:  # DataError is a ValueError.
    print(f"bin/build_data: error: {e}", file=sys.stderr)
    return 1
  print(f"train with --config.prepared_dir={out}")
  return 0

