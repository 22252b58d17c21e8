"""The train step: sharded over 8 devices it equals the 1-device step; non-finite steps
are skipped; the optimizer follows the paper's recipe."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import (LOOP, TINY, break_checkpoint, corrupt_features_row, demo_data,
                      fake_batch, leave_unfinished_save, loop_config, run_bin, run_steps,
                      tiny_config, warnings_of, xla_optimizations)
from vldeformer_jax import checkpoints, losses, prng, sharding, train
from vldeformer_jax.data.errors import DataError
from vldeformer_jax.model import init_params

# The edit loop checks the default stream; the other PRNGs and FSDP run in the slow tier.
slow = pytest.mark.slow


@pytest.mark.parametrize("overrides", [
    {}, pytest.param({"fsdp": True}, marks=slow),
    pytest.param({"dropout_rng": "rbg"}, marks=slow),
    pytest.param({"dropout_rng": "unsafe_rbg"}, marks=slow),
    pytest.param({"dropout_rng": "hash32"}, marks=slow)])
def test_sharded_step_equals_single_device(overrides):
  cfg = tiny_config(**overrides)
  s1, h1 = run_steps(cfg, 1)
  s8, h8 = run_steps(cfg, 8)
  np.testing.assert_allclose([h["loss"] for h in h8], [h["loss"] for h in h1], atol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(s1.params)),
                  jax.tree.leaves(jax.device_get(s8.params))):
    np.testing.assert_allclose(b, a, atol=1e-5)
  assert int(s8.step) == 4 and int(s8.skipped) == 0


@slow
def test_straight_line_layers_train_like_the_scanned_ones():
  """scan_layers=False (the layers as straight-line code over slices of the stacked
  state) takes the scanned step's steps without dropout; with dropout (its own
  stream), 1 and 8 devices agree."""
  quiet = TINY.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  cfg = tiny_config()
  scanned, hs = run_steps(cfg, 1, model_config=quiet)
  straight, hl = run_steps(cfg, 1, model_config=quiet.replace(scan_layers=False))
  np.testing.assert_allclose([h["loss"] for h in hl], [h["loss"] for h in hs], atol=1e-5)
  assert jax.tree.structure(straight.params) == jax.tree.structure(scanned.params)
  for a, b in zip(jax.tree.leaves(jax.device_get(scanned.params)),
                  jax.tree.leaves(jax.device_get(straight.params))):
    np.testing.assert_allclose(b, a, atol=1e-5)
  one, h1 = run_steps(cfg, 1, model_config=TINY.replace(scan_layers=False))
  eight, h8 = run_steps(cfg, 8, model_config=TINY.replace(scan_layers=False))
  np.testing.assert_allclose([h["loss"] for h in h8], [h["loss"] for h in h1], atol=1e-5)


@slow
@pytest.mark.parametrize("overrides", [{}, {"hard_negatives": False},
                                       {"loss": "cosine"}])
def test_loss_falls_on_a_learnable_batch(overrides):
  rng = np.random.default_rng(1)
  batch = fake_batch(rng, 16)
  _, hist = run_steps(tiny_config(lr=3e-3, warmup_steps=1, total_steps=100,
                                  **overrides), 1, steps=12, batches=[batch] * 12)
  losses = [h["loss"] for h in hist]
  assert losses[-1] < 0.7 * losses[0], losses


def test_nonfinite_step_is_skipped():
  rng = np.random.default_rng(2)
  good = fake_batch(rng, 16)
  bad = jax.tree.map(lambda x: x.copy(), good)
  bad["image"]["regions"][3, 0, 0] = np.nan
  state, hist = run_steps(tiny_config(), 2, steps=3, batches=[good, bad, good])
  assert [h["finite"] for h in hist] == [1.0, 0.0, 1.0]
  assert int(state.skipped) == 1 and int(state.step) == 3
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state.params)))


def test_optimizer_recipe():
  cfg = tiny_config(lr=5e-5, warmup_steps=10, total_steps=100, schedule="linear")
  sched = train.learning_rate_schedule(cfg)
  assert float(sched(0)) == 0.0
  assert float(sched(10)) == pytest.approx(5e-5)
  assert float(sched(100)) == pytest.approx(0.0, abs=1e-12)
  params = jax.device_get(init_params(TINY, jax.random.key(0)))
  mask = train.weight_decay_mask(params)
  assert mask["bert"]["encoder"]["layer"]["output"]["dense"]["kernel"] is True
  assert mask["bert"]["encoder"]["layer"]["output"]["dense"]["bias"] is False
  assert mask["bert"]["encoder"]["layer"]["output"]["LayerNorm"]["scale"] is False
  assert mask["bert"]["embeddings"]["word_embeddings"]["embedding"] is True


def test_joint_inputs_equal_oscar_pair_layout(vocab_file):
  """The on-device pair built from a text part and an image part is Oscar's
  `[CLS] caption [SEP] tags [SEP]` (same ids, segments, contiguous positions)."""
  from vldeformer_jax.inputs import InputBuilder, load_tokenizer
  config = TINY.replace(vocab_size=len(vocab_file.read_text().split()), max_text_len=12,
                        max_tag_len=8, max_joint_len=19, max_position_embeddings=32)
  inputs = InputBuilder(load_tokenizer(vocab_file), config)
  captions = ["a man sitting on a bench", "two dogs"]
  tags = ["man bench tree", "dog dog grass cat"]
  regions = [np.ones((2, 6), np.float32), np.ones((3, 6), np.float32)]
  text = inputs.batch(inputs.text_sequences(captions), length=12).as_dict()
  image = inputs.batch(inputs.image_sequences(tags), regions, length=8,
                       num_regions=3).as_dict()
  joint = jax.device_get(losses.joint_inputs(text, image))
  for i, (ids, segs) in enumerate(inputs.joint_sequences(captions, tags)):
    keep = joint["token_mask"][i].astype(bool)
    assert joint["input_ids"][i][keep].tolist() == ids
    assert joint["token_type_ids"][i][keep].tolist() == segs
    assert joint["position_ids"][i][keep].tolist() == list(range(len(ids)))
  np.testing.assert_array_equal(joint["region_mask"], image["region_mask"])


@slow
@pytest.mark.parametrize("rank_weight", [0.0, 1.0])
def test_joint_matching_loss_trains_the_classifier(rank_weight):
  rng = np.random.default_rng(3)
  batch = fake_batch(rng, 16)
  with xla_optimizations(True):  # 80 steps: optimised code pays for its compile
    _, hist = run_steps(tiny_config(lr=1e-2, warmup_steps=1, total_steps=100,
                                    joint_loss_weight=1.0, joint_rank_weight=rank_weight),
                        1, steps=80, batches=[batch] * 80)
  joint = [h["joint_loss"] for h in hist]
  # An untrained 2-way head: ln 2; the listwise term ranks each pair against its two
  # negatives (mined + hard) for captions and for images: ln 3 each, weighted 0.5.
  assert joint[0] == pytest.approx(np.log(2) + rank_weight * np.log(3), abs=0.1)
  assert joint[-1] < 0.85 * joint[0], joint


def test_mined_negatives_are_the_encoders_closest_other_pairs():
  rng = np.random.default_rng(0)
  b = 6
  batch = fake_batch(rng, b)
  text, image = batch["text"], batch["image"]
  # Row 4 repeats row 1 (the same image and caption, as all_pairs sampling can give).
  for part in (text, image):
    for key in part:
      part[key][4] = part[key][1]
  text_emb = rng.normal(size=(b, 8)).astype(np.float32)
  image_emb = rng.normal(size=(b, 8)).astype(np.float32)
  mined_image, mined_text, valid = jax.device_get(
      losses.mined_negatives(text_emb, image_emb, text, image))
  sim = text_emb @ image_emb.T
  same = np.eye(b, dtype=bool)
  same[1, 4] = same[4, 1] = True
  masked = np.where(same, -np.inf, sim)
  np.testing.assert_array_equal(mined_image, masked.argmax(axis=1))
  np.testing.assert_array_equal(mined_text, masked.argmax(axis=0))
  assert valid.all()
  assert mined_image[1] not in (1, 4) and mined_text[4] not in (1, 4)
  # A batch of one pair has no other pair to mine: the row is marked invalid.
  one = jax.tree.map(lambda x: x[:1], {"t": text, "i": image})
  _, _, valid = losses.mined_negatives(text_emb[:1], image_emb[:1], one["t"], one["i"])
  assert not bool(valid[0])


def test_fresh_lr_multiplier_scales_only_the_new_parts():
  params = jax.device_get(init_params(TINY, jax.random.key(0)))
  grads = jax.tree.map(np.ones_like, params)
  updates = {}
  for mult in (1.0, 10.0):
    tx = train.make_optimizer(tiny_config(fresh_lr_multiplier=mult, grad_clip_norm=1e9,
                                          weight_decay=0.0, warmup_steps=0,
                                          schedule="constant"))
    updates[mult], _ = tx.update(grads, tx.init(params), params)
  ratio = jax.tree.map(lambda a, b: float(np.abs(b).max() / np.abs(a).max()),
                       updates[1.0], updates[10.0])
  assert ratio["bert"]["img_embedding"]["kernel"] == pytest.approx(10.0)
  assert ratio["classifier"]["bias"] == pytest.approx(10.0)
  assert ratio["bert"]["encoder"]["layer"]["output"]["dense"]["kernel"] == pytest.approx(1.0)


def test_freeze_pretrained_steps_moves_only_the_new_parts_first():
  params = jax.device_get(init_params(TINY, jax.random.key(0)))
  grads = jax.tree.map(np.ones_like, params)
  tx = train.make_optimizer(tiny_config(freeze_pretrained_steps=2, warmup_steps=0,
                                        schedule="constant"))
  state = tx.init(params)
  for step in range(4):
    updates, state = tx.update(grads, state, params)
    moved = jax.tree.map(lambda u: bool(np.any(np.asarray(u) != 0)), updates)
    assert moved["bert"]["img_embedding"]["kernel"] and moved["classifier"]["bias"]
    pretrained = [moved["bert"]["encoder"]["layer"]["output"]["dense"]["kernel"],
                  moved["bert"]["embeddings"]["word_embeddings"]["embedding"],
                  moved["bert"]["pooler"]["dense"]["bias"]]
    assert pretrained == [step >= 2] * 3, step


@pytest.mark.parametrize("impl,op", [("rbg", "rng_bit_generator"),
                                     ("unsafe_rbg", "rng_bit_generator"),
                                     ("threefry2x32", "threefry"),
                                     ("hash32", "2246822507")])  # MurmurHash3's 0x85EBCA6B
def test_compiled_step_draws_dropout_from_the_configured_prng(impl, op):
  mesh = sharding.make_mesh(1)
  trainer = train.Trainer(tiny_config(dropout_rng=impl), TINY, mesh)
  state = trainer.init_state(jax.device_get(init_params(TINY, jax.random.key(0))), 0)
  batch = sharding.global_batch(fake_batch(np.random.default_rng(0), 4), mesh)
  text = trainer.compile_step(state).lower(state, batch).as_text()
  assert op in text
  if impl in ("threefry2x32", "hash32"):  # (rbg derives keys with threefry, draws with XLA)
    assert "rng_bit_generator" not in text
  assert state.rng.shape == jax.random.key_data(jax.random.key(0, impl=prng.impl(impl))).shape


def test_length_buckets_cut_only_padding():
  """Trimming a batch to length buckets leaves the (deterministic) embeddings as they
  are, and the cut lengths are the buckets of the longest real entries."""
  from vldeformer_jax.inputs import bucket, padded_lengths, trim_padding
  from vldeformer_jax.model import VLBert
  rng = np.random.default_rng(3)
  batch = fake_batch(rng, 6, L=8, R=3)
  for part in ("text", "neg_text"):
    batch[part]["token_mask"][:, 5:] = 0
  lengths = padded_lengths(batch)
  assert lengths["text"] == 5 and lengths["tags"] <= 8 and lengths["regions"] <= 3
  trimmed = trim_padding(batch, lengths, multiple=4)
  assert trimmed["text"]["input_ids"].shape == (6, 8)  # bucket(5) = 8 (a multiple of 4)
  trimmed = trim_padding(batch, lengths, multiple=2)
  assert trimmed["text"]["input_ids"].shape == (6, 6)
  assert trimmed["neg_image"]["regions"].shape[1] == bucket(lengths["regions"], 3, 2)
  assert trimmed["image"]["input_ids"].shape[1] == bucket(lengths["tags"], 8, 2)
  module = VLBert(TINY)
  params = init_params(TINY, jax.random.key(0))
  full = train.encode_batch(module, params, batch, jax.random.key(0), deterministic=True)
  cut = train.encode_batch(module, params, trimmed, jax.random.key(0), deterministic=True)
  for part in full:
    np.testing.assert_allclose(cut[part], full[part], atol=1e-5)


@slow
@pytest.mark.parametrize("overrides", [{}, {"dropout_rng": "hash32",
                                            "joint_loss_weight": 1.0}])
def test_packed_steps_equal_padded_steps(overrides):
  """Token packing (the layers on the real tokens only, model.Packing) on 8 devices (8
  packing groups) takes the padded single-device steps with dropout on (the same
  masks); the joint loss, which runs padded, takes batches with packing indices. (One
  group, and 2 groups on one device, are the model tests' packed-encoder cases.)"""
  dropout = TINY.replace(attention_probs_dropout_prob=0.1)
  padded, hp = run_steps(tiny_config(packing_bucket=0, attention_dropout=None,
                                     **overrides), 1, model_config=dropout)
  cfg = tiny_config(packing_bucket=8, attention_dropout=None, **overrides)
  packed, hk = run_steps(cfg, 8, model_config=dropout)
  np.testing.assert_allclose([h["loss"] for h in hk], [h["loss"] for h in hp], atol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(padded.params)),
                  jax.tree.leaves(jax.device_get(packed.params))):
    np.testing.assert_allclose(b, a, atol=1e-5)


def test_shape_batch_adds_packing_indices():
  """Each part gets the packing indices of its modality's slot bucket (the most real
  positions any group of either part holds, rounded up); the arrays are not copied."""
  from vldeformer_jax.inputs import sequence_mask
  batch = fake_batch(np.random.default_rng(1), 16)
  shaped = train.shape_batch(batch, tiny_config(packing_bucket=8, length_bucket=0), 4)
  for parts in (("text", "neg_text"), ("image", "neg_image")):
    most = max(sequence_mask(batch[p]).reshape(4, -1).sum(axis=1).max() for p in parts)
    for part in parts:
      assert shaped[part]["pack_index"].shape == (4, -(-most // 8) * 8)
      assert shaped[part]["input_ids"] is batch[part]["input_ids"]
  unpacked = train.shape_batch(batch, tiny_config(packing_bucket=0, length_bucket=0), 4)
  assert all("pack_index" not in arrays for arrays in unpacked.values())


@slow
def test_packing_adds_no_communication():
  """Packing groups are a device's own rows, so the sharded step's collectives are the
  padded step's (the contrastive loss's gathers and the gradient reductions)."""
  import re
  counts = {}
  for bucket in (0, 8):
    cfg = tiny_config(packing_bucket=bucket)
    mesh = sharding.make_mesh(8)
    trainer = train.Trainer(cfg, TINY, mesh)
    state = trainer.init_state(jax.device_get(init_params(TINY, jax.random.key(0))), 0)
    batch = train.shape_batch(fake_batch(np.random.default_rng(0), 16), cfg, 8)
    hlo = trainer.compile_step(state).lower(
        state, sharding.global_batch(batch, mesh)).compile().as_text()
    counts[bucket] = {op: len(re.findall(rf"= \S+ {op}(?:-start)?\(", hlo))
                      for op in ("all-gather", "all-reduce", "all-to-all",
                                 "collective-permute", "reduce-scatter")}
  assert sum(counts[0].values()) > 0
  assert counts[8] == counts[0]


# ---------------------------------------------------------------- the loop in-process
# The tiny model (conftest's `tiny_model_dir`) on a small demo split.
def test_train_and_evaluate_smoke(tiny_model_dir, tmp_path):
  """The loop in-process (as the Flax examples' train_test.py does): 2 steps on a small
  synthetic split, an evaluation and a checkpoint at step 2, the model dir written;
  a second call resumes from the checkpoint and trains no further. Compiler
  optimisations off: this checks the wiring, not speed."""
  import json
  from vldeformer_jax.model_dir import load_model_dir

  cfg = loop_config(demo_data(tmp_path / "data"), tiny_model_dir)
  workdir = tmp_path / "work"
  with xla_optimizations(False):
    state = train.train_and_evaluate(cfg, workdir)
    assert int(state.step) == 2
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert [r["step"] for r in rows if "eval/rsum" in r] == [2]
    assert (workdir / "checkpoints" / "2").is_dir()
    model_config, params, _ = load_model_dir(workdir / "model")
    assert model_config.max_regions == 8
    np.testing.assert_array_equal(
        jax.tree.leaves(params)[0], jax.tree.leaves(jax.device_get(state.params))[0])
    again = train.train_and_evaluate(cfg, workdir)  # resumes at the end: no new step
    assert int(again.step) == 2
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == len(rows)


@pytest.fixture(scope="module")
def bad_row_data(tmp_path_factory) -> Path:
  """The demo split with line 3 of features.tsv (a training image) made bad base64."""
  data = demo_data(tmp_path_factory.mktemp("bad_row") / "data")
  corrupt_features_row(data, 2)
  return data


class Compiling(Exception):
  """Raised where the trainer starts compiling (its state's init), in tests that
  check what happens before."""


@pytest.mark.parametrize("on_error", ["error", "skip"])
def test_bad_training_row_is_reported_before_anything_compiles(
    tiny_model_dir, bad_row_data, tmp_path, monkeypatch, caplog, on_error):
  """Issue 23: preparing the split records the bad row, but training failed only when
  a batch drew that image (a short run exited 0, a long one died mid-run). Now the
  row is an error naming file and line, or under on_error='skip' the skip report is
  logged, before the state's init compiles anything."""

  def init_state(self, params, seed):
    raise Compiling

  monkeypatch.setattr(train.Trainer, "init_state", init_state)
  cfg = loop_config(bad_row_data, tiny_model_dir, on_error=on_error)
  if on_error == "error":
    with pytest.raises(DataError, match=r"features\.tsv, line 3 .*bad image 1 of 1 in "
                       r"split 'train'; --config.on_error=skip leaves them out"):
      train.train_and_evaluate(cfg, tmp_path / "work")
    return
  with caplog.at_level(logging.WARNING), pytest.raises(Compiling):
    train.train_and_evaluate(cfg, tmp_path / "work")
  assert "Data skip report: skipped 1 problem(s) (bad_base64: 1)" in caplog.text
  assert "features.tsv, line 3" in caplog.text


@pytest.mark.slow
def test_bin_train_names_a_bad_row_in_one_line(tiny_model_dir, bad_row_data, tmp_path):
  """bin/train on a split with a bad row: exit 1 and one line naming file and line,
  no traceback."""
  overrides = [f"--config.{k}={v}" for k, v in {
      **LOOP, "data_dir": bad_row_data, "init_model": tiny_model_dir,
      "freeze_pretrained_steps": 0}.items()]
  proc = run_bin("train", "--config", "configs/demo.py", "--workdir",
                 str(tmp_path / "work"), *overrides, check=False)
  errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert len(errors) == 1 and errors[0].startswith("bin/train: error: "), proc.stderr
  assert "features.tsv, line 3" in errors[0]


# ------------------------------------------------------- resuming past a broken checkpoint
# restore_latest's cases on a small state: test_checkpoints.py; here the loop's.
RESUME = dict(checkpoint_every_steps=1, eval_every_steps=0)


@pytest.fixture(scope="module")
def two_checkpoints(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
  """(data dir, workdir) of a 2-step run with checkpoints at steps 1 and 2."""
  root = tmp_path_factory.mktemp("two_checkpoints")
  data = demo_data(root / "data")
  train.train_and_evaluate(loop_config(data, tiny_model_dir, **RESUME), root / "work")
  assert sorted(p.name for p in (root / "work" / "checkpoints").iterdir()) == ["1", "2"]
  return data, root / "work"


def workdir_copy(two_checkpoints, tmp_path: Path, broken: tuple[int, ...]) -> Path:
  """A copy of the 2-step run's workdir with the steps `broken` made unreadable and
  an unfinished async save of step 3 left behind."""
  work = tmp_path / "work"
  shutil.copytree(two_checkpoints[1], work)
  for step in broken:
    break_checkpoint(work / "checkpoints" / str(step))
  leave_unfinished_save(work / "checkpoints", 2, 3)
  return work


@pytest.mark.slow
def test_resume_skips_a_broken_newest_checkpoint(two_checkpoints, tiny_model_dir,
                                                 tmp_path, caplog):
  """Issue 23: a corrupted newest checkpoint stopped the resume with a long orbax
  traceback though step 1 was intact. Now the loop resumes from step 1 with one
  warning naming the step directory; the broken step is moved aside, so the run's own
  save of step 2 is made (orbax skips a step that exists), and the next resume
  restores that new step 2 quietly."""
  work = workdir_copy(two_checkpoints, tmp_path, broken=(2,))
  cfg = loop_config(two_checkpoints[0], tiny_model_dir, **RESUME)
  with caplog.at_level(logging.WARNING):
    state = train.train_and_evaluate(cfg, work)
  (line,) = warnings_of(caplog)
  assert f"skipped checkpoint {work / 'checkpoints' / '2'}: it does not restore" in line
  assert (work / checkpoints.BROKEN_DIRNAME / "2").is_dir()
  assert int(state.step) == 2 and (work / "checkpoints" / "2").is_dir()
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    again = train.train_and_evaluate(cfg, work)  # The new step 2 restores.
  assert int(again.step) == 2 and warnings_of(caplog) == []
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                  jax.tree.leaves(jax.device_get(again.params))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_bin_train_with_no_checkpoint_that_restores(two_checkpoints, tiny_model_dir,
                                                    tmp_path):
  """bin/train: exit 1 and one line naming the checkpoints directory, no traceback."""
  work = workdir_copy(two_checkpoints, tmp_path, broken=(1, 2))
  overrides = [f"--config.{k}={v}" for k, v in {
      **LOOP, **RESUME, "data_dir": two_checkpoints[0], "init_model": tiny_model_dir,
      "freeze_pretrained_steps": 0}.items()]
  proc = run_bin("train", "--config", "configs/demo.py", "--workdir", str(work),
                 *overrides, check=False)
  errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert len(errors) == 1 and errors[0].startswith(
      f"bin/train: error: {work / 'checkpoints'}: none of its 2 checkpoint(s) restores "
      "(the newest, step 2: "), proc.stderr
