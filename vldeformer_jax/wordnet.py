"""Offline WordNet 3.0 for NLTK, from Debian's `wordnet-base` database files.

The part-of-speech tagger (`pos_tagger.py`) needs WordNet's lexicon and sense counts,
the text hard negatives (`negatives.py`) its antonym pointers.
NLTK's own `wordnet` corpus is a download; Debian (`apt-get install wordnet-base
wordnet-sense-index`) ships the same WordNet 3.0 database under `/usr/share/wordnet`.
Recent NLTK only reads corpora that lie under a root on `nltk.data.path`, refuses
symlinks and hard links that point out of the corpus folder, refuses files that are
group/world writable, and needs a `lexnames` file that Debian does not ship. So
`get_wordnet()` lays out a private copy of the database plus `lexnames` in a cache
folder (once, atomically), puts that folder on `nltk.data.path` and loads the reader.

Where the database comes from, first match wins:
  1. `$VLD_WORDNET_DIR`: a WordNet dict folder (holds `index.noun`, `data.noun`, ...).
  2. A WordNet that NLTK already finds (`nltk.data.find("corpora/wordnet")`).
  3. `$WNSEARCHDIR` (WordNet's own variable), then `/usr/share/wordnet`.
The copy goes under `$VLD_CACHE_DIR/nltk_data` or `~/.cache/vldeformer_jax/nltk_data`,
in `wn-<key>/corpora/wordnet` (`wn-<key>` is the nltk_data folder; key = the source).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path

import nltk
from nltk.corpus.reader import WordNetCorpusReader
from nltk.data import PathPointer

from vldeformer_jax import fileio

ENV_WORDNET_DIR = "VLD_WORDNET_DIR"
DEFAULT_SYSTEM_DIRS: tuple[str, ...] = ("/usr/share/wordnet",)
INSTALL_HINT = (
    "Install it with `apt-get install wordnet-base wordnet-sense-index` "
    "(Debian/Ubuntu; files land in /usr/share/wordnet), or point "
    f"${ENV_WORDNET_DIR} at a WordNet 3.0 dict folder (the one holding index.noun, "
    "data.noun, ...).")

# Files the reader cannot work without, and files it opens only for some calls
# (`Lemma.count()` reads cntlist.rev, `lemma_from_key` reads index.sense).
REQUIRED_FILES: tuple[str, ...] = (
    "index.noun", "index.verb", "index.adj", "index.adv",
    "data.noun", "data.verb", "data.adj", "data.adv",
    "noun.exc", "verb.exc", "adj.exc", "adv.exc",
)
OPTIONAL_FILES: tuple[str, ...] = ("cntlist.rev", "index.sense")

# The WordNet 3.0 lexicographer files (`lexnames(5WN)`): number, name, syntactic
# category (1 noun, 2 verb, 3 adjective, 4 adverb). Synset lines in data.* refer to
# them by number; `_check_lexnames` verifies the categories against the data files.
LEXNAMES: tuple[tuple[int, str, int], ...] = (
    (0, "adj.all", 3), (1, "adj.pert", 3), (2, "adv.all", 4), (3, "noun.Tops", 1),
    (4, "noun.act", 1), (5, "noun.animal", 1), (6, "noun.artifact", 1),
    (7, "noun.attribute", 1), (8, "noun.body", 1), (9, "noun.cognition", 1),
    (10, "noun.communication", 1), (11, "noun.event", 1), (12, "noun.feeling", 1),
    (13, "noun.food", 1), (14, "noun.group", 1), (15, "noun.location", 1),
    (16, "noun.motive", 1), (17, "noun.object", 1), (18, "noun.person", 1),
    (19, "noun.phenomenon", 1), (20, "noun.plant", 1), (21, "noun.possession", 1),
    (22, "noun.process", 1), (23, "noun.quantity", 1), (24, "noun.relation", 1),
    (25, "noun.shape", 1), (26, "noun.state", 1), (27, "noun.substance", 1),
    (28, "noun.time", 1), (29, "verb.body", 2), (30, "verb.change", 2),
    (31, "verb.cognition", 2), (32, "verb.communication", 2),
    (33, "verb.competition", 2), (34, "verb.consumption", 2), (35, "verb.contact", 2),
    (36, "verb.creation", 2), (37, "verb.emotion", 2), (38, "verb.motion", 2),
    (39, "verb.perception", 2), (40, "verb.possession", 2), (41, "verb.social", 2),
    (42, "verb.stative", 2), (43, "verb.weather", 2), (44, "adj.ppl", 3),
)
_SS_TYPE_CATEGORY = {"n": 1, "v": 2, "a": 3, "s": 3, "r": 4}

_LOCK = threading.Lock()
_READER: WordNetCorpusReader | None = None


class WordNetNotFoundError(FileNotFoundError):
  """No WordNet database could be found or laid out."""


def lexnames_text() -> str:
  """The `lexnames` file NLTK's reader expects: `NN\\tname\\tcategory` per line."""
  return "".join(f"{num:02d}\t{name}\t{cat}\n" for num, name, cat in LEXNAMES)


def cache_root() -> Path:
  """The nltk_data folder that holds the laid-out copy."""
  return fileio.user_cache_dir("nltk_data")


def _missing(folder: Path) -> list[str]:
  return [f for f in REQUIRED_FILES if not (folder / f).is_file()]


def find_source_dir() -> Path:
  """The WordNet dict folder to copy from: `$VLD_WORDNET_DIR`, `$WNSEARCHDIR`, system."""
  explicit = os.environ.get(ENV_WORDNET_DIR)
  if explicit:
    folder = Path(explicit).expanduser()
    missing = _missing(folder)
    if missing:
      raise WordNetNotFoundError(
          f"${ENV_WORDNET_DIR}={explicit!r} is not a WordNet dict folder: missing "
          f"{', '.join(missing)}. {INSTALL_HINT}")
    return folder.resolve()
  candidates = [os.environ["WNSEARCHDIR"]] if os.environ.get("WNSEARCHDIR") else []
  candidates += list(DEFAULT_SYSTEM_DIRS)
  for cand in candidates:
    folder = Path(cand).expanduser()
    if not _missing(folder):
      return folder.resolve()
  raise WordNetNotFoundError(
      f"WordNet not found (looked in {', '.join(candidates)} and NLTK's data path). "
      f"{INSTALL_HINT}")


def _source_key(source: Path) -> str:
  """Identifies a source's content cheaply (path, sizes, mtimes) to name its copy."""
  h = hashlib.sha256(str(source).encode())
  for name in REQUIRED_FILES + OPTIONAL_FILES + ("lexnames",):
    path = source / name
    if path.is_file():
      st = path.stat()
      h.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode())
  return h.hexdigest()[:16]


def _check_lexnames(source: Path) -> None:
  """Checks that each data file's lexfile numbers name lexfiles of its category.

  Reads only the first synset lines of each file (after the license header), which is
  enough to catch a wrong or shifted list without scanning 30 MB.
  """
  category = {num: cat for num, _, cat in LEXNAMES}
  for pos in ("noun", "verb", "adj", "adv"):
    seen = 0
    with open(source / f"data.{pos}", encoding="utf-8", errors="replace") as f:
      for line in f:
        if line.startswith("  "):
          continue
        fields = line.split()
        if len(fields) < 3:
          continue
        lexfile, ss_type = int(fields[1]), fields[2]
        if category.get(lexfile) != _SS_TYPE_CATEGORY.get(ss_type):
          raise ValueError(
              f"{source / f'data.{pos}'}: synset {fields[0]} has lexfile {lexfile} "
              f"and type {ss_type!r}, which the lexnames list does not match")
        seen += 1
        if seen >= 2000:
          break


def _clean_stale_temps(root: Path, max_age_s: float = 3600.0) -> None:
  """Removes temp folders left behind by interrupted layouts (older than an hour)."""
  now = time.time()
  for entry in root.glob(".wordnet-tmp-*"):
    try:
      if now - entry.stat().st_mtime > max_age_s:
        shutil.rmtree(entry, ignore_errors=True)
    except OSError:
      pass


def layout_corpus(source: Path, root: Path | None = None) -> Path:
  """Copies a WordNet dict folder plus `lexnames` to `<root>/wn-<key>/corpora/wordnet`.

  `<root>/wn-<key>` is an nltk_data folder of its own, keyed by the source, so a
  changed source gets a fresh copy and nothing is ever rewritten in place. Copies,
  not links: NLTK refuses links leaving the corpus folder. The copy is built in a
  temp folder and renamed into place, so concurrent processes either see a complete
  folder or build their own and drop it when they lose the rename race. Returns the
  nltk_data folder (the one to put on `nltk.data.path`).
  """
  root = cache_root() if root is None else Path(root)
  final = root / f"wn-{_source_key(source)}"
  if (final / "corpora" / "wordnet").is_dir():
    return final
  missing = _missing(source)
  if missing:
    raise WordNetNotFoundError(
        f"{source} is not a WordNet dict folder: missing {', '.join(missing)}. "
        f"{INSTALL_HINT}")
  root.mkdir(parents=True, exist_ok=True)
  _clean_stale_temps(root)
  tmp = Path(tempfile.mkdtemp(prefix=".wordnet-tmp-", dir=root))
  try:
    corpus = tmp / "corpora" / "wordnet"
    corpus.mkdir(parents=True)
    for name in REQUIRED_FILES + OPTIONAL_FILES:
      if (source / name).is_file():
        shutil.copyfile(source / name, corpus / name)
    if (source / "lexnames").is_file():
      shutil.copyfile(source / "lexnames", corpus / "lexnames")
    else:
      _check_lexnames(source)
      (corpus / "lexnames").write_text(lexnames_text(), encoding="utf-8")
    # NLTK refuses group/world-writable corpus files and folders (whatever the umask).
    for path in corpus.iterdir():
      os.chmod(path, 0o644)
    for folder in (corpus, corpus.parent, tmp):
      os.chmod(folder, 0o755)
    try:
      os.rename(tmp, final)
    except OSError:
      if not (final / "corpora" / "wordnet").is_dir():
        raise
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return final


class _WordNet30Reader(WordNetCorpusReader):
  """NLTK's reader, minus a pointless self-mapping when the data already is 3.0.

  NLTK maps the loaded WordNet onto its own `corpora/wordnet` (3.0) for the
  multilingual (OMW) data at construction; for 3.0 data that map is the identity and
  costs a second parse of index.sense. OMW is not used here.
  """

  def map_wn(self, version="wordnet"):
    if self.get_version() == "3.0":
      return None
    return super().map_wn(version)


def _authorise(root: Path) -> None:
  """Puts `root` on `nltk.data.path` so NLTK's path guard accepts the corpus."""
  if str(root) not in [str(p) for p in nltk.data.path]:
    nltk.data.path.append(str(root))


def load_reader(corpus_dir: Path | str | PathPointer) -> WordNetCorpusReader:
  """Loads a WordNetCorpusReader from a corpus folder (no multilingual data)."""
  root = str(corpus_dir) if isinstance(corpus_dir, Path) else corpus_dir
  with warnings.catch_warnings():
    # "The multilingual functions are not available": expected, OMW is not used.
    warnings.simplefilter("ignore", UserWarning)
    return _WordNet30Reader(root, None)


def _existing_nltk_wordnet() -> WordNetCorpusReader | None:
  """NLTK's own WordNet when one is installed in its data path, else None."""
  try:
    found = nltk.data.find("corpora/wordnet")
  except LookupError:
    return None
  try:
    return load_reader(found)
  except (OSError, ValueError):
    return None


def build_wordnet() -> WordNetCorpusReader:
  """Finds or lays out WordNet and loads a fresh reader (uncached)."""
  if not os.environ.get(ENV_WORDNET_DIR):
    existing = _existing_nltk_wordnet()
    if existing is not None:
      return existing
  source = find_source_dir()
  root = cache_root()
  data_root = layout_corpus(source, root)
  _authorise(data_root)
  return load_reader(data_root / "corpora" / "wordnet")


def get_wordnet() -> WordNetCorpusReader:
  """The process-wide WordNet reader, built on first use.

  Returns NLTK's own WordNet when it is installed (and `$VLD_WORDNET_DIR` is unset),
  else a reader (a `WordNetCorpusReader` subclass) of the laid-out copy.

  The reader's lookups seek in shared file handles: callers that use it from several
  threads should serialise calls (pos_tagger.py and negatives.py memoise their
  lookups and take one lock, `pos_tagger._WN_LOCK`).
  """
  global _READER
  if _READER is None:
    with _LOCK:
      if _READER is None:
        _READER = build_wordnet()
  return _READER


def reset_wordnet_cache() -> None:
  """Forgets the cached reader (tests, or after changing the env variables)."""
  global _READER
  with _LOCK:
    _READER = None
