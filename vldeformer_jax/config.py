"""Configuration: the model's architecture and every key a training run reads.

`ModelConfig` is read from a VinVL/Oscar or Hugging Face BERT `config.json` (the
architecture fields) and extended with the VLDeformer options (pooling, input layout,
compute dtype, rematerialisation, attention kernel). A converted model directory stores
both in its own `config.json`, so `load_pretrained` needs nothing else.

The training run's keys live here too: `defaults()` (every key the trainer and the
input pipeline read, at the paper's recipe), `default_config()` (the same as an
`ml_collections.ConfigDict`, which `configs/*.py` start from), `apply_variants` (the
paper's ablations and `key=value` parts after the colon of `--config FILE:ARG`) and
`validate_config` (one line naming `--config.KEY` for a value that cannot train).
Importing this module imports neither JAX nor TensorFlow, so a config file stays a
cheap, readable recipe; the owners' choice tuples (`losses.LOSSES`, ...) are looked up
when validating.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal

from vldeformer_jax.fileio import read_json_object

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
    return cls.from_dict(read_json_object(path), source=str(path), **overrides)


# ----------------------------------------------------------------------------------
# The training run's keys.

# Keys whose default is None but which take a value of this type when set (a
# ConfigDict field needs its type to be overridable from the command line).
OPTIONAL_KEYS: dict[str, type] = {"data_dir": str, "init_model": str, "vocab_file": str,
                                  "attention_dropout": float, "teacher_model": str,
                                  "distill_false_negative_margin": float}


def defaults() -> dict[str, Any]:
  """Every key the trainer and the input pipeline read, at the paper's recipe (Sec.
  3.7: batch 1024, tau 0.005, AdamW lr 5e-5, wd 1e-4), as plain values.
  `default_config()` wraps them for config files; code that runs without
  ml_collections (the GPU benchmarks) can use them directly."""
  return dict(
      # Data (the released VinVL layout, see data/readers.py).
      data_dir=None,
      train_split="train",
      eval_split="test",
      feature_dim=FEATURE_DIM,
      box_order="auto",              # 'auto' | 'x1y1x2y2wh' | 'x1y1x2y2hw'
      caption_sampling="per_image",  # one random caption per image per epoch, or 'all_pairs'
      # 'shared_tags': images with the same set of object tags come together in the
      # stream, so in-batch negatives often differ only in their regions (data/pipeline.py).
      batch_grouping="none",
      on_error="error",              # bad rows: 'error' or 'skip' (counted and reported)
      data_source="raw",             # 'raw' released layout, or 'tfds' (bin/build_data --tfds)
      pipeline_workers=2,            # threads building batches
      pipeline_processes=0,          # > 0: processes building batches instead of threads
                                     # (scale past the GIL on a many-core host)
      prefetch_batches=1,
      # Each split is prepared once (caption templates, tag ids, float16 regions; see
      # data/prepared.py) in prepared_dir ('' = data_dir/.vldeformer_prepared), by
      # prepare_workers processes (or: bin/build_data).
      prepared_dir="",
      prepare_workers=2,
      # Model.
      init_model=None,               # a model dir (bin/convert or bin/train output)
      init_random=False,             # True: init_model's architecture and vocab, fresh weights
      vocab_file=None,               # a WordPiece vocab.txt, when init_model is None
      model=dict(vocab_size=30522, **MODEL_SIZES["base"], img_feature_dim=FEATURE_DIM,
                 use_img_layernorm=True),  # the architecture when init_model is None
      pooling="mean",                # 'mean' | 'cls' | 'mean_unmasked'
      dtype="bfloat16",
      remat=False,
      fsdp=False,
      # Attention kernel: 'auto' = cuDNN's fused flash attention on a GPU when it
      # computes the same function (bf16, no attention-probability dropout), XLA otherwise.
      attention_impl="auto",
      # Layers traced per iteration of the scanned encoder: 1 compiles fastest.
      scan_unroll=1,
      # False: the layers as straight-line code over per-layer slices of the (still
      # stacked) parameters: no loop, no stacked activations for the backward pass; on
      # a CPU faster per step, slower to compile (BENCHMARKS.md).
      scan_layers=True,
      # Dropout on attention probabilities, overriding the checkpoint's rate (BERT: 0.1);
      # None keeps the checkpoint's. 0 by default: fused attention kernels take none, and
      # the hidden-state dropout (the checkpoint's hidden_dropout_prob) stays.
      attention_dropout=0.0,
      # PRNG for dropout masks: 'rbg' or 'unsafe_rbg' (XLA's RngBitGenerator, as large
      # JAX trainers use: cheaper masks), 'threefry2x32' (JAX's default) or 'hash32'
      # (threefry keys, bits from a vectorised hash: ~20x cheaper masks on a CPU;
      # prng.py). Each is deterministic, resumes exactly and gives the same masks on any
      # device count.
      dropout_rng="rbg",
      # Padded lengths per batch (captions, tags, regions) are cut to buckets: powers of
      # two up to this, then its multiples (at most the configured maxima). The step
      # compiles once per bucket. 0: always pad to the maxima.
      length_bucket=16,
      # > 0: the layers run on each device's real tokens and regions packed into slots
      # (rounded up to a multiple of this) instead of padded rows: the same function and
      # dropout masks (model.Packing), on about the real tokens' share of the matrix
      # work. The step compiles once per bucket. 0: padded rows.
      packing_bucket=128,
      tag_segment_id=1,
      max_text_len=70,
      max_tag_len=70,
      max_joint_len=70,
      max_regions=50,
      # Objective (Eq. 1-3, losses.py) and bimodal hard negatives.
      loss="contrastive",            # 'contrastive' | 'cosine' (the "w/o contrastive" ablation)
      temperature=0.005,
      # True: tau is learned, as CLIP's logit scale: a parameter log(1/tau) initialised
      # from `temperature`, clamped to [0, log(max(100, 1/temperature))] after each
      # update (train.py); no weight decay, no freezing, no fresh-lr multiplier.
      temperature_learnable=False,
      hard_negatives=True,
      text_negative_ratio=0.5,
      image_negative_ratio=0.5,      # share of the objects not named in the caption
      joint_loss_weight=0.0,         # > 0: also train the joint scorer (re-ranker)
      joint_rank_weight=0.0,         # > 0: plus a listwise ranking term for the joint scorer
      # Distillation from a teacher's scores of each query's candidates (distill.py):
      # > 0 adds distill_weight x the term; the teacher is a model dir (bin/convert or
      # bin/train output) sharing the student's vocabulary and region feature size.
      distill_weight=0.0,
      teacher_model=None,
      teacher_mode="joint",          # 'joint' (its cross-encoder) | 'individual' (its encoders)
      distill_loss="kl",             # 'kl' (listwise, LightningDOT) | 'margin_mse'
      distill_candidates=4,          # k: each query's k closest other items of the batch
      distill_temperature=1.0,       # T of the KL's softmaxes (T^2 x KL)
      # A candidate the teacher scores above the positive by more than this is a likely
      # false negative: dropped from the candidates and the contrastive softmax
      # (RocketQA). None: none dropped.
      distill_false_negative_margin=None,
      text_negative_tags="batch",    # nouns become tags of the mini-batch ('batch') or of
                                     # the image itself ('image')
      negative_group_size=0,         # rows per negative group (0: the process's share)
      # Optimisation (paper: AdamW lr 5e-5, wd 1e-4, batch 1024).
      batch_size=1024,
      total_steps=20_000,
      seed=0,
      lr=5e-5,
      weight_decay=1e-4,
      warmup_steps=1000,
      schedule="linear",             # 'linear' | 'cosine' | 'constant' (after warm-up)
      end_lr_factor=0.0,
      grad_clip_norm=1.0,
      fresh_lr_multiplier=1.0,       # lr factor for img_embedding and classifier
      freeze_pretrained_steps=0,     # first updates that move only those fresh parts
      adam_b1=0.9,
      adam_b2=0.999,
      adam_eps=1e-8,
      grad_accum_steps=1,
      nonfinite="skip",              # 'skip' the step, or 'stop' with the last checkpoint
      # Bookkeeping.
      log_every_steps=50,
      checkpoint_every_steps=1000,
      keep_checkpoints=3,
      eval_every_steps=2000,         # 0: no periodic evaluation
      eval_protocol="all",           # evaluation.PROTOCOLS: 'all' | 'coco1k' | 'coco5k' | 'flickr1k'
      eval_max_images=0,             # 0: every image of eval_split
      eval_batch_size=128,
      best_metric="eval/rsum",
  )


def default_config():
  """`defaults()` as an `ml_collections.ConfigDict`: what `configs/*.py` start from."""
  import ml_collections
  c = ml_collections.ConfigDict()
  for key, value in defaults().items():
    if key in OPTIONAL_KEYS:
      value = ml_collections.FieldReference(value, field_type=OPTIONAL_KEYS[key])
    elif isinstance(value, dict):
      value = ml_collections.ConfigDict(value)
    c[key] = value
  return c


# The paper's ablations (Table 5: cosine, cls, random_init), this project's row without
# the hard negatives (not in Table 5) and the released code's recipe, as named variants
# of any config: `--config configs/vinvl_coco.py:no_negatives,cls`. bin/ablate trains
# them over seeds (ablation.py).
VARIANTS: dict[str, dict[str, Any]] = {
    "no_negatives": dict(hard_negatives=False),        # not a row of Table 5
    "cosine": dict(loss="cosine"),                      # w/o contrastive
    "cls": dict(pooling="cls"),                         # w/o avg pool
    # w/o pre-train: the init model's architecture and vocab, fresh weights (nothing
    # pre-trained to hold still).
    "random_init": dict(init_random=True, freeze_pretrained_steps=0),
    # The authors' released code: unmasked mean pooling (which counts the padding, so
    # no length buckets or packing), lr 7.5e-6, wd 0.05, cosine schedule.
    "released": dict(pooling="mean_unmasked", lr=7.5e-6, weight_decay=0.05,
                     length_bucket=0, packing_bucket=0, schedule="cosine",
                     warmup_steps=200),
}


def _typed(key: str, text: str, current: Any) -> Any:
  """`text` parsed as the type of the key's current value (big_vision's parse_arg)."""
  kind = OPTIONAL_KEYS.get(key) if current is None else type(current)
  try:
    if kind is bool:
      if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError
      return text.lower() in ("true", "1")
    if kind is int:
      return int(text)
    if kind is float:
      return float(text)
    if kind is str or kind is None:
      return text
  except ValueError:
    pass
  raise ValueError(f"config variant {key}={text!r}: expected a {kind.__name__}")


def apply_variants(c: Any, arg: str,
                   variants: dict[str, dict[str, Any]] | None = None) -> None:
  """Applies `arg`, the text after the colon of `--config FILE:ARG`: comma-separated
  named variants (`VARIANTS`, plus a config file's own `variants`) and `key=value`
  parts typed like the key's default, e.g. `no_negatives,seed=1,lr=1e-4`. Parts apply
  left to right."""
  variants = {**VARIANTS, **(variants or {})}
  for part in filter(None, (a.strip() for a in arg.split(","))):
    key, eq, text = part.partition("=")
    key = key.strip()
    if eq:
      if key not in c:
        raise ValueError(f"config variant {part!r}: no key {key!r}")
      c[key] = _typed(key, text.strip(), c[key])
    elif key in variants:
      for k, v in variants[key].items():
        c[k] = v
    else:
      raise ValueError(f"unknown config variant {key!r}; named variants: "
                       f"{', '.join(variants)}, or key=value")


# ----------------------------------------------------------------------------------
# Validation: one line naming the key for a value that cannot train.

# Integer keys and their least value.
_INT_MIN: dict[str, int] = {
    "batch_size": 1, "total_steps": 1, "log_every_steps": 1, "checkpoint_every_steps": 1,
    "keep_checkpoints": 1, "grad_accum_steps": 1, "eval_batch_size": 1, "scan_unroll": 1,
    "seed": 0, "warmup_steps": 0, "freeze_pretrained_steps": 0, "eval_every_steps": 0,
    "eval_max_images": 0, "length_bucket": 0, "packing_bucket": 0, "tag_segment_id": 0,
    "max_text_len": 3, "max_tag_len": 3, "max_joint_len": 3, "max_regions": 1,
    "distill_candidates": 1,
}
# Integer keys and their largest value: step counts fit the step's int32 counters
# (the state's and optax's), a batch the loss's batch x batch logits (twice CLIP's
# 32k), an image's regions what a detector keeps (VinVL keeps 50).
_INT_MAX: dict[str, int] = {
    "total_steps": 2**31 - 1, "warmup_steps": 2**31 - 1,
    "freeze_pretrained_steps": 2**31 - 1, "batch_size": 1 << 16, "max_regions": 1024,
}
# Float keys: (least, largest, whether the least and the largest values themselves are
# allowed). The caps keep the float32 step finite: learning rates (lr, the schedule's
# end lr x end_lr_factor, the fresh parts' lr x fresh_lr_multiplier: checked below) and
# weight decay at most 1, so AdamW's decay factor 1 - lr x weight_decay stays in
# [0, 1]; a loss weight at most 1e3 (the decomposing loss weighs 1).
_FLOAT_RANGE: dict[str, tuple[float, float, bool, bool]] = {
    "lr": (0.0, 1.0, False, True), "temperature": (0.0, math.inf, False, False),
    "grad_clip_norm": (0.0, math.inf, False, False),
    "adam_eps": (0.0, math.inf, False, False), "weight_decay": (0.0, 1.0, True, True),
    "end_lr_factor": (0.0, 1.0, True, True),
    "fresh_lr_multiplier": (0.0, math.inf, True, False),
    "joint_loss_weight": (0.0, 1e3, True, True), "joint_rank_weight": (0.0, 1e3, True, True),
    "adam_b1": (0.0, 1.0, True, False), "adam_b2": (0.0, 1.0, True, False),
    "distill_weight": (0.0, 1e3, True, True),
    "distill_temperature": (0.0, math.inf, False, False),
}
_FLOAT32_MAX = 3.4028234663852886e38  # every float key: the step computes in float32
_BOOL_KEYS = ("init_random", "remat", "fsdp", "scan_layers", "hard_negatives",
              "temperature_learnable")


def _check_int(config: Any, key: str, least: int, most: int | None = None) -> None:
  value = config[key]
  if isinstance(value, bool) or not isinstance(value, int) or value < least or (
      most is not None and value > most):
    what = "a positive integer" if least == 1 else f"an integer >= {least}"
    raise ValueError(f"--config.{key}={value!r} must be {what}"
                     + (f" and <= {most}" if most is not None else ""))


def _check_float(config: Any, key: str, low: float, high: float, low_ok: bool,
                 high_ok: bool) -> None:
  value = config[key]
  number = isinstance(value, (int, float)) and not isinstance(value, bool)
  if not number or not abs(value) <= _FLOAT32_MAX or not (
      (value >= low if low_ok else value > low)
      and (value <= high if high_ok else value < high)):
    bound = (f">= {low:g}" if low_ok else f"> {low:g}") + (
        f" and {'<=' if high_ok else '<'} {high:g}" if math.isfinite(high) else "")
    raise ValueError(f"--config.{key}={value!r} must be {bound} (a finite float32 "
                     "number)")


def validate_config(config: Any) -> None:
  """Clear errors for values the trainer cannot use, naming the config key. Data keys
  are checked by the input pipeline (`data.pipeline.PipelineOptions`), model sizes by
  `ModelConfig`; the choices come from the modules that own them."""
  from vldeformer_jax import distill, evaluation, losses, prng, train
  choices = {"loss": losses.LOSSES, "pooling": POOLINGS, "dtype": DTYPES,
             "teacher_mode": distill.MODES, "distill_loss": losses.DISTILL_LOSSES,
             "attention_impl": ATTENTION_IMPLS, "dropout_rng": prng.NAMES,
             "nonfinite": train.NONFINITE_POLICIES, "schedule": train.SCHEDULES,
             "eval_protocol": evaluation.PROTOCOLS}
  if config.eval_protocol in evaluation.RENAMED_PROTOCOLS:
    raise ValueError(f"--config.eval_protocol={config.eval_protocol!r} is now "
                     f"{evaluation.RENAMED_PROTOCOLS[config.eval_protocol]}")
  for key, allowed in choices.items():
    if config[key] not in allowed:
      raise ValueError(f"--config.{key}={config[key]!r} is not one of {tuple(allowed)}")
  for key, least in _INT_MIN.items():
    _check_int(config, key, least, _INT_MAX.get(key))
  for key, (low, high, low_ok, high_ok) in _FLOAT_RANGE.items():
    _check_float(config, key, low, high, low_ok, high_ok)
  if config.lr * config.fresh_lr_multiplier > 1:
    raise ValueError(f"--config.fresh_lr_multiplier={config.fresh_lr_multiplier!r} "
                     f"times --config.lr={config.lr!r} must be <= 1 (the fresh parts' "
                     "learning rate, capped as --config.lr is)")
  if config.grad_accum_steps > config.total_steps:
    raise ValueError(f"--config.grad_accum_steps={config.grad_accum_steps!r} is more "
                     f"than --config.total_steps={config.total_steps!r}: no update would "
                     "be made")
  for key in _BOOL_KEYS:
    if not isinstance(config[key], bool):
      raise ValueError(f"--config.{key}={config[key]!r} must be True or False")
  for key in ("length_bucket", "packing_bucket"):
    if config[key] and config.pooling == "mean_unmasked":
      raise ValueError("--config.pooling='mean_unmasked' averages over padding too, so "
                       f"the padded length changes results: set --config.{key}=0")
  dropout = config.attention_dropout
  if dropout is not None and not (isinstance(dropout, (int, float))
                                  and 0.0 <= dropout < 1.0):
    raise ValueError(f"--config.attention_dropout={dropout} must be in [0, 1) or None")
  if config.freeze_pretrained_steps and config.init_random:
    raise ValueError("--config.freeze_pretrained_steps freezes the pre-trained encoder, "
                     "but --config.init_random=True starts it from scratch: set "
                     "--config.freeze_pretrained_steps=0")
  margin = config.distill_false_negative_margin
  if margin is not None and not (isinstance(margin, (int, float)) and math.isfinite(margin)
                                 and margin >= 0):
    raise ValueError(f"--config.distill_false_negative_margin={margin} must be a finite "
                     "number >= 0, or None (no candidate dropped)")
  if config.distill_weight and config.distill_candidates >= config.batch_size:
    raise ValueError(f"--config.distill_candidates={config.distill_candidates}: each "
                     "query has at most batch_size - 1 other items "
                     f"(--config.batch_size={config.batch_size})")
  if not config.data_dir:
    raise ValueError("--config.data_dir is not set")
