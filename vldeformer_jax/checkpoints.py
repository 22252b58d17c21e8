"""Orbax checkpoints of the train state plus the input pipeline's position.

Saves are asynchronous and atomic (orbax writes a temporary directory and renames it on
commit), so a kill -9 at any moment leaves the last committed step intact. Kept: the
last `keep` checkpoints plus the best one by an eval metric.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

log = logging.getLogger(__name__)


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
  """(state, data_state) of the newest committed checkpoint, laid out like `target`
  (a state with the wanted shardings), or None when there is none."""
  step = manager.latest_step()
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
  log.info("restored checkpoint at step %d from %s", step, manager.directory)
  return restored["state"], restored["data"]
