"""The TFDS build of the released layout: round trip, and the pipeline's tfds source."""

import numpy as np
import pytest

from vldeformer_jax.data import errors, pipeline, readers, synthetic, tfds_builder
from vldeformer_jax.data.eval_set import load_eval_set
# `inputs` is a fixture: importing it makes it available here.
from test_pipeline import FEATURE_DIM, inputs, make_config, take  # noqa: F401


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("tfds_raw")
  synthetic.write_demo_dataset(out, num_train_images=24, num_test_images=12,
                               feature_dim=FEATURE_DIM)
  return out


@pytest.fixture(scope="module")
def built(raw_dir, tmp_path_factory):
  return tfds_builder.build_tfds(raw_dir, tmp_path_factory.mktemp("tfds_out"), "demo",
                                 feature_dim=FEATURE_DIM)


def float16_rounded(regions: np.ndarray) -> np.ndarray:
  """What the records hold: float16 features with the float32 box dims put back."""
  out = regions.astype(np.float16).astype(np.float32)
  out[:, -readers.NUM_BOX_DIMS:] = regions[:, -readers.NUM_BOX_DIMS:]
  return out


def test_build_writes_array_record_in_key_file_order(built, raw_dir):
  assert built.name == "1.0.0" and built.parent.name == "demo_feature_dim-32"
  files = {p.name for p in built.iterdir()}
  assert any(".array_record-" in f and "train" in f for f in files)
  builder = tfds_builder.load_builder(built.parents[2])  # Found below the root too.
  for split in ("train", "test"):
    keys = (raw_dir / f"{split}_img_keys.tsv").read_text().split()
    image_ids, num_captions = tfds_builder.split_index(builder, split)
    assert image_ids == keys and (num_captions == 5).all()
    source = builder.as_data_source(split)
    assert [tfds_builder.read_record(source[i]).image_id
            for i in range(len(source))] == keys


@pytest.mark.parametrize("split", ["train", "test"])
def test_records_round_trip_the_raw_examples(built, raw_dir, split):
  raw = readers.VinVLRetrievalData(raw_dir, split, feature_dim=FEATURE_DIM)
  source = tfds_builder.load_builder(built).as_data_source(split)
  assert len(source) == len(raw)
  for i, image_id in enumerate(raw.image_ids):
    want = raw.example(image_id)
    got = tfds_builder.read_record(source[i])
    assert (got.image_id, got.captions, got.tags) == (want.image_id, want.captions,
                                                      want.tags)
    np.testing.assert_array_equal(got.boxes, want.boxes)  # Exact.
    np.testing.assert_array_equal(got.regions, float16_rounded(want.regions))
    np.testing.assert_allclose(got.regions, want.regions, rtol=2**-11, atol=2**-24)


def test_tfds_source_gives_the_raw_pipeline_batches(built, raw_dir, inputs):
  raw_it = pipeline.make_train_iterator(make_config(raw_dir), inputs, 0, 1)
  tfds_it = pipeline.make_train_iterator(
      make_config(built, data_source="tfds"), inputs, 0, 1)
  assert tfds_it.epoch_size == raw_it.epoch_size
  for position in range(0, 32, 8):
    assert tfds_it.rows(position) == raw_it.rows(position)
  for a, b in zip(take(raw_it, 4), take(tfds_it, 4)):
    for part in a:
      for key in a[part]:
        if key == "regions":
          np.testing.assert_allclose(b[part][key], a[part][key], rtol=2**-11,
                                     atol=2**-24)
        else:  # Tokens, masks and the negatives' choices are identical.
          np.testing.assert_array_equal(b[part][key], a[part][key], err_msg=part + key)


def test_tfds_eval_set_matches_raw(built, raw_dir):
  raw = load_eval_set(make_config(raw_dir), "test")
  got = load_eval_set(make_config(built, data_source="tfds"), "test")
  assert (got.image_ids, got.tags, got.captions) == (raw.image_ids, raw.tags,
                                                     raw.captions)
  np.testing.assert_array_equal(got.caption_to_image, raw.caption_to_image)
  for a, b in zip(got.regions, raw.regions):
    np.testing.assert_array_equal(a, float16_rounded(b))


def test_named_config_builds_without_overrides(tmp_path):
  synthetic.write_demo_dataset(tmp_path / "raw", num_train_images=3, num_test_images=2)
  path = tfds_builder.build_tfds(tmp_path / "raw", tmp_path / "out", "demo")
  assert path == tmp_path / "out" / "vinvl_retrieval" / "demo" / "1.0.0"
  builder = tfds_builder.load_builder(path)
  assert builder.info.features["regions"].shape == (None, readers.DEFAULT_FEATURE_DIM)
  assert [len(builder.as_data_source(s)) for s in ("train", "test")] == [3, 2]


def test_tfds_source_config_errors(built, raw_dir, inputs):
  with pytest.raises(ValueError, match=r"config\.data_dir"):
    pipeline.make_train_iterator(make_config(raw_dir, data_source="tfds"), inputs, 0, 1)
  config = make_config(built, data_source="tfds", feature_dim=2054)
  with pytest.raises(ValueError, match=r"config\.feature_dim.*stores 32-dim"):
    load_eval_set(config, "test")
  with pytest.raises(ValueError, match="no split 'minival'"):
    load_eval_set(make_config(built, data_source="tfds"), "minival")
  with pytest.raises(ValueError, match="config_name"):
    tfds_builder.build_tfds(raw_dir, built, "imagenet")


def test_values_outside_float16_are_refused():
  regions = np.zeros((2, FEATURE_DIM), np.float32)
  regions[1, 3] = 1e5
  example = readers.RetrievalExample("7", ["a"], ["dog", "cat"], regions,
                                     regions[:, -readers.NUM_BOX_DIMS:])
  with pytest.raises(errors.DataError, match=r"image id 7.*region 1 dim 3"):
    tfds_builder.to_record(example, "features.tsv")
