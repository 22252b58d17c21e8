"""Model configuration: the backbone's architecture plus how VLDeformer uses it.

`ModelConfig` is read from a VinVL/Oscar or Hugging Face BERT `config.json` (the
architecture fields) and extended with the VLDeformer options (pooling, input layout,
compute dtype, rematerialisation, attention kernel). A converted model directory stores both in its own
`config.json`, so `load_pretrained` needs nothing else.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

Pooling = Literal["mean", "cls", "mean_unmasked"]
POOLINGS: tuple[str, ...] = ("mean", "cls", "mean_unmasked")
DTYPES: tuple[str, ...] = ("float32", "bfloat16")
ATTENTION_IMPLS: tuple[str, ...] = ("auto", "xla", "cudnn")

# Oscar/VinVL region features: 2,048 appearance dims + 6 box dims (readers.py).
FEATURE_DIM = 2054

# Named architectures (the vocabulary and the rest come from a checkpoint or
# ModelConfig's defaults): the paper's backbone, the MiniLM the demo starts from, and
# two small ones that compile in seconds (benchmark smoke runs, tests).
MODEL_SIZES: dict[str, dict[str, int]] = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                   intermediate_size=1536),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128),
    "micro": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64),
}


def model_size(name: str) -> dict[str, int]:
  """The architecture fields of a named size (`MODEL_SIZES`), as a new dict."""
  if name not in MODEL_SIZES:
    raise ValueError(f"unknown model size {name!r}; one of {sorted(MODEL_SIZES)}")
  return dict(MODEL_SIZES[name])


def describe_size(name: str) -> str:
  """'MiniLM size (384 x 6, 12 heads, FFN 1536)'-style label of a named size."""
  s = MODEL_SIZES[name]
  title = {"base": "BERT-base", "minilm": "MiniLM"}.get(name, name)
  return (f"{title} size ({s['hidden_size']} x {s['num_hidden_layers']}, "
          f"{s['num_attention_heads']} heads, FFN {s['intermediate_size']})")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of the Oscar `BertImgModel` (a BERT with a region embedding)."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  # Image side (Oscar). A text-only BERT gets these defaults when converted.
  img_feature_dim: int = FEATURE_DIM
  use_img_layernorm: bool = False
  img_layer_norm_eps: float = 1e-12
  num_labels: int = 2
  # VLDeformer options.
  pooling: Pooling = "mean"
  tag_segment_id: int = 1
  max_text_len: int = 70
  max_tag_len: int = 70
  max_joint_len: int = 70  # Oscar's pair input: caption + tags together
  max_regions: int = 50
  do_lower_case: bool = True
  dtype: str = "float32"
  remat: bool = False
  attention_impl: str = "auto"  # 'auto' | 'xla' | 'cudnn' (see model.py)
  scan_unroll: int = 1  # layers per iteration of the scanned encoder (see model.py)
  scan_layers: bool = True  # False: straight-line layers, own params (see model.py)

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"hidden_size {self.hidden_size} is not a multiple of "
          f"num_attention_heads {self.num_attention_heads}")
    if self.pooling not in POOLINGS:
      raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
    if self.scan_unroll < 1:
      raise ValueError(f"scan_unroll must be >= 1, got {self.scan_unroll}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(
          f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
    if self.hidden_act not in ("gelu", "gelu_new", "gelu_python", "relu"):
      raise ValueError(f"unsupported hidden_act {self.hidden_act!r}")
    if not 0 <= self.tag_segment_id < self.type_vocab_size:
      raise ValueError(
          f"tag_segment_id {self.tag_segment_id} outside type_vocab_size "
          f"{self.type_vocab_size}")
    for name in ("max_text_len", "max_tag_len", "max_joint_len"):
      if not 3 <= getattr(self, name) <= self.max_position_embeddings:
        raise ValueError(
            f"{name}={getattr(self, name)} must be in [3, max_position_embeddings="
            f"{self.max_position_embeddings}]")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, raw: dict[str, Any], source: str = "config",
                **overrides: Any) -> "ModelConfig":
    """Builds a config from a VinVL/Oscar/HF `config.json` dict.

    Unknown keys (the many HF bookkeeping fields) are ignored; known keys are
    type-checked so a wrong value names the field and the source.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in {**raw, **overrides}.items():
      if key not in fields or value is None:
        continue
      default = fields[key].default
      try:
        if isinstance(default, bool):
          value = bool(int(value)) if not isinstance(value, bool) else value
        elif isinstance(default, int):
          if isinstance(value, float) and not value.is_integer():
            raise ValueError
          value = int(value)
        elif isinstance(default, float):
          value = float(value)
        elif isinstance(default, str):
          value = str(value)
      except (TypeError, ValueError):
        raise ValueError(
            f"{source}: field {key!r} has value {value!r}, expected "
            f"{type(default).__name__}") from None
      kwargs[key] = value
    # HF spells the number of labels through id2label.
    if "num_labels" not in kwargs and isinstance(raw.get("id2label"), dict):
      kwargs["num_labels"] = len(raw["id2label"])
    try:
      return cls(**kwargs)
    except ValueError as e:
      raise ValueError(f"{source}: {e}") from None

  @classmethod
  def from_json(cls, path: str | Path, **overrides: Any) -> "ModelConfig":
    path = Path(path)
    try:
      raw = json.loads(path.read_text())
    except FileNotFoundError:
      raise FileNotFoundError(f"{path}: no such config file") from None
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
      raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return cls.from_dict(raw, source=str(path), **overrides)
