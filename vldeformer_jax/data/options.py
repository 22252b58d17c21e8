"""The data keys of a run's config, typed and checked: the part every reader shares.

One concern: turning config values into checked options, each bad value a ValueError
that names the flag that sets it (`--config.KEY=VALUE: why`), as the trainer's own
checks do. `SourceOptions` holds the keys that say which data to read and how
(data_source, data_dir, feature_dim, box_order, on_error) and how many objects of an
image are kept (max_regions, cut alike in training and evaluation); it checks itself
when built, from a config (`config_values`) or directly. The training pipeline's
options (`pipeline.PipelineOptions`) and the eval set's (`eval_set.EvalOptions`)
extend it with their own keys and checks. The config is the one home of the
trainer's defaults; these dataclasses hold defaults only for direct construction.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vldeformer_jax.data import errors, readers
from vldeformer_jax.data.sources import DATA_SOURCES, SourceSpec


# ----------------------------------------------------------------------------------
# Checks of one field of a frozen options dataclass, from its `__post_init__`: a bad
# value is named as the config key (`key`, default the field's name), a good one is
# stored as its plain Python type.


def config_error(key: str, value: Any, why: str) -> ValueError:
  """The error for a bad `config.KEY`, worded as the flag that sets it."""
  return ValueError(f"--config.{key}={value!r}: {why}")


def set_field(options: Any, field: str, value: Any) -> None:
  """Stores a checked value on a frozen dataclass."""
  object.__setattr__(options, field, value)


def require_int(options: Any, field: str, minimum: int = 0, key: str | None = None,
                maximum: int | None = None) -> None:
  """`options.FIELD` is an integer >= `minimum` (and <= `maximum`; bools refused)."""
  value = getattr(options, field)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise config_error(key or field, value, f"must be an integer >= {minimum}")
  if maximum is not None and value > maximum:
    raise config_error(key or field, value, f"must be an integer <= {maximum}")
  set_field(options, field, int(value))


def require_choice(options: Any, field: str, choices: Sequence[str]) -> None:
  """`options.FIELD` is one of `choices`."""
  value = getattr(options, field)
  if value not in choices:
    raise config_error(field, value, f"must be one of {tuple(choices)}")


def require_ratio(options: Any, field: str) -> None:
  """`options.FIELD` is a number in [0, 1] (bools refused)."""
  value = getattr(options, field)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
    raise config_error(field, value, "must be a number in [0, 1]")
  set_field(options, field, float(value))


def require_flag(options: Any, field: str) -> None:
  """`options.FIELD` is True or False."""
  value = getattr(options, field)
  if not isinstance(value, (bool, np.bool_)):
    raise config_error(field, value, "must be True or False")
  set_field(options, field, bool(value))


# ----------------------------------------------------------------------------------
# The keys every reader of the data shares.


@dataclasses.dataclass(frozen=True, kw_only=True)
class SourceOptions:
  """Which data to read and how, and how many objects per image; checked when built."""

  data_dir: str
  max_regions: int  # Objects kept per image (the model's max_regions).
  data_source: str = "raw"  # 'raw' released layout, or 'tfds' (see `sources.py`).
  feature_dim: int = readers.DEFAULT_FEATURE_DIM
  box_order: str = "auto"
  on_error: str = "error"

  def __post_init__(self):
    if not self.data_dir:
      raise config_error("data_dir", self.data_dir, "is not set")
    if not Path(self.data_dir).is_dir():
      raise config_error("data_dir", self.data_dir, "is not a directory")
    set_field(self, "data_dir", str(self.data_dir))
    require_choice(self, "data_source", DATA_SOURCES)
    require_int(self, "feature_dim", minimum=readers.NUM_BOX_DIMS + 1)
    require_choice(self, "box_order", ("auto",) + readers.BOX_ORDERS)
    require_choice(self, "on_error", errors.ON_ERROR_POLICIES)
    require_int(self, "max_regions", minimum=1)

  def spec(self, split: str) -> SourceSpec:
    """The `SourceSpec` of a split read with these options."""
    return SourceSpec(self.data_source, self.data_dir, split, self.feature_dim,
                      self.box_order, self.on_error)


def config_values(config: Any, options_type: type) -> dict[str, Any]:
  """The value of each field of `options_type` (a `SourceOptions` dataclass) in a config
  (a trainer's `ConfigDict`): a field is named as its config key."""
  return {field.name: config[field.name] for field in dataclasses.fields(options_type)}
