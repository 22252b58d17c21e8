"""The synthetic dataset: layout, determinism, content, not solvable by tags alone."""

import collections
import filecmp
import json
import logging
import sys

import numpy as np
import pytest

from vldeformer_jax.data import readers, synthetic, tsv

LAYOUT_FILES = {
    "features.tsv", "features.lineidx", "imageid2idx.json", "predictions.tsv",
    "train_captions.pt", "test_captions.pt", "train_captions.json",
    "test_captions.json", "train_img_keys.tsv", "test_img_keys.tsv",
    "test_img_keys_1k.tsv"}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo_small")
  return synthetic.write_demo_dataset(out, num_train_images=24, num_test_images=12,
                                      seed=0)


@pytest.fixture(scope="module")
def world():
  return synthetic.make_world(readers.DEFAULT_FEATURE_DIM)


def test_writes_exactly_the_released_layout(small):
  assert set(small.files) == LAYOUT_FILES
  assert small.wrote_pt
  out = small.out_dir
  train_keys = (out / "train_img_keys.tsv").read_text().split()
  test_keys = (out / "test_img_keys.tsv").read_text().split()
  assert train_keys == [str(s.image_id) for s in small.train]
  assert test_keys == [str(s.image_id) for s in small.test]
  assert (out / "test_img_keys_1k.tsv").read_text().split() == test_keys[:1000]
  assert not set(train_keys) & set(test_keys)
  # One features row per image; the lineidx is the real offsets; the id map indexes rows.
  offsets = tsv.scan_line_offsets(out / "features.tsv")
  assert (out / "features.lineidx").read_bytes() == tsv.format_lineidx(offsets)
  id_map = json.loads((out / "imageid2idx.json").read_text())
  assert sorted(id_map.values()) == list(range(len(offsets)))
  assert set(id_map) == set(train_keys) | set(test_keys)
  rows = (out / "features.tsv").read_bytes().splitlines()
  for image_id, row in id_map.items():
    columns = rows[row].split(b"\t")
    assert columns[0].decode() == image_id and len(columns) == 3


def test_captions_pt_and_json_hold_the_same_mapping(small):
  torch = pytest.importorskip("torch")
  out = small.out_dir
  train_pt = torch.load(out / "train_captions.pt", weights_only=True)
  test_pt = torch.load(out / "test_captions.pt", weights_only=True)
  assert all(isinstance(k, int) for k in train_pt) and all(
      isinstance(v, list) for v in train_pt.values())
  assert all(isinstance(v, str) for v in test_pt.values())  # JSON strings.
  train_json = json.loads((out / "train_captions.json").read_text())
  assert {str(k): v for k, v in train_pt.items()} == train_json
  test_json = json.loads((out / "test_captions.json").read_text())
  assert {str(k): json.loads(v) for k, v in test_pt.items()} == test_json
  for scene in small.test:
    assert test_json[str(scene.image_id)] == list(scene.captions)
    assert len(scene.captions) == synthetic.NUM_CAPTIONS == len(set(scene.captions))


def test_same_seed_same_bytes_and_different_seed_different(tmp_path):
  kwargs = dict(num_train_images=12, num_test_images=8)
  a = synthetic.write_demo_dataset(tmp_path / "a", seed=3, **kwargs)
  b = synthetic.write_demo_dataset(tmp_path / "b", seed=3, **kwargs)
  c = synthetic.write_demo_dataset(tmp_path / "c", seed=4, **kwargs)
  names = sorted(a.files)
  match, mismatch, errors = filecmp.cmpfiles(a.out_dir, b.out_dir, names, shallow=False)
  assert match == names and not mismatch and not errors
  for name in ("features.tsv", "predictions.tsv", "train_captions.json",
               "test_img_keys.tsv"):
    assert (a.out_dir / name).read_bytes() != (c.out_dir / name).read_bytes(), name


def test_splits_are_drawn_independently(world):
  alone = synthetic.generate_split(8, "train", seed=1, world=world)
  again = synthetic.generate_split(8, "train", seed=1, world=world)
  assert [s.captions for s in alone] == [s.captions for s in again]
  assert all(np.array_equal(x.features, y.features) for x, y in zip(alone, again))
  test = synthetic.generate_split(8, "test", seed=1, world=world)
  assert not {s.image_id for s in alone} & {s.image_id for s in test}


def test_scenes_have_realistic_regions_and_boxes(small):
  labels = set(synthetic.CLASSES)
  assert 28 <= len(labels) <= 40
  assert any(" " in label for label in labels)  # Multi-word tags ("tennis racket").
  for scene in small.train + small.test:
    assert scene.features.shape == (len(scene.regions), readers.DEFAULT_FEATURE_DIM)
    assert scene.features.dtype == np.float32
    kinds = [synthetic.CLASSES[r.label].kind for r in scene.regions]
    assert kinds.count("person") + kinds.count("animal") == 1
    assert 2 <= len(scene.regions) - kinds.count("stuff") <= 6
    assert kinds[scene.subject] in ("person", "animal")
    confs = [r.conf for r in scene.regions]
    assert confs == sorted(confs, reverse=True)
    boxes = readers.boxes_of(scene.features)
    w, h = scene.width, scene.height
    rects = np.array([r.rect for r in scene.regions])
    expected = np.stack([rects[:, 0] / w, rects[:, 1] / h, rects[:, 2] / w,
                         rects[:, 3] / h, (rects[:, 2] - rects[:, 0]) / w,
                         (rects[:, 3] - rects[:, 1]) / h], 1)
    np.testing.assert_allclose(boxes, expected, atol=1e-6)
    assert (boxes[:, :4] >= 0).all() and (boxes[:, :4] <= 1).all()
    assert (boxes[:, 4:] > 0).all()
    assert (scene.features[:, :-6] >= 0).all()  # ReLU'd like a detector's features.


def test_predictions_mix_both_json_shapes_with_pixel_rects(small):
  scenes = {str(s.image_id): s for s in small.train + small.test}
  shapes = collections.Counter()
  with_feature = 0
  for line in (small.out_dir / "predictions.tsv").read_text().splitlines():
    image_id, text = line.split("\t")
    value = json.loads(text)
    scene = scenes[image_id]
    if isinstance(value, dict):
      shapes["dict"] += 1
      assert (value["image_h"], value["image_w"]) == (scene.height, scene.width)
      objects = value["objects"]
    else:
      shapes["list"] += 1
      objects = value
    assert [o["class"] for o in objects] == scene.tags
    assert [tuple(o["rect"]) for o in objects] == [r.rect for r in scene.regions]
    with_feature += any("feature" in o for o in objects)
  assert shapes["dict"] > 0 and shapes["list"] > 0 and with_feature > 0


def test_box_order_option_swaps_the_last_two_dims(world):
  wh = synthetic.generate_split(4, "test", world=world, box_order="x1y1x2y2wh")
  hw = synthetic.generate_split(4, "test", world=world, box_order="x1y1x2y2hw")
  for a, b in zip(wh, hw):
    np.testing.assert_array_equal(a.features[:, :-2], b.features[:, :-2])
    np.testing.assert_array_equal(a.features[:, -2:], b.features[:, [-1, -2]])


def _pose_and_colour_words(scene):
  subject = scene.regions[scene.subject].attributes
  pose = subject["pose"]
  return synthetic.POSE_WORDS[pose] + (synthetic.POSE_VERBS[pose],), subject["colour"]


def test_not_solvable_by_tags_alone(world):
  scenes = synthetic.generate_split(100, "test", seed=0, world=world)
  by_tags = collections.defaultdict(list)
  for scene in scenes:
    by_tags[tuple(sorted(scene.tags))].append(scene)
  ambiguous = 0
  for group in by_tags.values():
    for scene in group:
      others = [o for o in group if o is not scene]
      if others and all(set(o.captions).isdisjoint(scene.captions) for o in others):
        ambiguous += 1
  # Every test image shares its tag multiset with images whose captions differ.
  assert ambiguous / len(scenes) >= 0.9
  # What tells them apart: the subject's (pose, colour), unique in a group and stated
  # in every caption.
  by_layout = collections.defaultdict(list)
  for scene in scenes:
    subject = scene.regions[scene.subject].attributes
    by_layout[scene.layout].append((subject["pose"], subject["colour"]))
  for signatures in by_layout.values():
    assert len(signatures) >= 2 and len(set(signatures)) == len(signatures)
  for scene in scenes:
    pose_words, colour = _pose_and_colour_words(scene)
    for caption in scene.captions:
      lower = caption.lower()
      words = {w.strip(".,") for w in lower.split()}
      assert any(w in lower for w in pose_words) and colour in words, caption


def test_attributes_are_readable_from_region_features(world):
  """A nearest-centroid probe on the subject's region recovers pose and age."""
  train = synthetic.generate_split(96, "train", seed=0, world=world)
  test = synthetic.generate_split(48, "test", seed=0, world=world)

  def probe_accuracy(attribute):
    def xy(scenes):
      x = np.stack([s.features[s.subject, :-6] for s in scenes])
      y = np.array([s.regions[s.subject].attributes[attribute] for s in scenes])
      return x, y
    x, y = xy(train)
    labels = sorted(set(y))
    centroids = np.stack([x[y == label].mean(0) for label in labels])
    xt, yt = xy(test)
    distance = ((xt[:, None] - centroids[None]) ** 2).sum(-1)
    return (np.array(labels)[distance.argmin(1)] == yt).mean()

  assert probe_accuracy("pose") >= 0.9
  assert probe_accuracy("age") >= 0.9


def test_captions_are_varied_english(small):
  captions = [c for s in small.train for c in s.captions]
  assert len(set(captions)) == len(captions)
  openings = collections.Counter(" ".join(c.lower().split()[:2]) for c in captions)
  assert len(openings) >= 10
  endings = {c.endswith(".") for c in captions}
  assert endings == {True, False}  # Some with a full stop, some without (as in COCO).
  words = {w.strip(".,").lower() for c in captions for w in c.split()}
  assert {"sitting", "standing", "lying"} & words and ({"large", "big", "small", "little"}
                                                        & words)


def test_without_torch_writes_json_only(tmp_path, monkeypatch, caplog):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails.
  with caplog.at_level(logging.WARNING):
    data = synthetic.write_demo_dataset(tmp_path, num_train_images=4, num_test_images=4)
  assert not data.wrote_pt
  assert "train_captions.json" in data.files and "train_captions.pt" not in data.files
  assert "only the JSON captions" in caplog.text
  # The readers then need no torch, and the .pt path says clearly what is missing.
  split = readers.VinVLRetrievalData(tmp_path, "train")
  assert len(list(split)) == 4
  (tmp_path / "test_captions.pt").write_bytes(b"x")
  with pytest.raises(ImportError, match="test_captions.pt.*needs PyTorch"):
    readers.load_captions(tmp_path / "test_captions.pt")


def test_cli_writes_the_dataset(tmp_path):
  synthetic.main([str(tmp_path / "cli"), "--num_train", "4", "--num_test", "3",
                  "--no_pt"])
  assert (tmp_path / "cli" / "test_img_keys_1k.tsv").read_text().count("\n") == 3
  assert not (tmp_path / "cli" / "train_captions.pt").exists()


def test_rejects_bad_arguments(tmp_path, world):
  with pytest.raises(ValueError, match="feature_dim"):
    synthetic.write_demo_dataset(tmp_path, 2, 2, feature_dim=8)
  with pytest.raises(ValueError, match="box_order"):
    synthetic.generate_split(2, "train", world=world, box_order="xywh")
  with pytest.raises(ValueError, match="split"):
    synthetic.generate_split(2, "minival", world=world)
