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
import re
from pathlib import Path
from typing import Sequence

from vldeformer_jax import cli, fileio
from vldeformer_jax.data import errors, prepared, readers, sources, tfds_builder
from vldeformer_jax.data.sources import SourceSpec

# What --out holds after a build: prepared splits (`prepared.split_dir`:
# <source>-<split>-<path hash>-<key>) and the TFDS copy.
_PREPARED_SPLIT = re.compile(rf"^({'|'.join(sources.DATA_SOURCES)})-.+-[0-9a-f]{{8}}-"
                             r"[0-9a-f]{16}$")
TFDS_DIR = "tfds"


def is_prepared_root(path: Path) -> bool:
  """Whether `path` holds only what bin/build_data writes: prepared splits (finished
  or not) and the TFDS copy."""
  return all(entry.is_dir() and (
      entry.name == TFDS_DIR or _PREPARED_SPLIT.match(entry.name) and any(
          (entry / name).is_file() for name in ("meta.json", "chunk_images.json")))
             for entry in path.iterdir())


def _splits(data_dir: Path, wanted: str | None) -> list[str]:
  if wanted:
    return [s for s in wanted.split(",") if s]
  found = {p.name.split("_captions.")[0] for p in data_dir.glob("*_captions.*")}
  return sorted(found)


def _prepare(spec: SourceSpec, out: Path, workers: int) -> list[str]:
  """Prepares one split; returns its bad rows as messages."""
  split = prepared.PreparedSplit(prepared.prepare(spec, out, workers=workers,
                                                  progress=True), spec)
  if not split.image_ids:
    raise sources.empty_split_error(spec.split, spec.data_dir)
  print(f"{spec.data_source} {spec.split}: {len(split.image_ids)} images, "
        f"{int(split.num_captions.sum())} captions, {len(split.vocab)} tags -> "
        f"{split.path}")
  return list(prepared.summary(split))


def _build(args: argparse.Namespace, splits: list[str]) -> int:
  data_dir, out = Path(args.data_dir), Path(args.out)
  # Resumed and added to, never replaced: a foreign non-empty directory is refused.
  fileio.check_output(out, is_dir=True, what="a bin/build_data output",
                      is_own=is_prepared_root, option="--out", overwrite=None)
  common = dict(feature_dim=args.feature_dim, box_order=args.box_order,
                on_error=args.on_error)
  bad = []
  for split in splits:
    bad += _prepare(SourceSpec("raw", str(data_dir), split, **common), out, args.workers)
  if bad and args.on_error == "error":
    return cli.fail("build_data", "bad rows (fix them, or pass --on_error skip to leave "
                    "them out):\n  " + "\n  ".join(bad))
  if bad:
    print("skipped bad rows:\n  " + "\n  ".join(bad))
  if args.tfds:
    built = tfds_builder.build_tfds(data_dir, out / TFDS_DIR, args.tfds, **common)
    for split in splits:
      _prepare(SourceSpec("tfds", str(built), split, **common), out, args.workers)
    print(f"TFDS copy: {built} (--config.data_source=tfds --config.data_dir={built})")
  print(f"train with --config.prepared_dir={out}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  p = cli.parser("build_data", __doc__)
  p.add_argument("--data_dir", required=True, help="the released layout (RAW)")
  p.add_argument("--out", required=True,
                 help="where the prepared splits go (DIR: new, empty, or an earlier "
                      "output, which is resumed)")
  p.add_argument("--splits", default=None,
                 help="comma-separated (default: every split with a captions file)")
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                 help="processes reading and tagging (default: the CPU count; 0: this "
                      "process)")
  p.add_argument("--feature_dim", type=int, default=readers.DEFAULT_FEATURE_DIM)
  p.add_argument("--box_order", default="auto",
                 choices=("auto",) + readers.BOX_ORDERS)
  p.add_argument("--on_error", default="error", choices=errors.ON_ERROR_POLICIES)
  p.add_argument("--tfds", metavar="CONFIG", default=None,
                 choices=[c.name for c in tfds_builder.BUILDER_CONFIGS],
                 help="also build the TFDS copy (config coco, flickr30k or demo) in "
                      "DIR/tfds and prepare its splits")
  args = p.parse_args(argv)
  if args.workers < 0:
    p.error(f"--workers must be >= 0, got {args.workers}")
  if args.feature_dim < 1:
    p.error(f"--feature_dim must be >= 1, got {args.feature_dim}")
  logging.basicConfig(level=logging.WARNING, format="%(message)s")
  data_dir = Path(args.data_dir)
  if (error := cli.missing_dir({"--data_dir": args.data_dir})):
    return cli.fail("build_data", error)
  splits = _splits(data_dir, args.splits)
  if not splits:
    return cli.fail("build_data", f"{data_dir}: no {{split}}_captions.pt/.json file")
  return cli.run("build_data", lambda: _build(args, splits))
