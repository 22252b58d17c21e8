"""The prepared split: same content as the source, exact templates, staleness, resume,
bad rows named."""

import json
import logging
import shutil

import numpy as np
import pytest

from vldeformer_jax import image_negatives, negatives
from vldeformer_jax.data import errors, pipeline, prepared, readers, synthetic
from vldeformer_jax.data.sources import SourceSpec
from conftest import corrupt_features_row
from test_pipeline import FEATURE_DIM, inputs, make_config, take  # noqa: F401

NUM_IMAGES = 20


def copy_data(src, dst):
  dst.mkdir()
  for path in src.iterdir():
    if path.is_file():
      shutil.copy(path, dst / path.name)
  return dst


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("prepared_raw")
  synthetic.write_demo_dataset(out, num_train_images=NUM_IMAGES, num_test_images=4,
                               feature_dim=FEATURE_DIM)
  return out


def spec_of(data_dir, **kw):
  return SourceSpec("raw", str(data_dir), "train", FEATURE_DIM, **kw)


@pytest.fixture(scope="module")
def split(raw_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("prepared_root")
  spec = spec_of(raw_dir)
  return prepared.PreparedSplit(prepared.prepare(spec, root, chunk_images=6), spec)


def test_prepared_split_holds_the_source(split, raw_dir):
  raw = readers.VinVLRetrievalData(raw_dir, "train", feature_dim=FEATURE_DIM)
  assert split.image_ids == raw.image_ids and not split.errors
  for i, image_id in enumerate(raw.image_ids):
    example = raw.example(image_id)
    assert [split.vocab[k] for k in split.tag_ids(i)] == example.tags
    regions = split.regions(i, 3)
    assert regions.dtype == np.float16
    np.testing.assert_array_equal(regions, example.regions[:3].astype(np.float16))
    for c, caption in enumerate(example.captions):
      assert split.template(i, c).caption == caption
      want = image_negatives.tags_in_caption(caption, split.vocab)
      assert split.mentioned_ids(i, c).tolist() == np.flatnonzero(want).tolist()


def test_stored_templates_fill_to_text_negative(split):
  """Templates made in the build, stored as JSON and read back: the same negative as
  `text_negative` on the caption, for every caption and several seeds and tag pools."""
  pools = [split.vocab, split.vocab[:3], [split.vocab[0]]]
  for i in range(len(split.image_ids)):
    for c in range(int(split.num_captions[i])):
      template = split.template(i, c)
      for seed, pool in enumerate(pools):
        want = negatives.text_negative(template.caption, pool,
                                       np.random.default_rng([seed, i, c]))
        got = negatives.fill_text_negative(template, pool,
                                           np.random.default_rng([seed, i, c]))
        assert got.text == want


def test_changed_source_is_detected_and_prepared_again(raw_dir, tmp_path):
  data = copy_data(raw_dir, tmp_path / "data")
  first = prepared.prepare(spec_of(data))  # Default place: beside the data.
  assert first.parent == data / prepared.DEFAULT_DIRNAME
  assert prepared.prepare(spec_of(data)) == first  # Reused while unchanged.
  captions = json.loads((data / "train_captions.json").read_text())
  image_id = next(iter(captions))
  captions[image_id][0] = "A purple cow jumps over the moon."
  (data / "train_captions.json").write_text(json.dumps(captions))
  second = prepared.prepare(spec_of(data))
  assert second != first and not first.exists()  # The stale one is gone.
  index = prepared.PreparedSplit(second, spec_of(data)).image_ids.index(image_id)
  assert prepared.PreparedSplit(second, spec_of(data)).template(
      index, 0).caption == "A purple cow jumps over the moon."


def test_building_a_missing_lineidx_leaves_the_split_fresh(raw_dir, tmp_path):
  """Regression: the first read built `predictions.lineidx`, the next open saw another
  key and deleted the directory the first iterator was reading from."""
  data = copy_data(raw_dir, tmp_path / "data")
  for index in data.glob("*.lineidx"):
    index.unlink()
  first = prepared.prepare(spec_of(data))
  assert list(data.glob("*.lineidx"))  # Reading the TSVs built them.
  assert prepared.prepare(spec_of(data)) == first and (first / "meta.json").is_file()


def test_killed_build_resumes_from_its_chunks(raw_dir, split, tmp_path):
  spec = spec_of(raw_dir)
  out = prepared.prepare(spec, tmp_path, chunk_images=6)
  # A kill after chunks 0 and 1 of 4: later chunks and the final files are missing.
  for path in out.iterdir():
    if not any(f"-{c:05d}." in path.name for c in (0, 1)) and path.name != (
        "chunk_images.json"):
      path.unlink()
  kept = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
  assert prepared.prepare(spec, tmp_path, chunk_images=99) == out
  for name, mtime in kept.items():  # Not redone (and the chunk size kept).
    assert (out / name).stat().st_mtime_ns == mtime, name
  again = prepared.PreparedSplit(out, spec)
  assert again.vocab == split.vocab and again.chunk_images == 6
  for name in ("object_start", "object_tag", "mentioned", "mentioned_start"):
    np.testing.assert_array_equal(getattr(again, name), getattr(split, name))


@pytest.fixture(scope="module")
def bad_base64_dir(raw_dir, tmp_path_factory):
  """The demo data with row 2 of features.tsv made bad base64."""
  data = copy_data(raw_dir, tmp_path_factory.mktemp("prepared_bad") / "data")
  return data, readers.canonical_image_id(corrupt_features_row(data, 2))


def test_bad_row_is_an_error_naming_file_and_line(bad_base64_dir, inputs):
  """Preparing finds the bad row; the trainer's iterator raises it when made (issue
  23: it used to wait until a batch drew that image), naming file and line."""
  data, bad_id = bad_base64_dir
  split = prepared.PreparedSplit(prepared.prepare(spec_of(data)), spec_of(data))
  (error,) = split.errors.values()
  assert (error.kind, error.key, error.line) == ("bad_base64", bad_id, 3)
  assert "features.tsv, line 3" in str(error)
  with pytest.raises(errors.DataError, match=r"features\.tsv, line 3 .*bad image 1 of "
                     r"1 in split 'train'; --config.on_error=skip leaves them out"):
    pipeline.make_train_iterator(make_config(data, batch_size=4), inputs, 0, 1)


def test_skip_policy_counts_the_bad_row(bad_base64_dir, inputs, caplog):
  data, bad_id = bad_base64_dir
  config = make_config(data, batch_size=4, on_error="skip")
  with caplog.at_level(logging.WARNING):
    it = pipeline.make_train_iterator(config, inputs, 0, 1)
  # Reported when the iterator is made, before any batch.
  assert it.report.counts == {"bad_base64": 1}
  assert "Data skip report: skipped 1 problem(s) (bad_base64: 1)" in caplog.text
  assert "features.tsv, line 3" in caplog.text
  rows = [r for p in range(0, NUM_IMAGES, 4) for r in it.rows(p)]
  assert bad_id not in {i for i, _ in rows} and len(rows) == NUM_IMAGES
  assert it.report.counts == {"bad_base64": 1}


@pytest.mark.slow
def test_process_pool_build_equals_in_process_build(raw_dir, split, tmp_path):
  spec = spec_of(raw_dir)
  pooled = prepared.PreparedSplit(
      prepared.prepare(spec, tmp_path, workers=2, chunk_images=10), spec)
  assert pooled.vocab == split.vocab and pooled.errors == {}
  for name in ("object_start", "object_tag", "mentioned", "mentioned_start"):
    np.testing.assert_array_equal(getattr(pooled, name), getattr(split, name))
  for i in range(NUM_IMAGES):
    np.testing.assert_array_equal(pooled.regions(i, 99), split.regions(i, 99))
    assert pooled.template(i, 1) == split.template(i, 1)


def test_build_data_command(bad_base64_dir, inputs, tmp_path, capsys):
  data, _ = bad_base64_dir
  from vldeformer_jax.cli import build_data
  out = tmp_path / "prepared"
  argv = ["--data_dir", str(data), "--out", str(out), "--workers", "0",
          "--feature_dim", str(FEATURE_DIM)]
  assert build_data.main(argv) == 1
  assert "features.tsv, line 3" in capsys.readouterr().err
  assert build_data.main(argv + ["--on_error", "skip"]) == 0
  printed = capsys.readouterr().out
  assert "skipped bad rows" in printed and "features.tsv, line 3" in printed
  assert {p.name.split("-")[1] for p in out.iterdir()} == {"train", "test"}
  config = make_config(data, batch_size=4, on_error="skip", prepared_dir=str(out))
  before = {p.name for p in out.iterdir()}
  take(pipeline.make_train_iterator(config, inputs, 0, 1), 2)
  assert {p.name for p in out.iterdir()} == before  # Used as built, not rebuilt.
