"""Orbax checkpoints of the train state plus the input pipeline's position.

Saves are asynchronous and atomic (orbax writes a temporary directory and renames it on
commit), so a kill -9 at any moment leaves the last committed step intact; a temporary
`<step>.orbax-checkpoint-tmp-*` directory is never a step. Kept: the last `keep`
checkpoints plus the best one by an eval metric. A committed step that does not
restore (a disk fault, a truncated file) is moved aside to `BROKEN_DIRNAME` beside the
checkpoints, never deleted, and the run resumes from the newest step that restores.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

log = logging.getLogger(__name__)

BROKEN_DIRNAME = "broken_checkpoints"  # beside the checkpoints directory


def make_manager(directory: str | Path, keep: int = 3, best_metric: str | None = None,
                 best_mode: str = "max", async_save: bool = True
                 ) -> ocp.CheckpointManager:
  policies = [cm.LatestN(n=keep)]
  if best_metric:
    policies.append(cm.BestN(
        get_metric_fn=lambda metrics: metrics[best_metric],
        reverse=best_mode == "min", n=1, keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=cm.AnyPreservationPolicy(policies),
      enable_async_checkpointing=async_save, create=True)
  return ocp.CheckpointManager(Path(directory).absolute(), options=options,
                               item_names=("state", "data"))


def save(manager: ocp.CheckpointManager, state: Any, data_state: dict,
         metrics: dict[str, float] | None = None, force: bool = False) -> bool:
  step = int(jax.device_get(state.step))
  if step in manager.all_steps():
    return False
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
                      metrics=metrics, force=force)


def restore_latest(manager: ocp.CheckpointManager, target: Any
                   ) -> tuple[Any, dict] | None:
  """(state, data_state) of the newest committed checkpoint that restores, laid out like
  `target` (a state with the wanted shardings), or None when there is none.

  A newer step that does not restore is moved aside (`_move_aside`: kept, and out of
  the way of the run's later saves at that step, which orbax would skip) with one
  warning naming its directory and why. When no step restores (also what a changed
  model looks like), nothing is moved and a ValueError names the directory.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  directory = Path(manager.directory)
  failed: list[tuple[int, str]] = []
  for step in steps:
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds
      failed.append((step, _reason(e)))
      continue
    for bad, why in failed:
      moved = _move_aside(directory, bad)
      log.warning("skipped checkpoint %s: it does not restore (%s); moved to %s, "
                  "resuming from step %d", directory / str(bad), why, moved, step)
    if failed:
      manager.reload()
    log.info("restored checkpoint at step %d from %s", step, directory)
    return restored["state"], restored["data"]
  newest, why = failed[0]
  raise ValueError(f"{directory}: none of its {len(steps)} checkpoint(s) restores (the "
                   f"newest, step {newest}: {why}); move the directory away to start "
                   "afresh")


def _reason(error: Exception, limit: int = 200) -> str:
  """An exception as one short line: its type and the first line of its message."""
  lines = str(error).strip().splitlines()
  text = f"{type(error).__name__}: {lines[0] if lines else ''}"
  return text if len(text) <= limit else text[:limit] + "..."


def _move_aside(directory: Path, step: int) -> Path:
  """Moves step `step`'s directory to BROKEN_DIRNAME beside `directory` (process 0,
  then every process waits for it); returns where it went."""
  broken = directory.parent / BROKEN_DIRNAME
  target, n = broken / str(step), 0
  while target.exists():  # An earlier run's broken step of the same number.
    n += 1
    target = broken / f"{step}.{n}"
  if jax.process_index() == 0:
    broken.mkdir(parents=True, exist_ok=True)
    shutil.move(directory / str(step), target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
  return target
