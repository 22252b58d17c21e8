"""The training loop's metrics: `metrics.jsonl` (one JSON object per logged step, what
`bin/plot` and the tests read), a TensorBoard event file beside it, and a log line.

The event file is written with TensorBoard's own record writer and protocol buffers
(the `tensorboard` package), which need neither TensorFlow nor PyTorch: clu's writers
(and TensorBoard's `EventFileWriter`) import all of TensorFlow, which made each
`bin/train` start ~2 s longer on a 2-core host (BENCHMARKS.md, "bin/train start-up")."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

log = logging.getLogger(__name__)


class EventFile:
  """A TensorBoard event file (`events.out.tfevents.<time>.<host>.<pid>`, the name
  TensorBoard looks for) of scalar summaries."""

  def __init__(self, logdir: Path):
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self._file = open(Path(logdir) / name, "wb")
    self._records = RecordWriter(self._file)
    self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event: event_pb2.Event) -> None:
    self._records.write(event.SerializeToString())
    self._file.flush()

  def scalars(self, step: int, scalars: dict[str, float]) -> None:
    values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
    self._write(event_pb2.Event(wall_time=time.time(), step=step,
                                summary=summary_pb2.Summary(value=values)))

  def close(self) -> None:
    self._file.close()


class MetricsLog:
  """metrics.jsonl + a TensorBoard event file in `workdir` + a log line per write;
  only the main process (`is_main`) writes files, every process logs."""

  def __init__(self, workdir: Path, is_main: bool):
    self.events = EventFile(workdir) if is_main else None
    self.jsonl = open(Path(workdir) / "metrics.jsonl", "a") if is_main else None

  def write(self, step: int, scalars: dict[str, float]) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    log.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in sorted(scalars.items())))
    if self.jsonl:
      self.events.scalars(step, scalars)
      self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
      self.jsonl.flush()

  def close(self) -> None:
    if self.jsonl:
      self.events.close()
      self.jsonl.close()
