"""Writes one benchmark's section into BENCHMARKS.md, with machine, date and command.

Each benchmark owns a section delimited by HTML comments, so re-running one benchmark
replaces its figures and leaves the others alone.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import sys
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
HEADER = ("# Benchmarks\n\nEach section is written by the script named in it; figures are "
          "medians of repeated runs measured side by side with the reference in one run.\n")


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  mem = ""
  try:
    kb = int(Path("/proc/meminfo").read_text().split()[1])
    mem = f", {kb / 2**20:.0f} GiB RAM"
  except (OSError, ValueError, IndexError):
    pass
  return f"{cpu}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}"


def write_section(name: str, title: str, body: str, extra_versions: str = "") -> None:
  """Replaces (or appends) the section `name` of BENCHMARKS.md."""
  command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  section = (f"<!-- BEGIN {name} -->\n## {title}\n\n"
             f"- machine: {machine()}\n- date: {stamp}\n- command: `{command}`\n"
             + (f"- versions: {extra_versions}\n" if extra_versions else "")
             + f"\n{body.strip()}\n<!-- END {name} -->")
  text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else HEADER
  pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->",
                       re.S)
  if pattern.search(text):
    text = pattern.sub(lambda _: section, text)
  else:
    text = text.rstrip() + "\n\n" + section + "\n"
  BENCHMARKS_MD.write_text(text)


def publish(name: str, title: str, body: str, write: bool, tag: str) -> None:
  """Prints a benchmark's figures and, with `write`, puts them into BENCHMARKS.md as the
  section `name` (`write_section`)."""
  print("\n" + body)
  if write:
    write_section(name, title, body)
    print(f"[{tag}] wrote the section into {BENCHMARKS_MD}")
