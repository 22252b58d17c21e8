"""Problems in data files and the `on_error` policy that handles them.

One concern: how a bad row, entry or file is reported. A `DataError` names the file,
the line (or entry), the image id and a machine-readable kind, and pickles whole, so a
worker process can hand it back. Under `on_error="error"` it is raised; under "skip"
it is counted in a `SkipReport` and logged (`apply_policy`), never dropped silently.
Every data module (readers, TSV files, sources, prepared splits) reports through it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from typing import Any, Literal, Sequence

logger = logging.getLogger(__name__)

OnError = Literal["error", "skip"]
ON_ERROR_POLICIES: tuple[str, ...] = ("error", "skip")

class DataError(ValueError):
  """A problem in a data file; the message names the file, line or entry, and kind.

  Attributes:
    path: the offending file.
    kind: a short machine-readable category ("bad_base64", "feature_size", ...).
    problem: what is wrong, in words.
    line: 1-based line number in `path`, when the problem sits on a line.
    where: another locator (e.g. "entry 3", "object 2"), when there are no lines.
    key: the image id concerned, when known.
  """

  def __init__(self, path: str | os.PathLike, problem: str, *, kind: str,
               line: int | None = None, where: str | None = None,
               key: str | None = None):
    self.path = str(path)
    self.problem = problem
    self.kind = kind
    self.line = line
    self.where = where
    self.key = key
    location = self.path
    if line is not None:
      location += f", line {line}"
    if where:
      location += f", {where}"
    if key is not None:
      location += f" (image id {key})"
    super().__init__(f"{location}: {problem} [{kind}]")

  def __reduce__(self):
    return (_rebuild_data_error, (self.path, self.problem, self.kind, self.line,
                                  self.where, self.key))


def _rebuild_data_error(path, problem, kind, line, where, key) -> DataError:
  return DataError(path, problem, kind=kind, line=line, where=where, key=key)


@dataclasses.dataclass
class SkipReport:
  """What the "skip" policy dropped: counts per kind and the first messages.

  The same problem (kind, file, line, image id) is counted once however often it is
  met, so iterating a split twice does not double the counts.
  """

  max_messages: int = 20
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  messages: list[str] = dataclasses.field(default_factory=list)
  _seen: set = dataclasses.field(default_factory=set, repr=False)

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def record(self, error: DataError) -> None:
    signature = (error.kind, error.path, error.line, error.where, error.key)
    if signature in self._seen:
      return
    self._seen.add(signature)
    self.counts[error.kind] += 1
    if len(self.messages) < self.max_messages:
      self.messages.append(str(error))
      logger.warning("Skipping bad data: %s", error)
    elif len(self.messages) == self.max_messages and self.total == self.max_messages + 1:
      logger.warning("More bad data is being skipped; see the summary at the end.")

  def skipped_ids(self, path: str | os.PathLike) -> set[str]:
    """The image ids whose problems in `path` were skipped."""
    return {key for _, p, _, _, key in self._seen if p == str(path) and key is not None}

  def summary(self) -> str:
    if not self.total:
      return "no bad data skipped"
    kinds = ", ".join(f"{kind}: {n}" for kind, n in sorted(self.counts.items()))
    lines = [f"skipped {self.total} problem(s) ({kinds})"]
    lines += [f"  {m}" for m in self.messages]
    if self.total > len(self.messages):
      lines.append(f"  ... and {self.total - len(self.messages)} more")
    return "\n".join(lines)

  def log(self, level: int = logging.WARNING) -> None:
    logger.log(level, "Data skip report: %s", self.summary())


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
  """A ValueError naming the option `name` unless `value` is one of `choices`."""
  if value not in choices:
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def apply_policy(error: DataError, on_error: str, report: SkipReport | None) -> None:
  """Applies the policy: raise for "error", record (and log) for "skip"."""
  if on_error == "error":
    raise error
  if report is None:  # Callers pass one; never drop a problem unseen.
    logger.warning("Skipping bad data: %s", error)
    return
  report.record(error)
