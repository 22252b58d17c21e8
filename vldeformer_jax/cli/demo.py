"""What scripts/demo.sh asks of Python: that its output directory is its own.

  python -m vldeformer_jax.cli.demo OUT_DIR    # exit 1, one line, when it is not

The demo writes everything into one directory ($VLD_DEMO_DIR, default demo_output) and
re-runs resume there, so a directory it made is its own, all of it: the marker file
`MARKER` says so (a directory from before the marker: one holding only names the demo
writes). A new or empty directory gets the marker; any other is refused and left
untouched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from vldeformer_jax import cli, fileio

MARKER = ".vldeformer_demo"
# What scripts/demo.sh writes into its directory.
OUTPUTS = frozenset({
    "data", "minilm", "workdir", "workdir_no_negatives", "eval_before.json",
    "eval_after.json", "eval_after_no_negatives.json", "eval_after_tags_only.json",
    "index", "curves.png", "recall.png", "report.html"})


def is_demo_dir(path: Path) -> bool:
  """Whether `path` is the demo's: its marker, or only the names the demo writes (and
  hidden leftovers of atomic writes)."""
  return (path / MARKER).is_file() or all(
      e.name in OUTPUTS or e.name.startswith(".") for e in path.iterdir())


def claim(out: str) -> None:
  """Checks that `out` is new, empty or the demo's, then marks it as the demo's."""
  path = fileio.check_output(out, is_dir=True, what="a scripts/demo.sh output",
                             is_own=is_demo_dir, option="VLD_DEMO_DIR", overwrite=None)
  path.mkdir(parents=True, exist_ok=True)
  (path / MARKER).write_text("written by scripts/demo.sh: everything here is its own\n")


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m vldeformer_jax.cli.demo",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("out", help="the demo's output directory")
  args = p.parse_args(argv)
  return cli.run("scripts/demo.sh", lambda: claim(args.out))


if __name__ == "__main__":
  sys.exit(main())
