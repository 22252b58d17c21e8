"""Offline image index and fast cross-modal search with an individually-encoding model.

VLDeformer encodes images and texts separately, so a gallery is encoded once:

    index = build_index(model, data)           # every image (and caption) once
    save_index(index, "coco_test.index")       # a directory, or a single .npz file
    index, model, _ = open_index("coco_test.index")  # with the model it was built with
    hits = search_text(model, index, "a dog on a skateboard", k=10)  # one encoder pass
    hits = search_image(index, image_id, k=5)  # image -> text, stored captions only

Similarity is cosine: the index stores L2-normalised embeddings, and search is a dot
product. The package's files, one concern each:

  index.py        the index (`RetrievalIndex`, `build_index`) and its on-disk format
                  (`save_index`, `load_index`, `index_metadata`, `open_index`; the
                  model it was built with checked by `check_model_matches`)
  exact.py        exact sharded top-k in JAX (`ExactIndex`, `exact_search`)
  faiss_index.py  approximate search with FAISS (`FaissIndex`, `measure_recall`)
  __init__.py     the query helpers below (`search_texts`, `search_images`, ...) and
                  the package's public names
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from vldeformer_jax.retrieval.exact import (
    DEFAULT_MAX_SCORES, DEFAULT_TOPK_BLOCK, GALLERY_DTYPES, ExactIndex, Searcher,
    exact_search)
from vldeformer_jax.retrieval.faiss_index import (
    APPROXIMATE_KINDS, FAISS_INSTALL_HINT, FAISS_KINDS, FaissIndex, default_nlist,
    faiss_file_name, import_faiss, measure_recall, recall_at_k, stored_faiss_index)
from vldeformer_jax.retrieval.index import (
    FINGERPRINT_KEY, FORMAT, METADATA_FILE, NPZ_METADATA_KEY, VERSION, CaptionHit,
    ImageHit, IndexFormatError, OpenedIndex, RetrievalIndex, build_index,
    check_index_output, check_model_matches, index_metadata, is_index, l2_normalize,
    load_index, open_index, save_index)

if TYPE_CHECKING:
  from vldeformer_jax.encoder import VLDeformer

__all__ = [
    # index.py
    "FINGERPRINT_KEY", "FORMAT", "METADATA_FILE", "NPZ_METADATA_KEY", "VERSION",
    "CaptionHit", "ImageHit", "IndexFormatError", "OpenedIndex", "RetrievalIndex",
    "build_index", "check_index_output", "check_model_matches", "index_metadata",
    "is_index", "l2_normalize", "load_index", "open_index", "save_index",
    # exact.py
    "DEFAULT_MAX_SCORES", "DEFAULT_TOPK_BLOCK", "GALLERY_DTYPES", "ExactIndex",
    "Searcher", "exact_search",
    # faiss_index.py
    "APPROXIMATE_KINDS", "FAISS_INSTALL_HINT", "FAISS_KINDS", "FaissIndex",
    "default_nlist", "faiss_file_name", "import_faiss", "measure_recall", "recall_at_k",
    "stored_faiss_index",
    # queries (here)
    "check_model_fits", "search_image", "search_images", "search_text", "search_texts",
]


def check_model_fits(model: "VLDeformer", index: RetrievalIndex) -> None:
  """An `IndexFormatError` naming the index's model unless the widths agree."""
  if model.config.hidden_size != index.hidden_size:
    raise IndexFormatError(
        f"the index holds {index.hidden_size}-d embeddings but the model's hidden size "
        f"is {model.config.hidden_size}; the index was built with "
        f"{index.metadata.get('model_dir')}")


def search_texts(model: "VLDeformer", index: RetrievalIndex, queries: Sequence[str],
                 k: int = 10, searcher: Searcher | None = None) -> list[list[ImageHit]]:
  """The k images that best match each query (one text-encoder pass + a dot product).

  `searcher` searches `index.image_embeddings` (default: a fresh `ExactIndex`; build
  one once, or a `FaissIndex`, for repeated queries). With an `ExactIndex` and a model
  that gives its text batches (`VLDeformer.text_batch`), each batch of at most
  `model.batch_size` queries is one compiled call (`ExactIndex.search_texts`);
  otherwise the queries are encoded, normalised, then searched.
  """
  queries = list(queries)
  for query in queries:
    if not isinstance(query, str) or not query.strip():
      raise ValueError(f"query must be a non-empty string, got {query!r}")
  check_model_fits(model, index)
  searcher = searcher or ExactIndex(index.image_embeddings)
  scores, rows = [], []
  if isinstance(searcher, ExactIndex) and hasattr(model, "text_batch"):
    for start in range(0, len(queries), model.batch_size):
      s, r = searcher.search_texts(model, queries[start:start + model.batch_size], k)
      scores += list(s)
      rows += list(r)
  elif queries:
    q, _ = l2_normalize(model.encode_text(queries))  # [n, d]
    scores, rows = searcher.search(q, k)
  return [[ImageHit(index.image_ids[r], index.tags[r], float(s))
           for s, r in zip(ss, rr) if r >= 0] for ss, rr in zip(scores, rows)]


def search_text(model: "VLDeformer", index: RetrievalIndex, query: str, k: int = 10,
                searcher: Searcher | None = None) -> list[ImageHit]:
  """The k images that best match `query`; see `search_texts`."""
  return search_texts(model, index, [query], k, searcher)[0]


def search_images(index: RetrievalIndex, image_ids: Sequence[Any], k: int = 10,
                  searcher: Searcher | None = None) -> list[list[CaptionHit]]:
  """The k stored captions closest to each indexed image (no encoder pass).

  `searcher` searches `index.caption_embeddings` (default: a fresh `ExactIndex`).
  An unknown id is a `KeyError` naming it.
  """
  if not index.has_captions:
    raise ValueError("the index holds no captions (it was built with "
                     "with_captions=False); image -> text search needs them")
  if not len(index.captions):
    raise ValueError("the index holds no captions to search")
  rows = [index.row(image_id) for image_id in image_ids]
  if not rows:
    return []
  searcher = searcher or ExactIndex(index.caption_embeddings)
  scores, found = searcher.search(index.image_embeddings[rows], k)
  return [[CaptionHit(index.captions[r], index.image_ids[index.caption_to_image[r]],
                      float(s)) for s, r in zip(ss, rr) if r >= 0]
          for ss, rr in zip(scores, found)]


def search_image(index: RetrievalIndex, image_id: Any, k: int = 10,
                 searcher: Searcher | None = None) -> list[CaptionHit]:
  """The k stored captions closest to an indexed image; see `search_images`."""
  return search_images(index, [image_id], k, searcher)[0]
