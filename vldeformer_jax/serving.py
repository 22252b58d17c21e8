"""An HTTP search service over a `bin/index` index: JSON endpoints and a search page.

    service = Service.load("test.index")          # model and data from the index
    web.run_app(make_app(service), port=8080)     # or `bin/serve --index test.index`

Endpoints (JSON in and out; errors are {"error": "..."} with a 4xx status):
  POST /api/search/text   {"query": "a dog", "k": 10, "rerank": 0}  -> images
  POST /api/search/image  {"image_id": "391895", "k": 5, "rerank": 0} -> captions
  GET  /api/health        sizes, model, and how requests were batched
  GET  /                  a search page: a query box, the top-k images drawn as
                          `bin/report` draws them (detector boxes and tags)

Requests that arrive while the device is busy wait in a queue and go to it together as
one call (`MicroBatcher`): a text batch is one compiled encoder + top-k program
(`retrieval.ExactIndex.search_texts`). Device work runs in one worker thread, so the
event loop keeps answering (health, errors) meanwhile. One bad request never fails
another: each is parsed, checked and its text tokenized alone before it joins a batch
(`Service.text_query`), a body the JSON parser cannot take is a 4xx, and a batch that
still fails is retried one request at a time, so only the request that fails alone
fails (422 when its input could not be processed, 500 for a server fault). `rerank` = M re-scores each
query's top-M with the joint (cross-encoder) scorer, LightningDOT-style as `bin/eval
--rerank` does: the M re-scored results come first, in joint-score order, then the
encoder's ranks M+1.. ; it needs the split's region features (the data directory).

Built on aiohttp: asyncio-native, so the micro-batching queue is a few lines and needs
no second framework, and it also gives the client that the tests and the load
benchmark use.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import html
import json
import logging
import threading
from pathlib import Path
from typing import Any, Awaitable, Callable, Generic, Sequence, TypeVar

import numpy as np
from aiohttp import web

from vldeformer_jax import drawing, evaluation, retrieval
from vldeformer_jax.data import readers, sources
from vldeformer_jax.data.errors import DataError
from vldeformer_jax.encoder import VLDeformer
from vldeformer_jax.inputs import bucket

logger = logging.getLogger(__name__)

MAX_QUERY_CHARS = 1000
MAX_K = 100
MAX_RERANK = 100
MAX_BODY_BYTES = 64 * 1024
PAGE_K = 5  # results the page shows by default

T = TypeVar("T")
R = TypeVar("R")


class RequestError(Exception):
  """A request the service refuses: an HTTP status (4xx) and a message for the client."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status
    self.message = message


# ----------------------------------------------------------------------------------
# Requests: validated before they reach the device.


@dataclasses.dataclass(frozen=True)
class TextQuery:
  query: str
  k: int
  rerank: int = 0


@dataclasses.dataclass(frozen=True)
class ImageQuery:
  image_id: str
  row: int
  k: int
  rerank: int = 0


def _shown(value: Any, limit: int = 60) -> str:
  """A JSON value as an error message quotes it: scalars as JSON (cut to `limit`
  characters), containers by their kind only (they may be huge or deeply nested)."""
  if isinstance(value, (dict, list)):
    return f"a JSON {'object' if isinstance(value, dict) else 'array'}"
  text = json.dumps(value)
  return text if len(text) <= limit else text[:limit] + "..."


def _int_field(body: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
  value = body.get(name, default)
  if isinstance(value, bool) or not isinstance(value, int):
    raise RequestError(400, f"{name} must be an integer, got {_shown(value)}")
  if not low <= value <= high:
    raise RequestError(400, f"{name} must be in [{low}, {high}], got {value}")
  return value


def _check_fields(body: Any, required: str, optional: Sequence[str]) -> dict[str, Any]:
  if not isinstance(body, dict):
    raise RequestError(400, f"the body must be a JSON object, got {type(body).__name__}")
  unknown = sorted(set(body) - {required, *optional})
  if unknown:
    raise RequestError(400, f"unknown field(s) {', '.join(unknown)}; expected "
                            f"{required} and optionally {', '.join(optional)}")
  if required not in body:
    raise RequestError(400, f"missing field {required!r}")
  return body


def parse_text_query(body: Any, can_rerank: bool) -> TextQuery:
  """A `TextQuery` from a JSON body, or a `RequestError` saying what is wrong."""
  body = _check_fields(body, "query", ("k", "rerank"))
  query = body["query"]
  if not isinstance(query, str) or not query.strip():
    raise RequestError(400, f"query must be a non-empty string, got {_shown(query)}")
  if len(query) > MAX_QUERY_CHARS:
    raise RequestError(400, f"query has {len(query)} characters; at most "
                            f"{MAX_QUERY_CHARS} are allowed")
  try:  # JSON's "\ud800" escapes give lone surrogates, which no tokenizer takes.
    query.encode("utf-8")
  except UnicodeEncodeError as e:
    raise RequestError(400, f"query is not valid Unicode text ({e.reason} at character "
                            f"{e.start})") from None
  return TextQuery(query, _int_field(body, "k", 10, 1, MAX_K),
                   _rerank_field(body, can_rerank))


def parse_image_query(body: Any, index: retrieval.RetrievalIndex, can_rerank: bool
                      ) -> ImageQuery:
  """An `ImageQuery` from a JSON body; an id the index lacks is a 404."""
  body = _check_fields(body, "image_id", ("k", "rerank"))
  image_id = body["image_id"]
  if isinstance(image_id, bool) or not isinstance(image_id, (str, int)) or (
      isinstance(image_id, str) and not image_id.strip()):
    raise RequestError(400, f"image_id must be a non-empty string or an integer, got "
                            f"{_shown(image_id)}")
  if not index.has_captions or not len(index.captions):
    raise RequestError(400, "the index holds no captions (built with --no_captions): "
                            "image -> text search needs them")
  try:
    row = index.row(image_id)
  except (KeyError, ValueError) as e:
    raise RequestError(404, str(e.args[0])) from None
  return ImageQuery(index.image_ids[row], row, _int_field(body, "k", 10, 1, MAX_K),
                    _rerank_field(body, can_rerank))


def _rerank_field(body: dict[str, Any], can_rerank: bool) -> int:
  m = _int_field(body, "rerank", 0, 0, MAX_RERANK)
  if m and not can_rerank:
    raise RequestError(400, "rerank needs the split's region features, which this "
                            "service has not loaded (start bin/serve with --data_dir)")
  return m


def _k_bucket(k: int) -> int:
  """k rounded up to a power of two, so that few top-k sizes get compiled."""
  return 1 << max(k - 1, 0).bit_length()


# ----------------------------------------------------------------------------------
# The search itself (synchronous; called from the device thread).


class Service:
  """A model, an index placed on the device, and (optionally) the split's data.

  Args:
    model: the encoder (and joint scorer).
    index: the index to search.
    data: the split the index was built from, for re-ranking (region features) and the
      page's drawings (detector boxes); None disables both.
    gallery_dtype: the dtype the image gallery is placed in (`ExactIndex`).
  """

  def __init__(self, model: VLDeformer, index: retrieval.RetrievalIndex,
               data: readers.VinVLRetrievalData | None = None,
               gallery_dtype: str = "float32", source: str = ""):
    retrieval.check_model_fits(model, index)
    self.model, self.index, self.data = model, index, data
    self.source = source
    self.images = retrieval.ExactIndex(index.image_embeddings, dtype=gallery_dtype)
    self.captions = (retrieval.ExactIndex(index.caption_embeddings)
                     if index.has_captions and len(index.captions) else None)
    self._data_lock = threading.Lock()  # the readers are not thread-safe

  @classmethod
  def load(cls, index_path: str | Path, model_dir: str | Path | None = None,
           data_dir: str | Path | None = None, max_batch: int = 32,
           gallery_dtype: str = "float32", use_data: bool = True,
           allow_model_mismatch: bool = False) -> "Service":
    """Opens an index with its model and data (default: those it was built with; the
    data is left out when its directory is gone, or with `use_data=False`); a model
    whose weights are not the index's is refused unless `allow_model_mismatch`
    (`retrieval.check_model_matches`)."""
    index, model, model_dir = retrieval.open_index(
        index_path, model_dir, batch_size=max_batch,
        allow_model_mismatch=allow_model_mismatch)
    meta = index.metadata
    data = None
    data_dir = data_dir or (meta.get("data_dir") if use_data else None)
    if data_dir and Path(data_dir).is_dir():
      data = readers.VinVLRetrievalData(data_dir, meta["split"],
                                        img_keys_file=meta.get("img_keys_file"),
                                        feature_dim=model.config.img_feature_dim)
    elif data_dir and use_data:
      logger.warning("data directory %s is gone: no re-ranking, no box drawings",
                     data_dir)
    return cls(model, index, data, gallery_dtype,
               source=f"index {index_path}, model {model_dir}")

  @property
  def can_rerank(self) -> bool:
    return self.data is not None

  def text_query(self, body: Any) -> TextQuery:
    """A checked `TextQuery` from a JSON body: its fields (`parse_text_query`), then its
    text tokenized and padded alone, as its batch will take it, so that a text the
    tokenizer refuses fails here, by itself, before it joins a batch."""
    query = parse_text_query(body, self.can_rerank)
    try:
      self.model.text_batch([query.query])
    except (TypeError, ValueError) as e:
      raise RequestError(400, f"query cannot be tokenized: {e}") from None
    return query

  def image_query(self, body: Any) -> ImageQuery:
    """A checked `ImageQuery` from a JSON body (`parse_image_query`)."""
    return parse_image_query(body, self.index, self.can_rerank)

  def _image_inputs(self, row: int) -> tuple[str, np.ndarray]:
    with self._data_lock:
      example = self.data.example(self.index.image_ids[row])
    objects = sources.image_objects(example, self.model.config.max_regions,
                                    self.data.features.path)
    return objects.tag_string, objects.regions

  def _rerank(self, pairs: list[tuple[str, int]]) -> np.ndarray:
    """Joint scores of (caption, image row) pairs, in one `score_pairs` call."""
    if not pairs:
      return np.zeros(0, np.float32)
    inputs = {row: self._image_inputs(row) for row in {r for _, r in pairs}}
    return self.model.score_pairs([c for c, _ in pairs], [inputs[r][0] for _, r in pairs],
                                  [inputs[r][1] for _, r in pairs])

  def text_to_image(self, queries: Sequence[TextQuery]) -> list[list[dict[str, Any]]]:
    """Results of a batch of text queries: one compiled search for the whole batch."""
    depth = _k_bucket(max(max(q.k, q.rerank) for q in queries))
    hits = retrieval.search_texts(self.model, self.index, [q.query for q in queries],
                                  depth, self.images)
    return self._finish(queries, hits, lambda q, h: (q.query, self.index.row(h.image_id)),
                        lambda h: {"image_id": h.image_id, "score": h.score,
                                   "tags": h.tags})

  def image_to_text(self, queries: Sequence[ImageQuery]) -> list[list[dict[str, Any]]]:
    """Stored captions closest to each image, one search for the batch."""
    depth = _k_bucket(max(max(q.k, q.rerank) for q in queries))
    hits = retrieval.search_images(self.index, [q.image_id for q in queries], depth,
                                   self.captions)
    return self._finish(queries, hits, lambda q, h: (h.caption, q.row),
                        lambda h: {"caption": h.caption, "image_id": h.image_id,
                                   "score": h.score})

  def _finish(self, queries: Sequence[TextQuery | ImageQuery], hits: list[list[Any]],
              pair: Callable[[Any, Any], tuple[str, int]],
              as_dict: Callable[[Any], dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Each query's hits as dicts, its first `rerank` re-ordered by the joint scorer
    (one `score_pairs` call for the whole batch; `pair(query, hit)` -> (caption,
    image row)), cut to its k."""
    joint = iter(self._rerank([pair(q, h) for q, hs in zip(queries, hits)
                               for h in hs[:q.rerank]]).tolist())
    return [_reranked([as_dict(h) for h in hs], [next(joint) for _ in hs[:q.rerank]], q.k)
            for q, hs in zip(queries, hits)]

  def health(self) -> dict[str, Any]:
    return {"status": "ok", "images": self.index.num_images,
            "captions": len(self.index.captions) if self.index.has_captions else 0,
            "hidden_size": self.index.hidden_size, "split": self.index.metadata.get("split"),
            "model_dir": str(self.model.vocab_file.parent), "rerank": self.can_rerank,
            "gallery_dtype": self.images.dtype, "max_batch": self.model.batch_size,
            "limits": {"k": MAX_K, "rerank": MAX_RERANK, "query_chars": MAX_QUERY_CHARS}}

  def render_page(self, query: str = "", k: int = PAGE_K,
                  results: Sequence[dict[str, Any]] | None = None, error: str = "") -> str:
    """The search page: the query box, then the results as `bin/report` draws them."""
    title = "VLDeformer search"
    out = [drawing.page_head(title),
           f"<p>{html.escape(self.source)} &mdash; {self.index.num_images} images. Each "
           "image is drawn as its detector boxes on a blank canvas, labelled with their "
           "tags; scores are the individual encoder's cosine similarity.</p>",
           '<form method="get" action="/"><input name="q" size="60" autofocus '
           f'placeholder="a dog on a skateboard" value="{html.escape(query)}"> k '
           f'<input name="k" type="number" min="1" max="{MAX_K}" value="{k}"> '
           "<button>Search</button></form>"]
    if error:
      out.append(f'<p class="error" style="color:#b00">{html.escape(error)}</p>')
    if results is not None:
      out.append(f'<div class="query" data-kind="results" data-query="{html.escape(query)}"'
                 f'><p><b>Top-{len(results)}</b> for &ldquo;{html.escape(query)}&rdquo;'
                 '</p><div class="row">'
                 + "".join(self._figure(rank, r) for rank, r in enumerate(results, 1))
                 + "</div></div>")
    out.append("</body></html>")
    return "\n".join(out)

  def _figure(self, rank: int, result: dict[str, Any]) -> str:
    image_id = result["image_id"]
    if self.data is None:  # No boxes to draw: the id, the score and the tags.
      return (f'<figure class="hit" data-image-id="{html.escape(image_id)}"><figcaption>'
              f'<b>#{rank} image {html.escape(image_id)}</b> (cos {result["score"]:.3f})'
              f'<br><span class="tags">{html.escape(result["tags"])}</span>'
              "</figcaption></figure>")
    with self._data_lock:
      objects = self.data.tags(image_id)
      boxes = self.data.example(image_id).boxes
    return drawing.figure_html(image_id, objects, drawing.image_size(objects, boxes), rank,
                              result["score"], "cos")


def _reranked(results: list[dict[str, Any]], joint: list[float], k: int
              ) -> list[dict[str, Any]]:
  """The first len(joint) results re-ordered by joint score (ties keep the encoder's
  order) and marked with it, then the rest; ranked and cut to k."""
  m = len(joint)
  order = evaluation.rerank_order(np.asarray(joint, np.float32)).tolist()
  head = [{**results[i], "joint_score": joint[i]} for i in order]
  return [{"rank": rank, **r} for rank, r in enumerate((head + results[m:])[:k], 1)]


# ----------------------------------------------------------------------------------
# Micro-batching.


class MicroBatcher(Generic[T, R]):
  """Runs `run(items) -> results` on a worker for requests as they come: while one
  call runs, new requests queue up, and the next call takes all of them (at most
  `max_batch`). No request waits for others to arrive: an idle service answers at
  once, a busy one answers in batches. When a call of several items fails, each item
  is run again alone, so that only the items that fail alone get their exception.

  Args:
    run: a synchronous batch function, one result per item.
    max_batch: the most items per call.
    executor: where `run` runs (one thread: device calls never overlap).
  """

  def __init__(self, run: Callable[[list[T]], list[R]], max_batch: int,
               executor: concurrent.futures.Executor):
    if max_batch < 1:
      raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    self.run, self.max_batch, self.executor = run, max_batch, executor
    self.calls = self.items = self.largest = 0
    self._queue: asyncio.Queue | None = None
    self._task: asyncio.Task | None = None

  def start(self) -> None:
    """Starts the batching loop (from inside the running event loop)."""
    self._queue = asyncio.Queue()
    self._task = asyncio.get_running_loop().create_task(self._loop())

  async def stop(self) -> None:
    if self._task is not None:
      self._task.cancel()
      try:
        await self._task
      except asyncio.CancelledError:
        pass

  async def submit(self, item: T) -> R:
    """The result for one item, computed in a batch with whatever else is queued."""
    future = asyncio.get_running_loop().create_future()
    await self._queue.put((item, future))
    return await future

  def stats(self) -> dict[str, int]:
    """Calls made, items sent, the largest batch, and the requests queued now."""
    return {"calls": self.calls, "items": self.items, "largest_batch": self.largest,
            "queued": self._queue.qsize() if self._queue is not None else 0}

  async def _loop(self) -> None:
    while True:
      batch = [await self._queue.get()]
      while len(batch) < self.max_batch and not self._queue.empty():
        batch.append(self._queue.get_nowait())
      batch = [(item, f) for item, f in batch if not f.done()]  # clients gone
      if not batch:
        continue
      self.items += len(batch)
      self.largest = max(self.largest, len(batch))
      if not await self._run_batch(batch) and len(batch) > 1:
        for entry in batch:  # One at a time: only what fails alone fails.
          if not entry[1].done():
            await self._run_batch([entry])

  async def _run_batch(self, batch: list[tuple[T, asyncio.Future]]) -> bool:
    """Runs the items in one call and hands each future its result; False when the
    call failed (a lone item's future then gets the exception)."""
    self.calls += 1
    try:
      results = await asyncio.get_running_loop().run_in_executor(
          self.executor, self.run, [item for item, _ in batch])
      if len(results) != len(batch):
        raise RuntimeError(f"the batch function gave {len(results)} results for "
                           f"{len(batch)} items")
    except Exception as e:  # noqa: BLE001 - retried alone, or the request's outcome
      if len(batch) > 1:
        logger.warning("a batch of %d failed; running its requests one at a time",
                       len(batch), exc_info=True)
      elif not batch[0][1].done():
        batch[0][1].set_exception(e)
      return False
    for (_, future), result in zip(batch, results):
      if not future.done():
        future.set_result(result)
    return True


# ----------------------------------------------------------------------------------
# HTTP.


SERVICE = web.AppKey("service", Service)
TEXT_BATCHER = web.AppKey("text_batcher", MicroBatcher)
IMAGE_BATCHER = web.AppKey("image_batcher", MicroBatcher)
DRAW_EXECUTOR = web.AppKey("draw_executor", concurrent.futures.Executor)


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Awaitable]
                  ) -> web.StreamResponse:
  """Every failure becomes a JSON error (a page error for the page); the service lives
  on whatever one request does."""
  try:
    return await handler(request)
  except RequestError as e:
    return web.json_response({"error": e.message}, status=e.status)
  except web.HTTPException as e:  # no such route (404), wrong method (405), ...
    if e.status < 400:
      raise
    return web.json_response({"error": f"{e.reason}: {request.method} {request.path}"},
                             status=e.status)
  except Exception:  # noqa: BLE001 - logged, answered, and the service goes on
    logger.exception("%s %s failed", request.method, request.path)
    return web.json_response({"error": "internal error (see the service log)"},
                             status=500)


async def _json_body(request: web.Request) -> Any:
  """The body as JSON (UTF-8, RFC 8259, whatever charset the request declares); a
  body the parser cannot take (too large, not decodable as its Content-Encoding says,
  not UTF-8, nested too deeply, an integer beyond Python's digit limit) is a
  `RequestError`."""
  try:
    raw = await request.read()
  except web.HTTPRequestEntityTooLarge:
    raise RequestError(413, f"the body is larger than {MAX_BODY_BYTES} bytes") from None
  except web.RequestPayloadError as e:  # e.g. "Content-Encoding: gzip" on plain bytes
    raise RequestError(400, f"the body cannot be read: {str(e).splitlines()[-1].strip()}"
                       ) from None
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise RequestError(400, f"the body is not UTF-8 text (byte {e.start})") from None
  try:
    return json.loads(text)
  except RecursionError:
    raise RequestError(400, "the body's JSON is nested too deeply") from None
  except ValueError as e:  # json.JSONDecodeError, or int() past its digit limit
    raise RequestError(400, f"the body is not valid JSON: {e}") from None


async def _answer(batcher: MicroBatcher, query: TextQuery | ImageQuery) -> Any:
  """The query's results from its batcher. A failure of the query alone (the batcher
  retries a failed batch one query at a time) is its own: a ValueError or TypeError
  says its input could not be processed (422); a `DataError` (the service's data
  files) or anything else is a server fault for the middleware (500)."""
  try:
    return await batcher.submit(query)
  except (ValueError, TypeError) as e:
    if isinstance(e, DataError):
      raise
    logger.warning("query %r could not be processed: %s", query, e)
    raise RequestError(422, f"the query could not be processed: {e}") from None


async def _search_text(request: web.Request) -> web.Response:
  query = request.app[SERVICE].text_query(await _json_body(request))
  results = await _answer(request.app[TEXT_BATCHER], query)
  return web.json_response({"query": query.query, "k": query.k, "rerank": query.rerank,
                            "results": results})


async def _search_image(request: web.Request) -> web.Response:
  query = request.app[SERVICE].image_query(await _json_body(request))
  results = await _answer(request.app[IMAGE_BATCHER], query)
  return web.json_response({"image_id": query.image_id, "k": query.k,
                            "rerank": query.rerank, "results": results})


async def _health(request: web.Request) -> web.Response:
  return web.json_response({**request.app[SERVICE].health(), "batches": {
      "text": request.app[TEXT_BATCHER].stats(),
      "image": request.app[IMAGE_BATCHER].stats()}})


async def _page(request: web.Request) -> web.Response:
  service = request.app[SERVICE]
  query = request.query.get("q", "")
  loop = asyncio.get_running_loop()
  render = lambda **kw: loop.run_in_executor(request.app[DRAW_EXECUTOR],
                                             lambda: service.render_page(query, **kw))
  if not query:
    return web.Response(text=await render(), content_type="text/html")
  try:
    try:
      k = int(request.query.get("k", PAGE_K))
    except ValueError:
      raise RequestError(400, "k must be an integer") from None
    results = await _answer(request.app[TEXT_BATCHER],
                            service.text_query({"query": query, "k": k}))
  except RequestError as e:
    return web.Response(text=await render(error=e.message), status=e.status,
                        content_type="text/html")
  return web.Response(text=await render(k=k, results=results), content_type="text/html")


def make_app(service: Service) -> web.Application:
  """The aiohttp application; its batchers start and stop with it."""
  app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY_BYTES)
  app[SERVICE] = service
  device = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="device")
  # Drawing (matplotlib: one thread) stays off the device thread and the event loop.
  app[DRAW_EXECUTOR] = concurrent.futures.ThreadPoolExecutor(
      1, thread_name_prefix="draw")
  batch = service.model.batch_size
  app[TEXT_BATCHER] = MicroBatcher(service.text_to_image, batch, device)
  app[IMAGE_BATCHER] = MicroBatcher(service.image_to_text, batch, device)

  async def lifecycle(app: web.Application):
    app[TEXT_BATCHER].start()
    app[IMAGE_BATCHER].start()
    yield
    await app[TEXT_BATCHER].stop()
    await app[IMAGE_BATCHER].stop()
    device.shutdown(wait=False)
    app[DRAW_EXECUTOR].shutdown(wait=False)

  app.cleanup_ctx.append(lifecycle)
  app.router.add_post("/api/search/text", _search_text)
  app.router.add_post("/api/search/image", _search_image)
  app.router.add_get("/api/health", _health)
  app.router.add_get("/", _page)
  return app


def warm_up(service: Service, k: int = 10) -> None:
  """Compiles the text path for every batch size the batcher can send (rows are padded
  to buckets) at a short and a caption-like token length, and the image path once."""
  rows = sorted({bucket(n, service.model.batch_size)
                 for n in range(1, service.model.batch_size + 1)})
  for text in ("dog", "a man riding a wave on top of a surfboard near the beach"):
    for n in rows:
      service.text_to_image([TextQuery(text, k)] * n)
  if service.captions is not None:
    service.image_to_text([ImageQuery(service.index.image_ids[0], 0, k)])


async def serve(service: Service, host: str = "127.0.0.1", port: int = 8080,
                ready: Callable[[str], None] = print) -> None:
  """Serves until cancelled; `ready` gets the URL once the port is bound (port 0
  binds a free one)."""
  runner = web.AppRunner(make_app(service), access_log=None)
  await runner.setup()
  site = web.TCPSite(runner, host, port)
  await site.start()
  bound = runner.addresses[0]
  ready(f"http://{bound[0]}:{bound[1]}")
  try:
    await asyncio.Event().wait()
  finally:
    await runner.cleanup()
