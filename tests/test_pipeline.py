"""The input pipeline: fixed shapes, determinism, sharding, resumption, negatives."""

import json
import shutil

import numpy as np
import pytest

from vldeformer_jax.config import ModelConfig
from vldeformer_jax.data import errors, pipeline, readers, synthetic
from vldeformer_jax.inputs import InputBuilder, load_tokenizer
from vldeformer_jax.config import default_config

FEATURE_DIM = 32
NUM_TRAIN, NUM_TEST = 40, 12
LENGTHS = dict(max_text_len=96, max_tag_len=48, max_regions=5)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("pipeline_demo")
  synthetic.write_demo_dataset(out, num_train_images=NUM_TRAIN,
                               num_test_images=NUM_TEST, feature_dim=FEATURE_DIM)
  return out


@pytest.fixture(scope="module")
def inputs(vocab_file):
  model = ModelConfig(vocab_size=200, hidden_size=32, num_hidden_layers=1,
                      num_attention_heads=4, intermediate_size=64,
                      max_position_embeddings=128, img_feature_dim=FEATURE_DIM, **LENGTHS)
  return InputBuilder(load_tokenizer(vocab_file), model)


@pytest.fixture(scope="module")
def raw_train(demo_dir):
  return readers.VinVLRetrievalData(demo_dir, "train", feature_dim=FEATURE_DIM)


def make_config(root, **overrides):
  c = default_config()
  c.data_dir = str(root)
  c.feature_dim = FEATURE_DIM
  c.batch_size = 8
  c.eval_max_images = 0
  c.update(LENGTHS)
  for key, value in overrides.items():
    c[key] = value
  return c


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for part in a:
    assert a[part].keys() == b[part].keys()
    for key in a[part]:
      np.testing.assert_array_equal(a[part][key], b[part][key], err_msg=f"{part}/{key}")


def test_batches_have_fixed_shapes_and_dtypes(demo_dir, inputs):
  it = pipeline.make_train_iterator(make_config(demo_dir), inputs, 0, 1)
  for batch in take(it, 6):  # 40 images / 8 rows: the sixth batch starts epoch 1.
    assert set(batch) == {"text", "image", "neg_text", "neg_image"}
    for part in ("text", "neg_text"):
      assert set(batch[part]) == set(pipeline.TEXT_KEYS)
      for v in batch[part].values():
        assert v.shape == (8, 96) and v.dtype == np.int32
    for part in ("image", "neg_image"):
      assert set(batch[part]) == set(pipeline.IMAGE_KEYS)
      for key in pipeline.TEXT_KEYS:
        assert batch[part][key].shape == (8, 48) and batch[part][key].dtype == np.int32
      assert batch[part]["regions"].shape == (8, 5, FEATURE_DIM)
      assert batch[part]["regions"].dtype == np.float16  # As prepared (prepared.py).
      assert batch[part]["region_mask"].shape == (8, 5)
      assert batch[part]["region_mask"].dtype == np.int32
      assert (batch[part]["token_mask"].sum(1) >= 2).all()  # At least [CLS] [SEP].
  no_neg = pipeline.make_train_iterator(make_config(demo_dir, hard_negatives=False),
                                        inputs, 0, 1)
  assert set(next(no_neg)) == {"text", "image"}


def test_batches_hold_the_rows_they_name(demo_dir, inputs, raw_train):
  it = pipeline.make_train_iterator(make_config(demo_dir), inputs, 0, 1)
  position = it.get_state()["position"]
  batch = next(it)
  rows = it.rows(position)
  captions = [raw_train.captions[i][c] for i, c in rows]
  expected = inputs.batch(inputs.text_sequences(captions), length=96).as_dict()
  for key, value in expected.items():
    np.testing.assert_array_equal(batch["text"][key], value)
  for r, (image_id, _) in enumerate(rows):
    example = raw_train.example(image_id)
    n = min(len(example.regions), 5)
    np.testing.assert_array_equal(batch["image"]["regions"][r, :n],
                                  example.regions[:n].astype(np.float16))
    assert batch["image"]["region_mask"][r].tolist() == [1] * n + [0] * (5 - n)
    tags = inputs.image_sequences([" ".join(example.tags[:5])])[0][0]
    assert batch["image"]["input_ids"][r, :len(tags)].tolist() == tags


def test_same_seed_same_batches_other_seed_other_batches(demo_dir, inputs):
  first = take(pipeline.make_train_iterator(make_config(demo_dir), inputs, 0, 1), 7)
  again = take(pipeline.make_train_iterator(make_config(demo_dir), inputs, 0, 1), 7)
  for a, b in zip(first, again):
    assert_batches_equal(a, b)
  other = next(pipeline.make_train_iterator(make_config(demo_dir, seed=1), inputs, 0, 1))
  assert not np.array_equal(other["text"]["input_ids"], first[0]["text"]["input_ids"])


@pytest.mark.parametrize("sampling", ["per_image", "all_pairs"])
def test_two_processes_cover_every_example_once_per_epoch(demo_dir, inputs, raw_train,
                                                          sampling):
  config = make_config(demo_dir, caption_sampling=sampling)
  shards = [pipeline.make_train_iterator(config, inputs, p, 2) for p in (0, 1)]
  single = pipeline.make_train_iterator(config, inputs, 0, 1)
  epoch = single.epoch_size
  expected_size = NUM_TRAIN if sampling == "per_image" else sum(
      len(c) for c in raw_train.captions.values())
  assert epoch == expected_size and epoch % 8 == 0
  for e in range(2):
    seen = []
    for position in range(e * epoch, (e + 1) * epoch, 8):
      share0, share1 = shards[0].rows(position), shards[1].rows(position)
      assert len(share0) == len(share1) == 4
      assert share0 + share1 == single.rows(position)
      seen += share0 + share1
    if sampling == "per_image":
      assert sorted(i for i, _ in seen) == sorted(raw_train.image_ids)
    else:
      assert sorted(seen) == sorted((i, c) for i in raw_train.image_ids
                                    for c in range(len(raw_train.captions[i])))
  # The iterators yield those shares: they concatenate to the single-process batch.
  for _ in range(3):
    b0, b1, b = next(shards[0]), next(shards[1]), next(single)
    for part in ("text", "image"):
      for key in b[part]:
        np.testing.assert_array_equal(
            np.concatenate([b0[part][key], b1[part][key]]), b[part][key])


def test_text_negatives_from_image_tags_do_not_depend_on_process_count(demo_dir,
                                                                       inputs):
  config = make_config(demo_dir, text_negative_tags="image")
  shards = [pipeline.make_train_iterator(config, inputs, p, 2) for p in (0, 1)]
  single = pipeline.make_train_iterator(config, inputs, 0, 1)
  for _ in range(2):
    b0, b1, b = next(shards[0]), next(shards[1]), next(single)
    np.testing.assert_array_equal(
        np.concatenate([b0["neg_text"]["input_ids"], b1["neg_text"]["input_ids"]]),
        b["neg_text"]["input_ids"])


def test_fixed_negative_groups_make_batches_independent_of_process_count(demo_dir,
                                                                         inputs):
  config = make_config(demo_dir, batch_size=16, negative_group_size=4)
  shards = [pipeline.make_train_iterator(config, inputs, p, 2) for p in (0, 1)]
  single = pipeline.make_train_iterator(config, inputs, 0, 1)
  assert single.group_size == shards[0].group_size == 4
  for _ in range(4):  # 40 images / 16 rows: crosses into epoch 1.
    b0, b1, b = next(shards[0]), next(shards[1]), next(single)
    assert set(b) == {"text", "image", "neg_text", "neg_image"}
    for part in b:
      assert b0[part].keys() == b1[part].keys() == b[part].keys()
      for key in b[part]:
        joined = np.concatenate([b0[part][key], b1[part][key]])
        assert joined.dtype == b[part][key].dtype
        assert joined.tobytes() == b[part][key].tobytes(), f"{part}/{key}"
    # Every object of an image negative comes from an image of the row's group.
    image, neg_image = b["image"], b["neg_image"]
    for first in range(0, 16, 4):
      rows = slice(first, first + 4)
      pool = image["regions"][rows][image["region_mask"][rows] == 1]
      for row in neg_image["regions"][rows][neg_image["region_mask"][rows] == 1]:
        assert (pool == row).all(1).any()
  # With the default (groups = the process's share) the negatives follow the layout.
  default = make_config(demo_dir, batch_size=16)
  b0, b = (next(pipeline.make_train_iterator(default, inputs, 0, n)) for n in (2, 1))
  assert not np.array_equal(b0["neg_image"]["regions"], b["neg_image"]["regions"][:8])


@pytest.mark.parametrize("group,process_count", [(3, 1), (16, 2), (6, 2), (1, 1)])
def test_negative_group_size_must_tile_the_share(demo_dir, inputs, group,
                                                 process_count):
  config = make_config(demo_dir, batch_size=16, negative_group_size=group)
  with pytest.raises(ValueError, match=r"config\.negative_group_size\b"):
    pipeline.make_train_iterator(config, inputs, 0, process_count)
  # Without hard negatives a group of 1 is harmless; a group that does not divide
  # the share is still refused.
  config.hard_negatives = False
  if group == 1:
    pipeline.make_train_iterator(config, inputs, 0, process_count)
  else:
    with pytest.raises(ValueError, match=r"config\.negative_group_size\b"):
      pipeline.make_train_iterator(config, inputs, 0, process_count)


@pytest.mark.parametrize("sampling", ["per_image", "all_pairs"])
def test_shared_tag_grouping_keeps_groups_together(demo_dir, inputs, raw_train, sampling):
  """With batch_grouping='shared_tags' each epoch is still a permutation of the split,
  images with the same set of tags come in one run, and the order of groups and of
  members changes from epoch to epoch."""
  it = pipeline.make_train_iterator(
      make_config(demo_dir, batch_grouping="shared_tags", caption_sampling=sampling),
      inputs, 0, 1)
  tag_set = {i: frozenset(raw_train.example(i).tags[:5]) for i in raw_train.image_ids}
  # The demo's layouts of 4 images share their tags (cut to the 5 regions the model
  # sees, some no longer do); a group is one tag set.
  assert NUM_TRAIN // 4 <= len(set(tag_set.values())) < NUM_TRAIN // 2
  epochs = []
  for e in range(2):
    rows = [r for position in range(e * it.epoch_size, (e + 1) * it.epoch_size, 8)
            for r in it.rows(position)]
    if sampling == "per_image":
      assert sorted(i for i, _ in rows) == sorted(raw_train.image_ids)
    else:
      assert sorted(rows) == sorted((i, c) for i in raw_train.image_ids
                                    for c in range(len(raw_train.captions[i])))
    runs = [tag_set[i] for i, _ in rows]
    changes = sum(a != b for a, b in zip(runs, runs[1:]))
    assert changes == len(set(runs)) - 1  # Each tag set appears as one run.
    epochs.append(rows)
  assert epochs[0] != epochs[1]
  plain = pipeline.make_train_iterator(make_config(demo_dir, caption_sampling=sampling),
                                       inputs, 0, 1)
  plain_runs = [tag_set[i] for i, _ in plain.rows(0) + plain.rows(8) + plain.rows(16)]
  assert sum(a != b for a, b in zip(plain_runs, plain_runs[1:])) > len(set(plain_runs))


def test_shared_tag_groups_ignore_tag_order_and_repeats():
  class Split:  # What shared_tag_groups reads of a PreparedSplit.
    image_ids = ["a", "b", "c", "d"]
    tags = [[3, 1, 1], [1, 3], [1], [2, 1, 3]]

    def tag_ids(self, i):
      return np.array(self.tags[i], np.int32)

  assert pipeline.shared_tag_groups(Split(), max_regions=3).tolist() == [0, 0, 1, 2]
  assert pipeline.shared_tag_groups(Split(), max_regions=1).tolist() == [0, 1, 1, 2]


def test_resuming_refuses_another_batch_grouping(demo_dir, inputs):
  state = pipeline.make_train_iterator(make_config(demo_dir), inputs, 0, 1).get_state()
  grouped = pipeline.make_train_iterator(
      make_config(demo_dir, batch_grouping="shared_tags"), inputs, 0, 1)
  with pytest.raises(ValueError, match="config.batch_grouping"):
    grouped.set_state(state)
  # A state saved before batch_grouping existed resumes an ungrouped stream.
  old = {k: v for k, v in state.items() if k != "batch_grouping"}
  plain = pipeline.make_train_iterator(make_config(demo_dir), inputs, 0, 1)
  plain.set_state(old)
  with pytest.raises(ValueError, match="config.batch_grouping"):
    grouped.set_state(old)


def test_resumed_iterator_continues_exactly(demo_dir, inputs):
  config = make_config(demo_dir)
  uninterrupted = pipeline.make_train_iterator(config, inputs, 0, 1)
  take(uninterrupted, 3)
  state = json.loads(json.dumps(uninterrupted.get_state()))  # As checkpointed.
  expected = take(uninterrupted, 5)  # Crosses into epoch 1.
  resumed = pipeline.make_train_iterator(config, inputs, 0, 1)
  resumed.set_state(state)
  for a, b in zip(take(resumed, 5), expected):
    assert_batches_equal(a, b)
  # Rewinding a running iterator drops the batches it was building ahead.
  uninterrupted.set_state(state)
  assert_batches_equal(next(uninterrupted), expected[0])
  # Resuming with two processes gives the same global batches, split in two.
  halves = [pipeline.make_train_iterator(config, inputs, p, 2) for p in (0, 1)]
  for it in halves:
    it.set_state(state)
  b0, b1 = next(halves[0]), next(halves[1])
  for part in ("text", "image"):
    for key in b0[part]:
      np.testing.assert_array_equal(np.concatenate([b0[part][key], b1[part][key]]),
                                    expected[0][part][key])


def test_set_state_refuses_a_different_stream(demo_dir, inputs):
  state = pipeline.make_train_iterator(make_config(demo_dir), inputs, 0, 1).get_state()
  other = pipeline.make_train_iterator(make_config(demo_dir, seed=3), inputs, 0, 1)
  with pytest.raises(ValueError, match="config.seed"):
    other.set_state(state)
  with pytest.raises(ValueError, match="position"):
    other.set_state({**other.get_state(), "position": -8})


def test_negatives_are_present_and_differ(demo_dir, inputs):
  it = pipeline.make_train_iterator(make_config(demo_dir), inputs, 0, 1)
  for batch in take(it, 5):
    text, neg_text = batch["text"], batch["neg_text"]
    assert (text["token_mask"].sum(1) < 96).all()  # Nothing truncated away...
    differs = (text["input_ids"] != neg_text["input_ids"]).any(1)
    assert differs.all()  # ...so every caption's negative differs from it.
    image, neg_image = batch["image"], batch["neg_image"]
    np.testing.assert_array_equal(image["region_mask"], neg_image["region_mask"])
    changed = (image["regions"] != neg_image["regions"]).any(axis=(1, 2))
    assert changed.mean() >= 0.75
    # Every object of a negative comes from an image of the same share.
    pool = image["regions"][image["region_mask"] == 1]
    for row in neg_image["regions"][neg_image["region_mask"] == 1]:
      assert (pool == row).all(1).any()


@pytest.mark.parametrize("key,value,process_count", [
    ("caption_sampling", "every_other", 1),
    ("batch_size", 0, 1),
    ("batch_size", 9, 2),
    ("batch_size", 2, 2),  # One row per process: no image negatives possible.
    ("text_negative_ratio", 1.5, 1),
    ("negative_group_size", -4, 1),
    ("negative_group_size", 3, 1),  # Does not divide the 8 rows.
    ("seed", -1, 1),
    ("data_source", "parquet", 1),
    ("on_error", "ignore", 1),
    ("batch_grouping", "by_layout", 1),
    ("max_regions", 50, 1),  # Differs from the model config's.
    ("feature_dim", 2054, 1),
    ("data_dir", "/nonexistent/data", 1),
    # The data keys the trainer's validate_config checked too: one checker now.
    ("data_dir", "", 1),
    ("box_order", "xywh", 1),
    ("image_negative_ratio", -0.5, 1),
    ("text_negative_tags", "caption", 1),
    ("pipeline_workers", 0, 1),
    ("prefetch_batches", -1, 1),
])
def test_bad_config_values_name_the_key(demo_dir, inputs, key, value, process_count):
  config = make_config(demo_dir, **{key: value})
  with pytest.raises(ValueError, match=rf"config\.{key}\b"):
    pipeline.make_train_iterator(config, inputs, 0, process_count)


@pytest.fixture(scope="module")
def mismatched_dir(demo_dir, tmp_path_factory):
  """The demo data with one image given an extra tag (tags != regions)."""
  out = tmp_path_factory.mktemp("pipeline_bad")
  for path in demo_dir.iterdir():
    if path.is_file() and path.name != "predictions.lineidx":
      shutil.copy(path, out / path.name)
  bad_id = (out / "train_img_keys.tsv").read_text().split()[0]
  lines = (out / "predictions.tsv").read_text().splitlines()
  for i, line in enumerate(lines):
    image_id, payload = line.split("\t", 1)
    if image_id == bad_id:
      value = json.loads(payload)
      objects = value["objects"] if isinstance(value, dict) else value
      objects.append({"class": "kite", "conf": 0.5, "rect": [0, 0, 10, 10]})
      lines[i] = f"{image_id}\t{json.dumps(value)}"
  (out / "predictions.tsv").write_text("\n".join(lines) + "\n")
  return out, bad_id


def test_tag_region_mismatch_is_an_error_naming_the_image(mismatched_dir, inputs):
  """Raised when the trainer's iterator is made (preparing found it), and by a bare
  `TrainPipeline` (as worker processes build) when a batch meets the image."""
  data_dir, bad_id = mismatched_dir
  config = make_config(data_dir)
  with pytest.raises(errors.DataError, match=rf"image id {bad_id}\b.*tags") as info:
    pipeline.make_train_iterator(config, inputs, 0, 1)
  assert info.value.kind == "tag_region_mismatch"
  options = pipeline.pipeline_options(config, inputs)
  it = pipeline.TrainPipeline(options, pipeline.open_prepared(options, "train"), inputs,
                              0, 1)
  with pytest.raises(errors.DataError, match=rf"image id {bad_id}\b.*tags") as info:
    take(it, 5)  # One epoch: the bad image is met on a worker thread.
  assert info.value.kind == "tag_region_mismatch"


def test_skip_policy_substitutes_bad_examples(mismatched_dir, inputs, raw_train):
  data_dir, bad_id = mismatched_dir
  config = make_config(data_dir, on_error="skip")
  it = pipeline.make_train_iterator(config, inputs, 0, 1)
  rows = [r for position in range(0, 2 * NUM_TRAIN, 8) for r in it.rows(position)]
  assert bad_id not in {i for i, _ in rows}
  assert len(rows) == 2 * NUM_TRAIN
  assert it.report.counts["tag_region_mismatch"] == 1
  batches = take(it, 10)
  again = take(pipeline.make_train_iterator(config, inputs, 0, 1), 10)
  for a, b in zip(batches, again):
    assert_batches_equal(a, b)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(demo_dir, inputs):
  """pipeline_processes > 0 builds in spawned processes (shared memory back): the
  same batches as threads, across a resume too."""
  threads = pipeline.make_train_iterator(make_config(demo_dir), inputs, 0, 1)
  want = take(threads, 4)
  it = pipeline.make_train_iterator(make_config(demo_dir, pipeline_processes=2),
                                    inputs, 0, 1)
  got = take(it, 2)
  state = it.get_state()
  it.close()  # Frees the blocks built ahead.
  it = pipeline.make_train_iterator(make_config(demo_dir, pipeline_processes=1),
                                    inputs, 0, 1)
  it.set_state(state)
  got += take(it, 2)
  it.close()
  for a, b in zip(want, got):
    assert_batches_equal(a, b)


def test_bad_config_values_are_named_as_flags(demo_dir, inputs):
  """One wording for every data key, the trainer's: `--config.KEY=VALUE`."""
  config = make_config(demo_dir, caption_sampling="every_other")
  with pytest.raises(ValueError, match=r"^--config\.caption_sampling='every_other': "):
    pipeline.make_train_iterator(config, inputs, 0, 1)
