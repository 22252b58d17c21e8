"""What `bin/train` checks before anything is built or compiled: that the workdir is
new, empty or a workdir to resume (never replaced), that the batches in flight fit in
the host's memory, and that a resumed workdir holds the model this run starts from.
Each refusal is one ValueError naming the flag and the path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vldeformer_jax.config import ModelConfig
from vldeformer_jax.fileio import check_output
from vldeformer_jax.model_dir import CONFIG_FILE, flatten_shapes, is_model_dir

Config = Any  # anything with config.defaults()' keys as attributes


WORKDIR = "a bin/train workdir"


def is_workdir(path: Path) -> bool:
  """Whether `path` is a bin/train workdir: its checkpoints/ and its metrics.jsonl or
  config.json."""
  return (path / "checkpoints").is_dir() and any(
      (path / name).is_file() for name in ("metrics.jsonl", "config.json"))


def check_workdir(workdir: str | Path) -> Path:
  """`fileio.check_output` for a workdir: new, empty, or a workdir (resumed); never
  replaced, so anything else is refused whatever the flags."""
  return check_output(workdir, is_dir=True, what=WORKDIR, is_own=is_workdir,
                      option="--workdir", overwrite=None)


def host_memory_bytes() -> int:
  """This machine's memory (physical pages), or its cgroup's limit when lower."""
  total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  try:
    limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
  except OSError:
    return total
  return min(total, int(limit)) if limit.isdigit() else total


def input_batch_bytes(config: Config, processes: int) -> int:
  """Bytes of one process's share of a global batch as the input pipeline builds it
  (`pipeline.TEXT_KEYS` int32 per text and tag position, float16 regions, an int32
  region mask), twice with the hard negatives."""
  from vldeformer_jax.data.pipeline import TEXT_KEYS  # data readers stay out of imports.
  rows = config.batch_size // processes
  ids = len(TEXT_KEYS) * 4 * (config.max_text_len + config.max_tag_len)
  regions = config.max_regions * (2 * config.feature_dim + 4)
  return rows * (ids + regions) * (2 if config.hard_negatives else 1)


def _size(n: float) -> str:
  """`n` bytes, in the largest binary unit below it."""
  for unit in ("bytes", "KiB", "MiB", "GiB"):
    if n < 1024:
      return f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:,.1f} TiB"


def check_batch_fits(config: Config, processes: int,
                     memory: int | None = None) -> None:
  """Refuses, before anything is built, a batch size whose batches in flight (one
  per pipeline worker, the prefetched ones and the one the step holds) alone exceed
  the host's memory (`memory`, default `host_memory_bytes()`)."""
  memory = host_memory_bytes() if memory is None else memory
  workers = config.pipeline_processes or config.pipeline_workers
  in_flight = workers + config.prefetch_batches + 1
  batch = input_batch_bytes(config, processes)
  if batch * in_flight > memory:
    negatives = ", twice for the hard negatives" if config.hard_negatives else ""
    raise ValueError(
        f"--config.batch_size={config.batch_size} does not fit in memory: "
        f"{in_flight} batches in flight x {_size(batch)} each "
        f"({config.batch_size // processes} rows x {config.max_regions} regions x "
        f"{config.feature_dim} float16 dims{negatives}) need "
        f"{_size(batch * in_flight)}, this machine has {_size(memory)}; lower "
        "--config.batch_size (or --config.pipeline_workers, --config.prefetch_batches)")


def check_resumes_same_model(workdir: Path, model_config: ModelConfig,
                             config: Config) -> None:
  """Refuses to resume a workdir whose checkpoints hold another architecture than
  this run's model, as the model directory saved beside them says: orbax would fail
  in the middle of the restore and leave its reads pending, to fail again as the
  interpreter exits."""
  saved = workdir / "model"
  if not (workdir / "checkpoints").is_dir() or not is_model_dir(saved):
    return
  stored = ModelConfig.from_json(saved / CONFIG_FILE)
  have = {k: v.shape for k, v in flatten_shapes(stored).items()}
  want = {k: v.shape for k, v in flatten_shapes(model_config).items()}
  if have == want:
    return
  fields = [f for f in ("vocab_size", "hidden_size", "num_hidden_layers",
                        "num_attention_heads", "intermediate_size", "img_feature_dim",
                        "max_position_embeddings", "type_vocab_size", "num_labels",
                        "use_img_layernorm")
            if getattr(stored, f) != getattr(model_config, f)]
  describe = lambda c: ", ".join(f"{f}={getattr(c, f)}" for f in fields) or "other shapes"
  source = (f"--config.init_model={config.init_model}" if config.init_model
            else "--config.model")
  raise ValueError(
      f"--workdir {workdir}: its checkpoints hold another model ({describe(stored)}) "
      f"than this run's {source} ({describe(model_config)}); resume with the model "
      "it was started with, or use another --workdir")
