"""Building batches ahead, in order, on worker threads or worker processes.

One concern: running a pure `build(position)` concurrently and handing its results
out in stream order. `OrderedPrefetcher` keeps a few builds in flight on any
executor. Worker processes (`config.pipeline_processes > 0`, spawned) each hold their
own batch builder, made once per process from a picklable factory (the training
pipeline over the same prepared split), and hand each batch over in one new
shared-memory block, which the main process copies out of and frees. Why threads are
the default and when processes pay: docs/input_pipeline.md.
"""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
from multiprocessing import shared_memory
from typing import Any, Callable

import numpy as np


# ----------------------------------------------------------------------------------
# Builds in flight, results in order.


class OrderedPrefetcher:
  """Submits `build(start + k * step)` for k = 0, 1, ... to `executor`, in order.

  Keeps `depth` builds in flight; `next()` returns `finish(result)` in order and
  re-raises a build's exception as it was raised. `close()` cancels what has not
  started and passes the results of builds that did to `discard` (shared memory to
  free), then shuts the executor down.
  """

  def __init__(self, executor: concurrent.futures.Executor, build: Callable[[int], Any],
               start: int, step: int, depth: int,
               finish: Callable[[Any], Any] = lambda r: r,
               discard: Callable[[Any], None] | None = None):
    self._executor = executor
    self._build = build
    self._next = int(start)
    self._step = int(step)
    self._depth = depth
    self._finish = finish
    self._discard = discard
    self._pending: collections.deque[concurrent.futures.Future] = collections.deque()

  def _fill(self) -> None:
    while len(self._pending) < self._depth:
      self._pending.append(self._executor.submit(self._build, self._next))
      self._next += self._step

  def next(self) -> Any:
    self._fill()
    result = self._finish(self._pending.popleft().result())
    self._fill()
    return result

  def close(self) -> None:
    for future in self._pending:
      future.cancel()
    if self._discard is not None:
      for future in self._pending:
        if not future.cancelled() and future.exception() is None:
          self._discard(future.result())
    self._pending.clear()
    self._executor.shutdown(wait=False, cancel_futures=True)


def thread_prefetcher(build: Callable[[int], Any], start: int, step: int,
                      threads: int, ahead: int) -> OrderedPrefetcher:
  """`build` on `threads` threads, with `threads + ahead` builds in flight."""
  executor = concurrent.futures.ThreadPoolExecutor(max_workers=threads,
                                                   thread_name_prefix="vld-input")
  return OrderedPrefetcher(executor, build, start, step, threads + ahead)


# ----------------------------------------------------------------------------------
# Worker processes: each holds its own builder and hands a batch over in one
# shared-memory block, which the main process copies out of and frees.


_WORKER: Any = None  # This process's builder: has `build_batch(position)`.


def _init_worker(make_builder: Callable[[], Any]) -> None:
  """The process pool's initializer: makes this worker's builder once."""
  global _WORKER
  _WORKER = make_builder()


def _build_shared(position: int) -> tuple[str, list[tuple]]:
  """`build_batch(position)` in a worker, written to a new shared-memory block."""
  batch = _WORKER.build_batch(position)
  arrays = [(part, key, v) for part in batch for key, v in batch[part].items()]
  block = shared_memory.SharedMemory(create=True,
                                     size=max(sum(v.nbytes for *_, v in arrays), 1))
  layout, offset = [], 0
  for part, key, value in arrays:
    np.ndarray(value.shape, value.dtype, block.buf, offset)[...] = value
    layout.append((part, key, value.shape, value.dtype.str, offset))
    offset += value.nbytes
  block.close()  # The main process unlinks it (the resource tracker is shared).
  return block.name, layout


def _take_shared(result: tuple[str, list[tuple]]) -> dict[str, dict[str, np.ndarray]]:
  """The batch `_build_shared` wrote, copied out; the block is freed."""
  name, layout = result
  block = shared_memory.SharedMemory(name=name)
  try:
    batch: dict[str, dict[str, np.ndarray]] = {}
    for part, key, shape, dtype, offset in layout:
      batch.setdefault(part, {})[key] = np.ndarray(shape, dtype, block.buf,
                                                   offset).copy()
  finally:
    block.close()
    block.unlink()
  return batch


def _free_shared(result: tuple[str, list[tuple]]) -> None:
  """Frees the block of a batch that will not be taken (the prefetcher closed)."""
  block = shared_memory.SharedMemory(name=result[0])
  block.close()
  block.unlink()


def process_prefetcher(make_builder: Callable[[], Any], start: int, step: int,
                       processes: int, ahead: int) -> OrderedPrefetcher:
  """`make_builder().build_batch` in `processes` processes, batches in shared memory;
  `processes + ahead` builds in flight. `make_builder` must pickle."""
  # Spawned, not forked: this process holds threads (JAX, TF, tokenizers).
  executor = concurrent.futures.ProcessPoolExecutor(
      processes, mp_context=multiprocessing.get_context("spawn"),
      initializer=_init_worker, initargs=(make_builder,))
  return OrderedPrefetcher(executor, _build_shared, start, step, processes + ahead,
                           _take_shared, _free_shared)
