"""The learnable temperature (`config.temperature_learnable`, CLIP's logit scale): its
gradient, its loss at the initial value, its clamp and masks, and its life in the loop
(logged, checkpointed and restored, kept out of the model directory)."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from conftest import TINY, fake_batch, tiny_config
from vldeformer_jax import sharding, train
from vldeformer_jax.logit_scale import LOGIT_SCALE, logit_scale_bounds, with_logit_scale
from vldeformer_jax.model import VLBert, init_params


def model_params():
  return jax.device_get(init_params(TINY, jax.random.key(0)))


def objective_on(cfg, num_devices: int):
  mesh = sharding.make_mesh(num_devices)
  objective = train.make_objective(VLBert(TINY), cfg, mesh)
  batch = sharding.global_batch(fake_batch(np.random.default_rng(0), 16), mesh)
  rng = jax.random.key(3)
  return jax.jit(lambda p: objective(p, batch, rng)[0])


@pytest.mark.parametrize("hard_negatives",
                         [True, pytest.param(False, marks=pytest.mark.slow)])
def test_loss_at_the_learned_scale_equals_the_fixed_loss(hard_negatives):
  tau = 0.07
  params = model_params()
  fixed = objective_on(tiny_config(temperature=tau, hard_negatives=hard_negatives), 8)
  learned_cfg = tiny_config(temperature=tau, hard_negatives=hard_negatives,
                            temperature_learnable=True)
  learned = objective_on(learned_cfg, 8)
  with_scale = with_logit_scale(params, learned_cfg)
  assert float(with_scale[LOGIT_SCALE]) == pytest.approx(math.log(1 / tau))
  np.testing.assert_allclose(float(learned(with_scale)), float(fixed(params)), rtol=1e-6)


@pytest.mark.slow
def test_logit_scale_gradient_matches_a_finite_difference():
  """d loss / d log(1/tau) through the sharded loss (the scale a replicated operand of
  the shard_map over 8 devices) against a central difference of the loss."""
  cfg = tiny_config(temperature=0.1, temperature_learnable=True)
  params = with_logit_scale(model_params(), cfg)
  loss = objective_on(cfg, 8)
  grad = float(jax.jit(jax.grad(loss))(params)[LOGIT_SCALE])
  h = 1e-2
  shifted = lambda d: float(loss({**params, LOGIT_SCALE:
                                  np.float32(params[LOGIT_SCALE] + d)}))
  numeric = (shifted(h) - shifted(-h)) / (2 * h)
  assert abs(grad) > 1e-3
  assert grad == pytest.approx(numeric, rel=2e-3, abs=1e-4)


def test_bounds_follow_clip_and_keep_the_initial_value():
  assert logit_scale_bounds(0.05) == (0.0, pytest.approx(math.log(100)))
  # The paper's tau 0.005 is a logit scale of 200: the top is raised, not cut.
  assert logit_scale_bounds(0.005) == (0.0, pytest.approx(math.log(200)))


def test_logit_scale_is_clamped_not_decayed_frozen_or_multiplied():
  cfg = tiny_config(temperature=0.05, temperature_learnable=True, weight_decay=0.1,
                    freeze_pretrained_steps=2, fresh_lr_multiplier=10.0, warmup_steps=0,
                    schedule="constant", grad_clip_norm=1e9, lr=1e-2)
  params = with_logit_scale(model_params(), cfg)
  assert train.weight_decay_mask(params)[LOGIT_SCALE] is False
  assert train.pretrained_params_mask(params)[LOGIT_SCALE] is False
  assert train.fresh_params_mask(params)[LOGIT_SCALE] is False
  tx = train.make_optimizer(cfg)
  state = tx.init(params)
  grads = jax.tree.map(np.zeros_like, params)
  grads[LOGIT_SCALE] = np.float32(-1.0)  # the loss falls as the scale grows
  updates, state = tx.update(grads, state, params)
  # Adam's first step is lr (no decay, no 10x, not held during the frozen steps).
  assert float(updates[LOGIT_SCALE]) == pytest.approx(1e-2, rel=1e-4)
  low, high = logit_scale_bounds(0.05)
  at_top = {**params, LOGIT_SCALE: np.float32(high - 1e-3)}
  updates, _ = tx.update(grads, state, at_top)
  assert float(at_top[LOGIT_SCALE] + updates[LOGIT_SCALE]) == pytest.approx(
      high, abs=1e-6)
  at_bottom = {**params, LOGIT_SCALE: np.float32(low)}
  updates, _ = tx.update(jax.tree.map(lambda g: -g, grads), state, at_bottom)
  assert float(at_bottom[LOGIT_SCALE] + updates[LOGIT_SCALE]) == low


def test_state_layout_without_it_is_the_models_and_with_it_one_more_entry():
  params = model_params()
  mesh = sharding.make_mesh(8)
  plain = train.Trainer(tiny_config(), TINY, mesh).init_state(params, 0)
  assert jax.tree.structure(plain.params) == jax.tree.structure(params)
  learned = train.Trainer(tiny_config(temperature_learnable=True, fsdp=True), TINY,
                          mesh).init_state(params, 0)
  assert set(learned.params) == set(params) | {LOGIT_SCALE}
  # Replicated like every small parameter; Adam keeps two moments of it.
  assert learned.params[LOGIT_SCALE].sharding.is_fully_replicated
  extra = len(jax.tree.leaves(learned.opt_state)) - len(jax.tree.leaves(plain.opt_state))
  assert extra == 2


@pytest.mark.slow
def test_steps_move_it_and_log_it():
  cfg = tiny_config(temperature=0.1, temperature_learnable=True, lr=1e-2, warmup_steps=0,
                    schedule="constant")
  mesh = sharding.make_mesh(2)
  trainer = train.Trainer(cfg, TINY, mesh)
  state = trainer.init_state(model_params(), 0)
  step = trainer.compile_step(state)
  batch = fake_batch(np.random.default_rng(0), 16)
  taus = []
  for _ in range(3):
    state, m = step(state, sharding.global_batch(train.shape_batch(batch, cfg, 2), mesh))
    taus.append(float(m["temperature"]))
  assert taus[0] == pytest.approx(0.1, rel=1e-6)  # the loss's tau, before the update
  scale = float(state.params[LOGIT_SCALE])
  assert scale != pytest.approx(math.log(10), abs=1e-3)
  assert len(set(taus)) == 3


@pytest.mark.slow
def test_train_and_evaluate_logs_and_restores_it(tiny_model_dir, tmp_path):
  """bin/train's loop with the flag: `temperature` in metrics.jsonl on log steps, the
  model directory without the logit scale, and a resume restores the learned value."""
  from conftest import demo_data, loop_config
  from vldeformer_jax.model_dir import flatten, load_model_dir

  cfg = loop_config(demo_data(tmp_path / "data"), tiny_model_dir, total_steps=3,
                    warmup_steps=0, schedule="constant", eval_every_steps=0,
                    checkpoint_every_steps=3, lr=1e-2, temperature=0.1,
                    temperature_learnable=True)
  workdir = tmp_path / "work"
  state = train.train_and_evaluate(cfg, workdir)
  learned = float(jax.device_get(state.params[LOGIT_SCALE]))
  assert learned != pytest.approx(math.log(10), abs=1e-3)
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  taus = [r["temperature"] for r in rows if "loss" in r]
  assert len(taus) == 3 and taus[0] == pytest.approx(0.1, rel=1e-6)
  _, saved, _ = load_model_dir(workdir / "model")
  assert not any(LOGIT_SCALE in k for k in flatten(saved))
  again = train.train_and_evaluate(cfg, workdir)  # resumes at the end: no new step
  assert int(again.step) == 3
  assert float(jax.device_get(again.params[LOGIT_SCALE])) == learned
