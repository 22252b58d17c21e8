"""`bin/serve` on a tiny model and demo split: every endpoint, the errors, concurrency
(answers identical to `bin/search`), re-ranking, and the page in headless Chromium."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest

from conftest import REPO, TINY_FEATURE_DIM, result_lines, run_bin
from vldeformer_jax import serving

QUERIES = ("a dog on a bench", "two men sitting at a table", "a red bus on the street")


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
  """(URL, index dir, data dir) of a `bin/serve --port 0` subprocess."""
  from vldeformer_jax.data.synthetic import write_demo_dataset
  root = tmp_path_factory.mktemp("serving")
  write_demo_dataset(root / "data", num_train_images=4, num_test_images=12,
                     feature_dim=TINY_FEATURE_DIM)
  run_bin("index", "--model", str(tiny_model_dir), "--data_dir", str(root / "data"),
          "--split", "test", "--out", str(root / "test.index"))
  log = open(root / "serve.log", "w")
  proc = subprocess.Popen([sys.executable, str(REPO / "bin" / "serve"), "--index",
                           str(root / "test.index"), "--port", "0", "--max_batch", "8"],
                          stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO)
  line = proc.stdout.readline()  # "serving on URL", or "" if it died
  if not line.startswith("serving on "):
    proc.wait()
    raise AssertionError(f"bin/serve did not start: {line}\n"
                         f"{(root / 'serve.log').read_text()}")
  yield line.split()[-1], root / "test.index", root / "data"
  proc.terminate()
  proc.wait()
  log.close()


def call(url: str, path: str, body: bytes | dict | None = None, method: str | None = None
         ) -> tuple[int, dict]:
  """(status, JSON answer) of one request; a body is POSTed."""
  data = json.dumps(body).encode() if isinstance(body, dict) else body
  request = urllib.request.Request(url + path, data=data, method=method)
  try:
    with urllib.request.urlopen(request) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def bin_search(index, *args: str) -> list[list[str]]:
  return result_lines(run_bin("search", "--index", str(index), *args).stdout)


def as_rows(results: list[dict], what: str) -> list[list[str]]:
  """An answer's results as bin/search prints them."""
  return [[str(r["rank"]), r["image_id"], f"{r['score']:.4f}", r[what]] for r in results]


def test_health(served):
  url, _, _ = served
  status, health = call(url, "/api/health")
  assert status == 200 and health["status"] == "ok"
  assert health["images"] == 12 and health["captions"] == 60 and health["rerank"]
  assert health["hidden_size"] == 32 and health["max_batch"] == 8


def test_concurrent_answers_equal_bin_search(served):
  url, index, _ = served
  want_text = {q: bin_search(index, q, "-k", "5") for q in QUERIES}
  image_ids = [r[1] for r in want_text[QUERIES[0]][:2]]
  want_image = {i: bin_search(index, "--image", i, "-k", "4") for i in image_ids}
  jobs = [("/api/search/text", {"query": q, "k": 5}) for q in QUERIES] * 8
  jobs += [("/api/search/image", {"image_id": i, "k": 4}) for i in image_ids] * 4
  with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
    answers = list(pool.map(lambda job: call(url, *job), jobs))
  for (path, body), (status, answer) in zip(jobs, answers):
    assert status == 200, answer
    if path.endswith("text"):
      assert as_rows(answer["results"], "tags") == want_text[body["query"]]
    else:
      assert as_rows(answer["results"], "caption") == want_image[body["image_id"]]
  _, health = call(url, "/api/health")
  batches = health["batches"]
  assert batches["text"]["items"] >= 24 and batches["image"]["items"] >= 8
  assert batches["text"]["largest_batch"] <= 8  # --max_batch


def test_rerank_reorders_the_top_m_by_the_joint_score(served, tiny_model_dir):
  from vldeformer_jax.data import readers
  from vldeformer_jax.encoder import load_pretrained
  url, _, data_dir = served
  query = QUERIES[1]
  _, plain = call(url, "/api/search/text", {"query": query, "k": 6})
  status, answer = call(url, "/api/search/text", {"query": query, "k": 6, "rerank": 4})
  assert status == 200 and answer["rerank"] == 4
  plain, reranked = plain["results"], answer["results"]
  head = reranked[:4]
  assert {r["image_id"] for r in head} == {r["image_id"] for r in plain[:4]}
  joint = [r["joint_score"] for r in head]
  assert joint == sorted(joint, reverse=True)
  assert reranked[4:] == plain[4:] and all("joint_score" not in r for r in reranked[4:])
  assert [r["rank"] for r in reranked] == list(range(1, 7))
  # The joint scores are the model's score_pairs of (query, image).
  model = load_pretrained(tiny_model_dir)
  split = readers.VinVLRetrievalData(data_dir, "test", feature_dim=TINY_FEATURE_DIM)
  examples = [split.example(r["image_id"]) for r in head]
  want = model.score_pairs([query] * 4, [" ".join(e.tags[:8]) for e in examples],
                           [e.regions[:8] for e in examples])
  np.testing.assert_allclose(joint, want, atol=1e-4)
  # Image -> text: the top-M captions re-scored against the image.
  status, answer = call(url, "/api/search/image",
                        {"image_id": head[0]["image_id"], "k": 3, "rerank": 3})
  assert status == 200 and all("joint_score" in r for r in answer["results"])


@pytest.mark.parametrize("path, body, status, message", [
    ("/api/search/text", {"query": ""}, 400, "query must be a non-empty string"),
    ("/api/search/text", {"query": "   "}, 400, "query must be a non-empty string"),
    ("/api/search/text", {"query": 5}, 400, "query must be a non-empty string"),
    ("/api/search/text", {"query": "dog " * 300}, 400, "at most 1000 are allowed"),
    ("/api/search/text", {"query": "dog", "k": 0}, 400, "k must be in [1, 100], got 0"),
    ("/api/search/text", {"query": "dog", "k": 101}, 400, "k must be in [1, 100]"),
    ("/api/search/text", {"query": "dog", "k": "5"}, 400, "k must be an integer"),
    ("/api/search/text", {"query": "dog", "k": True}, 400, "k must be an integer"),
    ("/api/search/text", {"query": "dog", "rerank": -1}, 400, "rerank must be in"),
    ("/api/search/text", {"q": "dog"}, 400, "unknown field(s) q"),
    ("/api/search/text", {"k": 3}, 400, "missing field 'query'"),
    ("/api/search/text", b"{not json", 400, "the body is not valid JSON"),
    ("/api/search/text", b"[1, 2]", 400, "the body must be a JSON object"),
    ("/api/search/text", b"\xff\xfe", 400, "not UTF-8"),
    ("/api/search/text", b'{"query": "' + b"a" * 70000 + b'"}', 413, "larger than"),
    # What the JSON parser cannot take, and text no tokenizer takes (issue 23).
    ("/api/search/text", b"[" * 5000 + b"]" * 5000, 400, "nested too deeply"),
    ("/api/search/text", b'{"query": "dog", "k": ' + b"9" * 5000 + b"}", 400,
     "not valid JSON"),
    ("/api/search/text", {"query": "dog", "k": 10 ** 30}, 400, "k must be in"),
    ("/api/search/text", {"query": "dog", "k": 1.5}, 400, "k must be an integer"),
    ("/api/search/text", b'{"query": "dog", "k": NaN}', 400, "k must be an integer"),
    ("/api/search/text", {"query": "dog \ud800"}, 400, "not valid Unicode text"),
    ("/api/search/text", b'{"query": "dog \xed\xa0\x80"}', 400, "not UTF-8"),
    ("/api/search/text", b'"dog"', 400, "the body must be a JSON object"),
    ("/api/search/text", {"query": [[["dog"]]]}, 400, "got a JSON array"),
    ("/api/search/image", {"image_id": "424242"}, 404, "image id 424242 is not in"),
    ("/api/search/image", {"image_id": ""}, 400, "image_id must be a non-empty"),
    ("/api/search/image", {"image_id": None}, 400, "image_id must be a non-empty"),
    ("/api/search/text", None, 405, "Method Not Allowed"),
    ("/api/nothing", None, 404, "Not Found"),
])
def test_bad_requests_get_a_clear_4xx(served, path, body, status, message):
  url, _, _ = served
  got, answer = call(url, path, body)
  assert got == status and message in answer["error"], answer
  assert call(url, "/api/health")[0] == 200  # and the service goes on


def test_rerank_without_data_is_refused(tiny_model_dir, served):
  _, index, _ = served
  service = serving.Service.load(index, use_data=False)
  with pytest.raises(serving.RequestError, match="rerank needs the split's region"):
    serving.parse_text_query({"query": "dog", "rerank": 2}, service.can_rerank)
  assert "<figure" in service.render_page("dog", 2, service.text_to_image(
      [serving.TextQuery("dog", 2)])[0])  # ids and tags, no drawing


def test_micro_batcher_sends_queued_requests_as_one_call():
  calls, started, release = [], threading.Event(), threading.Event()

  def run(items):
    calls.append(list(items))
    started.set()
    release.wait()
    if "boom" in items:
      raise RuntimeError("device failure")
    return [x * 10 for x in items]

  async def scenario():
    batcher = serving.MicroBatcher(run, max_batch=3,
                                   executor=concurrent.futures.ThreadPoolExecutor(1))
    batcher.start()
    first = asyncio.ensure_future(batcher.submit(1))
    await asyncio.get_running_loop().run_in_executor(None, started.wait)
    rest = [asyncio.ensure_future(batcher.submit(x)) for x in (2, 3, 4, 5)]
    await asyncio.sleep(0)  # all four queued while the first call runs
    release.set()
    results = await asyncio.gather(first, *rest)
    failed = await asyncio.gather(batcher.submit("boom"), return_exceptions=True)
    after = await batcher.submit(6)  # a failed batch does not stop the loop
    # A failed batch of three is retried one item at a time: only "boom" fails.
    started.clear()
    first = asyncio.ensure_future(batcher.submit(7))
    await asyncio.get_running_loop().run_in_executor(None, started.wait)
    mixed = [asyncio.ensure_future(batcher.submit(x)) for x in (8, "boom", 9)]
    mixed = await asyncio.gather(first, *mixed, return_exceptions=True)
    await batcher.stop()
    return results, failed, after, mixed

  results, failed, after, mixed = asyncio.run(scenario())
  assert results == [10, 20, 30, 40, 50] and after == 60
  assert isinstance(failed[0], RuntimeError)
  assert calls[:3] == [[1], [2, 3, 4], [5]]  # at most max_batch per call
  assert mixed[:2] == [70, 80] and isinstance(mixed[2], RuntimeError) and mixed[3] == 90
  assert calls[-5:] == [[7], [8, "boom", 9], [8], ["boom"], [9]]


def chromium() -> str:
  path = shutil.which("chromium")
  if path is None:
    pytest.skip("Debian's chromium is not installed (scripts/setup.sh installs it)")
  return path


def headless(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--hide-scrollbars",
                         "--window-size=1200,900", *args], capture_output=True, text=True)


def coloured_pixels(png_path) -> int:
  """Pixels with a saturated colour: the boxes and tag labels, not text or grey."""
  from PIL import Image
  rgb = np.asarray(Image.open(png_path).convert("RGB")).astype(int)
  return int(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).sum())


def test_page_in_headless_chromium(served, tmp_path):
  url, _, _ = served
  query = QUERIES[0]
  _, answer = call(url, "/api/search/text", {"query": query, "k": 4})
  page = f"{url}/?" + urllib.parse.urlencode({"q": query, "k": 4})
  dom = headless("--dump-dom", page).stdout
  assert f'value="{query}"' in dom and 'data-kind="results"' in dom
  ids = [part.split('"')[0] for part in dom.split('data-image-id="')[1:]]
  assert ids == [r["image_id"] for r in answer["results"]]
  assert dom.count('src="data:image/png;base64,') == 4
  for r in answer["results"]:
    assert ", ".join(r["tags"].split()) in dom  # each image's tags under its drawing
  # The screenshot shows the drawn boxes; the empty page has none.
  headless(f"--screenshot={tmp_path / 'results.png'}", page)
  headless(f"--screenshot={tmp_path / 'empty.png'}", url + "/")
  assert coloured_pixels(tmp_path / "results.png") > 2000
  assert coloured_pixels(tmp_path / "empty.png") < 100
  dom = headless("--dump-dom", f"{url}/?q=dog&k=500").stdout
  assert "k must be in [1, 100]" in dom and "data-image-id" not in dom


def test_bin_serve_errors(tmp_path):
  proc = run_bin("serve", "--index", str(tmp_path / "nope"), check=False)
  assert proc.returncode == 1 and "bin/serve: error: --index" in proc.stderr


# ----------------------------------------------------------------------------------
# In-process (aiohttp's test server): one bad request never hurts another.


@pytest.fixture(scope="module")
def service(tiny_model_dir, tmp_path_factory):
  """A `Service` over the tiny model and a 12-image split, built in this process
  (batches of at most 8), its text path compiled."""
  from vldeformer_jax import retrieval
  from vldeformer_jax.data import readers
  from vldeformer_jax.data.synthetic import write_demo_dataset
  from vldeformer_jax.encoder import load_pretrained
  root = tmp_path_factory.mktemp("serving_in_process")
  write_demo_dataset(root, num_train_images=4, num_test_images=12,
                     feature_dim=TINY_FEATURE_DIM)
  model = load_pretrained(tiny_model_dir, batch_size=8)
  data = readers.VinVLRetrievalData(root, "test", feature_dim=TINY_FEATURE_DIM)
  service = serving.Service(model, retrieval.build_index(model, data), data)
  serving.warm_up(service, k=5)
  return service


def against_app(service: serving.Service, scenario):
  """What `await scenario(client, app)` returns, run against `make_app(service)` on an
  in-process test server."""
  from aiohttp.test_utils import TestClient, TestServer

  async def main():
    app = serving.make_app(service)
    async with TestClient(TestServer(app)) as client:
      return await scenario(client, app)
  return asyncio.run(main())


async def post(client, path: str, body: bytes | dict, headers: dict | None = None
               ) -> tuple[int, dict]:
  """(status, JSON answer) of one POST; a dict body is sent as JSON."""
  data = json.dumps(body).encode() if isinstance(body, dict) else body
  async with client.post(path, data=data, headers=headers) as r:
    return r.status, json.loads(await r.read())


async def until(condition, what: str) -> None:
  """Waits (on the event loop) until `condition()` holds."""
  for _ in range(6000):
    if condition():
      return
    await asyncio.sleep(0.01)
  raise AssertionError(f"gave up waiting for {what}")


async def in_one_batch(client, app, bodies: list[dict]) -> list[tuple[int, dict]]:
  """The answers to `bodies` (text searches) sent while the device thread is held, so
  that all but the first queue up and go to the device in full batches."""
  batcher = app[serving.TEXT_BATCHER]
  gate = threading.Event()
  batcher.executor.submit(gate.wait)  # The one device thread waits for the gate.
  calls = batcher.calls
  first = asyncio.ensure_future(post(client, "/api/search/text", bodies[0]))
  await until(lambda: batcher.calls > calls, "the first request's batch")
  rest = [asyncio.ensure_future(post(client, "/api/search/text", b)) for b in bodies[1:]]
  # Every other request is either answered already (refused) or queued.
  await until(lambda: batcher.stats()["queued"] + sum(t.done() for t in rest)
              == len(rest), "the requests to queue")
  gate.set()
  return await asyncio.gather(first, *rest)


def alone(service: serving.Service, bodies: list[dict]) -> list[list[dict]]:
  """Each text search's results when it is the only request."""
  async def scenario(client, app):
    return [await post(client, "/api/search/text", b) for b in bodies]
  answers = against_app(service, scenario)
  assert all(status == 200 for status, _ in answers), answers
  return [answer["results"] for _, answer in answers]


def assert_same_results(got: list[dict], want: list[dict]) -> None:
  """The same hits in the same order; scores equal up to float rounding (a batch of
  another size is another compiled program)."""
  strip = lambda results: [{k: v for k, v in r.items() if not k.endswith("score")}
                           for r in results]
  assert strip(got) == strip(want)
  for key in ("score", "joint_score"):
    np.testing.assert_allclose([r.get(key, 0.0) for r in got],
                               [r.get(key, 0.0) for r in want], atol=1e-5)


VALID = [{"query": QUERIES[i % 3], "k": 1 + i % 5} for i in range(30)]


def test_a_bad_query_fails_alone_and_never_its_batch(service):
  """Issue 23: a lone surrogate (valid JSON) used to make the tokenizer raise inside
  the batched call, failing every request batched with it (500)."""
  want = alone(service, VALID[:15])  # 15 distinct bodies, each twice in VALID.
  bodies = VALID[:15] + [{"query": "a dog \ud800 on a bench", "k": 5}] + VALID[15:]
  answers = against_app(service, lambda client, app: in_one_batch(client, app, bodies))
  status, answer = answers.pop(15)
  assert status == 400 and "query is not valid Unicode text" in answer["error"], answer
  for i, (status, answer) in enumerate(answers):
    assert status == 200, answer
    assert_same_results(answer["results"], want[i % 15])


POISON = "a poisoned query"


@pytest.mark.parametrize("where, error, status, message", [
    ("tokenizer", TypeError("no such text"), 400, "query cannot be tokenized"),
    ("batch", ValueError("bad input"), 422, "the query could not be processed"),
    ("batch", RuntimeError("device fault"), 500, "internal error"),
])
def test_a_query_that_fails_its_batch_fails_alone(service, monkeypatch, where, error,
                                                  status, message):
  """A query that passes the field checks but fails when encoded (checked alone at
  parse time) or inside the batched call (the batch is retried one query at a time):
  only that query fails, with its own status; its batch-mates get their answers."""
  want = alone(service, VALID[:7])
  owner, name = ((service.model, "text_batch") if where == "tokenizer"
                 else (service, "text_to_image"))
  original = getattr(owner, name)

  def poisoned(items):
    texts = items if where == "tokenizer" else [q.query for q in items]
    if POISON in texts:
      raise error
    return original(items)

  monkeypatch.setattr(owner, name, poisoned)
  bodies = VALID[:3] + [{"query": POISON, "k": 3}] + VALID[3:7]

  async def scenario(client, app):
    answers = await in_one_batch(client, app, bodies)
    return answers, app[serving.TEXT_BATCHER].stats()

  answers, stats = against_app(service, scenario)
  got, answer = answers.pop(3)
  assert got == status and message in answer["error"], answer
  for i, (got, answer) in enumerate(answers):
    assert got == 200, answer
    assert_same_results(answer["results"], want[i])
  if where == "batch":  # The 7 queued went as one batch, then one at a time.
    assert stats["largest_batch"] == 7 and stats["calls"] == 1 + 1 + 7
  else:  # Refused before it was queued.
    assert stats["items"] == 7 and stats["largest_batch"] == 6


# ----------------------------------------------------------------------------------
# Fuzz: random bodies, types, sizes and encodings, concurrent with valid requests.

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TEXT, IMAGE = "/api/search/text", "/api/search/image"
# Text with lone surrogates (valid in JSON as "\ud800" escapes) and every other plane.
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=20)
SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10 ** 20)
           | st.floats() | ANY_TEXT | st.sampled_from(QUERIES))
VALUES = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=3)
                      | st.dictionaries(ANY_TEXT, kids, max_size=3), max_leaves=6)
FIELDS = st.fixed_dictionaries({}, optional={
    "query": VALUES, "image_id": VALUES | st.sampled_from(["391895", "0", " 7 "]),
    "k": VALUES | st.integers(-3, 130), "rerank": VALUES | st.integers(-3, 130),
    "extra": VALUES})


def _encoded(value, encoding: str) -> bytes:
  """A JSON value as bytes: ASCII escapes, or raw UTF-8/UTF-16 (lone surrogates
  written as the invalid bytes they make)."""
  if encoding == "ascii":
    return json.dumps(value).encode()
  return json.dumps(value, ensure_ascii=False).encode(encoding, "surrogatepass")


def _nested(n: int, inner: bytes = b"") -> bytes:
  return b"[" * n + inner + b"]" * n


RAW = st.one_of(
    st.binary(max_size=64),
    st.builds(_encoded, VALUES | FIELDS, st.sampled_from(["ascii", "utf-8", "utf-16"])),
    st.integers(1, 40_000).map(_nested),  # Past 32k levels: past MAX_BODY_BYTES too.
    st.integers(1, 5_000).map(lambda n: b'{"query": ' + _nested(n, b'"dog"') + b"}"),
    st.integers(4_000, 10_000).map(lambda n: b'{"query": "dog", "k": ' + b"7" * n + b"}"),
    st.just(b'{"query": "' + b"x" * serving.MAX_BODY_BYTES + b'"}'),
    st.just(b'{"query": "dog", "k": 3, "k": 1e999}'))
HEADERS = st.sampled_from([
    {}, {"Content-Type": "application/json"},
    {"Content-Type": "application/json; charset=utf-16"},
    {"Content-Type": "text/plain; charset=no-such-charset"},
    {"Content-Encoding": "gzip"}, {"Content-Encoding": "br"}])
FUZZ = st.tuples(st.sampled_from([TEXT, IMAGE]), RAW | FIELDS, HEADERS)
# Valid requests: their answers alone are computed once (`fuzz_answers_alone`).
FUZZ_VALID = [(TEXT, {"query": QUERIES[0], "k": 5}), (TEXT, {"query": QUERIES[1], "k": 2}),
              (TEXT, {"query": QUERIES[2], "k": 4, "rerank": 3}),
              (IMAGE, {"k": 3}), (IMAGE, {"k": 5, "rerank": 2})]


@pytest.fixture(scope="module")
def fuzz_answers_alone(service):
  """The valid requests (image ones get the index's first ids) and each one's answer
  when it is the only request."""
  valid = [(path, {"image_id": service.index.image_ids[i], **body} if path == IMAGE
            else body) for i, (path, body) in enumerate(FUZZ_VALID)]

  async def scenario(client, app):
    return [await post(client, path, body) for path, body in valid]
  answers = against_app(service, scenario)
  assert all(status == 200 for status, _ in answers), answers
  return valid, [answer["results"] for _, answer in answers]


@pytest.mark.filterwarnings("ignore:Generating overly large repr")
@settings(max_examples=50, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(fuzz=st.lists(FUZZ, min_size=1, max_size=6),
       valid=st.lists(st.integers(0, len(FUZZ_VALID) - 1), min_size=1, max_size=6),
       order=st.randoms(use_true_random=False))
def test_fuzzed_requests_get_no_5xx_and_never_fail_a_valid_one(service, fuzz_answers_alone,
                                                               fuzz, valid, order):
  """Issue 23: random bodies (any bytes, JSON of any shape with wrong types for every
  field and extra fields, lone surrogates, invalid UTF-8, UTF-16, deep nesting, huge
  integers, bodies past the size limit, odd charsets and encodings), sent at once with
  valid requests: no 5xx, every refusal a JSON error, and every valid request gets the
  answer it gets alone. (A Content-Encoding aiohttp has no decoder for is refused by
  its HTTP parser before the app sees the request: a plain-text 400.)"""
  requests, want = fuzz_answers_alone
  jobs = [(path, body, headers, None) for path, body, headers in fuzz]
  jobs += [(*requests[i], {}, want[i]) for i in valid]
  order.shuffle(jobs)

  async def send(client, path, body, headers):
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    async with client.post(path, data=data, headers=headers) as r:
      return r.status, r.content_type, await r.read()

  async def scenario(client, app):
    return await asyncio.gather(*(send(client, path, body, headers)
                                  for path, body, headers, _ in jobs))

  for (path, body, headers, expected), (status, kind, raw) in zip(
      jobs, against_app(service, scenario)):
    assert status < 500, (path, body[:200], headers, raw[:300])
    if headers.get("Content-Encoding") == "br" and kind == "text/plain":
      assert status == 400  # aiohttp's HTTP parser: no brotli decoder here.
      continue
    assert kind == "application/json", (path, body[:200], raw[:300])
    answer = json.loads(raw)
    if status >= 400:
      assert isinstance(answer.get("error"), str) and answer["error"], answer
    if expected is not None:
      assert status == 200, (body, answer)
      assert_same_results(answer["results"], expected)
