"""Contrastive decomposing: the train state, optimizer, jitted step and the loop.

`train_and_evaluate(config, workdir)` is what `bin/train` calls (the config's keys:
`config.defaults`). The step is one `jax.jit` over the device mesh with explicit
shardings and a donated state; the four embedding sets (texts, images and their hard
negatives) meet in the loss `config.loss` names (losses.py). The loop saves orbax
checkpoints (params, optimizer, step, rng and the input pipeline's position), resumes
from the workdir automatically, and on SIGTERM/SIGINT finishes the current step, saves
and returns.

The step needs neither ml_collections nor clu (the GPU benchmarks run it on an image
without them): a config is anything with the keys of `config.defaults()` as attributes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from vldeformer_jax import checkpoints, distill, losses, prng, sharding, startup
from vldeformer_jax.config import ModelConfig, validate_config
from vldeformer_jax.encoder import VLDeformer
from vldeformer_jax.evaluation import evaluate_encoder, protocol_set
from vldeformer_jax.inputs import (BatchParts, InputBuilder, add_pack_index,
                                   load_tokenizer, packed_lengths, padded_lengths,
                                   trim_padding)
from vldeformer_jax.logit_scale import (LOGIT_SCALE, clamp_logit_scale, split_logit_scale,
                                        with_logit_scale)
from vldeformer_jax.model import VLBert, compute_dtype, init_params, unstack_layers
from vldeformer_jax.model_dir import load_model_dir, save_model_dir

log = logging.getLogger(__name__)
Config = Any  # an Config, or any object with config.defaults()' keys
SCHEDULES = ("linear", "cosine", "constant")   # config.schedule, after the warm-up
NONFINITE_POLICIES = ("skip", "stop")          # config.nonfinite


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

  def __next__(self) -> BatchParts: ...

  def get_state(self) -> dict: ...

  def set_state(self, state: dict) -> None: ...


# ----------------------------------------------------------------------- optimizer
def learning_rate_schedule(config: Config) -> optax.Schedule:
  """Linear warm-up to `lr`, then cosine or linear decay to `lr * end_lr_factor`."""
  warmup = int(config.warmup_steps)
  total = int(config.total_steps)
  end = config.lr * config.end_lr_factor
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
  raise ValueError(f"--config.schedule={config.schedule!r} is not one of {SCHEDULES}")


def weight_decay_mask(params: Any) -> Any:
  """Decay kernels and embeddings; not biases, LayerNorm parameters (as BERT) or the
  logit scale (as CLIP)."""
  def decays(path, _) -> bool:
    names = [getattr(p, "key", str(p)) for p in path]
    return names[-1] not in ("bias", "scale", LOGIT_SCALE)
  return jax.tree_util.tree_map_with_path(decays, params)


FRESH_PARAMS = ("img_embedding", "classifier")  # what a text-only checkpoint lacks


def fresh_params_mask(params: Any) -> Any:
  """True for the region embedding and the classifier: the parts a text-only BERT
  checkpoint does not have, which start from scratch."""
  def fresh(path, _) -> bool:
    return any(getattr(p, "key", None) in FRESH_PARAMS for p in path)
  return jax.tree_util.tree_map_with_path(fresh, params)


def pretrained_params_mask(params: Any) -> Any:
  """What the init checkpoint brings: neither the fresh parts nor the logit scale."""
  def pretrained(path, _) -> bool:
    return not any(getattr(p, "key", None) in (*FRESH_PARAMS, LOGIT_SCALE) for p in path)
  return jax.tree_util.tree_map_with_path(pretrained, params)


def make_optimizer(config: Config) -> optax.GradientTransformation:
  parts = [
      optax.clip_by_global_norm(config.grad_clip_norm),
      optax.adamw(learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2,
                  eps=config.adam_eps, weight_decay=config.weight_decay,
                  mask=weight_decay_mask)]
  multiplier = config.fresh_lr_multiplier
  if multiplier != 1.0:
    parts.append(optax.masked(optax.scale(multiplier), fresh_params_mask))
  frozen_steps = config.freeze_pretrained_steps
  if frozen_steps > 0:
    # A projector warm-up (as LLaVA's first stage): the first updates move only the
    # fresh parts, so the region projection learns to feed the pre-trained encoder
    # before the encoder moves. AdamW's moments see every gradient meanwhile.
    released = lambda count: (count >= frozen_steps).astype(jnp.float32)
    parts.append(optax.masked(optax.scale_by_schedule(released), pretrained_params_mask))
  if config.temperature_learnable:
    parts.append(clamp_logit_scale(config.temperature))
  tx = optax.chain(*parts)
  if config.grad_accum_steps > 1:
    # Note: each micro-batch then has its own in-batch negatives.
    tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps)
  return tx


# ---------------------------------------------------------------------- the step
MODALITIES = (("text", "neg_text"), ("image", "neg_image"))


def encode_batch(module: VLBert, params: Any, batch: BatchParts, rng: jax.Array,
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


def make_objective(module: VLBert, config: Config, mesh: Mesh,
                   teacher: VLBert | None = None
                   ) -> Callable[..., tuple[jax.Array, dict]]:
  """objective(params, batch, rng[, teacher_params]) -> (total loss, its parts): the
  objectives of losses.py on this model: the decomposing loss `config.loss` names,
  plus `joint_loss_weight` x the joint matching loss, plus `distill_weight` x the
  distillation term from `teacher` (distill.py), whose likely false negatives also
  leave the contrastive softmax."""
  decompose = losses.decomposing_loss(config.loss)
  weight = float(config.joint_loss_weight)
  distill_weight = float(config.distill_weight) if teacher is not None else 0.0

  def objective(params, batch, rng, teacher_params=None):
    params, logit_scale = split_logit_scale(params)
    params = compute_params(params, module.config)
    if not module.config.scan_layers:  # the state stays stacked; see model.Encoder
      params = unstack_layers(params)
    emb = encode_batch(module, params, batch, rng, deterministic=False)
    temperature = (config.temperature if logit_scale is None
                   else jnp.exp(-logit_scale.astype(jnp.float32)))
    parts, exclude = {}, None
    if distill_weight > 0:
      term, exclude, metrics = distill.distill_term(
          config.distill_loss, emb, batch, teacher, teacher_params, config,
          temperature, config.hard_negatives)
      parts.update(distill_loss=term, **metrics)
    extra = {"exclude": exclude} if exclude is not None else {}
    loss = decompose(emb, mesh=mesh, temperature=temperature,
                     hard_negatives=config.hard_negatives, **extra)
    parts["decompose_loss"] = loss
    if logit_scale is not None:
      parts["temperature"] = temperature
    if distill_weight > 0:
      loss = loss + distill_weight * parts["distill_loss"]
    if weight > 0:
      joint_rng = jax.random.fold_in(rng, 99)

      def match_logits(text, image, i):
        return module.apply({"params": params}, **losses.joint_inputs(text, image),
                            deterministic=False,
                            rngs={"dropout": jax.random.fold_in(joint_rng, i)},
                            method=VLBert.match_logits)
      joint = losses.joint_matching_loss(match_logits, batch, emb,
                                         float(config.joint_rank_weight))
      parts["joint_loss"] = joint
      loss = loss + weight * joint
    return loss, parts
  return objective


def train_step(state: TrainState, batch: BatchParts, *extra: Any, objective, tx, schedule
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step; a non-finite loss or gradient leaves params and optimizer
  state untouched and counts the step in `skipped`. `extra`: the objective's frozen
  inputs after (params, batch, rng) (the teacher's parameters), never differentiated."""
  rng = jax.random.fold_in(state.rng, state.step)
  (loss, parts), grads = jax.value_and_grad(objective, has_aux=True)(state.params, batch,
                                                                      rng, *extra)
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
  config: Config
  model_config: ModelConfig
  mesh: Mesh
  teacher: distill.Teacher | None = None  # distill_weight > 0: its scores are matched

  def __post_init__(self):
    self.module = VLBert(self.model_config)
    self.schedule = learning_rate_schedule(self.config)
    self.tx = make_optimizer(self.config)
    self.objective = make_objective(self.module, self.config, self.mesh,
                                    self.teacher.module if self.teacher else None)

  @functools.cached_property
  def step_inputs(self) -> tuple[Any, ...]:
    """What the step takes after (state, batch): the teacher's parameters on device,
    in the compute dtype, sharded like the student's; () without a teacher."""
    if self.teacher is None:
      return ()
    params = distill.device_params(self.teacher)
    return (jax.device_put(params, sharding.param_shardings(params, self.mesh,
                                                             fsdp=self.config.fsdp)),)

  def init_state(self, params: Any, seed: int) -> TrainState:
    """Places params (the model's, and the logit scale when the temperature is learned:
    `with_logit_scale`) per the sharding rules and builds the optimizer state there."""
    params = with_logit_scale(params, self.config)
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
    def step(state, batch, *extra):
      # The state carries raw key data (checkpointable); wrap it for the step.
      state_k = state.replace(rng=jax.random.wrap_key_data(
          state.rng, impl=prng.impl(self.config.dropout_rng)))
      new, metrics = train_step(state_k, batch, *extra, objective=self.objective,
                                tx=self.tx, schedule=self.schedule)
      return new.replace(rng=state.rng), metrics
    return step

  def compile_step(self, state: TrainState):
    """step(state, batch, *self.step_inputs) -> (state, metrics), jitted with the
    state donated."""
    shardings = jax.tree.map(lambda x: x.sharding, state)
    extra = jax.tree.map(lambda x: x.sharding, self.step_inputs)
    return jax.jit(self.step_fn,
                   in_shardings=(shardings, sharding.batch_sharding(self.mesh), *extra),
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


def runtime_model_options(config: Config) -> dict[str, Any]:
  """The trainer config's overrides of the model config: the runtime options, and
  `attention_dropout` (when not None) as the attention-probability dropout rate."""
  runtime = {k: getattr(config, k) for k in RUNTIME_MODEL_OPTIONS}
  if config.attention_dropout is not None:
    runtime["attention_probs_dropout_prob"] = float(config.attention_dropout)
  return runtime


def load_init_model(config: Config
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
    if not config.vocab_file:
      raise ValueError("config.init_model is None (random init): set config.vocab_file "
                       "to a WordPiece vocab.txt")
    model_config = ModelConfig.from_dict(dict(config.model), source="config.model",
                                         **runtime)
    params = jax.device_get(init_params(model_config, jax.random.key(config.seed)))
    vocab = Path(config.vocab_file)
  joint_len = model_config.max_text_len + model_config.max_tag_len - 1
  if (config.joint_loss_weight > 0
      and joint_len > model_config.max_position_embeddings):
    raise ValueError(
        f"--config.joint_loss_weight > 0 pairs {model_config.max_text_len} text and "
        f"{model_config.max_tag_len} tag positions, more than the model's "
        f"{model_config.max_position_embeddings} position embeddings")
  if config.feature_dim != model_config.img_feature_dim:
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


def shape_batch(local: BatchParts, config: Config, groups: int) -> BatchParts:
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


def train_and_evaluate(config: Config, workdir: str | Path
                       ) -> TrainState:
  """Trains (resuming from `workdir` when it holds checkpoints) and evaluates."""
  validate_config(config)
  from vldeformer_jax.data import pipeline  # data readers stay out of model-only imports.
  from vldeformer_jax.data.eval_set import load_eval_set
  from vldeformer_jax.metrics_log import MetricsLog  # tensorboard: only for the loop
  pipeline.pipeline_options(config, None)  # the data keys, before any model loads

  workdir = startup.check_workdir(workdir)
  startup.check_batch_fits(config, jax.process_count())
  workdir.mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh()
  if config.batch_size % mesh.size:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                     f"{mesh.size} devices")
  model_config, params, vocab = load_init_model(config)
  startup.check_resumes_same_model(workdir, model_config, config)
  teacher = distill.load_teacher(config, model_config, vocab)  # a bad one fails now
  inputs = InputBuilder(load_tokenizer(vocab, model_config.do_lower_case), model_config)
  # The data first: a bad row fails (or its skip report shows) before anything compiles.
  train_iter = pipeline.make_train_iterator(config, inputs, jax.process_index(),
                                            jax.process_count())
  eval_set = (load_eval_set(config, config.eval_split)
              if config.eval_every_steps else None)
  if eval_set is not None:  # a protocol the split cannot take fails now, not later
    try:
      protocol_set(eval_set, config.eval_protocol)
    except ValueError as e:
      raise ValueError(f"--config.eval_protocol={config.eval_protocol}: {e} "
                       f"(--config.eval_split={config.eval_split})") from None
  trainer = Trainer(config, model_config, mesh, teacher)
  state = trainer.init_state(params, config.seed)
  del params
  manager = checkpoints.make_manager(
      workdir / "checkpoints", keep=config.keep_checkpoints,
      best_metric=config.best_metric if eval_set is not None else None)
  restored = checkpoints.restore_latest(manager, state)
  if restored is not None:
    state, data_state = restored
    train_iter.set_state(data_state)
  start = int(jax.device_get(state.step))
  step_fn = trainer.compile_step(state)
  metrics_log = MetricsLog(workdir, is_main)
  if is_main:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    log.info("training %s from step %d to %d on %d devices (%d processes); global batch %d",
             model_config.hidden_size, start, config.total_steps, mesh.size,
             jax.process_count(), config.batch_size)

  def evaluate(step: int) -> dict[str, float]:
    encoder = VLDeformer(model_config, split_logit_scale(host_params(state.params))[0],
                         vocab, batch_size=config.eval_batch_size)
    results = evaluate_encoder(encoder, eval_set, config.eval_protocol)
    results = {f"eval/{k}": v for k, v in results.items()}
    metrics_log.write(step, results)
    return results

  def save(step: int, eval_metrics: dict[str, float] | None) -> None:
    checkpoints.save(manager, state, train_iter.get_state(), eval_metrics)
    if is_main:
      save_model_dir(workdir / "model", model_config,
                     split_logit_scale(host_params(state.params))[0], vocab)

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
      # No implicit transfer in the step (big_vision's guard): a hidden per-step
      # device-to-host read would stall the loop on every step.
      with jax.transfer_guard("disallow"):
        state, metrics = step_fn(state, batch, *trainer.step_inputs)
      step += 1
      progress.update(1)
      if config.nonfinite == "stop" and not jax.device_get(metrics["finite"]):
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
