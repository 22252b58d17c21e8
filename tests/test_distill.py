"""Distillation (distill.py, losses.py): the losses against float64 NumPy references
(dropped candidates, ties), the false-negative rule and its contrastive mask, the
candidates, and the distilled step: sharded over 8 devices it equals 1 device, and
the frozen teacher gets no gradient and leaves training bit-equal."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vldeformer_jax import config, distill, losses, sharding, train
from vldeformer_jax.model import VLBert, init_params

from conftest import TINY, fake_batch, run_steps, tiny_config


def scores_with_ties(rng, q=6, c=5):
  student = rng.normal(size=(q, c)).round(1)  # rounded: ties within rows
  teacher = rng.normal(size=(q, c)).round(1)
  teacher[0, 2] = teacher[0, 3]  # a teacher tie
  valid = np.ones((q, c), bool)
  valid[1, 4] = valid[3, 2] = False
  return student, teacher, valid


def ref_kl(student, teacher, valid, t):
  out = []
  for s_row, t_row, v in zip(student, teacher, valid):
    s, tt = s_row[v] / t, t_row[v] / t
    log_p_t = tt - np.log(np.exp(tt).sum())
    log_p_s = s - np.log(np.exp(s).sum())
    out.append((np.exp(log_p_t) * (log_p_t - log_p_s)).sum())
  return t * t * np.mean(out)


def ref_margin_mse(student, teacher, valid):
  errors = [((s[0] - s[c]) - (tt[0] - tt[c])) ** 2
            for s, tt, v in zip(student, teacher, valid) for c in range(1, len(v)) if v[c]]
  return np.mean(errors)


@pytest.mark.parametrize("margin", [None, 0.3])
def test_distillation_losses_equal_float64_references(margin):
  rng = np.random.default_rng(0)
  student, teacher, valid = scores_with_ties(rng)
  dropped_ref = np.zeros_like(valid)
  if margin is not None:
    dropped_ref[:, 1:] = (teacher[:, 1:] - teacher[:, :1] > margin) & valid[:, 1:]
    assert dropped_ref.any()  # the case exercises the dropping
  kept = valid & ~dropped_ref
  for name, ref in (("kl", lambda: ref_kl(student, teacher, kept, 2.0)),
                    ("margin_mse", lambda: ref_margin_mse(student, teacher, kept))):
    loss, dropped, metrics = losses.distillation_loss(
        name, jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32),
        jnp.asarray(valid), temperature=2.0, false_negative_margin=margin)
    np.testing.assert_array_equal(dropped, dropped_ref)
    np.testing.assert_allclose(float(loss), ref(), rtol=1e-5, atol=1e-6)
    assert float(metrics["dropped_frac"]) == pytest.approx(
        dropped_ref.sum() / valid[:, 1:].sum())


def test_rank_agreement_counts_ordered_pairs_and_skips_teacher_ties():
  teacher = jnp.array([[3.0, 2.0, 2.0, 1.0]])
  student = jnp.array([[3.0, 1.0, 5.0, 0.0]])
  valid = jnp.ones((1, 4), bool)
  # Teacher-ordered pairs (ties left out): (0,1) (0,2) (0,3) (1,3) (2,3) = 5; the
  # student agrees on (0,1) (0,3) (1,3) (2,3), not (0,2).
  assert float(losses.rank_agreement(student, teacher, valid)) == pytest.approx(4 / 5)


def test_kl_gradient_reaches_the_student_only_and_is_finite_with_invalid_candidates():
  rng = np.random.default_rng(1)
  student, teacher, valid = scores_with_ties(rng)
  grad_s, grad_t = jax.grad(lambda s, t: losses.kl_distill_loss(s, t, jnp.asarray(valid),
                                                                 1.0), argnums=(0, 1))(
      jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32))
  assert np.all(np.isfinite(grad_s)) and np.abs(grad_s).sum() > 0
  assert not np.any(grad_s[~valid])  # an invalid candidate gets nothing
  assert not np.any(grad_t)


def test_closest_others_is_mined_negatives_at_k1():
  rng = np.random.default_rng(2)
  batch = fake_batch(rng, 6)
  for key in batch["text"]:
    batch["text"][key][4] = batch["text"][key][1]  # a repeated pair
  for key in batch["image"]:
    batch["image"][key][4] = batch["image"][key][1]
  t = rng.normal(size=(6, 8)).astype(np.float32)
  v = rng.normal(size=(6, 8)).astype(np.float32)
  mined_image, mined_text, _ = losses.mined_negatives(t, v, batch["text"], batch["image"])
  other = losses.other_pairs(batch["text"], batch["image"])
  sim = jnp.asarray(t @ v.T)
  idx, valid = losses.closest_others(sim, other, 1)
  np.testing.assert_array_equal(idx[:, 0], mined_image)
  idx_t, _ = losses.closest_others(sim.T, other.T, 1)
  np.testing.assert_array_equal(idx_t[:, 0], mined_text)
  idx3, valid3 = losses.closest_others(sim, other, 5)
  assert not bool(valid3[1].all())  # row 1 has only 4 others (row 4 repeats it)
  assert 4 not in np.asarray(idx3[1])[np.asarray(valid3[1])]


def test_excluded_columns_leave_the_contrastive_softmax():
  """contrastive_loss with `exclude` equals the loss computed with those columns
  removed (float64 reference), and never touches the positive."""
  rng = np.random.default_rng(3)
  b, d, tau = 5, 8, 0.1
  t, v, nv, nt = (rng.normal(size=(b, d)) for _ in range(4))
  ex_t = rng.random((b, 2 * b)) < 0.3
  ex_v = rng.random((b, 2 * b)) < 0.3
  ex_t[np.arange(b), np.arange(b)] = ex_v[np.arange(b), np.arange(b)] = False
  norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)

  def ref(rows, cols, exclude):
    logits = norm(rows) @ norm(cols).T / tau
    out = []
    for i in range(b):
      keep = ~exclude[i]
      out.append(-(logits[i, i] - np.log(np.exp(logits[i][keep]).sum())))
    return np.mean(out)

  want = ref(t, np.concatenate([v, nv]), ex_t) + ref(v, np.concatenate([t, nt]), ex_v)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  got = losses.contrastive_loss(f32(t), f32(v), f32(nt), f32(nv), tau,
                                exclude=(jnp.asarray(ex_t), jnp.asarray(ex_v)))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  mesh = sharding.make_mesh(1)
  sharded = losses.sharded_contrastive_loss(
      f32(t), f32(v), f32(nt), f32(nv), mesh=mesh, temperature=tau,
      exclude=(jnp.asarray(ex_t), jnp.asarray(ex_v)))
  np.testing.assert_allclose(float(sharded), want, rtol=1e-5)


def test_dropped_candidates_become_contrastive_exclusions():
  images = jnp.array([[0, 2, 1], [1, 0, 2], [2, 1, 0]])
  cands = distill.Candidates(images=images, texts=images, valid_images=None,
                             valid_texts=None, hard_negatives=True)
  dropped = jnp.array([[False, True, False, False], [False, False, False, True],
                       [False, False, False, False]])
  ex_t, ex_v = distill.contrastive_exclusions(cands, dropped, dropped)
  want = np.zeros((3, 6), bool)
  want[0, 2] = True      # row 0's candidate image 2
  want[1, 3 + 1] = True  # row 1's own hard negative (column B + 1)
  np.testing.assert_array_equal(ex_t, want)
  np.testing.assert_array_equal(ex_v, want)


def distill_config(mode: str, loss: str = "kl", **overrides):
  return tiny_config(**{**dict(distill_weight=1.0, teacher_model="unused",
                               teacher_mode=mode, distill_loss=loss, distill_candidates=3,
                               distill_false_negative_margin=0.5), **overrides})


def teacher_for(mode: str) -> distill.Teacher:
  """A teacher of another size and seed than the student (TINY): 1 layer, 16 wide."""
  arch = TINY.replace(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32)
  return distill.Teacher(VLBert(arch), jax.device_get(init_params(arch, jax.random.key(7))),
                         mode, Path("teacher"))


def run_distilled(cfg, teacher, num_devices: int, steps: int = 3):
  mesh = sharding.make_mesh(num_devices)
  trainer = train.Trainer(cfg, TINY, mesh, teacher)
  state = trainer.init_state(jax.device_get(init_params(TINY, jax.random.key(0))), 0)
  step = trainer.compile_step(state)
  rng = np.random.default_rng(0)
  history = []
  for _ in range(steps):
    batch = train.shape_batch(fake_batch(rng, 16), cfg, len(mesh.local_devices))
    state, m = step(state, sharding.global_batch(batch, mesh), *trainer.step_inputs)
    history.append({k: float(v) for k, v in jax.device_get(m).items()})
  return state, history, trainer


@pytest.mark.parametrize("mode,loss", [("joint", "kl"),
                                       pytest.param("individual", "margin_mse",
                                                    marks=pytest.mark.slow)])
def test_distilled_step_sharded_equals_single_device(mode, loss):
  teacher = teacher_for(mode)
  before = jax.tree.map(np.copy, teacher.params)
  cfg = distill_config(mode, loss)
  s1, h1, _ = run_distilled(cfg, teacher, 1)
  s8, h8, trainer = run_distilled(cfg, teacher, 8)
  for key in ("loss", "distill_loss", "decompose_loss", "distill/rank_agreement",
              "distill/dropped_frac"):
    np.testing.assert_allclose([h[key] for h in h8], [h[key] for h in h1], atol=1e-5,
                               err_msg=key)
  assert all(np.isfinite(h["distill_loss"]) and h["distill_loss"] > 0 for h in h1)
  for a, b in zip(jax.tree.leaves(jax.device_get(s1.params)),
                  jax.tree.leaves(jax.device_get(s8.params))):
    np.testing.assert_allclose(b, a, atol=1e-5)
  # The teacher is frozen: bit-equal after training, and not in the train state.
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(teacher.params)):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(s8.params) == jax.tree.structure(
      jax.device_get(init_params(TINY, jax.random.key(0))))


def test_the_teacher_gets_no_gradient():
  cfg = distill_config("joint")
  teacher = teacher_for("joint")
  mesh = sharding.make_mesh(1)
  objective = train.make_objective(VLBert(TINY), cfg, mesh, teacher.module)
  batch = train.shape_batch(fake_batch(np.random.default_rng(4), 8), cfg, 1)
  batch = jax.tree.map(jnp.asarray, batch)
  params = init_params(TINY, jax.random.key(0))
  grads = jax.grad(lambda t: objective(params, batch, jax.random.key(1), t)[0])(
      distill.device_params(teacher))
  assert all(not np.any(g) for g in jax.tree.leaves(grads))


def test_without_distillation_the_objective_is_unchanged():
  """distill_weight = 0 (the default) adds nothing: no teacher loaded, the same
  losses as before (the contrastive loss takes no exclusions)."""
  cfg = tiny_config()
  assert distill.load_teacher(cfg, TINY, Path("unused")) is None
  _, history = run_steps(cfg, 1, steps=1)
  assert "distill_loss" not in history[0]


def test_missing_or_mismatched_teacher_is_an_error_naming_it(tmp_path, tiny_model_dir,
                                                             vocab_file):
  from vldeformer_jax.model_dir import load_model_dir, save_model_dir
  student, _, vocab = load_model_dir(tiny_model_dir)
  cfg = config.default_config()
  cfg.update(distill_weight=1.0, init_model=str(tiny_model_dir))
  with pytest.raises(ValueError, match="needs --config.teacher_model"):
    distill.load_teacher(cfg, student, vocab)
  cfg.teacher_model = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nowhere'}: no such model"):
    distill.load_teacher(cfg, student, vocab)
  other_dim = student.replace(img_feature_dim=student.img_feature_dim + 1)
  save_model_dir(tmp_path / "wide", other_dim,
                 jax.device_get(init_params(other_dim, jax.random.key(0))), vocab)
  cfg.teacher_model = str(tmp_path / "wide")
  with pytest.raises(ValueError, match=f"{tmp_path / 'wide'} takes 17-d region features, "
                     f"the student {tiny_model_dir} 16-d"):
    distill.load_teacher(cfg, student, vocab)
  other_vocab = tmp_path / "vocab.txt"
  other_vocab.write_text(vocab.read_text() + "extra\n")
  save_model_dir(tmp_path / "words", student.replace(vocab_size=student.vocab_size + 1),
                 jax.device_get(init_params(student.replace(vocab_size=student.vocab_size + 1),
                                            jax.random.key(0))), other_vocab)
  cfg.teacher_model = str(tmp_path / "words")
  with pytest.raises(ValueError, match="another vocabulary"):
    distill.load_teacher(cfg, student, vocab)
  cfg.teacher_model = str(tiny_model_dir)
  teacher = distill.load_teacher(cfg, student, vocab)
  assert teacher.mode == "joint" and teacher.model_dir == tiny_model_dir


def test_distill_config_errors_name_the_key():
  with pytest.raises(ValueError, match="--config.teacher_mode='both'"):
    config.validate_config(distill_config("both", data_dir="x"))
  with pytest.raises(ValueError, match="--config.distill_loss='l2'"):
    config.validate_config(distill_config("joint", "l2", data_dir="x"))
  with pytest.raises(ValueError, match="--config.distill_candidates=16"):
    config.validate_config(distill_config("joint", data_dir="x", distill_candidates=16,
                                          batch_size=16))
  with pytest.raises(ValueError, match="--config.distill_false_negative_margin=-1"):
    config.validate_config(distill_config("joint", data_dir="x",
                                          distill_false_negative_margin=-1.0))
  with pytest.raises(ValueError, match="--config.distill_temperature=0"):
    config.validate_config(distill_config("joint", data_dir="x", distill_temperature=0.0))
