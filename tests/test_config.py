"""The run configuration (config.py): defaults, named and typed variants, validation
naming the key, and config files that stay free of JAX and TensorFlow."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vldeformer_jax import config
from vldeformer_jax.config import ModelConfig

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


