"""R@K against a straightforward loop implementation written independently."""

from __future__ import annotations

import numpy as np
import pytest

from vldeformer_jax.evaluation import fold_metrics, retrieval_metrics


def loop_metrics(sim, cap2img):
  """Plain loops: sort each query's candidates, a wrong item tying the ground truth is
  placed before it (pessimistic)."""
  n_img, n_cap = sim.shape
  out = {}
  hits = {1: [], 5: [], 10: []}
  for i in range(n_img):
    own = [c for c in range(n_cap) if cap2img[c] == i]
    if not own:
      continue
    # order: by score desc; among equal scores, wrong captions first.
    order = sorted(range(n_cap), key=lambda c: (-sim[i, c], cap2img[c] == i))
    first = min(order.index(c) for c in own)
    for k in hits:
      hits[k].append(first < k)
  for k in hits:
    out[f"i2t_r{k}"] = 100 * np.mean(hits[k])
  hits = {1: [], 5: [], 10: []}
  for c in range(n_cap):
    order = sorted(range(n_img), key=lambda i: (-sim[i, c], i == cap2img[c]))
    r = order.index(cap2img[c])
    for k in hits:
      hits[k].append(r < k)
  for k in hits:
    out[f"t2i_r{k}"] = 100 * np.mean(hits[k])
  out["rsum"] = sum(out.values())
  return out


@pytest.mark.parametrize("case", ["random", "ties", "uneven"])
def test_metrics_equal_loop_implementation(case):
  rng = np.random.default_rng(0)
  n_img = 30
  if case == "uneven":
    counts = rng.integers(1, 8, size=n_img)
    counts[3] = 0  # a distractor image with no caption
  else:
    counts = np.full(n_img, 5)
  cap2img = np.repeat(np.arange(n_img), counts)
  sim = rng.normal(size=(n_img, len(cap2img))).astype(np.float32)
  if case == "ties":
    sim = np.round(sim, 0)  # many exact ties
  # make it better than chance so recalls are not all tiny
  sim[cap2img, np.arange(len(cap2img))] += 1.0
  got = retrieval_metrics(sim, cap2img)
  want = loop_metrics(sim, cap2img)
  assert got.keys() == want.keys()
  for k in want:
    assert got[k] == pytest.approx(want[k]), k


def test_pessimistic_ties_and_perfect_scores():
  cap2img = np.repeat(np.arange(4), 5)
  const = np.zeros((4, 20), np.float32)
  m = retrieval_metrics(const, cap2img)
  assert m["t2i_r1"] == 0 and m["i2t_r1"] == 0 and m["i2t_r5"] == 0
  assert m["t2i_r5"] == 100  # only 3 wrong images: every rank is 3 < 5
  perfect = (cap2img[None, :] == np.arange(4)[:, None]).astype(np.float32)
  m = retrieval_metrics(perfect, cap2img)
  assert all(m[k] == 100 for k in m if k != "rsum") and m["rsum"] == 600


def test_fold_averaging():
  rng = np.random.default_rng(1)
  cap2img = np.repeat(np.arange(20), 5)
  sim = rng.normal(size=(20, 100)).astype(np.float32)
  folds = fold_metrics(sim, cap2img, fold_size=10)
  a = retrieval_metrics(sim[:10, :50], cap2img[:50])
  b = retrieval_metrics(sim[10:, 50:], cap2img[50:] - 10)
  for k in a:
    assert folds[k] == pytest.approx((a[k] + b[k]) / 2)
  with pytest.raises(ValueError, match="do not split into folds"):
    fold_metrics(sim, cap2img, fold_size=7)


def test_bad_inputs():
  with pytest.raises(ValueError, match="caption_to_image has shape"):
    retrieval_metrics(np.zeros((2, 3)), np.zeros(2, int))
  with pytest.raises(ValueError, match="outside"):
    retrieval_metrics(np.zeros((2, 3)), np.array([0, 1, 2]))
  with pytest.raises(ValueError, match="NaN"):
    retrieval_metrics(np.full((2, 2), np.nan), np.array([0, 1]))


class OracleEncoder:
  """Embeddings that know the answer only roughly; a joint scorer that knows it."""

  def __init__(self, n_images, noise=1.5, seed=0):
    rng = np.random.default_rng(seed)
    self.protos = rng.normal(size=(n_images, 16))
    self.noise = noise
    self.rng = rng

  def _proto(self, text):
    return self.protos[int(text.split()[-1])]

  def encode_image(self, tags, regions):
    return np.stack([self._proto(t) + self.noise * self.rng.normal(size=16) for t in tags])

  def encode_text(self, captions):
    return np.stack([self._proto(c) + self.noise * self.rng.normal(size=16)
                     for c in captions])

  def score_pairs(self, captions, tags, regions):
    return np.array([10.0 if c.split()[-1] == t.split()[-1] else -10.0
                     for c, t in zip(captions, tags)], np.float32)


def oracle_set(n_images=40, per_image=3):
  from vldeformer_jax.evaluation import EvalSet
  cap2img = np.repeat(np.arange(n_images), per_image)
  return EvalSet([str(i) for i in range(n_images)], [f"tags of {i}" for i in range(n_images)],
                 [np.zeros((1, 4), np.float32)] * n_images,
                 [f"caption {k} of {i}" for k, i in enumerate(cap2img)], cap2img)


def test_rerank_with_an_oracle_joint_scorer_lifts_r1_to_the_top_m_recall():
  from vldeformer_jax.evaluation import run_eval
  ev = oracle_set()
  report = run_eval(OracleEncoder(40), ev, "all", rerank_m=5)
  ind, rr = report["individual"], report["rerank"]
  assert ind["t2i_r1"] < 100 and ind["i2t_r1"] < 100
  # Every query whose answer the encoder put in its top 5 is now at rank 1.
  assert rr["t2i_r1"] == pytest.approx(ind["t2i_r5"])
  assert rr["i2t_r1"] == pytest.approx(ind["i2t_r5"])
  assert rr["t2i_r10"] == pytest.approx(ind["t2i_r10"])
  assert 0 < rr["joint_pairs"] <= 5 * (40 + 120)


def test_rerank_by_another_models_individual_embeddings():
  """--rerank_model with --rerank_mode individual: a decomposed teacher orders each
  query's top-M by its own cosines; a noiseless teacher lifts R@1 to the top-M recall,
  as the oracle joint scorer does."""
  from vldeformer_jax.evaluation import run_eval
  ev = oracle_set()
  teacher = OracleEncoder(40, noise=0.0)
  report = run_eval(OracleEncoder(40), ev, "all", rerank_m=5, reranker=teacher,
                    rerank_mode="individual")
  ind, rr = report["individual"], report["rerank"]
  assert rr["mode"] == "individual"
  assert rr["t2i_r1"] == pytest.approx(ind["t2i_r5"])
  assert rr["i2t_r1"] == pytest.approx(ind["i2t_r5"])



class BlindJointEncoder(OracleEncoder):
  """The oracle's encoders with a joint scorer that cannot tell pairs apart."""

  def score_pairs(self, captions, tags, regions):
    return np.zeros(len(captions), np.float32)


def test_rerank_similarity_weight_adds_the_encoder_score():
  from vldeformer_jax.evaluation import rerank, run_eval
  ev = oracle_set()
  # A blind joint scorer plus w x similarity re-ranks in the encoder's own order.
  report = run_eval(BlindJointEncoder(40), ev, "all", rerank_m=5,
                    rerank_similarity_weight=20.0)
  ind, rr = report["individual"], report["rerank"]
  assert rr["similarity_weight"] == 20.0
  for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
    assert rr[key] == pytest.approx(ind[key]), key
  # The oracle's +-10 still decides when the similarity weighs 1 (|cos| <= 1).
  report = run_eval(OracleEncoder(40), ev, "all", rerank_m=5, rerank_similarity_weight=1.0)
  assert report["rerank"]["t2i_r1"] == pytest.approx(report["individual"]["t2i_r5"])
  with pytest.raises(ValueError, match="rerank_similarity_weight"):
    rerank(OracleEncoder(40), ev, np.zeros((40, 120), np.float32), 5, float("nan"))

def test_joint_mode_scores_all_pairs_and_extrapolates():
  from vldeformer_jax.evaluation import format_table, run_eval
  ev = oracle_set()
  full = run_eval(OracleEncoder(40), ev, "all", mode="joint")
  assert full["joint"]["pairs"] == 40 * 120 and full["joint"]["t2i_r1"] == 100
  part = run_eval(OracleEncoder(40), ev, "all", mode="joint", joint_max_images=10)
  assert part["joint"]["pairs"] == 10 * 30 and part["joint"]["images_scored"] == 10
  per_pair = part["joint"]["seconds"] / 300
  assert part["joint"]["estimated_seconds_all_pairs"] == pytest.approx(per_pair * 4800)
  table = format_table(part)
  assert "Text Retrieval" in table and "would take about" in table


def test_protocols():
  from vldeformer_jax.evaluation import protocol_metrics, protocol_set
  ev = oracle_set(n_images=2000, per_image=1)
  assert len(protocol_set(ev, "flickr1k").image_ids) == 1000
  with pytest.raises(ValueError, match="coco5k needs 5000 images"):
    protocol_set(ev, "coco5k")
  rng = np.random.default_rng(0)
  sim = rng.normal(size=(2000, 2000)).astype(np.float32)
  assert protocol_metrics(sim, ev.caption_to_image, "coco1k") == pytest.approx(
      fold_metrics(sim, ev.caption_to_image, 1000))


@pytest.mark.parametrize("flag, value", [("--rerank", "-1"),
                                         ("--rerank_similarity_weight", "-1"),
                                         ("--rerank_similarity_weight", "nan"),
                                         ("--batch_size", "0")])
def test_bin_eval_bad_flag_names_it(tmp_path, flag, value):
  from conftest import run_bin
  proc = run_bin("eval", "--model", str(tmp_path), "--data_dir", str(tmp_path),
                 flag, value, check=False)
  assert proc.returncode == 2 and flag in proc.stderr, proc.stderr


def test_evaluation_data_and_trainer_do_not_import_each_other():
  """The eval set is data: the pipeline does not import the evaluation, and the
  evaluation does not import the trainer (nor, until it loads data, the pipeline)."""
  import subprocess
  import sys
  code = ("import sys; import vldeformer_jax.evaluation; "
          "a = {m for m in sys.modules if m.startswith('vldeformer_jax.')}; "
          "import vldeformer_jax.data.pipeline; "
          "print(sorted(a)); print('vldeformer_jax.train' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, timeout=300).stdout.splitlines()
  loaded_by_evaluation = eval(out[0])
  assert "vldeformer_jax.train" not in loaded_by_evaluation
  assert "vldeformer_jax.data.pipeline" not in loaded_by_evaluation
  assert out[1] == "False"  # the pipeline does not pull in the trainer either


def test_eval_set_tags_only_drops_every_region_and_keeps_the_rest():
  from vldeformer_jax.data.eval_set import EvalSet
  regions = [np.ones((3, 8), np.float32), np.ones((5, 8), np.float32)]
  ev = EvalSet(["1", "2"], ["dog bench", "cat"], regions, ["a", "b", "c"],
               np.array([0, 1, 1]))
  tags_only = ev.tags_only()
  assert [r.shape for r in tags_only.regions] == [(0, 8), (0, 8)]
  assert (tags_only.image_ids, tags_only.tags, tags_only.captions) == (
      ev.image_ids, ev.tags, ev.captions)
  np.testing.assert_array_equal(tags_only.caption_to_image, ev.caption_to_image)
  assert [r.shape for r in ev.regions] == [(3, 8), (5, 8)]  # the original is unchanged
