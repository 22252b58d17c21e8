"""PyTorch <-> Flax checkpoint conversion.

`from_pytorch` reads a VinVL/Oscar checkpoint folder (`pytorch_model.bin` + `config.json`
+ `vocab.txt`) or a Hugging Face BERT (`model.safetensors` or `pytorch_model.bin`, keys
with or without `bert.`) and returns Flax parameters for `VLBert`. Every Flax leaf is
derived from the model's own parameter tree, so the mapping cannot drift from the model.
The scanned encoder stacks its layers on a leading axis; layer N is row N:

  flax  bert/encoder/layer/attention/self/query/kernel[3]   (transposed)
  torch bert.encoder.layer.3.attention.self.query.weight

Pickles are read with `torch.load(weights_only=True)` only: a pickle that carries code
is refused before any of it runs. `to_pytorch` is the inverse, with Oscar's key names.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from vldeformer_jax import safe_pickle
from vldeformer_jax.config import ModelConfig
from vldeformer_jax.fileio import (atomic_directory, check_output, generator,
                                   is_generated, read_json_object)
from vldeformer_jax.model import init_params
from vldeformer_jax.model_dir import (check_model_dir_output, flatten, flatten_shapes,
                                     load_model_dir, save_model_dir,
                                     stack_per_layer_keys, unflatten)

log = logging.getLogger(__name__)

# Parameters a source may lack; they are initialised fresh and reported.
_OPTIONAL_FOR_TEXT_BERT = ("bert/img_embedding/", "bert/LayerNorm/", "bert/pooler/",
                           "classifier/")
_OPTIONAL_FOR_OSCAR = ("classifier/",)


class CheckpointError(ValueError):
  """A checkpoint that cannot be converted; the message names the file and key."""


@dataclasses.dataclass
class ConversionReport:
  """What a conversion did: which tensors were used, dropped or freshly initialised."""
  source: str
  kind: str  # "oscar" or "bert"
  mapped: list[str]
  dropped: list[str]
  initialised: list[str]

  def summary(self) -> str:
    lines = [f"{self.source}: {self.kind} checkpoint, {len(self.mapped)} tensors mapped"]
    if self.dropped:
      lines.append(f"dropped {len(self.dropped)} tensors not used by the model: "
                   + ", ".join(self.dropped))
    if self.initialised:
      lines.append(f"initialised fresh (absent from the checkpoint): "
                   + ", ".join(self.initialised))
    return "\n".join(lines)


STACKED = "bert/encoder/layer/"  # leaves with a leading layer axis


def torch_key(flax_key: str, layer: int | None = None) -> str:
  """`bert/encoder/layer/output/dense/kernel`, layer 3 ->
  `bert.encoder.layer.3.output.dense.weight`; other keys take no layer."""
  if flax_key.startswith(STACKED) != (layer is not None):
    raise ValueError(f"{flax_key}: a layer index is needed exactly for {STACKED}* keys")
  *path, leaf = flax_key.split("/")
  if layer is not None:
    path[2] = f"layer.{layer}"
  leaf = "bias" if leaf == "bias" else "weight"
  return ".".join(path + [leaf])


def torch_keys(flax_key: str, num_layers: int) -> list[str]:
  """The PyTorch keys one Flax leaf holds: one per layer for stacked leaves."""
  if flax_key.startswith(STACKED):
    return [torch_key(flax_key, i) for i in range(num_layers)]
  return [torch_key(flax_key)]


def _candidates(key: str) -> list[str]:
  """Spellings a source may use for one Oscar key: with/without `bert.`, gamma/beta."""
  keys = [key]
  if key.endswith("LayerNorm.weight"):
    keys.append(key[: -len("weight")] + "gamma")
  if key.endswith("LayerNorm.bias"):
    keys.append(key[: -len("bias")] + "beta")
  if key.startswith("bert."):
    keys += [k[len("bert."):] for k in keys]
  return keys


def _to_flax(flax_key: str, tensor: np.ndarray) -> np.ndarray:
  return tensor.T if flax_key.endswith("/kernel") else tensor


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
  """Tensors of a `.safetensors` file or a `.bin`/`.pt` pickle, as float32 NumPy."""
  path = Path(path)
  if path.suffix == ".safetensors":
    from safetensors import safe_open
    try:
      with safe_open(str(path), framework="np") as f:
        raw = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
      raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
  else:
    raw = _torch_load_weights_only(path)
  return {k: np.asarray(v) for k, v in raw.items()}


def _torch_load_weights_only(path: Path) -> dict[str, np.ndarray]:
  """A torch state dict as NumPy, loaded without running code from the pickle."""
  try:
    obj = safe_pickle.load_torch(path, safe_pickle.tensor_global)
  except ImportError:
    raise CheckpointError(
        f"{path}: reading PyTorch pickles needs torch; install the extra with "
        "`pip install -e '.[torch]'`") from None
  except safe_pickle.UnsafePickleError as e:
    raise CheckpointError(f"{path}: refused: {e}; only weights-only pickles (tensors) "
                          "are loaded") from None
  except safe_pickle.UnreadablePickleError as e:
    raise CheckpointError(f"{path}: {e}") from None
  import torch
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
  out = {}
  for k, v in obj.items():
    if not isinstance(v, torch.Tensor):
      raise CheckpointError(f"{path}: entry {k!r} is {type(v).__name__}, not a tensor")
    out[k] = v.detach().to(torch.float32).numpy() if v.is_floating_point() else v.numpy()
  return out


def find_weights(src: Path) -> Path:
  for name in ("model.safetensors", "pytorch_model.bin"):
    if (src / name).is_file():
      return src / name
  raise CheckpointError(f"{src}: no model.safetensors or pytorch_model.bin found")


def read_source_config(src: Path, **overrides: Any) -> tuple[ModelConfig, dict]:
  config_path = src / "config.json"
  if not config_path.is_file():
    raise CheckpointError(f"{src}: no config.json")
  raw = read_json_object(config_path)
  tok_cfg = src / "tokenizer_config.json"
  if tok_cfg.is_file() and "do_lower_case" not in overrides:
    lower = read_json_object(tok_cfg).get("do_lower_case")
    if lower is not None:
      overrides["do_lower_case"] = bool(lower)
  return ModelConfig.from_json(config_path, **overrides), raw


def from_state_dict(state: dict[str, np.ndarray], config: ModelConfig, source: str,
                    seed: int = 0) -> tuple[dict[str, Any], ConversionReport]:
  """Maps a PyTorch state dict onto `VLBert(config)` parameters, checking every shape.

  Oscar/VinVL checkpoints (recognised by `img_embedding`) must hold every backbone
  tensor; a text-only BERT gets the image embedding, image LayerNorm and classifier
  freshly initialised (seeded) and reported. Unused tensors are listed as dropped.
  """
  is_oscar = any(k.endswith("img_embedding.weight") for k in state)
  optional = _OPTIONAL_FOR_OSCAR if is_oscar else _OPTIONAL_FOR_TEXT_BERT
  expected = flatten_shapes(config)
  fresh = None
  flat, used, mapped, initialised, problems = {}, set(), [], [], []
  for fkey, spec in expected.items():
    stacked = fkey.startswith(STACKED)
    want = tuple(spec.shape[1:] if stacked else spec.shape)
    tensors = []
    for tkey in torch_keys(fkey, config.num_hidden_layers):
      hit = next((k for k in _candidates(tkey) if k in state), None)
      if hit is None:
        if fkey.startswith(optional):
          if fresh is None:
            fresh = flatten(init_params(config, jax.random.key(seed)))
          initialised.append(tkey)
        else:
          problems.append(f"missing tensor {tkey}")
        continue
      tensor = _to_flax(fkey, state[hit])
      if tuple(tensor.shape) != want:
        torch_shape = tuple(state[hit].shape)
        torch_want = want[::-1] if fkey.endswith("/kernel") else want
        problems.append(f"tensor {hit} has shape {torch_shape}, expected {torch_want}")
        continue
      tensors.append(np.asarray(tensor, dtype=np.float32))
      used.add(hit)
      mapped.append(hit)
    if fkey.startswith(optional) and not tensors and fresh is not None:
      flat[fkey] = fresh[fkey]
    elif len(tensors) == (config.num_hidden_layers if stacked else 1):
      flat[fkey] = np.ascontiguousarray(np.stack(tensors) if stacked else tensors[0])
  if problems:
    raise CheckpointError(f"{source}: checkpoint does not fit the model config:\n  "
                          + "\n  ".join(problems))
  dropped = sorted(k for k in state if k not in used)
  report = ConversionReport(source, "oscar" if is_oscar else "bert", mapped,
                            dropped, sorted(set(initialised)))
  return unflatten(flat), report


def from_pytorch(src: str | Path, seed: int = 0, **config_overrides: Any
                 ) -> tuple[ModelConfig, dict[str, Any], Path, ConversionReport]:
  """Converts a checkpoint folder: returns (config, params, vocab path, report)."""
  src = Path(src)
  if not src.is_dir():
    raise CheckpointError(f"{src}: not a directory")
  config, raw = read_source_config(src, **config_overrides)
  vocab = src / "vocab.txt"
  if not vocab.is_file():
    raise CheckpointError(f"{src}: no vocab.txt")
  weights = find_weights(src)
  state = read_state_dict(weights)
  if "img_feature_dim" not in raw and not any("img_embedding" in k for k in state):
    log.info("%s: text-only BERT; image embedding sized img_feature_dim=%d",
             src, config.img_feature_dim)
  params, report = from_state_dict(state, config, str(weights), seed=seed)
  return config, params, vocab, report


def to_state_dict(params: Any, config: ModelConfig) -> dict[str, np.ndarray]:
  """Flax parameters (stacked, or one tree per layer as `VLDeformer.params` holds
  them) -> PyTorch state dict arrays with Oscar's key names."""
  expected = flatten_shapes(config)
  out = {}
  for fkey, value in stack_per_layer_keys(flatten(params)).items():
    if fkey not in expected:
      raise CheckpointError(f"parameter {fkey} is not part of the model")
    rows = value if fkey.startswith(STACKED) else [value]
    for tkey, row in zip(torch_keys(fkey, config.num_hidden_layers), rows, strict=True):
      out[tkey] = np.ascontiguousarray(_to_flax(fkey, row))
  return out


def oscar_config_dict(config: ModelConfig) -> dict[str, Any]:
  """A `config.json` in Oscar/VinVL's spelling (what `BertImgModel` reads), marked as
  ours (`fileio.generator`: an extra key, which BERT configs keep as an attribute)."""
  keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
          "intermediate_size", "hidden_act", "hidden_dropout_prob",
          "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
          "layer_norm_eps", "img_feature_dim", "img_layer_norm_eps", "num_labels")
  d = {"generator": generator("bin/convert --to-pytorch")}
  d.update({k: getattr(config, k) for k in keys})
  d.update(model_type="bert", architectures=["ImageBertForSequenceClassification"],
           img_feature_type="frcnn", use_img_layernorm=int(config.use_img_layernorm),
           initializer_range=0.02, do_lower_case=config.do_lower_case)
  return d


PYTORCH_EXPORT = "a PyTorch export (bin/convert --to-pytorch)"


def is_pytorch_export(path: str | Path) -> bool:
  """Whether `path` holds what `to_pytorch` writes (its config.json marked as ours)."""
  return is_generated(Path(path) / "config.json") and (
      Path(path) / "pytorch_model.bin").is_file()


def check_pytorch_output(dst: str | Path, overwrite: bool = False) -> Path:
  """`fileio.check_output` for `to_pytorch`'s folder: new, empty or an earlier
  export; anything else (an original checkpoint, say) only with `overwrite`."""
  return check_output(dst, is_dir=True, what=PYTORCH_EXPORT, is_own=is_pytorch_export,
                      overwrite=overwrite)


def to_pytorch(params: Any, config: ModelConfig, vocab_file: str | Path,
               dst: str | Path, *, overwrite: bool = False) -> Path:
  """Writes `pytorch_model.bin` (Oscar key names), `config.json` and `vocab.txt`, as
  one directory replaced atomically (`check_pytorch_output` says what it may
  replace)."""
  try:
    import torch
  except ImportError:
    raise CheckpointError("--to-pytorch needs torch: pip install -e '.[torch]'") from None
  dst = check_pytorch_output(dst, overwrite)
  state = {k: torch.from_numpy(v.copy()) for k, v in to_state_dict(params, config).items()}
  with atomic_directory(dst) as tmp:
    torch.save(state, tmp / "pytorch_model.bin")
    (tmp / "config.json").write_text(
        json.dumps(oscar_config_dict(config), indent=2) + "\n")
    shutil.copyfile(vocab_file, tmp / "vocab.txt")
  return dst


def convert_to_model_dir(src: str | Path, dst: str | Path, seed: int = 0, *,
                         overwrite: bool = False,
                         **config_overrides: Any) -> ConversionReport:
  """`bin/convert SRC DST`: a PyTorch checkpoint folder -> a model directory. `dst` is
  checked before the conversion starts (`model_dir.check_model_dir_output`)."""
  check_model_dir_output(dst, overwrite=overwrite)
  config, params, vocab, report = from_pytorch(src, seed=seed, **config_overrides)
  save_model_dir(dst, config, params, vocab, overwrite=overwrite)
  return report


def export_to_pytorch(model_dir: str | Path, dst: str | Path, *,
                      overwrite: bool = False) -> Path:
  """`bin/convert --to-pytorch MODEL_DIR DST`: a model directory -> Oscar layout; `dst`
  is checked before the model is read."""
  check_pytorch_output(dst, overwrite)
  config, params, vocab = load_model_dir(model_dir)
  return to_pytorch(params, config, vocab, dst, overwrite=overwrite)
