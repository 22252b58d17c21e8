"""TSV files with a line index (`tsv.py`), through the readers that use them.

The demo data's TSVs and corrupted copies of their `.lineidx`: rebuilt when missing,
every kind of mismatch a `DataError` naming the lineidx file and line, and a
descriptor per process.
"""

import logging
import os

import numpy as np
import pytest

from test_readers import (  # noqa: F401 - the demo data and its fixtures
    NUM_TEST, NUM_TRAIN, _assert_names, _scenes, data_dir, dataset)
from vldeformer_jax.data import readers, tsv
from vldeformer_jax.data.errors import DataError


# Descriptors. -------------------------------------------------------------------------


def test_a_forked_reader_opens_its_own_file(dataset, monkeypatch):
  """After fork (simulated: a new pid), the inherited descriptor is replaced."""
  scenes = _scenes(dataset)
  ids = list(scenes)
  reader = readers.RegionFeatureReader(dataset.out_dir)
  reader[ids[0]]
  parent_fd = reader.tsv._fd
  pid = os.getpid()
  closed, real_close = [], os.close
  monkeypatch.setattr(tsv.os, "getpid", lambda: pid + 1)
  monkeypatch.setattr(tsv.os, "close", lambda fd: (closed.append(fd), real_close(fd)))
  np.testing.assert_array_equal(reader[ids[1]], scenes[ids[1]].features)
  assert reader.tsv._pid == pid + 1 and reader.tsv._fd is not None
  assert closed == [parent_fd]  # The child's copy of the parent's descriptor.
  np.testing.assert_array_equal(reader[ids[2]], scenes[ids[2]].features)
  assert closed == [parent_fd]  # Opened once per process, not per read.


# Line indexes. ------------------------------------------------------------------------


def test_lineidx_rebuilt_when_missing_is_identical(data_dir):
  original = (data_dir / "features.lineidx").read_bytes()
  (data_dir / "features.lineidx").unlink()
  reader = readers.RegionFeatureReader(data_dir)
  assert (data_dir / "features.lineidx").read_bytes() == original
  assert len(reader.tsv) == NUM_TRAIN + NUM_TEST
  assert not list(data_dir.glob(".*.tmp"))  # The atomic write left nothing behind.
  readers.PredictionsReader(data_dir / "predictions.tsv")
  offsets = tsv.scan_line_offsets(data_dir / "predictions.tsv")
  rebuilt = (data_dir / "predictions.lineidx").read_bytes()
  assert rebuilt == tsv.format_lineidx(offsets)


def _offsets(data_dir):
  return [int(x) for x in (data_dir / "features.lineidx").read_text().split()]


def _write_offsets(data_dir, offsets):
  (data_dir / "features.lineidx").write_text("".join(f"{o}\n" for o in offsets))


def test_lineidx_offset_not_at_line_start(data_dir):
  offsets = _offsets(data_dir)
  offsets[3] += 5
  _write_offsets(data_dir, offsets)
  with pytest.raises(DataError, match="not at a line start") as e:
    readers.RegionFeatureReader(data_dir)
  _assert_names(e.value, data_dir / "features.lineidx", line=4)
  assert e.value.kind == "bad_lineidx"


def test_lineidx_with_too_few_rows(data_dir):
  _write_offsets(data_dir, _offsets(data_dir)[:-2])
  with pytest.raises(DataError, match="wrong count") as e:
    readers.RegionFeatureReader(data_dir)
  _assert_names(e.value, data_dir / "features.lineidx", line=NUM_TRAIN + NUM_TEST - 2)


def test_lineidx_not_a_number(data_dir):
  offsets = [str(o) for o in _offsets(data_dir)]
  offsets[2] = "12x"
  (data_dir / "features.lineidx").write_text("\n".join(offsets) + "\n")
  with pytest.raises(DataError, match="expected a byte offset") as e:
    readers.RegionFeatureReader(data_dir)
  _assert_names(e.value, data_dir / "features.lineidx", line=3)


def test_lineidx_skipping_a_middle_row(dataset, data_dir):
  offsets = _offsets(data_dir)
  del offsets[5]
  _write_offsets(data_dir, offsets)
  num_rows = NUM_TRAIN + NUM_TEST - 1
  # The id map sees that rows are missing ...
  with pytest.raises(DataError, match=rf"not in \[0, {num_rows}\)"):
    readers.RegionFeatureReader(data_dir)
  (data_dir / "imageid2idx.json").unlink()
  # ... without it, "quick" cannot see the skipped row at open; reading it fails ...
  reader = readers.RegionFeatureReader(data_dir, box_order="x1y1x2y2wh")
  with pytest.raises(DataError, match="does not end where the next offset") as e:
    reader.read_row(4)
  _assert_names(e.value, data_dir / "features.lineidx", line=6)
  # ... and "full" finds it at open.
  with pytest.raises(DataError, match="row 5 starts at byte") as e:
    readers.RegionFeatureReader(data_dir, check_lineidx="full")
  _assert_names(e.value, data_dir / "features.lineidx", line=6)


def test_bad_lineidx_rebuilt_with_a_warning_when_asked(data_dir, caplog):
  original = (data_dir / "features.lineidx").read_bytes()
  offsets = _offsets(data_dir)
  offsets[1] -= 1
  _write_offsets(data_dir, offsets)
  with caplog.at_level(logging.WARNING):
    readers.RegionFeatureReader(data_dir, rebuild_bad_lineidx=True)
  assert "rebuilding" in caplog.text and "features.lineidx" in caplog.text
  assert (data_dir / "features.lineidx").read_bytes() == original
