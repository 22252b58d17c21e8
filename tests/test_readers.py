"""Readers of the VinVL/Oscar retrieval layout, on the demo data and corrupted copies."""

import base64
import concurrent.futures
import json
import logging
import multiprocessing
import operator
import pathlib
import pickle
import shutil

import numpy as np
import pytest

from vldeformer_jax import safe_pickle
from vldeformer_jax.data import readers, synthetic
from vldeformer_jax.data.errors import DataError, SkipReport

NUM_TRAIN, NUM_TEST = 20, 12


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo")
  return synthetic.write_demo_dataset(out, num_train_images=NUM_TRAIN,
                                      num_test_images=NUM_TEST, seed=0)


@pytest.fixture
def data_dir(dataset, tmp_path):
  """A private copy of the demo data, free to corrupt."""
  out = tmp_path / "data"
  shutil.copytree(dataset.out_dir, out)
  return out


def _scenes(dataset):
  return {str(s.image_id): s for s in dataset.train + dataset.test}


def _rows(path: pathlib.Path) -> list[bytes]:
  return path.read_bytes().split(b"\n")[:-1]


def _write_rows(path: pathlib.Path, rows: list[bytes]) -> None:
  """Rewrites a TSV and drops its lineidx (row lengths changed; it is rebuilt)."""
  path.write_bytes(b"\n".join(rows) + b"\n")
  path.with_suffix(".lineidx").unlink(missing_ok=True)


def _row_of(data_dir: pathlib.Path, image_id: str) -> int:
  return json.loads((data_dir / "imageid2idx.json").read_text())[image_id]


def _assert_names(error: DataError, path: pathlib.Path, line: int | None = None,
                  image_id: str | None = None) -> None:
  message = str(error)
  assert str(path) in message, message
  if line is not None:
    assert f"line {line}" in message, message
  if image_id is not None:
    assert image_id in message, message


# Round trips. -------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("captions_format", ["pt", "json"])
def test_split_round_trips_the_generated_data(dataset, split, captions_format):
  scenes = getattr(dataset, split)
  data = readers.VinVLRetrievalData(dataset.out_dir, split,
                                    captions_format=captions_format)
  assert data.captions_path.suffix == f".{captions_format}"
  assert data.image_ids == [str(s.image_id) for s in scenes]
  examples = list(data)
  assert len(examples) == len(scenes) == len(data)
  for example, scene in zip(examples, scenes):
    assert example.image_id == str(scene.image_id)
    np.testing.assert_array_equal(example.regions, scene.features)
    assert example.regions.dtype == np.float32
    np.testing.assert_array_equal(example.boxes, scene.features[:, -6:])
    assert example.tags == scene.tags
    assert example.tag_string == " ".join(scene.tags)
    assert example.captions == list(scene.captions)
  assert data.report.total == 0


def test_keys_subset_file_and_default_keys(dataset):
  data = readers.VinVLRetrievalData(dataset.out_dir, "test",
                                    img_keys_file="test_img_keys_1k.tsv")
  assert data.image_ids == [str(s.image_id) for s in dataset.test[:1000]]
  no_keys = readers.VinVLRetrievalData(dataset.out_dir, "train",
                                       img_keys_file=None, use_tags=False)
  assert all(e.tags == [] for e in no_keys)


def test_captions_from_pt_and_json_are_equal(dataset):
  pytest.importorskip("torch")
  for split in ("train", "test"):  # test_captions.pt holds JSON strings.
    from_pt = readers.load_captions(dataset.out_dir / f"{split}_captions.pt")
    from_json = readers.load_captions(dataset.out_dir / f"{split}_captions.json")
    assert from_pt == from_json
    scenes = getattr(dataset, split)
    assert from_json == {str(s.image_id): list(s.captions) for s in scenes}


def test_random_access_in_shuffled_order(dataset):
  scenes = _scenes(dataset)
  features = readers.RegionFeatureReader(dataset.out_dir)
  predictions = readers.PredictionsReader(dataset.out_dir / "predictions.tsv")
  ids = list(scenes)
  assert sorted(features.ids()) == sorted(ids) and len(features) == len(ids)
  assert sorted(predictions.ids()) == sorted(ids) and len(predictions) == len(ids)
  rng = np.random.default_rng(0)
  for image_id in rng.permutation(ids * 2):
    scene = scenes[image_id]
    np.testing.assert_array_equal(features[image_id], scene.features)
    np.testing.assert_array_equal(features[int(image_id)], scene.features)
    tags = predictions[image_id]
    assert tags.tags == scene.tags
    np.testing.assert_allclose(tags.rects, [r.rect for r in scene.regions], rtol=1e-6)
    np.testing.assert_allclose(tags.confs, [r.conf for r in scene.regions], rtol=1e-6)
  assert "000" + ids[0] in features  # Decimal ids are canonical ints.
  with pytest.raises(KeyError, match="features.tsv"):
    features["123abc"]


def test_readers_work_across_threads_pickles_and_processes(dataset):
  scenes = _scenes(dataset)
  reader = readers.RegionFeatureReader(dataset.out_dir)
  ids = list(scenes)
  reader[ids[0]]  # Opens the file in this process.
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    for image_id, array in zip(ids, pool.map(reader.__getitem__, ids)):
      np.testing.assert_array_equal(array, scenes[image_id].features)
  clone = pickle.loads(pickle.dumps(reader))
  assert clone.tsv._fd is None  # A copy opens its own file.
  np.testing.assert_array_equal(clone[ids[1]], scenes[ids[1]].features)
  # Real worker processes ("spawn": the test process runs JAX threads, fork is unsafe).
  with multiprocessing.get_context("spawn").Pool(2) as pool:
    arrays = pool.starmap(operator.getitem, [(reader, i) for i in ids[:6]])
  for image_id, array in zip(ids, arrays):
    np.testing.assert_array_equal(array, scenes[image_id].features)
  data = readers.VinVLRetrievalData(dataset.out_dir, "test")
  assert len(list(pickle.loads(pickle.dumps(data)))) == NUM_TEST


# Id maps. -----------------------------------------------------------------------------


def test_imageid2idx_built_by_scan_when_missing(dataset, data_dir):
  (data_dir / "imageid2idx.json").unlink()
  reader = readers.RegionFeatureReader(data_dir)
  for image_id, scene in _scenes(dataset).items():
    np.testing.assert_array_equal(reader[image_id], scene.features)


def test_id_map_pointing_at_the_wrong_row(data_dir):
  id_map = json.loads((data_dir / "imageid2idx.json").read_text())
  first, second = list(id_map)[:2]
  id_map[first], id_map[second] = id_map[second], id_map[first]
  (data_dir / "imageid2idx.json").write_text(json.dumps(id_map))
  reader = readers.RegionFeatureReader(data_dir)
  with pytest.raises(DataError, match="holds image id") as e:
    reader[first]
  _assert_names(e.value, data_dir / "imageid2idx.json", image_id=first)
  assert e.value.kind == "id_mismatch"


def test_id_map_with_an_out_of_range_row(data_dir):
  id_map = json.loads((data_dir / "imageid2idx.json").read_text())
  key = list(id_map)[3]
  id_map[key] = 10_000
  (data_dir / "imageid2idx.json").write_text(json.dumps(id_map))
  with pytest.raises(DataError, match="not in") as e:
    readers.RegionFeatureReader(data_dir)
  _assert_names(e.value, data_dir / "imageid2idx.json", image_id=key)


# Box order. ---------------------------------------------------------------------------


def test_detect_box_order_both_orders(dataset):
  scene = dataset.train[0]
  wh = scene.features
  hw = readers.convert_box_order(wh, "x1y1x2y2wh", "x1y1x2y2hw")
  assert readers.detect_box_order(wh) == "x1y1x2y2wh"
  assert readers.detect_box_order(hw) == "x1y1x2y2hw"
  back = readers.convert_box_order(hw, "x1y1x2y2hw", "x1y1x2y2wh")
  np.testing.assert_array_equal(back, wh)
  # Column 2052 is x2 - x1 in the first order (the rule the notes give).
  np.testing.assert_allclose(wh[:, 2052], wh[:, 2050] - wh[:, 2048], atol=1e-6)
  # The "+1 pixel" width convention is still recognised.
  plus_one = wh.copy()
  plus_one[:, -2:] += 1 / 640
  assert readers.detect_box_order(plus_one) == "x1y1x2y2wh"


def test_detect_box_order_refuses_when_data_cannot_tell():
  square = np.zeros((3, 10), np.float32)
  square[:, -6:] = [0.1, 0.1, 0.5, 0.5, 0.4, 0.4]
  with pytest.raises(DataError, match="no box has width != height"):
    readers.detect_box_order(square)
  neither = square.copy()
  neither[:, -6:] = [0.1, 0.2, 0.5, 0.9, 0.2, 0.3]
  with pytest.raises(DataError, match="neither order"):
    readers.detect_box_order(neither)


def test_reader_detects_and_normalises_stored_hw_order(tmp_path, dataset):
  hw = synthetic.write_demo_dataset(tmp_path, num_train_images=6, num_test_images=4,
                                    box_order="x1y1x2y2hw", write_pt=False)
  reader = readers.RegionFeatureReader(tmp_path)
  assert reader.box_order == "x1y1x2y2hw"
  raw = readers.RegionFeatureReader(tmp_path, canonical_box_order=None)
  for scene in hw.test:
    stored = raw[scene.image_id]
    np.testing.assert_array_equal(stored, scene.features)
    np.testing.assert_array_equal(reader[scene.image_id],
                                  readers.convert_box_order(stored, "x1y1x2y2hw",
                                                            "x1y1x2y2wh"))
  data = readers.VinVLRetrievalData(tmp_path, "test")
  example = next(iter(data))
  boxes = example.boxes
  np.testing.assert_allclose(boxes[:, 4], boxes[:, 2] - boxes[:, 0], atol=1e-6)
  # An explicit (wrong) order is trusted: the caller said so.
  forced = readers.RegionFeatureReader(tmp_path, box_order="x1y1x2y2wh")
  np.testing.assert_array_equal(forced[hw.test[0].image_id], hw.test[0].features)


# Predictions. -------------------------------------------------------------------------


def test_both_predictions_json_shapes():
  rect = [1.0, 2.0, 30.5, 40.0]
  as_dict = json.dumps({"image_h": 480, "image_w": 640, "objects": [
      {"class": "tennis racket", "conf": 0.9, "rect": rect},
      {"class": "man", "conf": 0.8, "rect": rect, "feature": "AAAA"}]})
  as_list = json.dumps([{"class": "tennis racket", "conf": 0.9, "rect": rect},
                        {"class": "man", "conf": 0.8, "rect": rect}])
  a = readers.parse_prediction(as_dict, image_id="7")
  b = readers.parse_prediction(as_list, image_id="7")
  assert a.tags == b.tags == ["tennis racket", "man"]
  assert a.tag_string == "tennis racket man"
  assert (a.image_h, a.image_w) == (480, 640) and b.image_h is None
  np.testing.assert_array_equal(a.rects, b.rects)
  assert a.rects.shape == (2, 4) and a.confs.dtype == np.float32


def test_demo_predictions_have_both_shapes(dataset):
  reader = readers.PredictionsReader(dataset.out_dir)
  sizes = {reader[i].image_h is None for i in reader.ids()}
  assert sizes == {True, False}


@pytest.mark.parametrize("text,match", [
    ('{"objects": [{"class": "dog", "conf": 0.5}]}', "rect"),
    ('{"objects": [{"conf": 0.5, "rect": [0, 0, 1, 1]}]}', "class"),
    ('{"objects": [{"class": "dog", "rect": [0, 0, 1, 1]}]}', "conf"),
    ('{"image_h": 4}', "objects"),
    ('"dog"', "JSON object or list"),
])
def test_malformed_prediction_objects(text, match):
  with pytest.raises(DataError, match=match) as e:
    readers.parse_prediction(text, path="p.tsv", line=9, image_id="5")
  _assert_names(e.value, pathlib.Path("p.tsv"), line=9, image_id="5")


# Bad input, one case each: the error names the file and the line. ---------------------


def _features_row(data_dir, image_id):
  row = _row_of(data_dir, image_id)
  return row, _rows(data_dir / "features.tsv")


def test_bad_base64(dataset, data_dir):
  image_id = str(dataset.test[2].image_id)
  row, rows = _features_row(data_dir, image_id)
  rows[row] = rows[row][:-10] + b"!" + rows[row][-9:]  # Same length: lineidx stays valid.
  (data_dir / "features.tsv").write_bytes(b"\n".join(rows) + b"\n")
  reader = readers.RegionFeatureReader(data_dir)
  with pytest.raises(DataError, match="bad base64") as e:
    reader[image_id]
  _assert_names(e.value, data_dir / "features.tsv", line=row + 1, image_id=image_id)
  assert e.value.kind == "bad_base64"


def _replace_features(data_dir, image_id, features=None, num_boxes=None, raw=None):
  row, rows = _features_row(data_dir, image_id)
  columns = rows[row].split(b"\t")
  if num_boxes is not None:
    columns[1] = str(num_boxes).encode()
  if features is not None:
    raw = np.asarray(features, "<f4").tobytes()
  if raw is not None:
    columns[-1] = base64.b64encode(raw)
  rows[row] = b"\t".join(columns)
  _write_rows(data_dir / "features.tsv", rows)
  return row


def test_feature_size_not_a_multiple_of_feature_dim(dataset, data_dir):
  scene = dataset.test[1]
  raw = scene.features.astype("<f4").tobytes()[:-4]  # One float short.
  row = _replace_features(data_dir, str(scene.image_id), raw=raw)
  with pytest.raises(DataError, match="not a multiple of feature_dim 2054") as e:
    readers.RegionFeatureReader(data_dir, box_order="x1y1x2y2wh")[scene.image_id]
  _assert_names(e.value, data_dir / "features.tsv", line=row + 1)
  raw = scene.features.astype("<f4").tobytes()[:-2]  # Not even whole floats.
  _replace_features(data_dir, str(scene.image_id), raw=raw)
  with pytest.raises(DataError, match="not a whole number of float32"):
    readers.RegionFeatureReader(data_dir, box_order="x1y1x2y2wh")[scene.image_id]


def test_feature_dim_mismatch_with_the_option(dataset):
  reader = readers.RegionFeatureReader(dataset.out_dir, feature_dim=2048,
                                       box_order="x1y1x2y2wh")
  with pytest.raises(DataError, match="feature_dim 2048"):
    reader[dataset.test[0].image_id]


def test_num_boxes_mismatch(dataset, data_dir):
  scene = dataset.test[0]
  row = _replace_features(data_dir, str(scene.image_id),
                          num_boxes=len(scene.regions) + 1)
  with pytest.raises(DataError, match="num_boxes column says") as e:
    readers.RegionFeatureReader(data_dir)[scene.image_id]
  _assert_names(e.value, data_dir / "features.tsv", line=row + 1,
                image_id=str(scene.image_id))
  assert e.value.kind == "num_boxes_mismatch"


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_features(dataset, data_dir, bad):
  scene = dataset.test[3]
  features = scene.features.copy()
  features[1, 7] = bad
  row = _replace_features(data_dir, str(scene.image_id), features=features)
  with pytest.raises(DataError, match="region 1 dim 7") as e:
    readers.RegionFeatureReader(data_dir)[scene.image_id]
  _assert_names(e.value, data_dir / "features.tsv", line=row + 1)
  assert e.value.kind == "non_finite"
  unchecked = readers.RegionFeatureReader(data_dir, check_finite=False)
  assert not np.isfinite(unchecked[scene.image_id]).all()


def test_truncated_features_row(dataset, data_dir):
  image_id = str(dataset.test[4].image_id)
  row, rows = _features_row(data_dir, image_id)
  rows[row] = b"\t".join(rows[row].split(b"\t")[:2])
  _write_rows(data_dir / "features.tsv", rows)
  with pytest.raises(DataError, match="truncated row: 2 tab-separated") as e:
    readers.RegionFeatureReader(data_dir)[image_id]
  _assert_names(e.value, data_dir / "features.tsv", line=row + 1)
  assert e.value.kind == "truncated_row"


def test_truncated_predictions_row(dataset, data_dir):
  rows = _rows(data_dir / "predictions.tsv")
  rows[6] = rows[6].split(b"\t")[0]
  _write_rows(data_dir / "predictions.tsv", rows)
  with pytest.raises(DataError, match="truncated row") as e:
    readers.PredictionsReader(data_dir / "predictions.tsv")
  _assert_names(e.value, data_dir / "predictions.tsv", line=7)
  report = SkipReport()
  reader = readers.PredictionsReader(data_dir / "predictions.tsv", on_error="skip",
                                     report=report)
  assert len(reader) == NUM_TRAIN + NUM_TEST - 1
  assert report.counts == {"truncated_row": 1}


def test_broken_predictions_json(dataset, data_dir):
  rows = _rows(data_dir / "predictions.tsv")
  image_id = rows[4].split(b"\t")[0].decode()
  rows[4] = rows[4][: len(rows[4]) // 2]  # Cut mid-JSON.
  _write_rows(data_dir / "predictions.tsv", rows)
  reader = readers.PredictionsReader(data_dir / "predictions.tsv")
  with pytest.raises(DataError, match="broken JSON") as e:
    reader[image_id]
  _assert_names(e.value, data_dir / "predictions.tsv", line=5, image_id=image_id)
  assert e.value.kind == "bad_json"


def test_duplicate_predictions_row(data_dir):
  rows = _rows(data_dir / "predictions.tsv")
  rows.append(rows[2])
  _write_rows(data_dir / "predictions.tsv", rows)
  with pytest.raises(DataError, match="duplicate image id, first seen on line 3") as e:
    readers.PredictionsReader(data_dir / "predictions.tsv")
  _assert_names(e.value, data_dir / "predictions.tsv", line=len(rows))


def test_broken_captions_json(data_dir):
  path = data_dir / "test_captions.json"
  text = path.read_text()
  path.write_text(text[: len(text) // 2])
  with pytest.raises(DataError, match="broken JSON") as e:
    readers.load_captions(path)
  _assert_names(e.value, path, line=text[: len(text) // 2].count("\n") + 1)
  with pytest.raises(DataError, match="broken JSON"):
    readers.VinVLRetrievalData(data_dir, "test", captions_format="json")


def test_broken_json_string_in_captions_pt(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "x_captions.pt"
  torch.save({5: '["a dog", "a cat"', 6: ["fine"]}, path)
  with pytest.raises(DataError, match="not valid JSON") as e:
    readers.load_captions(path)
  _assert_names(e.value, path, image_id="5")
  assert "entry 0" in str(e.value)


@pytest.mark.parametrize("fmt", ["json", "pt"])
def test_empty_caption_list(dataset, data_dir, fmt):
  if fmt == "pt":
    torch = pytest.importorskip("torch")
  image_id = str(dataset.test[5].image_id)
  captions = json.loads((data_dir / "test_captions.json").read_text())
  captions[image_id] = []
  (data_dir / "test_captions.json").write_text(json.dumps(captions))
  if fmt == "pt":
    torch.save({int(k): v for k, v in captions.items()}, data_dir / "test_captions.pt")
  path = data_dir / f"test_captions.{fmt}"
  with pytest.raises(DataError, match="empty caption list") as e:
    readers.VinVLRetrievalData(data_dir, "test", captions_format=fmt)
  _assert_names(e.value, path, image_id=image_id)
  assert f"entry {list(captions).index(image_id)}" in str(e.value)
  assert e.value.kind == "empty_captions"


def test_empty_caption_string(tmp_path):
  path = tmp_path / "c.json"
  path.write_text(json.dumps({"3": ["a dog", "  "]}))
  with pytest.raises(DataError, match="caption 1 is empty"):
    readers.load_captions(path)


def test_caption_image_id_without_features(dataset, data_dir):
  image_id = str(dataset.test[6].image_id)
  row, rows = _features_row(data_dir, image_id)
  del rows[row]
  _write_rows(data_dir / "features.tsv", rows)
  (data_dir / "imageid2idx.json").unlink()  # Rebuilt by a scan, without the image.
  with pytest.raises(DataError, match="has captions but no features") as e:
    readers.VinVLRetrievalData(data_dir, "test")
  _assert_names(e.value, data_dir / "test_captions.json", image_id=image_id)
  assert "features.tsv" in str(e.value) and "line 7 of test_img_keys.tsv" in str(e.value)
  assert e.value.kind == "missing_features"


def test_caption_image_id_without_tags(dataset, data_dir):
  image_id = str(dataset.test[7].image_id)
  rows = [r for r in _rows(data_dir / "predictions.tsv")
          if r.split(b"\t")[0].decode() != image_id]
  _write_rows(data_dir / "predictions.tsv", rows)
  with pytest.raises(DataError, match="no tags in") as e:
    readers.VinVLRetrievalData(data_dir, "test")
  _assert_names(e.value, data_dir / "test_captions.json", image_id=image_id)
  assert len(readers.VinVLRetrievalData(data_dir, "test", use_tags=False)) == NUM_TEST


def test_key_without_captions_and_bad_key_lines(dataset, data_dir):
  keys = data_dir / "test_img_keys.tsv"
  keys.write_text(keys.read_text() + "999999999\n")
  with pytest.raises(DataError, match="no \\(valid\\) captions") as e:
    readers.VinVLRetrievalData(data_dir, "test")
  _assert_names(e.value, keys, line=NUM_TEST + 1, image_id="999999999")
  first = str(dataset.test[0].image_id)
  keys.write_text(f"{first}\n\n{first}\n")
  with pytest.raises(DataError, match="one image id per line") as e:
    readers.read_image_keys(keys)
  _assert_names(e.value, keys, line=2)
  report = SkipReport()
  assert readers.read_image_keys(keys, on_error="skip", report=report) == [(1, first)]
  assert report.counts == {"bad_row": 1, "duplicate_id": 1}


# Unsafe pickles. ----------------------------------------------------------------------


def _plant_marker(path):
  pathlib.Path(path).write_text("code ran")


class _Payload:
  """Unpickling this calls `_plant_marker`: a pickle that carries code."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (_plant_marker, (str(self.marker),))


@pytest.mark.parametrize("writer", ["torch_zip", "plain_pickle"])
def test_pickle_carrying_code_is_refused_and_never_runs(dataset, data_dir, writer):
  torch = pytest.importorskip("torch")
  marker = data_dir / "MARKER"
  path = data_dir / "test_captions.pt"
  payload = {int(dataset.test[0].image_id): _Payload(marker)}
  if writer == "torch_zip":
    torch.save(payload, path)
  else:
    with open(path, "wb") as f:
      pickle.dump(payload, f)
  assert not marker.exists()
  with pytest.raises(DataError, match="refused") as e:
    readers.load_captions(path)
  _assert_names(e.value, path)
  assert e.value.kind == "unsafe_pickle" and "_plant_marker" in str(e.value)
  with pytest.raises(DataError, match="refused"):
    readers.VinVLRetrievalData(data_dir, "test", captions_format="pt")
  assert not marker.exists()


def test_pickle_globals_parses_without_running(tmp_path):
  marker = tmp_path / "MARKER"
  data = pickle.dumps({1: _Payload(marker)})
  names = safe_pickle.pickle_globals(data)
  assert any(n.endswith("_plant_marker") for n in names)
  assert safe_pickle.pickle_globals(pickle.dumps({1: ["a", "b"]})) == []
  assert safe_pickle.pickle_globals(b"not a pickle") == []
  assert not marker.exists()


def test_unreadable_captions_pt(tmp_path):
  pytest.importorskip("torch")
  path = tmp_path / "test_captions.pt"
  path.write_bytes(b"not a torch file")
  with pytest.raises(DataError, match="not a") as e:
    readers.load_captions(path)
  _assert_names(e.value, path)
  assert e.value.kind == "bad_captions"


# The skip policy. ---------------------------------------------------------------------


def test_skip_policy_counts_and_reports(dataset, data_dir, caplog):
  test = [str(s.image_id) for s in dataset.test]
  # 1: bad base64 (same length), 2: NaN, 3: empty captions, 4: no tags, 5: broken tags.
  row, rows = _features_row(data_dir, test[1])
  rows[row] = rows[row][:-10] + b"*" + rows[row][-9:]
  (data_dir / "features.tsv").write_bytes(b"\n".join(rows) + b"\n")
  features = dataset.test[2].features.copy()
  features[0, 0] = np.nan
  _replace_features(data_dir, test[2], features=features)
  captions = json.loads((data_dir / "test_captions.json").read_text())
  captions[test[3]] = []
  (data_dir / "test_captions.json").write_text(json.dumps(captions))
  predictions = []
  for r in _rows(data_dir / "predictions.tsv"):
    image_id = r.split(b"\t")[0].decode()
    if image_id == test[5]:
      r = r[:-3]
    if image_id != test[4]:
      predictions.append(r)
  _write_rows(data_dir / "predictions.tsv", predictions)

  with pytest.raises(DataError):
    readers.VinVLRetrievalData(data_dir, "test", captions_format="json")
  with caplog.at_level(logging.WARNING, logger="vldeformer_jax.data.errors"):
    data = readers.VinVLRetrievalData(data_dir, "test", captions_format="json",
                                      on_error="skip")
    assert data.report.counts == {"empty_captions": 1, "missing_tags": 1}
    assert len(data) == NUM_TEST - 2
    examples = list(data)
  assert [e.image_id for e in examples] == [i for i in test if i not in test[1:6]]
  assert data.report.counts == {"empty_captions": 1, "missing_tags": 1,
                                "bad_base64": 1, "non_finite": 1, "bad_json": 1}
  assert data.report.total == 5  # One per bad image.
  list(data)  # A second pass counts nothing twice.
  assert data.report.total == 5
  summary = data.report.summary()
  assert "skipped 5 problem(s)" in summary and "features.tsv" in summary
  assert "Data skip report" in caplog.text and "bad_base64: 1" in caplog.text
  assert "Skipping bad data" in caplog.text
  assert len(data) == NUM_TEST - 2  # Bad rows are found only when read ...
  assert data.validate() is data.report
  assert len(data) == NUM_TEST - 5 and data.report.total == 5  # ... or validated.
  assert [e.image_id for e in data] == [e.image_id for e in examples]


# Small pieces. ------------------------------------------------------------------------


def test_canonical_image_id():
  assert readers.canonical_image_id(391895) == "391895"
  assert readers.canonical_image_id("000391895") == "391895"
  assert readers.canonical_image_id(np.int64(7)) == "7"
  assert readers.canonical_image_id(" COCO_val2014_42 ") == "COCO_val2014_42"
  with pytest.raises(TypeError):
    readers.canonical_image_id(1.5)


def test_bad_options_are_rejected(dataset):
  with pytest.raises(ValueError, match="on_error"):
    readers.VinVLRetrievalData(dataset.out_dir, "test", on_error="ignore")
  with pytest.raises(ValueError, match="box_order"):
    readers.RegionFeatureReader(dataset.out_dir, box_order="xywh")
  with pytest.raises(FileNotFoundError, match="minival"):
    readers.VinVLRetrievalData(dataset.out_dir, "minival")
