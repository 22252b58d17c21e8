"""Timing several callables side by side, and the memory they take while they run.

`time_blocks` is the one alternating-block timer of the speed study and the benchmarks:
every callable runs the same calls, in rounds of one block each, the order rotating,
so that noise from other processes on a shared machine hits all of them alike.
`PeakRss` samples the process's resident memory while a block runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence


def rss_bytes() -> int:
  """Resident set size of this process."""
  try:
    import psutil
    return int(psutil.Process().memory_info().rss)
  except ImportError:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
  """Samples the process RSS in a thread while the `with` block runs; `peak_delta` is
  the highest RSS seen minus the RSS at entry (bytes)."""

  def __init__(self, interval_s: float = 0.01):
    self.interval_s = interval_s
    self.start = self.peak = 0
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _sample(self) -> None:
    while not self._stop.wait(self.interval_s):
      self.peak = max(self.peak, rss_bytes())

  def __enter__(self) -> "PeakRss":
    self.start = self.peak = rss_bytes()
    self._stop.clear()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, rss_bytes())

  @property
  def peak_delta(self) -> int:
    return self.peak - self.start


@dataclasses.dataclass
class BlockTimes:
  """Per callable, in call order: wall seconds, outputs, and the cores kept busy (this
  process's CPU time / wall time) of each timed call; with `peak_rss`, the highest RSS
  growth over any of its blocks (bytes)."""
  seconds: dict[str, list[float]]
  outputs: dict[str, list[Any]]
  cores: dict[str, list[float]]
  peak_rss: dict[str, int]


def time_blocks(fns: Mapping[str, Callable[..., Any]], calls: Sequence[tuple],
                rounds: int, warm: int = 0, peak_rss: bool = False) -> BlockTimes:
  """Runs `fn(*args)` for every `args` in `calls` through every fn, timing each call.

  The calls are cut into `rounds` blocks in order (the last one may be shorter); each
  round runs one block per fn, the order of the fns rotating each round. Blocks rather
  than call-by-call alternation: a library's idle worker threads (OpenMP, Eigen) keep
  spinning for a while after a call returns and would take a core from the other side
  (MiniLM's PyTorch latency on 2 cores: 38 ms interleaved with ours, 9 ms alone).
  Each block first makes `warm` untimed calls with its first args; with `peak_rss`, a
  `PeakRss` samples memory while a block runs (a thread: leave it off for timings it
  would disturb).
  """
  names = list(fns)
  out = BlockTimes({k: [] for k in names}, {k: [] for k in names}, {k: [] for k in names},
                   {k: 0 for k in names})
  per = -(-len(calls) // max(rounds, 1))
  for r, start in enumerate(range(0, len(calls), per)):
    block = calls[start:start + per]
    for name in names[r % len(names):] + names[:r % len(names)]:
      fn = fns[name]
      for _ in range(warm):
        fn(*block[0])
      with PeakRss() if peak_rss else contextlib.nullcontext() as rss:
        for args in block:
          c0, t0 = time.process_time(), time.perf_counter()
          result = fn(*args)
          dt = time.perf_counter() - t0
          out.seconds[name].append(dt)
          out.cores[name].append((time.process_time() - c0) / max(dt, 1e-9))
          out.outputs[name].append(result)
      if peak_rss:
        out.peak_rss[name] = max(out.peak_rss[name], rss.peak_delta)
  return out
