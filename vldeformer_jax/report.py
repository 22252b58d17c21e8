"""A qualitative retrieval report like the paper's Fig. 4, as one self-contained page.

    report = build_report(model, load_split(model, data_dir, "test"), queries)
    Path("report.html").write_text(render_html(report))

For each query the top-k images (default 5) of the individual encoder are shown. There
are no pixels in the released features, so each image is drawn as what the model sees
of it: its detector boxes (`predictions.tsv` rects) on a blank canvas of the image's
size, labelled with their tags; the ground-truth image is framed in green.

A second section lists cases that the joint (early-interaction) scorer gets right at
rank 1 and the individual encoder does not, the mirror image of the paper's Fig. 4:
every scanned caption's top-M images under the encoder are re-scored with
`VLDeformer.score_pairs`, and a case is a caption whose joint rank-1 image is its
ground truth while the encoder's rank-1 image is another one. Both top-k lists are
shown for each case.
"""

from __future__ import annotations

import dataclasses
import html
import os
from typing import Any, Sequence

import numpy as np

from vldeformer_jax import drawing, fileio
from vldeformer_jax.data import readers, sources
from vldeformer_jax.encoder import VLDeformer
from vldeformer_jax.evaluation import embedding_similarity, rerank_order


@dataclasses.dataclass(frozen=True, eq=False)
class SplitImages:
  """Every image of a split with what the encoders and the drawing need.

  tag_strings[i], regions[i]: image i as the model encodes it (`sources.image_objects`);
  objects[i]: its detector output (tags, confs, rects in pixels); sizes[i]: (w, h).
  captions[c] belongs to image caption_to_image[c].
  """
  image_ids: list[str]
  tag_strings: list[str]
  regions: list[np.ndarray]
  objects: list[readers.ImageTags]
  sizes: list[tuple[int, int]]
  captions: list[str]
  caption_to_image: np.ndarray

  def __len__(self) -> int:
    return len(self.image_ids)


def load_split(model: VLDeformer, data_dir: str | os.PathLike, split: str = "test",
               max_images: int = 0, **reader_options: Any) -> SplitImages:
  """Reads a split of a VinVL/Oscar data directory (the first `max_images` images when
  > 0) with the model's feature size and region limit."""
  data = readers.VinVLRetrievalData(data_dir, split,
                                    feature_dim=model.config.img_feature_dim,
                                    **reader_options)
  ids = data.image_ids[:max_images] if max_images > 0 else data.image_ids
  if not ids:
    raise sources.empty_split_error(split, data.keys_path or data_dir)
  image_ids, tag_strings, regions, objects, sizes, captions, owner = (
      [] for _ in range(7))
  try:
    for example in data.examples(ids):
      encoded = sources.image_objects(example, model.config.max_regions,
                                      data.features.path)
      tag_string, region = encoded.tag_string, encoded.regions
      tags = data.tags(example.image_id)
      owner += [len(image_ids)] * len(example.captions)
      captions += example.captions
      image_ids.append(example.image_id)
      tag_strings.append(tag_string)
      regions.append(region)
      objects.append(tags)
      sizes.append(drawing.image_size(tags, example.boxes))
  finally:
    data.close()
  if not image_ids:
    raise ValueError(f"split {split!r} of {data_dir} has no readable images")
  return SplitImages(image_ids, tag_strings, regions, objects, sizes, captions,
                     np.asarray(owner, np.int64))


# ----------------------------------------------------------------------------------
# Ranking.


def top_images(similarity: np.ndarray, k: int) -> np.ndarray:
  """Indices [Q, k] of the k best images per query of [n_images, Q] scores (ties: the
  lower image index first)."""
  k = min(k, similarity.shape[0])
  return np.argsort(-similarity, axis=0, kind="stable")[:k].T


def joint_flips(encoder_top: np.ndarray, joint_scores: np.ndarray,
                ground_truth: np.ndarray) -> np.ndarray:
  """Queries the joint scorer gets right at rank 1 and the encoder does not.

  Args:
    encoder_top: [Q, M] image indices, the encoder's top-M per query, best first.
    joint_scores: [Q, M] the joint score of each of those (query, image) pairs.
    ground_truth: [Q] each query's image index.
  Returns the query indices where the joint re-ranking's rank-1 image (the best joint
  score, ties to the encoder's order) is the ground truth and the encoder's is not.
  """
  encoder_top = np.asarray(encoder_top)
  joint_scores = np.asarray(joint_scores)
  ground_truth = np.asarray(ground_truth)
  if (encoder_top.shape != joint_scores.shape
      or encoder_top.shape[:1] != ground_truth.shape):
    raise ValueError(f"shapes do not fit: encoder_top {encoder_top.shape}, joint_scores "
                     f"{joint_scores.shape}, ground_truth {ground_truth.shape}")
  joint_first = encoder_top[np.arange(len(encoder_top)), rerank_order(joint_scores)[:, 0]]
  return np.flatnonzero((joint_first == ground_truth)
                        & (encoder_top[:, 0] != ground_truth))


def rerank_with_joint(model: VLDeformer, split: SplitImages, captions: Sequence[str],
                      encoder_top: np.ndarray) -> np.ndarray:
  """`score_pairs` of each caption with each of its candidate images: [Q, M]."""
  q, m = encoder_top.shape
  flat = encoder_top.ravel()
  scores = model.score_pairs([c for c in captions for _ in range(m)],
                             [split.tag_strings[i] for i in flat],
                             [split.regions[i] for i in flat])
  return scores.reshape(q, m)


@dataclasses.dataclass
class QueryResult:
  """One query's ranked images (indices into the split) and what marks them."""
  text: str
  ranked: list[int]
  scores: list[float]
  ground_truth: int | None = None
  # 1-based rank under the encoder, pessimistic (ties count against), as evaluation.
  ground_truth_rank: int | None = None
  joint_ranked: list[int] | None = None
  joint_scores: list[float] | None = None


def build_report(model: VLDeformer, split: SplitImages, queries: Sequence[str] = (),
                 num_queries: int = 5, num_cases: int = 5, top_m: int = 10,
                 top_k: int = 5, scan: int = 0) -> dict[str, Any]:
  """Ranks the queries and finds the joint-right / encoder-wrong cases.

  Args:
    model: the encoder (also the joint scorer, through `score_pairs`).
    split: the images and captions (`load_split`).
    queries: texts to show; a text equal to a caption of the split gets that caption's
      image as ground truth. Empty: the first caption of `num_queries` images spread
      evenly over the split.
    num_cases: at most this many joint-right / encoder-wrong cases to show.
    top_m: candidates per caption re-scored by the joint scorer.
    top_k: images shown per ranking.
    scan: look for cases among the first `scan` captions (0: all).
  """
  if top_k < 1 or top_m < 1 or num_cases < 0 or scan < 0:
    raise ValueError(f"need top_k >= 1, top_m >= 1, num_cases >= 0, scan >= 0; got "
                     f"{top_k}, {top_m}, {num_cases}, {scan}")
  image_emb = model.encode_image(split.tag_strings, split.regions)
  first_caption = {}
  for c, owner in enumerate(split.caption_to_image.tolist()):
    first_caption.setdefault(owner, c)
  owner_of = {}
  for c, text in enumerate(split.captions):
    owner_of.setdefault(text, int(split.caption_to_image[c]))
  if not queries:
    picks = np.unique(np.linspace(0, len(split) - 1, min(num_queries, len(split)))
                      .round().astype(int))
    queries = [split.captions[first_caption[int(i)]] for i in picks if int(i) in
               first_caption]
  queries = [str(q) for q in queries]
  if any(not q.strip() for q in queries):
    raise ValueError("queries must be non-empty texts")

  results = []
  if queries:
    sim = embedding_similarity(model.encode_text(queries), image_emb)  # [n_img, Q]
    ranked = top_images(sim, top_k)
    for j, text in enumerate(queries):
      gt = owner_of.get(text)
      gt_rank = None if gt is None else int((sim[:, j] >= sim[gt, j]).sum())
      results.append(QueryResult(text, ranked[j].tolist(),
                                 sim[ranked[j], j].astype(float).tolist(), gt, gt_rank))

  cases, summary = [], {}
  if num_cases:
    cap_idx = np.arange(len(split.captions) if scan == 0
                        else min(scan, len(split.captions)))
    caps = [split.captions[c] for c in cap_idx]
    gt = split.caption_to_image[cap_idx]
    sim = embedding_similarity(model.encode_text(caps), image_emb)  # [n_img, Q]
    enc_ranked = top_images(sim, max(top_m, top_k))
    enc_top = enc_ranked[:, :top_m]
    joint = rerank_with_joint(model, split, caps, enc_top)
    flips = joint_flips(enc_top, joint, gt)
    joint_first = enc_top[np.arange(len(caps)), rerank_order(joint)[:, 0]]
    summary = {
        "scanned_captions": len(caps), "top_m": int(enc_top.shape[1]),
        "encoder_r1": float(np.mean(enc_top[:, 0] == gt)),
        "joint_rerank_r1": float(np.mean(joint_first == gt)),
        "joint_right_encoder_wrong": int(len(flips)),
        "encoder_right_joint_wrong": int(np.sum((enc_top[:, 0] == gt)
                                                & (joint_first != gt))),
        "joint_pairs_scored": int(joint.size)}
    for q in flips[:num_cases]:
      order = rerank_order(joint[q])[:top_k]
      g = int(gt[q])
      cases.append(QueryResult(
          caps[q], enc_ranked[q, :top_k].tolist(),
          sim[enc_ranked[q, :top_k], q].astype(float).tolist(), g,
          int((sim[:, q] >= sim[g, q]).sum()), enc_top[q, order].tolist(),
          joint[q, order].astype(float).tolist()))
  return {"queries": results, "cases": cases, "case_summary": summary,
          "num_images": len(split), "num_captions": len(split.captions),
          "top_k": top_k, "split": split}


# ----------------------------------------------------------------------------------
# The page.


def _figure(split: SplitImages, image: int, rank: int, score: float, is_gt: bool,
            what: str, max_boxes: int) -> str:
  return drawing.figure_html(split.image_ids[image], split.objects[image], split.sizes[image],
                     rank, score, what, is_gt, max_boxes)


def _row(split: SplitImages, ranked: Sequence[int], scores: Sequence[float],
         gt: int | None, what: str, max_boxes: int) -> str:
  return ('<div class="row">' + "".join(
      _figure(split, i, r, s, i == gt, what, max_boxes)
      for r, (i, s) in enumerate(zip(ranked, scores), 1)) + "</div>")


def _gt_line(split: SplitImages, q: QueryResult) -> str:
  if q.ground_truth is None:
    return "<p>ground truth: none (the query is not a caption of the split)</p>"
  where = ("in the top-k" if q.ground_truth in q.ranked
           else "not in the top-k")
  return (f"<p>ground truth: image {html.escape(split.image_ids[q.ground_truth])}, "
          f"encoder rank {q.ground_truth_rank} ({where})</p>")


def render_html(report: dict[str, Any], title: str = "VLDeformer retrieval report",
                source: str = "", max_boxes: int = 0) -> str:
  """The page: one section per query and one for the joint-right cases, every image
  an embedded PNG."""
  split: SplitImages = report["split"]
  k = report["top_k"]
  out = [drawing.page_head(title, fileio.generator("bin/report")),
         f"<p>{html.escape(source)}{' &mdash; ' if source else ''}{report['num_images']} "
         f"images, {report['num_captions']} captions. Each image is drawn as its "
         "detector "
         "boxes (predictions.tsv) on a blank canvas of the image's size, labelled with "
         "their tags; the ground truth is framed in green. Scores: cosine similarity of "
         "the individual encoder; joint: the cross-encoder's match logit.</p>",
         f'<h2 id="queries">Top-{k} images per query (individual encoder)</h2>']
  for n, q in enumerate(report["queries"], 1):
    out.append(f'<div class="query" data-kind="query"><p><b>Query {n}:</b> '
               f'&ldquo;{html.escape(q.text)}&rdquo;</p>{_gt_line(split, q)}'
               + _row(split, q.ranked, q.scores, q.ground_truth, "cos", max_boxes)
               + "</div>")
  if not report["queries"]:
    out.append("<p>No queries.</p>")
  s = report["case_summary"]
  cases = report["cases"]
  out.append(f'<h2 id="cases" data-num-cases="{len(cases)}">Joint scorer right at '
             "rank 1, "
             "individual encoder wrong</h2>")
  if s:
    out.append(
        f"<p>Each of the first {s['scanned_captions']} captions' top-{s['top_m']} images "
        f"under the encoder were re-scored with the joint scorer "
        f"({s['joint_pairs_scored']} pairs).</p><table><tr><th>encoder R@1</th>"
        f"<th>joint re-rank@{s['top_m']} R@1</th><th>joint right, encoder wrong</th>"
        f"<th>encoder right, joint wrong</th></tr><tr><td>{100 * s['encoder_r1']:.1f}%"
        f"</td><td>{100 * s['joint_rerank_r1']:.1f}%</td>"
        f"<td>{s['joint_right_encoder_wrong']}</td><td>{s['encoder_right_joint_wrong']}"
        f"</td></tr></table><p>Showing {len(cases)} of "
        f"{s['joint_right_encoder_wrong']} cases.</p>")
  else:
    out.append("<p>Not computed (num_cases = 0).</p>")
  for n, q in enumerate(cases, 1):
    out.append(
        f'<div class="query" data-kind="case"><p><b>Case {n}:</b> '
        f'&ldquo;{html.escape(q.text)}&rdquo;</p>{_gt_line(split, q)}'
        f'<div class="label">individual encoder, top-{k}</div>'
        + _row(split, q.ranked, q.scores, q.ground_truth, "cos", max_boxes)
        + f'<div class="label">joint scorer re-ranking the encoder\'s top-{s["top_m"]}, '
        f"top-{k}</div>"
        + _row(split, q.joint_ranked, q.joint_scores, q.ground_truth, "joint", max_boxes)
        + "</div>")
  out.append("</body></html>")
  return "\n".join(out)


def write_report(model_dir: str | os.PathLike, data_dir: str | os.PathLike,
                 out: str | os.PathLike, split: str = "test", queries: Sequence[str] = (),
                 num_queries: int = 5, num_cases: int = 5, top_m: int = 10,
                 top_k: int = 5, scan: int = 0, max_images: int = 0, max_boxes: int = 0,
                 batch_size: int = 64, *, overwrite: bool = False) -> dict[str, Any]:
  """`bin/report`: loads the model and split, writes the HTML page; returns counts.
  `out` is checked first (`fileio.check_output`): new, or an earlier report (replaced);
  another file only with `overwrite`."""
  from vldeformer_jax.encoder import load_pretrained
  fileio.check_output(out, is_dir=False, what="a bin/report page", option="--out",
                      overwrite=overwrite)
  model = load_pretrained(model_dir, batch_size=batch_size)
  images = load_split(model, data_dir, split, max_images)
  report = build_report(model, images, queries, num_queries, num_cases, top_m, top_k,
                        scan)
  page = render_html(report, source=f"model {model_dir}, data {data_dir}, split {split}",
                     max_boxes=max_boxes)
  with fileio.atomic_file(out) as tmp:
    tmp.write_text(page, encoding="utf-8")
  return {"out": str(out), "queries": len(report["queries"]),
          "cases": len(report["cases"]), "case_summary": report["case_summary"],
          "images_drawn": sum(len(q.ranked) for q in report["queries"])
          + sum(len(q.ranked) + len(q.joint_ranked) for q in report["cases"])}
