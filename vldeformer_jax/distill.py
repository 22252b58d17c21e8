"""Distillation into the decomposed encoder from a teacher's scores (LightningDOT,
LoopITR, RocketQA, Margin-MSE; `../shared/notes/accuracy-anchors.md` T1-T3, T7).

Per step, each caption's candidates are its own image plus the `k` other images of the
global batch the student ranks highest (and its hard-negative image, when the batch
has one); each image's candidates are its caption plus the `k` other captions (and
its hard-negative text). A frozen teacher scores every candidate:

  * 'joint': its cross-encoder (`VLBert.match_logits`, the score re-ranking uses:
    l1 - l0) on each (caption, candidate image) / (candidate caption, image) pair;
  * 'individual': its own decomposed encoder, cosine / `temperature`.

The student's scores are its cosines / `temperature` (its contrastive logits), and
`losses.distillation_loss` matches them ('kl' or 'margin_mse'), after dropping the
candidates the teacher scores above the positive by more than a margin: likely false
negatives, which also leave the contrastive loss's softmax (`contrastive_exclusions`).

The teacher is loaded once per run (a resumed run reloads it from
`config.teacher_model`), held on device in the compute dtype and sharded like the
student's parameters; it is a separate argument of the step, never part of the train
state, the optimizer or a checkpoint, and runs without dropout or gradients.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from vldeformer_jax import losses
from vldeformer_jax.config import ModelConfig
from vldeformer_jax.model import VLBert, compute_dtype, unstack_layers

Array = jax.Array
MODES = ("joint", "individual")  # config.teacher_mode


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A loaded teacher: its model, host parameters (float32) and how it scores."""
  module: VLBert
  params: Any
  mode: str
  model_dir: Path


def _digest(path: Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def load_teacher(config: Any, student: ModelConfig, student_vocab: Path
                 ) -> Teacher | None:
  """`config.teacher_model` when distillation is on (`distill_weight` > 0), checked
  against the student: the same vocabulary and region feature size, and room for the
  student's inputs in its position embeddings. Errors name both directories."""
  if not config.distill_weight:
    return None
  from vldeformer_jax.model_dir import load_model_dir
  if not config.teacher_model:
    raise ValueError("--config.distill_weight > 0 needs --config.teacher_model (a "
                     "model directory: bin/convert or bin/train output)")
  where = Path(config.teacher_model)
  if not where.is_dir():
    raise FileNotFoundError(f"--config.teacher_model {where}: no such model directory")
  # Scored in the student's compute dtype and attention kernel; its own architecture.
  teacher, params, vocab = load_model_dir(where, dtype=student.dtype,
                                          attention_impl=student.attention_impl,
                                          scan_layers=True)
  student_dir = config.init_model or config.vocab_file
  if _digest(vocab) != _digest(student_vocab):
    raise ValueError(f"--config.teacher_model {where} has another vocabulary ({vocab}) "
                     f"than the student {student_dir} ({student_vocab}): the teacher "
                     "must read the student's token ids")
  if teacher.img_feature_dim != student.img_feature_dim:
    raise ValueError(f"--config.teacher_model {where} takes {teacher.img_feature_dim}-d "
                     f"region features, the student {student_dir} "
                     f"{student.img_feature_dim}-d")
  longest = (student.max_text_len + student.max_tag_len - 1 if config.teacher_mode == "joint"
             else max(student.max_text_len, student.max_tag_len))
  if longest > teacher.max_position_embeddings:
    raise ValueError(f"--config.teacher_model {where} has {teacher.max_position_embeddings} "
                     f"positions; the student {student_dir}'s inputs need {longest}")
  return Teacher(VLBert(teacher), params, config.teacher_mode, where)


def device_params(teacher: Teacher) -> Any:
  """The teacher's parameters as the step reads them: matrices in the compute dtype
  (cast once, not every step)."""
  dtype = compute_dtype(teacher.module.config)
  return jax.tree.map(lambda x: x.astype(dtype) if x.ndim >= 2 else x, teacher.params)


# ----------------------------------------------------------------------------------
# Candidates and scores (inside the jitted step, on global arrays).


@dataclasses.dataclass(frozen=True)
class Candidates:
  """Each query's candidates: column 0 its positive, then its k closest others under
  the student, then (with hard negatives) its own hard negative."""
  images: Array        # [B, 1 + k] image indices of each caption's candidates
  texts: Array         # [B, 1 + k] caption indices of each image's candidates
  valid_images: Array  # [B, C] bool (C = 1 + k, + 1 with hard negatives)
  valid_texts: Array   # [B, C] bool
  hard_negatives: bool


def candidates(emb: dict[str, Array], batch: dict[str, dict[str, Array]], k: int,
               hard_negatives: bool) -> Candidates:
  """The student's top-k other items of the global batch per query (pairs sharing an
  image or caption with the query's are never candidates: `losses.other_pairs`)."""
  sim = jax.lax.stop_gradient(losses.l2_normalize(emb["text"])
                              @ losses.l2_normalize(emb["image"]).T)
  other = losses.other_pairs(batch["text"], batch["image"])
  images, valid_i = losses.closest_others(sim, other, k)
  texts, valid_t = losses.closest_others(sim.T, other.T, k)
  rows = jnp.arange(sim.shape[0])[:, None]
  ones = jnp.ones_like(rows, dtype=bool)
  extra = [ones] if hard_negatives else []
  return Candidates(
      images=jnp.concatenate([rows, images], axis=1),
      texts=jnp.concatenate([rows, texts], axis=1),
      valid_images=jnp.concatenate([ones, valid_i] + extra, axis=1),
      valid_texts=jnp.concatenate([ones, valid_t] + extra, axis=1),
      hard_negatives=hard_negatives)


def cosine_scores(emb: dict[str, Array], cands: Candidates, temperature: float | Array
                  ) -> tuple[Array, Array]:
  """(caption->image [B, C], image->caption [B, C]) cosines / temperature of each
  query's candidates, from embeddings of the batch's parts."""
  t, v = losses.l2_normalize(emb["text"]), losses.l2_normalize(emb["image"])
  t2i = jnp.einsum("bd,bcd->bc", t, v[cands.images])
  i2t = jnp.einsum("bd,bcd->bc", v, t[cands.texts])
  if cands.hard_negatives:
    own = lambda a, b: jnp.sum(a * b, axis=-1, keepdims=True)
    t2i = jnp.concatenate([t2i, own(t, losses.l2_normalize(emb["neg_image"]))], axis=1)
    i2t = jnp.concatenate([i2t, own(v, losses.l2_normalize(emb["neg_text"]))], axis=1)
  return t2i / temperature, i2t / temperature


def teacher_scores(teacher: VLBert, params: Any, mode: str,
                   batch: dict[str, dict[str, Array]], cands: Candidates,
                   temperature: float | Array) -> tuple[Array, Array]:
  """The teacher's (caption->image, image->caption) scores [B, C] of the candidates:
  deterministic, padded inputs (no packing), no gradient."""
  params = jax.lax.stop_gradient(params)
  if not teacher.config.scan_layers:
    params = unstack_layers(params)
  batch = {part: {k: v for k, v in arrays.items() if k != "pack_index"}
           for part, arrays in batch.items()}
  if mode == "individual":
    encode = lambda part: teacher.apply({"params": params}, **part, deterministic=True,
                                        method=VLBert.encode)
    emb = {part: encode(arrays) for part, arrays in batch.items()}
    return jax.lax.stop_gradient(cosine_scores(emb, cands, temperature))

  # Every (caption, image) pair to score, in one cross-encoder call: captions'
  # candidates (column 0 the positive), then images' candidates but the positive
  # (already scored). Hard negatives sit after the batch in each pool: row B + i.
  b = cands.images.shape[0]
  pool = lambda part, neg: (jax.tree.map(lambda x, y: jnp.concatenate([x, y]),
                                         batch[part], batch[neg])
                            if cands.hard_negatives else batch[part])
  texts, images = pool("text", "neg_text"), pool("image", "neg_image")
  rows = jnp.arange(b)[:, None]
  hard = [b + rows] if cands.hard_negatives else []
  image_cands = jnp.concatenate([cands.images] + hard, axis=1)        # [B, C]
  text_cands = jnp.concatenate([cands.texts[:, 1:]] + hard, axis=1)   # [B, C - 1]
  text_index = jnp.concatenate([jnp.broadcast_to(rows, image_cands.shape).ravel(),
                                text_cands.ravel()])
  image_index = jnp.concatenate([image_cands.ravel(),
                                 jnp.broadcast_to(rows, text_cands.shape).ravel()])
  take = lambda part, idx: jax.tree.map(lambda x: jnp.take(x, idx, axis=0), part)
  logits = teacher.apply({"params": params},
                         **losses.joint_inputs(take(texts, text_index),
                                               take(images, image_index)),
                         deterministic=True, method=VLBert.match_logits)
  score = (logits[:, 1] - logits[:, 0]).astype(jnp.float32)  # what re-ranking uses
  t2i = score[:image_cands.size].reshape(image_cands.shape)
  i2t = jnp.concatenate([t2i[:, :1], score[image_cands.size:].reshape(text_cands.shape)],
                        axis=1)
  return jax.lax.stop_gradient((t2i, i2t))


def contrastive_exclusions(cands: Candidates, dropped_images: Array, dropped_texts: Array
                           ) -> tuple[Array, Array]:
  """The dropped candidates as the contrastive loss's `exclude` masks: caption rows
  over the image columns (then, with hard negatives, the hard-negative images), image
  rows over the caption columns ([B, B] or [B, 2B] bool each)."""
  b, k1 = cands.images.shape
  cols = 2 * b if cands.hard_negatives else b
  rows = jnp.arange(b)

  def mask(index: Array, dropped: Array) -> Array:
    # Candidates are distinct per row (the positive, then others), so one set each.
    out = jnp.zeros((b, cols), bool).at[rows[:, None], index].set(dropped[:, :k1])
    if cands.hard_negatives:
      out = out.at[rows, b + rows].set(dropped[:, k1])
    return out

  return mask(cands.images, dropped_images), mask(cands.texts, dropped_texts)


def distill_term(name: str, emb: dict[str, Array], batch: dict[str, dict[str, Array]],
                 teacher: VLBert, teacher_params: Any, config: Any,
                 temperature: float | Array, hard_negatives: bool
                 ) -> tuple[Array, tuple[Array, Array], dict[str, Array]]:
  """The distillation loss (both directions summed, as Eq. 3 sums L_t and L_v), the
  contrastive loss's exclusions of the teacher's likely false negatives, and the
  metrics metrics.jsonl logs."""
  # Hard negatives are candidates (and contrastive columns) when the loss uses them.
  hard_negatives = hard_negatives and "neg_image" in emb
  cands = candidates(emb, batch, config.distill_candidates, hard_negatives)
  student = cosine_scores(emb, cands, temperature)
  scored = teacher_scores(teacher, teacher_params, config.teacher_mode, batch, cands,
                          temperature)
  terms = [losses.distillation_loss(
      name, s, t, valid, temperature=config.distill_temperature,
      false_negative_margin=config.distill_false_negative_margin)
      for s, t, valid in zip(student, scored, (cands.valid_images, cands.valid_texts))]
  (loss_t, dropped_t, m_t), (loss_i, dropped_i, m_i) = terms
  exclude = contrastive_exclusions(cands, dropped_t, dropped_i)
  metrics = {f"distill/{k}": (m_t[k] + m_i[k]) / 2 for k in m_t}
  return loss_t + loss_i, exclude, metrics
