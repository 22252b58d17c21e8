"""Contrastive decomposing: the train state, optimizer, jitted step and the loop.

`train_and_evaluate(config, workdir)` is what `bin/train` calls. The step is one
`jax.jit` over the device mesh with explicit shardings and a donated state; the four
embedding sets (texts, images and their hard negatives) meet in
`sharding.sharded_contrastive_loss`. The loop saves orbax checkpoints (params, optimizer,
step, rng and the input pipeline's position), resumes from the workdir automatically,
and on SIGTERM/SIGINT finishes the current step, saves and returns.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from clu import metric_writers
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from vldeformer_jax import checkpoints, prng, sharding
from vldeformer_jax.config import ModelConfig
from vldeformer_jax.encoder import VLDeformer
from vldeformer_jax.evaluation import evaluate_encoder
from vldeformer_jax.inputs import (InputBuilder, add_pack_index, load_tokenizer,
                                   packed_lengths, padded_lengths, trim_padding)
from vldeformer_jax.losses import cosine_loss
from vldeformer_jax.model import VLBert, compute_dtype, init_params, unstack_layers
from vldeformer_jax.model_dir import load_model_dir, save_model_dir

log = logging.getLogger(__name__)
Batch = dict[str, dict[str, np.ndarray]]
BATCH_PARTS = ("text", "image", "neg_text", "neg_image")


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: optimizer steps taken
  params: Any              # float32 parameters (compute dtype is a model option)
  opt_state: Any
  rng: jax.Array           # base dropout key data (config.dropout_rng's PRNG); step
                           # keys are fold_in(rng, step)
  skipped: jax.Array       # int32 scalar: steps skipped for a non-finite loss


class TrainIterator(Protocol):
  """What the input pipeline gives the trainer: this process's share of each global
  batch (NumPy), and a JSON-able position to checkpoint and restore."""

  def __next__(self) -> Batch: ...

  def get_state(self) -> dict: ...

  def set_state(self, state: dict) -> None: ...


# ----------------------------------------------------------------------- optimizer
def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up to `lr`, then cosine or linear decay to `lr * end_lr_factor`."""
  warmup = int(config.warmup_steps)
  total = int(config.total_steps)
  end = config.lr * config.get("end_lr_factor", 0.0)
  if config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, max(total, warmup + 1),
                                              end)
  if config.schedule == "linear":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, config.lr, max(warmup, 1)),
         optax.linear_schedule(config.lr, end, max(total - warmup, 1))], [warmup])
  if config.schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, config.lr, max(warmup, 1)),
         optax.constant_schedule(config.lr)], [warmup])
  raise ValueError(f"config.schedule: unknown schedule {config.schedule!r} "
                   "(cosine, linear, constant)")


def weight_decay_mask(params: Any) -> Any:
  """Decay kernels and embeddings; not biases or LayerNorm parameters (as BERT)."""
  def decays(path, _) -> bool:
    names = [getattr(p, "key", str(p)) for p in path]
    return names[-1] not in ("bias", "scale")
  return jax.tree_util.tree_map_with_path(decays, params)


FRESH_PARAMS = ("img_embedding", "classifier")  # what a text-only checkpoint lacks


def fresh_params_mask(params: Any) -> Any:
  """True for the region embedding and the classifier: the parts a text-only BERT
  checkpoint does not have, which start from scratch."""
  def fresh(path, _) -> bool:
    return any(getattr(p, "key", None) in FRESH_PARAMS for p in path)
  return jax.tree_util.tree_map_with_path(fresh, params)


def pretrained_params_mask(params: Any) -> Any:
  """The complement of `fresh_params_mask`: what the init checkpoint brings."""
  return jax.tree.map(lambda fresh: not fresh, fresh_params_mask(params))


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  parts = [
      optax.clip_by_global_norm(config.grad_clip_norm),
      optax.adamw(learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2,
                  eps=config.adam_eps, weight_decay=config.weight_decay,
                  mask=weight_decay_mask)]
  multiplier = config.get("fresh_lr_multiplier", 1.0)
  if multiplier != 1.0:
    parts.append(optax.masked(optax.scale(multiplier), fresh_params_mask))
  frozen_steps = config.get("freeze_pretrained_steps", 0)
  if frozen_steps > 0:
    # A projector warm-up (as LLaVA's first stage): the first updates move only the
    # fresh parts, so the region projection learns to feed the pre-trained encoder
    # before the encoder moves. AdamW's moments see every gradient meanwhile.
    released = lambda count: (count >= frozen_steps).astype(jnp.float32)
    parts.append(optax.masked(optax.scale_by_schedule(released), pretrained_params_mask))
  tx = optax.chain(*parts)
  if config.grad_accum_steps > 1:
    # Note: each micro-batch then has its own in-batch negatives.
    tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps)
  return tx


# ---------------------------------------------------------------------- the step
MODALITIES = (("text", "neg_text"), ("image", "neg_image"))


def encode_batch(module: VLBert, params: Any, batch: Batch, rng: jax.Array,
                 deterministic: bool) -> dict[str, jax.Array]:
  """r_t / r_v for every part present in the batch, each [B, hidden] float32.

  A caption and its hard negative (and an image and its hard negative) share their
  padded shapes, so each modality is one encoder call, `vmap`ped over its parts: the
  matrix products see all their rows at once and the step compiles half the program.
  Each part draws its own dropout key, and a row's dropout mask depends on its index
  in its part only, so results do not depend on how the batch is sharded."""
  out = {}
  for i, modality in enumerate(MODALITIES):
    parts = [p for p in modality if p in batch]
    if not parts:
      continue
    def encode(inputs, key):
      return module.apply({"params": params}, **inputs, deterministic=deterministic,
                          rngs={"dropout": key}, method=VLBert.encode)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[batch[p] for p in parts])
    keys = jax.random.split(jax.random.fold_in(rng, i), len(parts))
    out.update(zip(parts, jax.vmap(encode)(stacked, keys)))
  return out


def compute_params(params: Any, config: ModelConfig) -> Any:
  """The matrices (kernels, embeddings) in the compute dtype, cast once per step
  rather than at every use; vectors (biases, LayerNorm) stay float32 for Flax to
  promote where they are used. Gradients flow back to the float32 parameters."""
  dtype = compute_dtype(config)
  return jax.tree.map(lambda x: x.astype(dtype) if x.ndim >= 2 else x, params)


def joint_inputs(text: dict[str, jax.Array], image: dict[str, jax.Array]
                 ) -> dict[str, jax.Array]:
  """Oscar's pair input `[CLS] caption [SEP] tags [SEP]` + regions, built on device from
  a text part and an image part (the image's own [CLS] dropped, tags in segment 1,
  tag positions continuing after the caption). The caption's padding stays in the
  middle, masked out, which attention does not see."""
  tag_ids = image["input_ids"][:, 1:]
  caption_len = text["token_mask"].sum(axis=1, keepdims=True)
  tag_pos = caption_len + jnp.arange(tag_ids.shape[1])[None, :]
  cat = lambda a, b: jnp.concatenate([a, b], axis=1)
  return dict(input_ids=cat(text["input_ids"], tag_ids),
              token_type_ids=cat(jnp.zeros_like(text["input_ids"]), jnp.ones_like(tag_ids)),
              position_ids=cat(text["position_ids"], tag_pos.astype(jnp.int32)),
              token_mask=cat(text["token_mask"], image["token_mask"][:, 1:]),
              regions=image["regions"], region_mask=image["region_mask"])


def _fingerprint(part: dict[str, jax.Array]) -> jax.Array:
  """[B] uint32 hashes, equal for identical inputs and (almost surely) different
  otherwise: integer arithmetic on the token ids and the regions' bits, so identical
  rows hash identically on any backend."""
  def hash_rows(x):
    flat = x.reshape(x.shape[0], -1)
    mults = jax.random.bits(jax.random.key(flat.shape[1]), (flat.shape[1],), jnp.uint32)
    return (flat * (mults | 1)).sum(axis=1, dtype=jnp.uint32)
  ids = (part["input_ids"] * part["token_mask"]).astype(jnp.uint32)
  out = hash_rows(ids)
  if "regions" in part:
    bits = jax.lax.bitcast_convert_type(part["regions"].astype(jnp.float32), jnp.uint32)
    out = out * jnp.uint32(0x9E3779B1) + hash_rows(bits)
  return out


def mined_negatives(text_emb: jax.Array, image_emb: jax.Array, text: dict[str, jax.Array],
                    image: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """For each pair of the (global) batch, the other image its caption is closest to and
  the other caption its image is closest to under the encoder, as ALBEF mines
  image-text-matching negatives: the re-ranker then trains on the candidates it will
  re-rank. Rows sharing the pair's image or caption (all_pairs sampling, duplicate
  captions) are never chosen. Returns (image index [B], text index [B], valid [B])."""
  sim = jax.lax.stop_gradient(text_emb @ image_emb.T)                  # [B text, B image]
  img_fp, txt_fp = _fingerprint(image), _fingerprint(text)
  other = (img_fp[:, None] != img_fp[None, :]) & (txt_fp[:, None] != txt_fp[None, :])
  sim = jnp.where(other, sim, -jnp.inf)
  return jnp.argmax(sim, axis=1), jnp.argmax(sim, axis=0), other.any(axis=1)


def joint_matching_loss(module: VLBert, params: Any, batch: Batch,
                        emb: dict[str, jax.Array], rng: jax.Array,
                        rank_weight: float = 0.0) -> jax.Array:
  """Oscar's retrieval fine-tuning objective for the joint scorer (the re-ranker):
  2-way cross-entropy on aligned pairs (label 1) and mismatched pairs (label 0). The
  mismatched pairs are each caption with the other image the encoder ranks highest for
  it, each image with its highest-ranked other caption (`mined_negatives`) and, when
  the batch has them, the bimodal hard-negative image and text.

  `rank_weight` > 0 adds a listwise term on the score re-ranking uses (l1 - l0, see
  `VLDeformer.score_pairs`): each caption's own image must outscore its negative
  images, and each image's own caption its negative captions (a softmax over the pair
  and its negatives). The 2-way loss calibrates a pair on its own; this term teaches
  the order among the candidates of one query, which is what re-ranking needs.
  """
  # The joint scorer runs on padded pairs: drop the parts' packing indices.
  batch = {part: {k: v for k, v in arrays.items() if k != "pack_index"}
           for part, arrays in batch.items()}
  text, image = batch["text"], batch["image"]
  mined_image, mined_text, valid = mined_negatives(emb["text"], emb["image"], text, image)
  take = lambda part, idx: jax.tree.map(lambda x: jnp.take(x, idx, axis=0), part)
  # (text, image, which rows count [B], the query it competes for: "text" or "image")
  negatives = [(text, take(image, mined_image), valid, "text"),
               (take(text, mined_text), image, valid, "image")]
  if "neg_image" in batch:
    always = jnp.ones_like(valid)
    negatives += [(text, batch["neg_image"], always, "text"),
                  (batch["neg_text"], image, always, "image")]

  def logits_of(i: int, text, image) -> jax.Array:  # [B, 2]
    logits = module.apply({"params": params}, **joint_inputs(text, image),
                          deterministic=False, rngs={"dropout": jax.random.fold_in(rng, i)},
                          method=VLBert.match_logits)
    return logits.astype(jnp.float32)

  positive = logits_of(0, text, image)
  negative = [logits_of(i + 1, t, v) for i, (t, v, _, _) in enumerate(negatives)]
  nll = lambda logits, label: -jax.nn.log_softmax(logits, axis=-1)[:, label]
  weights = jnp.stack([w for _, _, w, _ in negatives]).astype(jnp.float32)  # [N, B]
  negative_nll = jnp.stack([nll(lg, 0) for lg in negative])               # [N, B]
  # Positives and negatives weigh the same, as in Oscar's balanced sampling.
  loss = (0.5 * nll(positive, 1).mean()
          + 0.5 * (negative_nll * weights).sum() / jnp.maximum(weights.sum(), 1.0))
  if rank_weight:
    score = lambda logits: logits[:, 1] - logits[:, 0]
    for query in ("text", "image"):
      rivals = [jnp.where(w, score(lg), -1e9)
                for lg, (_, _, w, q) in zip(negative, negatives) if q == query]
      scores = jnp.stack([score(positive)] + rivals, axis=1)  # [B, 1 + rivals]
      loss += 0.5 * rank_weight * -jax.nn.log_softmax(scores, axis=1)[:, 0].mean()
  return loss


def make_loss_fn(module: VLBert, config: ml_collections.ConfigDict, mesh: Mesh
                 ) -> Callable[[Any, Batch, jax.Array], tuple[jax.Array, dict]]:
  """loss(params, batch, rng) -> (total, parts): the decomposing loss (Eq. 3 or the
  cosine ablation) plus `joint_loss_weight` x the joint matching loss."""
  if config.loss not in ("contrastive", "cosine"):
    raise ValueError(f"config.loss: unknown loss {config.loss!r} (contrastive, cosine)")
  weight = float(config.get("joint_loss_weight", 0.0))

  def loss_fn(params, batch, rng):
    params = compute_params(params, module.config)
    if not module.config.scan_layers:  # the state stays stacked; see model.Encoder
      params = unstack_layers(params)
    emb = encode_batch(module, params, batch, rng, deterministic=False)
    if config.loss == "cosine":
      loss = cosine_loss(emb["text"], emb["image"])
    else:
      negs = ((emb.get("neg_text"), emb.get("neg_image")) if config.hard_negatives
              else (None, None))
      loss = sharding.sharded_contrastive_loss(emb["text"], emb["image"], *negs,
                                               mesh=mesh, temperature=config.temperature)
    parts = {"decompose_loss": loss}
    if weight > 0:
      joint = joint_matching_loss(module, params, batch, emb, jax.random.fold_in(rng, 99),
                                  float(config.get("joint_rank_weight", 0.0)))
      parts["joint_loss"] = joint
      loss = loss + weight * joint
    return loss, parts
  return loss_fn


def train_step(state: TrainState, batch: Batch, *, loss_fn, tx, schedule
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step; a non-finite loss or gradient leaves params and optimizer
  state untouched and counts the step in `skipped`."""
  rng = jax.random.fold_in(state.rng, state.step)
  (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch,
                                                                     rng)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(
      step=state.step + 1, params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      skipped=state.skipped + (~finite).astype(jnp.int32))
  metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
             "finite": finite, **parts}
  return new_state, metrics


@dataclasses.dataclass
class Trainer:
  """Everything compiled for one (config, mesh): the init and the sharded step."""
  config: ml_collections.ConfigDict
  model_config: ModelConfig
  mesh: Mesh

  def __post_init__(self):
    self.module = VLBert(self.model_config)
    self.schedule = learning_rate_schedule(self.config)
    self.tx = make_optimizer(self.config)
    self.loss_fn = make_loss_fn(self.module, self.config, self.mesh)

  def init_state(self, params: Any, seed: int) -> TrainState:
    """Places params per the sharding rules and builds the optimizer state there."""
    shardings = sharding.param_shardings(params, self.mesh, fsdp=self.config.fsdp)
    params = jax.device_put(params, shardings)
    init = jax.jit(lambda p: TrainState(
        step=jnp.zeros((), jnp.int32), params=p, opt_state=self.tx.init(p),
        rng=jax.random.key_data(jax.random.key(seed, impl=prng.impl(
            self.config.dropout_rng))),
        skipped=jnp.zeros((), jnp.int32)),
                   out_shardings=self.state_shardings(params))
    return init(params)

  def state_shardings(self, params: Any) -> TrainState:
    param_sh = sharding.param_shardings(params, self.mesh, fsdp=self.config.fsdp)
    rep = sharding.replicated(self.mesh)
    abstract = jax.eval_shape(lambda p: self.tx.init(p), params)
    # Optimizer moments mirror the parameters; everything else is replicated.
    opt_sh = _mirror_param_shardings(abstract, params, param_sh, rep)
    return TrainState(step=rep, params=param_sh, opt_state=opt_sh, rng=rep, skipped=rep)

  @functools.cached_property
  def step_fn(self):
    def step(state, batch):
      # The state carries raw key data (checkpointable); wrap it for the step.
      state_k = state.replace(rng=jax.random.wrap_key_data(
          state.rng, impl=prng.impl(self.config.dropout_rng)))
      new, metrics = train_step(state_k, batch, loss_fn=self.loss_fn, tx=self.tx,
                                schedule=self.schedule)
      return new.replace(rng=state.rng), metrics
    return step

  def compile_step(self, state: TrainState):
    shardings = jax.tree.map(lambda x: x.sharding, state)
    return jax.jit(self.step_fn, in_shardings=(shardings, sharding.batch_sharding(self.mesh)),
                   out_shardings=(shardings, sharding.replicated(self.mesh)),
                   donate_argnums=(0,))


def _mirror_param_shardings(opt_abstract: Any, params: Any, param_sh: Any, default):
  """Sharding for each optimizer-state leaf: a parameter-shaped subtree gets the
  parameters' shardings, anything else (counts, scalars) is replicated."""
  param_struct = jax.tree.structure(params)

  def is_param_like(x) -> bool:
    try:
      return jax.tree.structure(x) == param_struct
    except Exception:
      return False

  return jax.tree.map(
      lambda sub: param_sh if is_param_like(sub) else jax.tree.map(lambda _: default, sub),
      opt_abstract, is_leaf=is_param_like)


# ---------------------------------------------------------------------- the loop
class StopSignal:
  """Turns SIGTERM/SIGINT into a flag the loop checks after each step."""

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.received = signum
    log.warning("received %s: finishing the current step, saving, exiting",
                signal.Signals(signum).name)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


RUNTIME_MODEL_OPTIONS = ("pooling", "dtype", "remat", "tag_segment_id", "max_text_len",
                         "max_tag_len", "max_joint_len", "max_regions", "attention_impl",
                         "scan_unroll", "scan_layers")


def runtime_model_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The trainer config's overrides of the model config: the runtime options, and
  `attention_dropout` (when not None) as the attention-probability dropout rate."""
  runtime = {k: config[k] for k in RUNTIME_MODEL_OPTIONS if k in config}
  if config.get("attention_dropout") is not None:
    runtime["attention_probs_dropout_prob"] = float(config.attention_dropout)
  return runtime


def load_init_model(config: ml_collections.ConfigDict
                    ) -> tuple[ModelConfig, Any, Path]:
  """(model config, float32 params, vocab file): a converted model dir, or a random
  BERT initialisation (the paper's "w/o pre-train") with `init_random`, or from
  `config.model` + `config.vocab_file` when `init_model` is None."""
  runtime = runtime_model_options(config)
  if config.init_model:
    model_config, params, vocab = load_model_dir(config.init_model, **runtime)
    if config.init_random:
      params = jax.device_get(init_params(model_config, jax.random.key(config.seed)))
  else:
    if not config.get("vocab_file"):
      raise ValueError("config.init_model is None (random init): set config.vocab_file "
                       "to a WordPiece vocab.txt")
    model_config = ModelConfig.from_dict(dict(config.model), source="config.model",
                                         **runtime)
    params = jax.device_get(init_params(model_config, jax.random.key(config.seed)))
    vocab = Path(config.vocab_file)
  joint_len = model_config.max_text_len + model_config.max_tag_len - 1
  if (config.get("joint_loss_weight", 0.0) > 0
      and joint_len > model_config.max_position_embeddings):
    raise ValueError(
        f"--config.joint_loss_weight > 0 pairs {model_config.max_text_len} text and "
        f"{model_config.max_tag_len} tag positions, more than the model's "
        f"{model_config.max_position_embeddings} position embeddings")
  if config.get("feature_dim") and config.feature_dim != model_config.img_feature_dim:
    raise ValueError(
        f"config.feature_dim={config.feature_dim} but the model's img_feature_dim is "
        f"{model_config.img_feature_dim} (convert with --img_feature_dim "
        f"{config.feature_dim})")
  return model_config, params, vocab


def host_params(params: Any) -> Any:
  """Full NumPy parameters on every process, whatever their sharding."""
  if jax.process_count() == 1:
    return jax.device_get(params)
  return multihost_utils.process_allgather(params, tiled=True)


class MetricsLog:
  """metrics.jsonl (one JSON object per logged step) + clu writers (TensorBoard and
  logging); only process 0 writes."""

  def __init__(self, workdir: Path):
    self.is_main = jax.process_index() == 0
    self.writer = metric_writers.create_default_writer(
        str(workdir), just_logging=not self.is_main)
    self.jsonl = open(workdir / "metrics.jsonl", "a") if self.is_main else None

  def write(self, step: int, scalars: dict[str, float]) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    self.writer.write_scalars(step, scalars)
    if self.jsonl:
      self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
      self.jsonl.flush()

  def close(self) -> None:
    self.writer.flush()
    if self.jsonl:
      self.jsonl.close()


def shape_batch(local: Batch, config: ml_collections.ConfigDict, groups: int) -> Batch:
  """This process's share of a global batch as the step takes it: padding cut to
  length buckets (`inputs.trim_padding`, `config.length_bucket`) and, with
  `config.packing_bucket`, each part's `pack_index` for `groups` groups of rows (this
  process's devices; `model.Packing`). Every process agrees on the buckets, in one
  host all-gather (real counts do not change when padding is cut)."""
  wanted = {}
  if config.length_bucket:
    wanted.update({("padded", k): v for k, v in padded_lengths(local).items()})
  if config.packing_bucket:
    wanted.update({("packed", k): v for k, v in packed_lengths(local, groups).items()})
  agreed = _agreed(wanted)
  of = lambda kind: {k: v for (kind_, k), v in agreed.items() if kind_ == kind}
  if config.length_bucket:
    local = trim_padding(local, of("padded"), config.length_bucket)
  if config.packing_bucket:
    local = add_pack_index(local, of("packed"), groups, config.packing_bucket)
  return local


def _agreed(lengths: dict[Any, int]) -> dict[Any, int]:
  """The largest of each length over all processes."""
  if jax.process_count() == 1 or not lengths:
    return lengths
  keys = sorted(lengths)
  most = multihost_utils.process_allgather(np.array([lengths[k] for k in keys]))
  return dict(zip(keys, (int(x) for x in np.max(most, axis=0))))


def _any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path
                       ) -> TrainState:
  """Trains (resuming from `workdir` when it holds checkpoints) and evaluates."""
  validate_config(config)
  from vldeformer_jax.data import pipeline  # data readers stay out of model-only imports.
  from vldeformer_jax.data.eval_set import load_eval_set

  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh()
  if config.batch_size % mesh.size:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                     f"{mesh.size} devices")
  model_config, params, vocab = load_init_model(config)
  inputs = InputBuilder(load_tokenizer(vocab, model_config.do_lower_case), model_config)
  trainer = Trainer(config, model_config, mesh)
  state = trainer.init_state(params, config.seed)
  del params

  train_iter = pipeline.make_train_iterator(config, inputs, jax.process_index(),
                                            jax.process_count())
  eval_set = (load_eval_set(config, config.eval_split)
              if config.eval_every_steps else None)
  manager = checkpoints.make_manager(
      workdir / "checkpoints", keep=config.keep_checkpoints,
      best_metric=config.best_metric if eval_set is not None else None)
  restored = checkpoints.restore_latest(manager, state)
  if restored is not None:
    state, data_state = restored
    train_iter.set_state(data_state)
  start = int(jax.device_get(state.step))
  step_fn = trainer.compile_step(state)
  metrics_log = MetricsLog(workdir)
  if is_main:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    log.info("training %s from step %d to %d on %d devices (%d processes); global batch %d",
             model_config.hidden_size, start, config.total_steps, mesh.size,
             jax.process_count(), config.batch_size)

  def evaluate(step: int) -> dict[str, float]:
    encoder = VLDeformer(model_config, host_params(state.params), vocab,
                         batch_size=config.eval_batch_size)
    results = evaluate_encoder(encoder, eval_set, config.eval_protocol)
    results = {f"eval/{k}": v for k, v in results.items()}
    metrics_log.write(step, results)
    return results

  def save(step: int, eval_metrics: dict[str, float] | None) -> None:
    checkpoints.save(manager, state, train_iter.get_state(), eval_metrics)
    if is_main:
      save_model_dir(workdir / "model", model_config, host_params(state.params), vocab)

  progress = tqdm.tqdm(total=config.total_steps, initial=start, disable=not is_main,
                       desc="train", unit="step", dynamic_ncols=True)
  last_eval: dict[str, float] = {}
  tick, tick_step, waited = time.perf_counter(), start, 0.0
  with StopSignal() as stop:
    step = start
    while step < config.total_steps:
      t0 = time.perf_counter()
      batch = sharding.global_batch(
          shape_batch(next(train_iter), config, len(mesh.local_devices)), mesh)
      waited += time.perf_counter() - t0
      state, metrics = step_fn(state, batch)
      step += 1
      progress.update(1)
      if config.nonfinite == "stop" and not bool(metrics["finite"]):
        manager.wait_until_finished()
        raise FloatingPointError(
            f"non-finite loss or gradient at step {step}; stopped without saving "
            f"(config.nonfinite='stop'); the last good checkpoint is step "
            f"{manager.latest_step()} in {workdir / 'checkpoints'}")
      if step % config.log_every_steps == 0 or step == config.total_steps:
        m = jax.device_get(metrics)
        now = time.perf_counter()
        pairs_per_s = (step - tick_step) * config.batch_size / max(now - tick, 1e-9)
        input_wait_frac = waited / max(now - tick, 1e-9)
        tick, tick_step, waited = now, step, 0.0
        metrics_log.write(step, {**{k: v for k, v in m.items() if k != "finite"},
                                 "pairs_per_s": pairs_per_s,
                                 "input_wait_frac": input_wait_frac,
                                 "skipped_steps": int(jax.device_get(state.skipped))})
        progress.set_postfix(loss=f"{float(m['loss']):.4f}")
      evaluated = eval_set is not None and (step % config.eval_every_steps == 0
                                            or step == config.total_steps)
      if evaluated:
        last_eval = evaluate(step)
        progress.write(f"step {step}: " + ", ".join(
            f"{k[5:]}={v:.1f}" for k, v in last_eval.items()))
      stopping = _any_process(stop.received is not None)
      if (step % config.checkpoint_every_steps == 0 or step == config.total_steps
          or stopping):
        save(step, last_eval if evaluated else None)
      if stopping:
        log.warning("stopped by signal at step %d; checkpoint saved", step)
        break
  progress.close()
  manager.wait_until_finished()
  manager.close()
  metrics_log.close()
  return state


def default_config() -> ml_collections.ConfigDict:
  """Every key the trainer reads, at the paper's recipe; configs/*.py override them."""
  c = ml_collections.ConfigDict()
  # Data (the released VinVL layout, see data/readers.py).
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.train_split = "train"
  c.eval_split = "test"
  c.feature_dim = 2054
  c.box_order = "auto"               # 'auto' | 'x1y1x2y2wh' | 'x1y1x2y2hw'
  c.caption_sampling = "per_image"   # one random caption per image per epoch, or 'all_pairs'
  # 'shared_tags': images with the same set of object tags come together in the stream,
  # so in-batch negatives often differ only in their regions (data/pipeline.py).
  c.batch_grouping = "none"
  c.on_error = "error"               # bad rows: 'error' or 'skip' (counted and reported)
  c.data_source = "raw"              # 'raw' released layout, or 'tfds' (built with build_tfds)
  c.pipeline_workers = 2             # threads building batches
  c.pipeline_processes = 0           # > 0: processes building batches instead of threads
                                     # (scale past the GIL on a many-core host)
  c.prefetch_batches = 1
  # Each split is prepared once (caption templates, tag ids, float16 regions; see
  # data/prepared.py) in prepared_dir ('' = data_dir/.vldeformer_prepared), by
  # prepare_workers processes (or: bin/build_data).
  c.prepared_dir = ""
  c.prepare_workers = 2
  # Model.
  c.init_model = ml_collections.FieldReference(None, field_type=str)  # a model dir
  c.init_random = False    # True: init_model's architecture and vocab, fresh weights
  c.vocab_file = ml_collections.FieldReference(None, field_type=str)  # if no init_model
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
      intermediate_size=3072, img_feature_dim=2054, use_img_layernorm=True))
  c.pooling = "mean"                 # 'mean' | 'cls' | 'mean_unmasked'
  c.dtype = "bfloat16"
  c.remat = False
  c.fsdp = False
  # Attention kernel: 'auto' = cuDNN's fused flash attention on a GPU when it computes
  # the same function (bf16, no attention-probability dropout), XLA otherwise.
  c.attention_impl = "auto"
  # Layers traced per iteration of the scanned encoder: 1 compiles fastest; the layer
  # count compiles them as straight-line code (on a CPU about 10% faster per step).
  c.scan_unroll = 1
  # False: the layers as straight-line code over per-layer slices of the (still
  # stacked) parameters: no loop, no stacked activations for the backward pass; on
  # a CPU faster per step, slower to compile (BENCHMARKS.md).
  c.scan_layers = True
  # Dropout on attention probabilities, overriding the checkpoint's rate (BERT: 0.1);
  # None keeps the checkpoint's. 0 by default: fused attention kernels take none, and
  # the hidden-state dropout (the checkpoint's hidden_dropout_prob) stays.
  c.attention_dropout = ml_collections.FieldReference(0.0, field_type=float)
  # PRNG for dropout masks: 'rbg' or 'unsafe_rbg' (XLA's RngBitGenerator, as large JAX
  # trainers use: cheaper masks), 'threefry2x32' (JAX's default) or 'hash32' (threefry
  # keys, bits from a vectorised hash: ~20x cheaper masks on a CPU; prng.py). Each is
  # deterministic, resumes exactly and gives the same masks on any device count.
  c.dropout_rng = "rbg"
  # Padded lengths per batch (captions, tags, regions) are cut to buckets: powers of two
  # up to this, then its multiples (at most the configured maxima). The step compiles
  # once per bucket. 0: always pad to the maxima.
  c.length_bucket = 16
  # > 0: the layers run on each device's real tokens and regions packed into slots
  # (rounded up to a multiple of this) instead of padded rows: the same function and
  # dropout masks (model.Packing), on about the real tokens' share of the matrix work.
  # The step compiles once per bucket. 0: padded rows.
  c.packing_bucket = 128
  c.tag_segment_id = 1
  c.max_text_len = 70
  c.max_tag_len = 70
  c.max_joint_len = 70
  c.max_regions = 50
  # Objective (Eq. 1-3) and bimodal hard negatives.
  c.loss = "contrastive"             # 'contrastive' | 'cosine' (the "w/o contrastive" ablation)
  c.temperature = 0.005
  c.hard_negatives = True
  c.text_negative_ratio = 0.5
  c.image_negative_ratio = 0.5       # share of the objects not named in the caption
  c.joint_loss_weight = 0.0          # > 0: also train the joint scorer (re-ranker)
  c.joint_rank_weight = 0.0          # > 0: plus a listwise ranking term for the joint scorer
  c.text_negative_tags = "batch"     # nouns become tags of the mini-batch ('batch') or of
                                     # the image itself ('image')
  c.negative_group_size = 0          # rows per negative group (0: the process's share)
  # Optimisation (paper: AdamW lr 5e-5, wd 1e-4, batch 1024).
  c.batch_size = 1024
  c.total_steps = 20_000
  c.seed = 0
  c.lr = 5e-5
  c.weight_decay = 1e-4
  c.warmup_steps = 1000
  c.schedule = "linear"
  c.end_lr_factor = 0.0
  c.grad_clip_norm = 1.0
  c.fresh_lr_multiplier = 1.0        # lr factor for img_embedding and classifier
  c.freeze_pretrained_steps = 0      # first updates that move only those fresh parts
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.adam_eps = 1e-8
  c.grad_accum_steps = 1
  c.nonfinite = "skip"               # 'skip' the step, or 'stop' with the last checkpoint
  # Bookkeeping.
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.eval_every_steps = 2000          # 0: no periodic evaluation
  c.eval_protocol = "all"            # 'all' | '1k' | '5k' | 'folds1k'
  c.eval_max_images = 0              # 0: every image of eval_split
  c.eval_batch_size = 128
  c.best_metric = "eval/rsum"
  return c


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Clear errors for values the trainer cannot use, naming the config key."""
  choices = {"loss": ("contrastive", "cosine"), "pooling": ("mean", "cls", "mean_unmasked"),
             "dtype": ("float32", "bfloat16"), "nonfinite": ("skip", "stop"),
             "schedule": ("cosine", "linear", "constant"),
             "caption_sampling": ("per_image", "all_pairs"), "on_error": ("error", "skip"),
             "batch_grouping": ("none", "shared_tags"),
             "eval_protocol": ("all", "1k", "5k", "folds1k"),
             "box_order": ("auto", "x1y1x2y2wh", "x1y1x2y2hw"),
             "attention_impl": ("auto", "xla", "cudnn"),
             "dropout_rng": prng.NAMES}
  for key, allowed in choices.items():
    if config[key] not in allowed:
      raise ValueError(f"--config.{key}={config[key]!r} is not one of {allowed}")
  positive = ("batch_size", "total_steps", "log_every_steps", "checkpoint_every_steps",
              "keep_checkpoints", "grad_accum_steps", "eval_batch_size")
  for key in positive:
    if not isinstance(config[key], int) or config[key] <= 0:
      raise ValueError(f"--config.{key}={config[key]!r} must be a positive integer")
  for key in ("length_bucket", "packing_bucket"):
    if not isinstance(config[key], int) or config[key] < 0:
      raise ValueError(f"--config.{key}={config[key]!r} must be an integer >= 0")
    if config[key] and config.pooling == "mean_unmasked":
      raise ValueError("--config.pooling='mean_unmasked' averages over padding too, so "
                       f"the padded length changes results: set --config.{key}=0")
  if config.attention_dropout is not None and not 0.0 <= config.attention_dropout < 1.0:
    raise ValueError(f"--config.attention_dropout={config.attention_dropout} must be in "
                     "[0, 1) or None")
  if not config.temperature > 0:
    raise ValueError(f"--config.temperature={config.temperature} must be > 0")
  for key in ("text_negative_ratio", "image_negative_ratio"):
    if not 0.0 <= config[key] <= 1.0:
      raise ValueError(f"--config.{key}={config[key]} must be in [0, 1]")
  for key in ("joint_loss_weight", "joint_rank_weight"):
    if not config[key] >= 0:
      raise ValueError(f"--config.{key}={config[key]} must be >= 0")
  frozen = config.freeze_pretrained_steps
  if not isinstance(frozen, int) or frozen < 0:
    raise ValueError(f"--config.freeze_pretrained_steps={frozen!r} must be an integer >= 0")
  if frozen and config.init_random:
    raise ValueError("--config.freeze_pretrained_steps freezes the pre-trained encoder, "
                     "but --config.init_random=True starts it from scratch: set "
                     "--config.freeze_pretrained_steps=0")
  if not config.data_dir:
    raise ValueError("--config.data_dir is not set")


def apply_variants(c: ml_collections.ConfigDict, arg: str) -> None:
  """The paper's ablations and the released-code recipe as named config variants:
  `no_negatives`, `cosine` (w/o contrastive), `cls` (w/o avg pool), `random_init`
  (w/o pre-train: the init model's architecture and vocab, fresh weights), `released`."""
  for variant in filter(None, (a.strip() for a in arg.split(","))):
    if variant == "no_negatives":
      c.hard_negatives = False
    elif variant == "cosine":
      c.loss = "cosine"
    elif variant == "cls":
      c.pooling = "cls"
    elif variant == "random_init":
      c.init_random = True
      c.freeze_pretrained_steps = 0  # nothing pre-trained to hold still
    elif variant == "released":
      c.pooling, c.lr, c.weight_decay = "mean_unmasked", 7.5e-6, 0.05
      c.length_bucket = c.packing_bucket = 0  # its unmasked mean counts the padding
      c.schedule, c.warmup_steps = "cosine", 200
    else:
      raise ValueError(f"unknown config variant {variant!r}")
