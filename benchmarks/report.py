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
import statistics
import sys
from pathlib import Path
from typing import Callable

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


def alternate(rounds: int, sides: tuple[str, str], run: Callable[[str, int], tuple[float, float]],
              tag: str) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
  """`run(side, round)` -> (wall s, CPU s), once per side per round, the order of the
  two sides alternating between rounds; (walls, CPU times) per side, each printed."""
  walls: dict[str, list[float]] = {side: [] for side in sides}
  cpus: dict[str, list[float]] = {side: [] for side in sides}
  for r in range(rounds):
    for side in (sides if r % 2 == 0 else sides[::-1]):
      wall, cpu = run(side, r)
      walls[side].append(wall)
      cpus[side].append(cpu)
      print(f"[{tag}] round {r} {side}: {wall:.1f} s, {cpu:.1f} CPU s", flush=True)
  return walls, cpus


def two_sides(walls: dict[str, list[float]], cpus: dict[str, list[float]], new: str,
              old: str, per: str) -> list[str]:
  """The markdown of a side-by-side timing: each side's runs, median wall and CPU
  seconds and cores (CPU / wall), then `new` / `old` as ratios and seconds saved `per`."""
  med = {k: statistics.median(v) for k, v in walls.items()}
  cpu_med = {k: statistics.median(v) for k, v in cpus.items()}
  return [
      "| side | runs (s) | median s | median CPU s | cores |", "|---|---|---|---|---|",
      *(f"| {k} | {', '.join(f'{x:.1f}' for x in walls[k])} | {med[k]:.1f} | "
        f"{cpu_med[k]:.1f} | {statistics.median(c / w for c, w in zip(cpus[k], walls[k])):.2f} |"
        for k in (new, old)),
      "", f"- {new} / {old}: wall **{med[new] / med[old]:.2f}** "
      f"({med[old] - med[new]:.1f} s less {per}), CPU "
      f"**{cpu_med[new] / cpu_med[old]:.2f}** "
      f"({cpu_med[old] - cpu_med[new]:.1f} CPU s less)."]
