"""Retrieval: exact (chunked, sharded) top-k, FAISS, the index format, bin tools."""

import dataclasses
import shutil
import sys

import numpy as np
import pytest

from conftest import result_lines, run_bin
from vldeformer_jax import retrieval
from vldeformer_jax.data.sources import image_objects
from vldeformer_jax.sharding import make_mesh


def reference_top_k(queries: np.ndarray, gallery: np.ndarray, k: int):
  """NumPy brute force: float64 scores, stable sort (ties: lowest index first)."""
  scores = queries.astype(np.float64) @ gallery.astype(np.float64).T
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, order, axis=1), order


def unit_rows(x: np.ndarray) -> np.ndarray:
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# ----------------------------------------------------------------------------------
# Exact search.


@pytest.mark.parametrize("n, chunk, k, devices", [
    (37, 5, 7, None),    # chunks do not divide N
    (37, 5, 12, 4),      # k > chunk, sharded
    (100, 16, 10, 4),    # several chunks per device
    (50, 7, 50, 4),      # k == N
    (5, 64, 10, None),   # k > N: capped at N
    (3, 2, 3, 4),        # fewer rows than devices
])
def test_exact_search_equals_brute_force_with_ties(n, chunk, k, devices):
  rng = np.random.default_rng(n + k)
  # Small integer entries: scores are exact in float32 and full of ties.
  gallery = rng.integers(-1, 2, (n, 6)).astype(np.float32)
  queries = rng.integers(-1, 2, (9, 6)).astype(np.float32)
  mesh = make_mesh(devices) if devices else None
  scores, indices = retrieval.exact_search(queries, gallery, k, chunk_size=chunk,
                                           mesh=mesh)
  want_scores, want_indices = reference_top_k(queries, gallery, min(k, n))
  assert scores.dtype == np.float32 and indices.dtype == np.int64
  assert indices.shape == (9, min(k, n))
  np.testing.assert_array_equal(indices, want_indices)
  np.testing.assert_array_equal(scores, want_scores)


def test_exact_search_continuous_data_sharded():
  rng = np.random.default_rng(1)
  gallery = unit_rows(rng.normal(size=(1001, 32)))
  queries = unit_rows(rng.normal(size=(13, 32)))
  scores, indices = retrieval.exact_search(queries, gallery, 10, chunk_size=96,
                                           mesh=make_mesh(4))
  want_scores, want_indices = reference_top_k(queries, gallery, 10)
  np.testing.assert_array_equal(indices, want_indices)
  np.testing.assert_allclose(scores, want_scores, atol=1e-5)


@pytest.mark.parametrize("devices", [None, 4])
def test_exact_index_picks_the_chunk_from_its_score_budget(devices):
  """Without chunk_size, queries x chunk stays within max_scores: a single query
  scores many rows per step, a batch few, and the ranking is the same."""
  rng = np.random.default_rng(5)
  gallery = rng.integers(-1, 2, (203, 6)).astype(np.float32)
  queries = rng.integers(-1, 2, (9, 6)).astype(np.float32)
  index = retrieval.ExactIndex(gallery, mesh=make_mesh(devices) if devices else None,
                               max_scores=64)
  per_device = index.rows_per_device
  assert index.chunk_for(1) == min(64, per_device)
  assert index.chunk_for(16) == 4 and index.chunk_for(128) == 1
  want_scores, want_indices = reference_top_k(queries, gallery, 11)
  for batch in (1, 16):  # chunks of 64 (or all rows) and of 4 rows, with remainders
    scores, indices = index.search(queries, 11, query_batch=batch)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_array_equal(scores, want_scores)
  bad = gallery.copy()
  bad[-1, 0] = np.inf  # in the last, partial chunk
  with pytest.raises(ValueError, match="NaN or Inf"):
    retrieval.ExactIndex(bad, max_scores=64).search(queries, 3)


def test_exact_index_reuses_the_placed_gallery_across_query_batches():
  rng = np.random.default_rng(2)
  gallery = unit_rows(rng.normal(size=(200, 16)))
  queries = unit_rows(rng.normal(size=(21, 16)))
  index = retrieval.ExactIndex(gallery, chunk_size=32, mesh=make_mesh(8))
  batched = index.search(queries, 5, query_batch=4)  # 6 batches, the last padded
  whole = index.search(queries, 5)
  # Matmuls of other shapes may round the last bit differently; the ranking holds.
  np.testing.assert_array_equal(batched[1], whole[1])
  np.testing.assert_allclose(batched[0], whole[0], rtol=0, atol=1e-6)
  np.testing.assert_array_equal(whole[1], reference_top_k(queries, gallery, 5)[1])


@pytest.mark.parametrize("devices", [None, 4])
def test_padding_rows_never_appear(devices):
  # Every real score is negative, so an unmasked zero padding row would win.
  rng = np.random.default_rng(3)
  queries = np.abs(rng.normal(size=(4, 8))).astype(np.float32) + 0.1
  gallery = -np.abs(rng.normal(size=(9, 8))).astype(np.float32) - 0.1
  mesh = make_mesh(devices) if devices else None
  scores, indices = retrieval.exact_search(queries, gallery, 9, chunk_size=2, mesh=mesh)
  assert indices.shape == (4, 9)
  for row in indices:
    assert sorted(row.tolist()) == list(range(9))
  assert np.all(np.isfinite(scores)) and np.all(scores < 0)


@pytest.mark.parametrize("n, block, k, chunk, devices", [
    (1000, 7, 10, None, None),  # many blocks, the last one partial
    (257, 5, 12, None, 4),      # k > block, sharded
    (300, 1, 3, 64, None),      # one column per block, several chunks
    (64, 16, 64, None, None),   # k == N
    (50, 128, 5, None, None),   # one block holds every row
])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_blocked_top_k_equals_brute_force_with_ties(n, block, k, chunk, devices, dtype):
  """Per-block top-k, then the best of the candidates: the same rows and order as
  one top-k, ties included (integer entries are exact in every gallery dtype)."""
  rng = np.random.default_rng(n + block)
  gallery = rng.integers(-1, 2, (n, 6)).astype(np.float32)
  queries = rng.integers(-1, 2, (9, 6)).astype(np.float32)
  index = retrieval.ExactIndex(gallery, chunk_size=chunk, dtype=dtype, topk_block=block,
                               mesh=make_mesh(devices) if devices else None)
  assert index.gallery.dtype == np.dtype(dtype)
  scores, indices = index.search(queries, k)
  want_scores, want_indices = reference_top_k(queries, gallery, min(k, n))
  np.testing.assert_array_equal(indices, want_indices)
  np.testing.assert_array_equal(scores, want_scores)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_gallery_recall(dtype):
  rng = np.random.default_rng(6)
  gallery = unit_rows(rng.normal(size=(3000, 64)))
  queries = unit_rows(rng.normal(size=(50, 64)))
  half = retrieval.ExactIndex(gallery, dtype=dtype)
  recall = retrieval.measure_recall(half, gallery, queries, k=10)
  assert 0.9 <= recall <= 1.0  # (bfloat16 keeps 8 bits: near-ties swap, few rows drop)
  with pytest.raises(ValueError, match="dtype must be one of"):
    retrieval.ExactIndex(gallery, dtype="int8")


@pytest.mark.parametrize("devices", [None, 4])
def test_search_texts_runs_encoder_and_search_as_one_call(tiny_model_dir, devices):
  """Token ids -> top-k in one compiled program, as encode_text + normalise + search."""
  from vldeformer_jax.encoder import load_pretrained
  model = load_pretrained(tiny_model_dir, batch_size=4)
  gallery = unit_rows(np.random.default_rng(7).normal(size=(700, 32)))
  index = retrieval.ExactIndex(gallery, topk_block=64,
                               mesh=make_mesh(devices) if devices else None)
  texts = ["a dog on a bench", "two red cars near a tree", "a man"]
  scores, indices = index.search_texts(model, texts, 7)
  queries = retrieval.l2_normalize(model.encode_text(texts))[0]
  want_scores, want_indices = reference_top_k(queries, gallery, 7)
  np.testing.assert_array_equal(indices, want_indices)
  np.testing.assert_allclose(scores, want_scores, atol=1e-5)
  with pytest.raises(ValueError, match="1 to 4 captions"):
    index.search_texts(model, texts * 2, 7)
  # search_texts of the module batches any number of queries through it.
  index_of = retrieval.RetrievalIndex(gallery, np.ones(700, np.float32),
                                      [str(i) for i in range(700)], ["t"] * 700)
  hits = retrieval.search_texts(model, index_of, texts * 2, 7, index)
  assert [[int(h.image_id) for h in row] for row in hits] == want_indices.tolist() * 2


def test_exact_search_rejects_bad_input():
  gallery = np.ones((10, 4), np.float32)
  with pytest.raises(ValueError, match=r"queries must be \[q, 4\]"):
    retrieval.exact_search(np.ones((2, 5), np.float32), gallery, 3)
  with pytest.raises(ValueError, match="k must be >= 1"):
    retrieval.exact_search(np.ones((2, 4), np.float32), gallery, 0)
  with pytest.raises(ValueError, match="non-empty"):
    retrieval.exact_search(np.ones((2, 4), np.float32), gallery[:0], 3)
  bad = gallery.copy()
  bad[7, 2] = np.nan
  with pytest.raises(ValueError, match="NaN or Inf"):
    retrieval.exact_search(np.ones((2, 4), np.float32), bad, 3, chunk_size=3,
                           mesh=make_mesh(2))


# ----------------------------------------------------------------------------------
# FAISS.


def clustered(rng, num_clusters=40, per_cluster=100, dim=32, noise=0.15):
  centers = unit_rows(rng.normal(size=(num_clusters, dim)))
  points = np.repeat(centers, per_cluster, axis=0)
  return unit_rows(points + noise * rng.normal(size=points.shape) / np.sqrt(dim))


def test_faiss_flat_equals_exact():
  pytest.importorskip("faiss")
  rng = np.random.default_rng(4)
  gallery = unit_rows(rng.normal(size=(2000, 32)))
  queries = unit_rows(rng.normal(size=(25, 32)))
  flat = retrieval.FaissIndex(gallery, "flat")
  scores, indices = flat.search(queries, 10)
  want_scores, want_indices = retrieval.exact_search(queries, gallery, 10)
  np.testing.assert_array_equal(indices, want_indices)
  np.testing.assert_allclose(scores, want_scores, atol=1e-5)
  assert retrieval.measure_recall(flat, gallery, queries) == 1.0


def test_approximate_recall_is_measured(record_property):
  pytest.importorskip("faiss")
  rng = np.random.default_rng(5)
  gallery = clustered(rng)  # 4000 x 32, 40 clusters
  picks = rng.choice(len(gallery), 200, replace=False)
  queries = unit_rows(gallery[picks] + 0.05 * rng.normal(size=(200, 32)))
  exact = retrieval.ExactIndex(gallery)
  recalls = {}
  ivf = retrieval.FaissIndex(gallery, "ivf", nlist=40, nprobe=4)
  recalls["ivf_nprobe4"] = retrieval.measure_recall(ivf, gallery, queries, 10, exact)
  hnsw = retrieval.FaissIndex(gallery, "hnsw", hnsw_m=16, ef_search=64)
  recalls["hnsw_ef64"] = retrieval.measure_recall(hnsw, gallery, queries, 10, exact)
  ivf.configure(nprobe=40)  # every list: exhaustive
  recalls["ivf_nprobe40"] = retrieval.measure_recall(ivf, gallery, queries, 10, exact)
  # Unclustered data, one list of 64 probed: recall must drop well below 1.
  uniform = unit_rows(rng.normal(size=(4000, 32)))
  coarse = retrieval.FaissIndex(uniform, "ivf", nlist=64, nprobe=1)
  recalls["ivf_uniform_nprobe1"] = retrieval.measure_recall(
      coarse, uniform, unit_rows(rng.normal(size=(100, 32))), 10)
  for name, value in recalls.items():
    record_property(f"recall_at_10_{name}", value)
  print("recall@10:", {k: round(v, 4) for k, v in recalls.items()})
  assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in recalls.values())
  assert recalls["ivf_nprobe4"] >= 0.9 and recalls["hnsw_ef64"] >= 0.9
  assert recalls["ivf_nprobe40"] == 1.0
  assert recalls["ivf_uniform_nprobe1"] < 0.8


def test_faiss_save_load_and_options(tmp_path):
  pytest.importorskip("faiss")
  rng = np.random.default_rng(6)
  gallery = clustered(rng, num_clusters=8, per_cluster=50)
  queries = gallery[:5]
  ivf = retrieval.FaissIndex(gallery, "ivf", nlist=8, nprobe=2)
  ivf.save(tmp_path / "a.index")
  loaded = retrieval.FaissIndex.load(tmp_path / "a.index")
  assert loaded.kind == "ivf" and loaded.num_rows == 400 and loaded.dim == 32
  for got, want in zip(loaded.search(queries, 7), ivf.search(queries, 7)):
    np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match="nprobe applies to an ivf index"):
    retrieval.FaissIndex(gallery, "hnsw").configure(nprobe=2)
  with pytest.raises(ValueError, match="nprobe must be in"):
    ivf.configure(nprobe=9)
  with pytest.raises(ValueError, match="kind must be one of"):
    retrieval.FaissIndex(gallery, "pq")
  with pytest.raises(FileNotFoundError, match="no such FAISS index"):
    retrieval.FaissIndex.load(tmp_path / "missing.index")


def test_missing_faiss_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
  with pytest.raises(ImportError, match=r"pip install -e '\.\[faiss\]'"):
    retrieval.FaissIndex(np.ones((4, 2), np.float32))


# ----------------------------------------------------------------------------------
# The index format and in-process search.


def make_index(rng, n=6, d=8, with_captions=True) -> retrieval.RetrievalIndex:
  emb, norms = retrieval.l2_normalize(rng.normal(size=(n, d)))
  parts = {}
  if with_captions:
    # Two captions per image; the first lies on its image's embedding.
    owner = np.repeat(np.arange(n), 2)
    raw = emb[owner] + np.where(np.arange(2 * n) % 2, 1.0, 0.0)[:, None] * rng.normal(
        size=(2 * n, d))
    cap_emb, cap_norms = retrieval.l2_normalize(raw)
    parts = dict(caption_embeddings=cap_emb, caption_norms=cap_norms,
                 captions=[f"caption {c} of image {c // 2}, naïve ☃"
                           for c in range(2 * n)],
                 caption_to_image=owner.astype(np.int64))
  return retrieval.RetrievalIndex(
      emb, norms, [str(100 + i) for i in range(n)], [f"dog tag{i}" for i in range(n)],
      metadata={"model_dir": "/models/x", "split": "test"}, **parts)


def assert_same_index(a: retrieval.RetrievalIndex, b: retrieval.RetrievalIndex):
  for name in ("image_embeddings", "image_norms", "caption_embeddings", "caption_norms",
               "caption_to_image"):
    x, y = getattr(a, name), getattr(b, name)
    assert (x is None) == (y is None), name
    if x is not None:
      np.testing.assert_array_equal(x, y)
      assert x.dtype == y.dtype, name
  assert (a.image_ids, a.tags, a.captions) == (b.image_ids, b.tags, b.captions)


@pytest.mark.parametrize("name", ["idx", "idx.npz"])
@pytest.mark.parametrize("with_captions", [True, False])
def test_index_round_trip(tmp_path, rng, name, with_captions):
  index = make_index(rng, with_captions=with_captions)
  path = retrieval.save_index(index, tmp_path / name)
  loaded = retrieval.load_index(path, hidden_size=8)
  assert_same_index(index, loaded)
  assert loaded.metadata["model_dir"] == "/models/x"
  assert loaded.metadata["split"] == "test"
  assert retrieval.index_metadata(path)["num_images"] == 6
  np.testing.assert_allclose(loaded.raw_image_embeddings(),
                             index.image_embeddings * index.image_norms[:, None])
  # Saving again over an index replaces it.
  retrieval.save_index(make_index(rng, n=3, with_captions=with_captions), path)
  assert retrieval.load_index(path).num_images == 3


def test_index_load_errors(tmp_path, rng):
  fresh = lambda: retrieval.save_index(make_index(rng), tmp_path / "idx")
  path = fresh()
  with pytest.raises(FileNotFoundError, match="no such index"):
    retrieval.load_index(tmp_path / "nope")
  with pytest.raises(retrieval.IndexFormatError,
                     match=r"idx/image_embeddings\.npy: embeddings have dim 8 but the "
                           r"model's hidden size is 384"):
    retrieval.load_index(path, hidden_size=384)
  (path / "tags_utf8.npy").unlink()
  with pytest.raises(retrieval.IndexFormatError, match=r"tags_utf8\.npy: missing"):
    retrieval.load_index(path)
  # An object array (a pickle) is refused, naming the file.
  np.save(fresh() / "tags_utf8.npy", np.array([{"a": 1}], dtype=object),
          allow_pickle=True)
  with pytest.raises(retrieval.IndexFormatError, match=r"tags_utf8\.npy: unreadable"):
    retrieval.load_index(path)
  np.save(fresh() / "image_embeddings.npy", np.ones((6, 8), np.float64))
  with pytest.raises(retrieval.IndexFormatError,
                     match=r"image_embeddings\.npy: expected a 2-d float32 array"):
    retrieval.load_index(path)
  np.save(fresh() / "image_norms.npy", np.ones(5, np.float32))
  with pytest.raises(retrieval.IndexFormatError, match="image_norms has 5 entries"):
    retrieval.load_index(path)
  (fresh() / "index.json").write_text("{not json")
  with pytest.raises(retrieval.IndexFormatError, match=r"index\.json: not JSON"):
    retrieval.load_index(path)
  (fresh() / "index.json").unlink()
  with pytest.raises(retrieval.IndexFormatError, match="no index.json"):
    retrieval.load_index(path)
  other = tmp_path / "other.npz"
  np.savez(other, x=np.ones(3))
  with pytest.raises(retrieval.IndexFormatError, match="no metadata_json entry"):
    retrieval.load_index(other)
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(retrieval.IndexFormatError, match=r"junk\.npz: not a readable"):
    retrieval.load_index(tmp_path / "junk.npz")


def test_open_index_needs_the_model_it_was_built_with(tmp_path, rng):
  index = make_index(rng)
  index.metadata["model_dir"] = str(tmp_path / "deleted")
  path = retrieval.save_index(index, tmp_path / "idx")
  with pytest.raises(FileNotFoundError, match=r"the model the index was built with "
                     r"\(.*deleted\) is gone; pass --model"):
    retrieval.open_index(path)
  alone = retrieval.open_index(path, need_model=False)  # image -> text needs no model
  assert alone.model is None and alone.model_dir is None
  assert_same_index(alone.index, index)


@pytest.fixture
def other_weights(tiny_model_dir, vocab_file, tmp_path):
  """A model of the tiny model's size (and vocabulary) with other weights."""
  from vldeformer_jax.config import ModelConfig
  from vldeformer_jax.model_dir import random_params, save_model_dir
  config = ModelConfig.from_json(tiny_model_dir / "config.json")
  return save_model_dir(tmp_path / "other", config, random_params(config, seed=1),
                        vocab_file)


def test_open_index_refuses_another_models_weights(tmp_path, rng, tiny_model_dir,
                                                   other_weights, caplog):
  from vldeformer_jax.model_dir import fingerprint
  built_with = fingerprint(tiny_model_dir)
  assert fingerprint(shutil.copytree(tiny_model_dir, tmp_path / "copy")) == built_with
  assert fingerprint(other_weights) != built_with
  index = make_index(rng, d=32)  # the tiny model's width
  index.metadata.update(model_dir=str(tiny_model_dir),
                        model_fingerprint=built_with)
  path = retrieval.save_index(index, tmp_path / "idx")
  assert retrieval.open_index(path).model_dir == str(tiny_model_dir)
  assert retrieval.open_index(path, tmp_path / "copy").model is not None
  want = (rf"the weights of the model {other_weights} differ from those the index "
          rf"{path} was built with \({tiny_model_dir}\): its scores would be wrong; "
          r"rebuild the index with bin/index, or pass --allow_model_mismatch")
  with pytest.raises(retrieval.IndexFormatError, match=want):
    retrieval.open_index(path, other_weights)
  from vldeformer_jax import serving  # bin/serve opens an index the same way
  with pytest.raises(retrieval.IndexFormatError, match=want):
    serving.Service.load(path, other_weights)
  with caplog.at_level("WARNING"):
    opened = retrieval.open_index(path, other_weights, allow_model_mismatch=True)
  assert opened.model_dir == other_weights
  assert "(--allow_model_mismatch given: going on)" in caplog.text
  # An index built before fingerprints were recorded: a warning, not a failure.
  del index.metadata["model_fingerprint"]
  retrieval.save_index(index, path)
  caplog.clear()
  with caplog.at_level("WARNING"):
    assert retrieval.open_index(path, other_weights).model is not None
  assert f"{path} records no fingerprint of the model it was built with" in caplog.text


def test_bin_search_refuses_another_models_weights(tmp_path, rng, tiny_model_dir,
                                                   other_weights, capsys):
  from vldeformer_jax.cli import search
  from vldeformer_jax.model_dir import fingerprint
  index = make_index(rng, d=32)
  index.metadata.update(model_dir=str(tiny_model_dir),
                        model_fingerprint=fingerprint(tiny_model_dir))
  path = retrieval.save_index(index, tmp_path / "idx")
  argv = ["--index", str(path), "--model", str(other_weights), "a dog", "-k", "2"]
  assert search.main(argv) == 1
  err = capsys.readouterr().err
  assert err.startswith(f"bin/search: error: the weights of the model {other_weights} "
                        f"differ from those the index {path} was built with")
  assert "Traceback" not in err
  assert search.main(argv + ["--allow_model_mismatch"]) == 0
  assert len(result_lines(capsys.readouterr().out)) == 2


def test_build_index_records_the_models_fingerprint(demo_data, tiny_model_dir):
  from vldeformer_jax.data import readers
  from vldeformer_jax.model_dir import fingerprint
  data = readers.VinVLRetrievalData(demo_data.out_dir, "test")
  index = retrieval.build_index(FakeImageTextModel(), data, model_dir=tiny_model_dir)
  assert index.metadata["model_fingerprint"] == fingerprint(tiny_model_dir)
  assert retrieval.build_index(FakeImageTextModel(), data, model_dir="/m").metadata[
      "model_fingerprint"] is None  # no parameters file to fingerprint


def test_save_refuses_to_replace_other_things(tmp_path, rng):
  from vldeformer_jax.fileio import OutputError
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("keep me")
  with pytest.raises(OutputError, match="is not an index .*; pass --overwrite"):
    retrieval.save_index(make_index(rng), mine)
  assert (mine / "notes.txt").read_text() == "keep me"
  (tmp_path / "file.npz").write_bytes(b"keep me too")  # a .npz that is not an index
  with pytest.raises(OutputError, match="is not an index"):
    retrieval.save_index(make_index(rng), tmp_path / "file.npz")
  assert (tmp_path / "file.npz").read_bytes() == b"keep me too"
  with pytest.raises(OutputError, match=r"file\.npz is a file, not a directory"):
    retrieval.save_index(make_index(rng), tmp_path / "file.npz" / "sub")
  # What --overwrite says: the directory is replaced by the index, in one step.
  retrieval.save_index(make_index(rng), mine, overwrite=True)
  assert retrieval.is_index(mine) and not (mine / "notes.txt").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["file.npz", "mine"]


def test_inconsistent_index_is_rejected(rng):
  good = make_index(rng)
  with pytest.raises(ValueError, match="tags has 5 entries"):
    retrieval.RetrievalIndex(good.image_embeddings, good.image_norms, good.image_ids,
                             good.tags[:5])
  with pytest.raises(ValueError, match="caption_to_image holds a row outside"):
    retrieval.RetrievalIndex(good.image_embeddings, good.image_norms, good.image_ids,
                             good.tags, good.caption_embeddings, good.caption_norms,
                             good.captions, good.caption_to_image + 1)


class FixedTextEncoder:
  """A stand-in text encoder: maps each known query to a fixed vector."""

  def __init__(self, vectors: dict[str, np.ndarray]):
    self.vectors = vectors
    self.config = type("Config", (), {"hidden_size": len(next(iter(vectors.values())))})

  def encode_text(self, texts):
    return np.stack([self.vectors[t] for t in texts]).astype(np.float32)


def test_search_text_and_image_in_process(rng):
  index = make_index(rng)
  # The query points at image 4 (scaled: cosine ignores the norm).
  model = FixedTextEncoder({"a dog": 3.0 * index.image_embeddings[4]})
  hits = retrieval.search_text(model, index, "a dog", k=3)
  assert len(hits) == 3 and hits[0] == ("104", "dog tag4", pytest.approx(1.0, abs=1e-5))
  assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
  if retrieval_has_faiss():
    flat = retrieval.FaissIndex(index.image_embeddings, "flat")
    via_faiss = retrieval.search_text(model, index, "a dog", 3, flat)
    assert [h[:2] for h in via_faiss] == [h[:2] for h in hits]
    np.testing.assert_allclose([h.score for h in via_faiss], [h.score for h in hits],
                               atol=1e-5)
  caps = retrieval.search_image(index, 104, k=4)  # an int id is canonicalised
  assert caps[0].caption.startswith("caption 8 of image 4") and caps[0].image_id == "104"
  assert len(caps) == 4
  with pytest.raises(KeyError, match="image id 999 is not in the index"):
    retrieval.search_image(index, "999")
  with pytest.raises(ValueError, match="no captions"):
    retrieval.search_image(make_index(rng, with_captions=False), "100")
  with pytest.raises(retrieval.IndexFormatError, match="hidden size is 3"):
    retrieval.search_text(FixedTextEncoder({"x": np.ones(3)}), index, "x")


def retrieval_has_faiss() -> bool:
  try:
    retrieval.import_faiss()
  except ImportError:
    return False
  return True


# ----------------------------------------------------------------------------------
# End to end through bin/index and bin/search.


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
  from vldeformer_jax.data.synthetic import write_demo_dataset
  root = tmp_path_factory.mktemp("retrieval_data")
  return write_demo_dataset(root, num_train_images=8, num_test_images=16)


class FakeImageTextModel:
  """Deterministic stand-in encoders: an image's vector depends on its tags and
  regions, a caption's on its text, so misaligned rows show up."""

  def __init__(self, dim=8):
    self.batch_size = 64
    self.config = type("Config", (), {"hidden_size": dim, "max_regions": 50,
                                      "pooling": "mean"})
    self.calls = []

  @staticmethod
  def _vector(seed_text: str, extra: float, dim: int) -> np.ndarray:
    seed = int.from_bytes(seed_text.encode()[:8].ljust(8, b"_"), "little")
    return np.random.default_rng(seed).normal(size=dim) + extra

  def encode_image(self, tags, regions):
    self.calls.append(len(tags))
    return np.stack([self._vector(t, float(r.sum()) % 1.0, self.config.hidden_size)
                     for t, r in zip(tags, regions)]).astype(np.float32)

  def encode_text(self, texts):
    return np.stack([self._vector(t[::-1], len(t) / 100, self.config.hidden_size)
                     for t in texts]).astype(np.float32)


def test_build_index_aligns_rows_across_batches(demo_data):
  from vldeformer_jax.data import readers
  data = readers.VinVLRetrievalData(demo_data.out_dir, "test")
  model = FakeImageTextModel()
  index = retrieval.build_index(model, data, batch_size=5, model_dir="/m")
  assert model.calls == [5, 5, 5, 1]
  assert index.image_ids == data.image_ids and index.metadata["model_dir"] == "/m"
  for row, image_id in enumerate(index.image_ids):
    example = data.example(image_id)
    objects = image_objects(example, 50)
    tags, regions = objects.tag_string, objects.regions
    want, _ = retrieval.l2_normalize(model.encode_image([tags], [regions]))
    np.testing.assert_allclose(index.image_embeddings[row], want[0], rtol=1e-6)
    own = np.flatnonzero(index.caption_to_image == row)
    assert [index.captions[c] for c in own] == example.captions
    want, _ = retrieval.l2_normalize(model.encode_text(example.captions))
    np.testing.assert_allclose(index.caption_embeddings[own], want, rtol=1e-6)
  bare = retrieval.build_index(model, data, with_captions=False, model_dir="/m")
  assert not bare.has_captions
  np.testing.assert_array_equal(bare.image_embeddings, index.image_embeddings)


# cut=0: an image with regions but no tags is refused too, as training and evaluation
# refuse it (one rule for an image's objects: `sources.image_objects`).
@pytest.mark.parametrize("cut", [-1, 0])
@pytest.mark.parametrize("on_error", ["error", "skip"])
def test_build_index_tag_region_mismatch(demo_data, monkeypatch, on_error, cut):
  from vldeformer_jax.data import readers
  data = readers.VinVLRetrievalData(demo_data.out_dir, "test", on_error=on_error)
  bad_id = data.image_ids[2]
  original = data.example

  def example(image_id):
    ex = original(image_id)
    return dataclasses.replace(ex, tags=ex.tags[:cut]) if ex.image_id == bad_id else ex

  monkeypatch.setattr(data, "example", example)
  if on_error == "error":
    with pytest.raises(readers.DataError,
                       match=f"image id {bad_id}.*tag_region_mismatch"):
      retrieval.build_index(FakeImageTextModel(), data, model_dir="/m")
    return
  index = retrieval.build_index(FakeImageTextModel(), data, model_dir="/m")
  assert bad_id not in index.image_ids and index.num_images == 15
  assert index.metadata["skipped_images"] == 1
  assert data.report.counts["tag_region_mismatch"] == 1
  assert len(index.captions) == 75


@pytest.fixture(scope="module")
def demo_index(minilm_dir, demo_data, tmp_path_factory):
  data = demo_data
  out = tmp_path_factory.mktemp("retrieval") / "test.index"
  proc = run_bin("index", "--model", str(minilm_dir), "--data_dir", str(data.out_dir),
                 "--split", "test", "--out", str(out), "--batch_size", "16")
  assert "indexed 16 images and 80 captions" in proc.stdout
  return data, out


def test_bin_index_writes_the_split(demo_index, minilm_dir):
  from vldeformer_jax.data import readers
  data, path = demo_index
  index = retrieval.load_index(path, hidden_size=384)
  split = readers.VinVLRetrievalData(data.out_dir, "test")
  assert index.image_ids == split.image_ids
  assert index.metadata["split"] == "test"
  assert index.metadata["model_dir"] == str(minilm_dir.resolve())
  for row, image_id in enumerate(index.image_ids):
    example = split.example(image_id)
    assert index.tags[row] == " ".join(example.tags[:50])
    own = np.flatnonzero(index.caption_to_image == row)
    assert [index.captions[c] for c in own] == example.captions
  np.testing.assert_allclose(np.linalg.norm(index.image_embeddings, axis=1), 1.0,
                             atol=1e-5)


def test_bin_search_text(demo_index):
  data, path = demo_index
  proc = run_bin("search", "--index", str(path), "a dog on a skateboard", "-k", "3")
  rows = result_lines(proc.stdout)
  assert len(rows) == 3
  test_ids = {str(s.image_id) for s in data.test}
  assert all(r[1] in test_ids for r in rows)
  assert [r[0] for r in rows] == ["1", "2", "3"]
  scores = [float(r[2]) for r in rows]
  assert scores == sorted(scores, reverse=True)
  assert all(r[3] for r in rows)  # tags


def test_bin_search_image_prints_captions(demo_index):
  data, path = demo_index
  scene = data.test[3]
  proc = run_bin("search", "--index", str(path), "--image", str(scene.image_id),
                 "-k", "4", "--faiss", "flat")
  rows = result_lines(proc.stdout)
  assert len(rows) == 4
  all_captions = {c: str(s.image_id) for s in data.test for c in s.captions}
  for _, image_id, _, caption in rows:
    assert all_captions[caption] == image_id


def test_bin_errors(demo_index, minilm_dir, tmp_path, rng):
  data, path = demo_index
  proc = run_bin("index", "--model", str(minilm_dir), "--data_dir", str(tmp_path / "no"),
                 "--split", "test", "--out", str(tmp_path / "x"), check=False)
  assert proc.returncode == 1
  assert "bin/index: error: --data_dir" in proc.stderr
  assert "no such directory" in proc.stderr
  proc = run_bin("index", "--model", str(minilm_dir), "--data_dir", str(data.out_dir),
                 "--split", "nosuchsplit", "--out", str(tmp_path / "x"), check=False)
  assert proc.returncode == 1 and proc.stderr.startswith("bin/index: error:")
  assert "nosuchsplit" in proc.stderr
  proc = run_bin("search", "--index", str(tmp_path / "nope"), "dog", check=False)
  assert proc.returncode == 1 and "bin/search: error: --index" in proc.stderr
  proc = run_bin("search", "--index", str(path), "dog", "--image", "1", check=False)
  assert proc.returncode == 1 and "either a text query or --image" in proc.stderr
  proc = run_bin("search", "--index", str(path), "--image", "424242", check=False)
  assert proc.returncode == 1
  assert "bin/search: error: --image: image id 424242 is not in the index" in proc.stderr
  # An index of another width than the model: the error names the embeddings file.
  narrow = make_index(rng)
  narrow.metadata["model_dir"] = str(minilm_dir)
  narrow_path = retrieval.save_index(narrow, tmp_path / "narrow.index")
  proc = run_bin("search", "--index", str(narrow_path), "dog", check=False)
  assert proc.returncode == 1
  assert "image_embeddings.npy: embeddings have dim 8" in proc.stderr
  assert "hidden size is 384" in proc.stderr
