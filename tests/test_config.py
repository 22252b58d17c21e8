"""The run configuration (config.py): defaults, named and typed variants, validation
naming the key, and config files that stay free of JAX and TensorFlow."""

from __future__ import annotations

import functools
import math
import re
import subprocess
import sys

import pytest

from vldeformer_jax import config
from vldeformer_jax.config import ModelConfig
from vldeformer_jax.data.pipeline import MAX_WORKERS

from conftest import REPO


def cfg_with(**overrides):
  cfg = config.default_config()
  cfg.total_steps, cfg.warmup_steps, cfg.temperature, cfg.lr = 10, 2, 0.1, 1e-3
  cfg.update(overrides)
  return cfg


@pytest.mark.parametrize("config_file", sorted(p.name for p in (REPO / "configs").glob("*.py")))
def test_config_files_import_no_jax_or_tensorflow(config_file):
  """A config file is a recipe: loading it (as bin/train does) must not pull in JAX,
  optax, orbax, clu or TensorFlow."""
  code = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("c", {str(REPO / "configs" / config_file)!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.get_config()
module.get_config("no_negatives,seed=1")
heavy = [m for m in ("jax", "optax", "orbax", "clu", "tensorflow", "flax") if m in sys.modules]
print(",".join(heavy))
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True).stdout.strip()
  assert out == "", f"{config_file} imported {out}"


def test_variants_are_named_or_typed_key_value():
  c = config.default_config()
  config.apply_variants(c, "no_negatives, cls,seed=3,lr=1e-4,scan_layers=false,loss=cosine")
  assert (c.hard_negatives, c.pooling, c.seed, c.lr, c.scan_layers, c.loss) == (
      False, "cls", 3, 1e-4, False, "cosine")
  assert isinstance(c.seed, int) and isinstance(c.lr, float)
  config.apply_variants(c, "data_dir=/some/where,attention_dropout=0.1")
  assert c.data_dir == "/some/where" and c.attention_dropout == 0.1
  with pytest.raises(ValueError, match="config variant seed='x': expected a int"):
    config.apply_variants(c, "seed=x")
  with pytest.raises(ValueError, match="no key 'sed'"):
    config.apply_variants(c, "sed=1")
  with pytest.raises(ValueError, match="expected a bool"):
    config.apply_variants(c, "fsdp=maybe")


def test_defaults_are_one_table():
  """default_config is defaults() as a ConfigDict; the optional keys take their type."""
  c = config.default_config()
  assert c.to_dict() == config.defaults()
  assert c.model.hidden_size == config.MODEL_SIZES["base"]["hidden_size"]
  assert c.feature_dim == config.FEATURE_DIM == ModelConfig().img_feature_dim
  c.data_dir = "x"  # an optional str key takes a str
  with pytest.raises(TypeError):
    c.data_dir = 3


def test_config_validation_names_the_key():
  cfg = cfg_with(loss="triplet")
  cfg.data_dir = "x"
  with pytest.raises(ValueError, match=r"--config.loss='triplet'"):
    config.validate_config(cfg)
  cfg = cfg_with(batch_size=0)
  cfg.data_dir = "x"
  with pytest.raises(ValueError, match=r"--config.batch_size=0"):
    config.validate_config(cfg)
  for key in ("joint_loss_weight", "joint_rank_weight"):
    cfg = cfg_with(**{key: -1.0})
    cfg.data_dir = "x"
    with pytest.raises(ValueError, match=rf"--config.{key}=-1.0 must be >= 0"):
      config.validate_config(cfg)
  with pytest.raises(ValueError, match="unknown config variant 'nope'"):
    config.apply_variants(cfg_with(), "nope")
  with pytest.raises(ValueError, match=r"--config.freeze_pretrained_steps=-1 must be"):
    config.validate_config(cfg_with(freeze_pretrained_steps=-1, data_dir="x"))
  with pytest.raises(ValueError, match=r"--config.init_random=True starts it from"):
    config.validate_config(cfg_with(freeze_pretrained_steps=5, init_random=True,
                                    data_dir="x"))
  cfg = cfg_with(freeze_pretrained_steps=5)
  config.apply_variants(cfg, "random_init")
  assert cfg.freeze_pretrained_steps == 0


def test_length_bucket_config_errors():
  with pytest.raises(ValueError, match="length_bucket=0"):
    config.validate_config(cfg_with(pooling="mean_unmasked", data_dir="x",
                                    packing_bucket=0))
  with pytest.raises(ValueError, match="packing_bucket=0"):
    config.validate_config(cfg_with(pooling="mean_unmasked", data_dir="x",
                                    length_bucket=0))
  with pytest.raises(ValueError, match="--config.packing_bucket=-1 must be an integer"):
    config.validate_config(cfg_with(packing_bucket=-1, data_dir="x"))
  with pytest.raises(ValueError, match="--config.dropout_rng"):
    config.validate_config(cfg_with(dropout_rng="philox", data_dir="x"))
  with pytest.raises(ValueError, match="--config.attention_dropout"):
    config.validate_config(cfg_with(attention_dropout=1.5, data_dir="x"))




# ----------------------------------------------------------------------------------
# Fuzz (issue 23): every numeric key at NaN, +-inf, -1, 0 and a huge value gets an
# error naming the key, or trains.

NUMERIC_KEYS = {key: type(value) for key, value in config.defaults().items()
                if isinstance(value, (int, float)) and not isinstance(value, bool)}
# The data keys the pipeline caps at MAX_WORKERS.
WORKER_KEYS = ("pipeline_workers", "pipeline_processes", "prefetch_batches",
               "prepare_workers")


def extremes(key: str) -> list:
  """NaN, +-inf, -1, 0, huge (1e300, or 10**18 for an integer key), and the key's
  largest value where it has a finite one (`validate_config`'s caps, the pipeline's)."""
  if NUMERIC_KEYS[key] is int:
    values = [math.nan, math.inf, -math.inf, -1, 0, 10 ** 18]
    most = config._INT_MAX.get(key, MAX_WORKERS if key in WORKER_KEYS else None)
  else:
    values = [math.nan, math.inf, -math.inf, -1.0, 0.0, 1e300]
    most = config._FLOAT_RANGE.get(key, (0, None))[1]
  return values + ([most] if most is not None and math.isfinite(most)
                   and most not in values else [])


def validation_error(key: str, value, data_dir, **context) -> str | None:
  """What `validate_config` and `pipeline_options` say to the defaults with
  `key=value` (None: accepted). The config is not type-safe, so an integer key can
  hold NaN here as it could in a config file's Python."""
  import ml_collections
  from vldeformer_jax.data import pipeline
  cfg = ml_collections.ConfigDict(config.defaults(), type_safe=False)
  cfg.update(data_dir=str(data_dir), **context)
  cfg[key] = value
  try:
    config.validate_config(cfg)
    pipeline.pipeline_options(cfg, None)
  except ValueError as e:
    return str(e)
  return None


# How an accepted value is shown to train, by what the key changes (every numeric key
# in exactly one group):
# - the optimizer and its schedule: the base batch's gradients through
#   `make_optimizer(cfg)` with its counters at steps 0, the end of the warm-up and the
#   last step: finite learning rate, finite parameters (the step's update, cheaply);
OPTIMIZER_KEYS = ("lr", "weight_decay", "end_lr_factor", "fresh_lr_multiplier",
                  "adam_b1", "adam_b2", "adam_eps", "grad_clip_norm", "warmup_steps",
                  "total_steps", "freeze_pretrained_steps", "grad_accum_steps")
# - the loss and the model: a trainer built for the value takes one step (at the peak
#   learning rate): finite loss and gradient, finite parameters; a value the model
#   cannot take is refused when it loads, naming the key, before anything compiles;
STEP_KEYS = ("temperature", "joint_loss_weight", "joint_rank_weight", "distill_weight",
             "distill_candidates", "distill_temperature", "attention_dropout", "scan_unroll", "tag_segment_id", "max_text_len",
             "max_tag_len", "max_joint_len", "max_regions", "feature_dim")
# - the data only: the base trainer's compiled step takes the batch the pipeline
#   builds for the value (or the pipeline refuses it, naming the key);
DATA_KEYS = ("batch_size", "seed", "negative_group_size", "text_negative_ratio",
             "image_negative_ratio", "pipeline_workers", "pipeline_processes",
             "prefetch_batches", "prepare_workers")
# - the padded layout: the step's arrays for the value (`shape_batch`) are never larger
#   than the batch's padded arrays, and its packing indices stay inside them (padded
#   and packed steps are one function: test_model.py, test_train.py);
LAYOUT_KEYS = ("length_bucket", "packing_bucket")
# - the loop's bookkeeping (Python integers compared with the step number, orbax's
#   count of checkpoints kept, the evaluation's size and batch): one 1-step run of
#   `train_and_evaluate` with all of them at their largest accepted value.
LOOP_KEYS = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
             "eval_every_steps", "eval_max_images", "eval_batch_size")
GROUPS = (OPTIMIZER_KEYS, STEP_KEYS, DATA_KEYS, LAYOUT_KEYS, LOOP_KEYS)
# What a key needs set beside it to change anything.
# The distillation keys: the teacher is the init model itself (`Setup.config`).
TEACHER = "the init model"
DISTILL = {"distill_weight": 1.0, "teacher_mode": "individual", "teacher_model": TEACHER}
CONTEXT = {"joint_rank_weight": {"joint_loss_weight": 1.0},
           "distill_weight": {k: v for k, v in DISTILL.items() if k != "distill_weight"},
           "distill_candidates": DISTILL, "distill_temperature": DISTILL}
# Accepted values not run here: the largest batch (65536 rows: its cost is its size,
# minutes of batch building on this CPU) and the most input processes (256: the
# host's limit, not the step's; 0, threads, runs).
NOT_RUN = {"batch_size": config._INT_MAX["batch_size"], "pipeline_processes": MAX_WORKERS}


def test_fuzzed_numeric_keys_are_refused_naming_the_key_or_accepted(tmp_path):
  """Each refusal names `--config.<key>`; what is accepted,
  `test_fuzzed_accepted_values_train` trains with (its groups hold every key)."""
  for key in NUMERIC_KEYS:
    for value in extremes(key):
      error = validation_error(key, value, tmp_path, **CONTEXT.get(key, {}))
      assert error is None or f"--config.{key}=" in error, (key, value, error)
  grouped = [key for group in GROUPS for key in group]
  assert sorted(grouped) == sorted(NUMERIC_KEYS)


def test_caps_found_by_the_fuzz():
  """What the fuzz found accepted but untrainable, now refused naming the key: a
  learning rate or weight decay whose step overflows float32, a loss weight that
  makes the loss inf, a value float32 cannot hold (the step's update or gradient then
  0: nothing learned), step counts past the int32 counters, accumulation past the
  run, batches and region counts no array can hold."""
  for key, value, words in [
      ("lr", 1e300, "must be > 0 and <= 1"),
      ("weight_decay", 2.0, "must be >= 0 and <= 1"),
      ("end_lr_factor", 1e300, "must be >= 0 and <= 1"),
      ("fresh_lr_multiplier", 2000.0, "times --config.lr=0.001 must be <= 1"),
      ("joint_loss_weight", 1e300, "must be >= 0 and <= 1000"),
      ("temperature", 1e300, "must be > 0 (a finite float32 number)"),
      ("total_steps", 10 ** 18, "must be a positive integer and <= 2147483647"),
      ("warmup_steps", 2 ** 31, "must be an integer >= 0 and <= 2147483647"),
      ("grad_accum_steps", 11, "is more than --config.total_steps=10"),
      ("batch_size", 10 ** 18, "and <= 65536"),
      ("max_regions", 10 ** 18, "and <= 1024")]:
    with pytest.raises(ValueError, match=rf"--config\.{key}=.*{re.escape(words)}"):
      config.validate_config(cfg_with(data_dir="x", **{key: value}))


class Setup:
  """The tiny model (conftest's `tiny_model_dir`) on a small demo split: the loop's
  config for it (`conftest.loop_config`, the warm-up off so the first step is at the
  peak learning rate), a trainer built once for it, its step and gradients."""

  def __init__(self, data_dir, model_dir):
    from conftest import loop_config
    from vldeformer_jax import sharding, train
    self.base = loop_config(data_dir, model_dir, total_steps=4, warmup_steps=0)
    self.mesh = sharding.make_mesh(1)
    model_config, self.params, _ = train.load_init_model(self.base)
    self.trainer = train.Trainer(self.base, model_config, self.mesh)
    self.state = self.trainer.init_state(self.params, self.base.seed)
    self.step = self.trainer.compile_step(self.state)
    self.local = self.batch(self.base)

  def config(self, key: str, value):
    import ml_collections
    cfg = ml_collections.ConfigDict(self.base.to_dict(), type_safe=False)
    cfg.update(**CONTEXT.get(key, {}))
    cfg[key] = value
    if cfg.teacher_model == TEACHER:
      cfg.teacher_model = cfg.init_model
    return cfg

  def batch(self, cfg):
    """This process's first batch, as the loop builds it for `cfg` (a ValueError for
    what the model or the split cannot take, before anything compiles)."""
    from vldeformer_jax import train
    from vldeformer_jax.data import pipeline
    from vldeformer_jax.inputs import InputBuilder, load_tokenizer
    model_config, _, vocab = train.load_init_model(cfg)
    inputs = InputBuilder(load_tokenizer(vocab, model_config.do_lower_case),
                          model_config)
    batches = pipeline.make_train_iterator(cfg, inputs, 0, 1)
    try:
      return next(batches)
    finally:
      batches.close()

  def take_step(self, cfg, new_trainer: bool) -> None:
    """One step on `cfg`'s batch: by a trainer built for `cfg`, or the base's."""
    import jax
    import numpy as np
    from vldeformer_jax import distill, sharding, train
    local = self.batch(cfg)
    trainer = self.trainer
    if new_trainer:
      model_config, params, vocab = train.load_init_model(cfg)
      trainer = train.Trainer(cfg, model_config, self.mesh,
                              distill.load_teacher(cfg, model_config, vocab))
      state = trainer.init_state(params, cfg.seed)
      step = trainer.compile_step(state)
    else:
      state, step = self.trainer.init_state(self.params, cfg.seed), self.step
    state, metrics = step(state, sharding.global_batch(train.shape_batch(local, cfg, 1),
                                                       self.mesh), *trainer.step_inputs)
    assert bool(metrics["finite"]), f"loss {float(metrics['loss'])}"
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(
        state.params))), "non-finite parameters"

  @functools.cached_property
  def grads(self):
    """The base step's gradients on the base batch."""
    import jax
    from vldeformer_jax import prng, sharding, train
    rng = jax.random.wrap_key_data(self.state.rng, impl=prng.impl(self.base.dropout_rng))
    batch = sharding.global_batch(train.shape_batch(self.local, self.base, 1), self.mesh)
    loss = lambda p, b, r: self.trainer.objective(p, b, r)[0]
    return jax.device_get(jax.jit(jax.grad(loss))(self.state.params, batch, rng))

  def update(self, cfg) -> None:
    """The step's update by `make_optimizer(cfg)` of the base gradients, its counters
    at each turning point of the schedule: learning rate and parameters finite."""
    import jax
    import numpy as np
    import optax
    from vldeformer_jax import train
    tx, schedule = train.make_optimizer(cfg), train.learning_rate_schedule(cfg)
    params = jax.device_get(self.state.params)
    for at in sorted({0, min(cfg.warmup_steps, cfg.total_steps - 1), cfg.total_steps - 1}):
      assert np.isfinite(schedule(np.int32(at))), f"learning rate at step {at}"

      def counter(path, leaf):
        name = getattr(path[-1], "name", None)
        if name in ("count", "gradient_step"):
          return np.asarray(at, leaf.dtype)
        return np.asarray(cfg.grad_accum_steps - 1, leaf.dtype) if name == "mini_step" else leaf

      opt_state = jax.tree_util.tree_map_with_path(counter, tx.init(params))
      updates, _ = tx.update(self.grads, opt_state, params)
      for x in jax.tree.leaves(optax.apply_updates(params, updates)):
        assert np.all(np.isfinite(x)), f"non-finite parameters at step {at}"

  def layout(self, cfg) -> None:
    """The step's arrays for `cfg` fit inside the padded batch."""
    import numpy as np
    from vldeformer_jax import train
    for part, arrays in train.shape_batch(self.local, cfg, 1).items():
      for name, array in arrays.items():
        if name == "pack_index":
          rows, length = self.local[part]["input_ids"].shape
          size = rows * (length + self.local[part].get("regions", np.zeros((0, 0))).shape[1])
          assert array.shape[1] <= size and array.max() <= size, (part, array.shape)
        else:
          assert all(a <= b for a, b in zip(array.shape, self.local[part][name].shape))


@pytest.mark.slow
def test_fuzzed_accepted_values_train(tiny_model_dir, tmp_path):
  """Every (key, extreme) that `validate_config` and `pipeline_options` accept trains
  on the tiny model, checked by what the key changes (the groups above), or is
  refused, naming the key, by the checks against the model and the split before
  anything compiles. `NOT_RUN` lists the accepted values this test does not run."""
  from conftest import demo_data
  from vldeformer_jax import train
  setup = Setup(demo_data(tmp_path / "data"), tiny_model_dir)
  checks = {**dict.fromkeys(OPTIMIZER_KEYS, setup.update),
            **dict.fromkeys(STEP_KEYS, lambda cfg: setup.take_step(cfg, True)),
            **dict.fromkeys(DATA_KEYS, lambda cfg: setup.take_step(cfg, False)),
            **dict.fromkeys(LAYOUT_KEYS, setup.layout)}
  failures, loop = [], {}
  for key in NUMERIC_KEYS:
    for value in extremes(key):
      if validation_error(key, value, tmp_path, **CONTEXT.get(key, {})) is not None or (
          setup.base[key] == value or NOT_RUN.get(key) == value):
        continue
      if key in LOOP_KEYS:
        loop[key] = max(loop.get(key, value), value)
        continue
      try:
        checks[key](setup.config(key, value))
      except ValueError as e:  # Refused by the model or the split: named?
        if key not in str(e):
          failures.append(f"{key}={value!r}: {type(e).__name__}: {str(e)[:300]}")
      except Exception as e:  # noqa: BLE001 - the fuzz reports every case
        failures.append(f"{key}={value!r}: {type(e).__name__}: {str(e)[:300]}")
  cfg = setup.config("total_steps", 1)
  cfg.update(**loop)
  try:
    train.train_and_evaluate(cfg, tmp_path / "loop")
  except Exception as e:  # noqa: BLE001
    failures.append(f"the loop with {loop}: {type(e).__name__}: {str(e)[:300]}")
  assert not failures, "\n".join(failures)
