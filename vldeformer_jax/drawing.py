"""Retrieval results drawn as what the model sees of an image: its detector boxes,
labelled with their tags, on a blank canvas of the image's size (the released features
carry no pixels). Shared by the report page (`bin/report`) and the search page
(`bin/serve`): PNGs via matplotlib, embedded in self-contained HTML.
"""

from __future__ import annotations

import base64
import html
import io
import zlib

import numpy as np

from vldeformer_jax.data import readers

# Oscar's size for predictions that do not record one (the bare-list JSON shape).
DEFAULT_IMAGE_W, DEFAULT_IMAGE_H = 800, 600


def image_size(tags: readers.ImageTags, boxes: np.ndarray) -> tuple[int, int]:
  """(width, height) of an image: from the predictions when they record it, else
  inferred from the pixel rects and the normalised boxes of the features (x2 / W,
  y2 / H, canonical order), else Oscar's 800 x 600."""
  if tags.image_w and tags.image_h:
    return int(tags.image_w), int(tags.image_h)
  n = min(len(tags.rects), len(boxes))
  if n:
    rects, norm = tags.rects[:n].astype(np.float64), boxes[:n].astype(np.float64)
    size = []
    for px, frac in ((rects[:, 2], norm[:, 2]), (rects[:, 3], norm[:, 3])):
      ok = frac > 0.05
      size.append(int(round(float(np.median(px[ok] / frac[ok])))) if ok.any() else 0)
    if min(size) > 0:
      return size[0], size[1]
  return DEFAULT_IMAGE_W, DEFAULT_IMAGE_H


def _colour(tag: str) -> tuple[float, float, float, float]:
  import matplotlib
  return matplotlib.colormaps["tab20"](zlib.crc32(tag.encode()) % 20)


def draw_image_png(tags: readers.ImageTags, size: tuple[int, int], title: str,
                   ground_truth: bool = False, max_boxes: int = 0,
                   width_in: float = 3.0, dpi: int = 90) -> bytes:
  """PNG of an image's detector boxes on a blank `size` = (w, h) canvas, each labelled
  with its tag; the ground truth gets a thick green frame. `max_boxes` > 0 draws only
  the most confident boxes."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.patches import Rectangle
  w, h = size
  fig = plt.figure(figsize=(width_in, width_in * h / w + 0.35), dpi=dpi)
  ax = fig.add_axes((0.02, 0.02, 0.96, 0.96 * (width_in * h / w)
                     / (width_in * h / w + 0.35)))
  ax.set_xlim(0, w)
  ax.set_ylim(h, 0)
  ax.set_facecolor("#f3f3f3")
  ax.set_xticks([])
  ax.set_yticks([])
  for spine in ax.spines.values():
    spine.set_edgecolor("#2ca02c" if ground_truth else "#999999")
    spine.set_linewidth(5 if ground_truth else 1)
  order = np.argsort(-tags.confs, kind="stable") if len(tags.confs) else np.arange(0)
  if max_boxes > 0:
    order = order[:max_boxes]
  for i in order[::-1]:  # the most confident drawn last (on top)
    x1, y1, x2, y2 = (float(v) for v in tags.rects[i])
    colour = _colour(tags.tags[i])
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour,
                           linewidth=1.5))
    ax.text(x1 + 2, y1 + 2, tags.tags[i], fontsize=6, va="top", ha="left", color="black",
            bbox=dict(facecolor=colour, alpha=0.6, pad=0.5, edgecolor="none"),
            clip_on=True)
  fig.text(0.5, 0.99, title, ha="center", va="top", fontsize=7,
           color="#2ca02c" if ground_truth else "black",
           fontweight="bold" if ground_truth else "normal")
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi)
  plt.close(fig)
  return buf.getvalue()


_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.2em; margin-top: 2em; }
.query { margin: 1.2em 0 2em; }
.query p { margin: 0.2em 0; }
.row { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }
figure { margin: 0; width: 270px; }
figure img { width: 260px; display: block; }
figure.gt figcaption b { color: #2ca02c; }
figcaption { font-size: 0.75em; word-wrap: break-word; }
.tags { color: #555; }
.label { font-size: 0.85em; font-weight: bold; margin: 0.6em 0 0.3em; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
"""


def figure_html(image_id: str, objects: readers.ImageTags, size: tuple[int, int],
                rank: int, score: float, what: str, is_gt: bool = False,
                max_boxes: int = 0) -> str:
  """One ranked image as a <figure>: its boxes drawn by `draw_image_png`, embedded as a
  PNG, and a caption with its id, size, score (`what` names it) and tags."""
  title = f"#{rank}  {what} {score:.3f}" + ("  (ground truth)" if is_gt else "")
  png = draw_image_png(objects, size, title, is_gt, max_boxes)
  tags = objects.tags
  w, h = size
  return (f'<figure class="{"gt" if is_gt else "hit"}" '
          f'data-image-id="{html.escape(image_id)}">'
          f'<img alt="image {html.escape(image_id)}" src="data:image/png;base64,'
          f'{base64.b64encode(png).decode()}">'
          f'<figcaption><b>#{rank} image {html.escape(image_id)}'
          f'{" &#10003; ground truth" if is_gt else ""}</b> ({w}x{h}, {what} '
          f'{score:.3f})<br><span class="tags">{len(tags)} tags: '
          f'{html.escape(", ".join(tags))}</span></figcaption></figure>')


def page_head(title: str, generator: str | None = None) -> str:
  """The start of a page in the report's style, up to and including its <h1>; a page
  written to a file names its `generator` (`fileio.generator`) in a <meta> tag, by
  which the tool recognises its own earlier output."""
  meta = (f'<meta name="generator" content="{html.escape(generator)}">'
          if generator else "")
  return (f"<!DOCTYPE html><html><head><meta charset='utf-8'>{meta}"
          f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
          f"<h1>{html.escape(title)}</h1>")
