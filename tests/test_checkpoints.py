"""Resuming from orbax checkpoints (checkpoints.py): the newest step that restores; a
broken newer step moved aside and named, never deleted; an unfinished async save
ignored; no step that restores an error naming the directory. On a small state; the
training loop's resume past a broken step is in test_train.py (slow)."""

from __future__ import annotations

import logging
import shutil

import flax
import jax
import jax.numpy as jnp
import pytest

from conftest import break_checkpoint, leave_unfinished_save, warnings_of
from vldeformer_jax import checkpoints


@flax.struct.dataclass
class State:
  step: jax.Array
  w: jax.Array


def state_at(step: int) -> State:
  return State(jnp.int32(step), jnp.full((4, 8), float(step)))


def save_steps(directory, *steps: int) -> None:
  manager = checkpoints.make_manager(directory)
  for step in steps:
    assert checkpoints.save(manager, state_at(step), {"position": step})
  manager.wait_until_finished()
  manager.close()


def resume(directory) -> tuple[int, dict] | None:
  """(restored step, data state) through a fresh manager, as a resuming run opens it."""
  manager = checkpoints.make_manager(directory)
  try:
    restored = checkpoints.restore_latest(manager, state_at(0))
  finally:
    manager.close()
  if restored is None:
    return None
  state, data = restored
  assert float(state.w[0, 0]) == int(state.step)
  return int(state.step), data


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A checkpoints directory with steps 1 and 2."""
  directory = tmp_path_factory.mktemp("saved") / "checkpoints"
  save_steps(directory, 1, 2)
  return directory


@pytest.fixture
def work(saved, tmp_path):
  """A copy of `saved` inside a workdir."""
  directory = tmp_path / "work" / "checkpoints"
  shutil.copytree(saved, directory)
  return directory


def test_no_checkpoint_is_none(tmp_path):
  assert resume(tmp_path / "checkpoints") is None


def test_unfinished_async_save_is_not_a_step(work, caplog):
  """An async save cut short leaves `3.orbax-checkpoint-tmp-*`: not a step, not
  broken; the newest committed step restores without a word."""
  leave_unfinished_save(work, 2, 3)
  with caplog.at_level(logging.WARNING):
    assert resume(work) == (2, {"position": 2})
  assert warnings_of(caplog) == []
  assert not (work.parent / checkpoints.BROKEN_DIRNAME).exists()


def test_broken_newest_step_is_skipped_named_and_kept(work, caplog):
  """Issue 23: the newest step's files are damaged: resume from step 1, one warning
  naming step 2's directory and why; step 2 moved aside intact (not deleted), so a
  new save of step 2 is made (orbax skips a step that exists) and restores."""
  broken = break_checkpoint(work / "2")
  leave_unfinished_save(work, 1, 3)
  with caplog.at_level(logging.WARNING):
    assert resume(work) == (1, {"position": 1})
  kept = work.parent / checkpoints.BROKEN_DIRNAME / "2"
  assert warnings_of(caplog) == [
      f"skipped checkpoint {work / '2'}: it does not restore (JSONDecodeError: "
      f"Expecting value: line 1 column 51 (char 50)); moved to {kept}, resuming from "
      "step 1"]
  assert (kept / "state" / "_METADATA").read_bytes() == broken
  save_steps(work, 2)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert resume(work) == (2, {"position": 2})
  assert warnings_of(caplog) == []
  break_checkpoint(work / "2")  # Broken again: kept beside the first one.
  assert resume(work) == (1, {"position": 1})
  assert sorted(p.name for p in kept.parent.iterdir()) == ["2", "2.1"]


def test_no_step_that_restores_is_one_error_naming_the_directory(work):
  for step in (1, 2):
    break_checkpoint(work / str(step))
  with pytest.raises(ValueError) as info:
    resume(work)
  assert str(info.value) == (
      f"{work}: none of its 2 checkpoint(s) restores (the newest, step 2: "
      "JSONDecodeError: Expecting value: line 1 column 51 (char 50)); move the "
      "directory away to start afresh")
  assert sorted(p.name for p in work.iterdir()) == ["1", "2"]  # Nothing moved.
  assert not (work.parent / checkpoints.BROKEN_DIRNAME).exists()
