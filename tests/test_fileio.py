"""The one rule for output paths (`fileio.check_output`), the marker our file outputs
carry (`is_generated`) and the atomic writes: nothing that is not a tool's own earlier
output is replaced without --overwrite, and a replacement is one step."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vldeformer_jax import fileio
from vldeformer_jax.fileio import OutputError, check_output

WHAT = "a thing (test)"


def own_marker(path: Path) -> bool:
  return (path / "MINE").is_file()


def files_of(path: Path) -> dict[str, bytes]:
  return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
          if p.is_file()}


def test_new_empty_and_own_outputs_pass(tmp_path):
  for path in (tmp_path / "new", tmp_path / "deeper" / "new"):
    assert check_output(path, is_dir=True, what=WHAT, is_own=own_marker) == path
  (tmp_path / "empty").mkdir()
  check_output(tmp_path / "empty", is_dir=True, what=WHAT, is_own=own_marker)
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "MINE").write_text("")
  check_output(tmp_path / "mine", is_dir=True, what=WHAT, is_own=own_marker)
  check_output(tmp_path / "mine", is_dir=True, what=WHAT, is_own=own_marker,
               overwrite=None)  # a resumed output


def test_foreign_output_is_refused_naming_the_path_and_the_flag(tmp_path):
  foreign = tmp_path / "yours"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("keep me")
  before = files_of(foreign)
  with pytest.raises(OutputError, match=rf"^--out {foreign}: exists and is not a thing "
                     r"\(test\); pass --overwrite to replace it$"):
    check_output(foreign, is_dir=True, what=WHAT, is_own=own_marker, option="--out")
  # A tool that resumes its output never replaces another's: it asks for another path.
  with pytest.raises(OutputError, match=rf"^--workdir {foreign}: not empty and not a "
                     r"thing \(test\); it is never replaced: give --workdir a new"):
    check_output(foreign, is_dir=True, what=WHAT, is_own=own_marker,
                 option="--workdir", overwrite=None)
  check_output(foreign, is_dir=True, what=WHAT, is_own=own_marker, overwrite=True)
  assert files_of(foreign) == before  # checking writes nothing
  (tmp_path / "theirs.json").write_text('{"a": 1}')
  with pytest.raises(OutputError, match="theirs.json: exists and is not"):
    check_output(tmp_path / "theirs.json", is_dir=False, what=WHAT)


def test_file_for_a_directory_and_the_reverse_are_refused_whatever_the_flag(tmp_path):
  (tmp_path / "file").write_text("x")
  (tmp_path / "dir").mkdir()
  for overwrite in (False, True, None):
    with pytest.raises(OutputError, match="file: is a file; expected a thing"):
      check_output(tmp_path / "file", is_dir=True, what=WHAT, overwrite=overwrite)
    with pytest.raises(OutputError, match="dir: is a directory; expected a thing"):
      check_output(tmp_path / "dir", is_dir=False, what=WHAT, overwrite=overwrite)
    with pytest.raises(OutputError, match=f"{tmp_path / 'file'} is a file, not a "
                       "directory"):
      check_output(tmp_path / "file" / "a" / "b", is_dir=True, what=WHAT,
                   overwrite=overwrite)
  assert (tmp_path / "file").read_text() == "x"


def test_a_place_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
  locked = tmp_path / "locked"
  locked.mkdir()
  if os.geteuid() == 0:
    # Root writes through a mode of 0o500 (only a read-only filesystem stops it), so
    # here the permission check itself is made to say no.
    monkeypatch.setattr(fileio.os, "access", lambda path, mode: Path(path) != locked)
  else:
    locked.chmod(0o500)
  try:
    with pytest.raises(OutputError, match=rf"--out {locked / 'out'}: cannot write in "
                       rf"{locked} \(permission denied\)"):
      check_output(locked / "out", is_dir=True, what=WHAT, option="--out")
    with pytest.raises(OutputError, match="cannot write in"):
      check_output(locked, is_dir=True, what=WHAT, is_own=lambda p: True)  # resumed
  finally:
    locked.chmod(0o755)


def test_our_file_outputs_carry_the_marker(tmp_path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from vldeformer_jax import drawing, plots
  assert fileio.generator("bin/plot") == "vldeformer_jax bin/plot"
  ours = plots.save(plt.figure(), tmp_path / "ours.png")
  plt.figure().savefig(tmp_path / "theirs.png")  # matplotlib's own "Software" text
  fileio.write_marked_json(tmp_path / "ours.json", {"x": 1}, "bin/eval")
  (tmp_path / "theirs.json").write_text(json.dumps({"x": 1, "generator": "x"}))
  (tmp_path / "ours.html").write_text(
      drawing.page_head("t", fileio.generator("bin/report")) + "</body></html>")
  (tmp_path / "theirs.html").write_text(drawing.page_head("t") + "</body></html>")
  (tmp_path / "bytes").write_bytes(os.urandom(64))
  assert fileio.is_generated(ours)
  assert fileio.is_generated(tmp_path / "ours.json")
  assert json.loads((tmp_path / "ours.json").read_text()) == {
      "generator": "vldeformer_jax bin/eval", "x": 1}
  assert fileio.is_generated(tmp_path / "ours.html")
  for name in ("theirs.png", "theirs.json", "theirs.html", "bytes", "missing", ""):
    assert not fileio.is_generated(tmp_path / name), name
  # Our own earlier output passes the rule; another's file does not.
  check_output(ours, is_dir=False, what=WHAT)
  with pytest.raises(OutputError):
    check_output(tmp_path / "theirs.png", is_dir=False, what=WHAT)


@pytest.mark.parametrize("can_swap", [True, False])
def test_atomic_directory_replaces_in_one_step(tmp_path, monkeypatch, can_swap):
  swaps, exchange = [], fileio._exchange  # pylint: disable=protected-access
  # can_swap=False: a system without renameat2(RENAME_EXCHANGE), two renames instead.
  monkeypatch.setattr(fileio, "_exchange",
                      lambda a, b: swaps.append(exchange(a, b) if can_swap else False)
                      or swaps[-1])
  out = tmp_path / "out"
  with fileio.atomic_directory(out) as tmp:
    (tmp / "a").write_text("first")
  with pytest.raises(RuntimeError):
    with fileio.atomic_directory(out) as tmp:
      (tmp / "a").write_text("half")
      raise RuntimeError("crash")
  assert files_of(out) == {"a": b"first"}  # a failed write leaves the old one
  with fileio.atomic_directory(out) as tmp:
    (tmp / "b").write_text("second")
  assert files_of(out) == {"b": b"second"}
  assert swaps == [can_swap]  # only the replacement of an existing directory swaps
  assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing left beside it


def test_atomic_file_replaces_in_one_step(tmp_path):
  out = tmp_path / "sub" / "out.json"
  with fileio.atomic_file(out) as tmp:
    assert tmp.suffix == ".json" and tmp.parent == out.parent
    tmp.write_text("first")
  with pytest.raises(RuntimeError):
    with fileio.atomic_file(out) as tmp:
      tmp.write_text("half")
      raise RuntimeError("crash")
  assert out.read_text() == "first"
  assert [p.name for p in out.parent.iterdir()] == ["out.json"]


def test_read_json_object_names_the_file(tmp_path):
  path = tmp_path / "config.json"
  with pytest.raises(FileNotFoundError, match="config.json: no such file"):
    fileio.read_json_object(path)
  for content, error in ((b"{not json", "not valid JSON"),
                         (b"[1, 2]", "expected a JSON object, got list"),
                         (b"\xff\xfe{}", "not UTF-8 text")):
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"config.json: {error}"):
      fileio.read_json_object(path)
  path.write_text('{"a": 1}')
  assert fileio.read_json_object(path) == {"a": 1}
