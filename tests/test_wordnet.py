"""Offline WordNet: layout of Debian's database for NLTK, loading, and errors."""

import os
import threading
from pathlib import Path

import nltk
import pytest

from vldeformer_jax import fileio, wordnet


@pytest.fixture(autouse=True)
def _fresh_reader():
  """Each test starts and ends without a cached reader (env changes stay local)."""
  wordnet.reset_wordnet_cache()
  yield
  wordnet.reset_wordnet_cache()


@pytest.fixture
def source(monkeypatch) -> Path:
  monkeypatch.delenv(wordnet.ENV_WORDNET_DIR, raising=False)
  return wordnet.find_source_dir()


def test_lexnames_list_is_wordnet30():
  text = wordnet.lexnames_text()
  lines = text.splitlines()
  assert len(lines) == 45
  assert lines[0] == "00\tadj.all\t3"
  assert lines[3] == "03\tnoun.Tops\t1"
  assert lines[29] == "29\tverb.body\t2"
  assert lines[44] == "44\tadj.ppl\t3"
  assert [int(line.split("\t")[0]) for line in lines] == list(range(45))


def test_lexnames_match_the_data_files(source):
  wordnet._check_lexnames(source)  # raises on a mismatch


def test_shifted_lexnames_are_caught(source, monkeypatch):
  shifted = tuple((num, name, cat) for (num, _, _), (_, name, cat) in zip(
      wordnet.LEXNAMES, wordnet.LEXNAMES[1:] + wordnet.LEXNAMES[:1]))
  monkeypatch.setattr(wordnet, "LEXNAMES", shifted)
  with pytest.raises(ValueError, match="lexnames"):
    wordnet._check_lexnames(source)


def test_get_wordnet_lays_out_a_tmp_cache_and_loads(tmp_path, source, monkeypatch):
  monkeypatch.setenv(wordnet.ENV_WORDNET_DIR, str(source))
  monkeypatch.setenv(fileio.CACHE_DIR_ENV, str(tmp_path))
  monkeypatch.setattr("nltk.data.path", list(nltk.data.path))
  old_umask = os.umask(0o002)  # group-writable files would be refused by NLTK
  try:
    wn = wordnet.get_wordnet()
  finally:
    os.umask(old_umask)
  assert wordnet.get_wordnet() is wn  # cached
  (data_root,) = (tmp_path / "nltk_data").iterdir()
  assert str(data_root) in nltk.data.path
  corpus = data_root / "corpora" / "wordnet"
  assert Path(str(wn.root)) == corpus
  for name in wordnet.REQUIRED_FILES + ("lexnames",):
    path = corpus / name
    assert path.is_file() and not path.is_symlink(), name
    assert path.stat().st_mode & 0o022 == 0, name
  assert (corpus / "lexnames").read_text() == wordnet.lexnames_text()
  # A second layout reuses the folder.
  assert wordnet.layout_corpus(source, tmp_path / "nltk_data") == data_root
  assert wn.synset("dog.n.01").lexname() == "noun.animal"
  assert wn.synset("sit.v.01").lexname().startswith("verb.")
  assert wn.synset("quickly.r.01").lexname() == "adv.all"
  assert [a.name() for a in wn.lemma("quickly.r.01.quickly").antonyms()] == ["slowly"]
  assert wn.morphy("sitting", "v") == "sit"
  assert wn.lemma("dog.n.01.dog").count() > 0  # cntlist.rev was copied


def test_concurrent_layouts_agree(tmp_path, source):
  results, errors = [], []

  def run():
    try:
      results.append(wordnet.layout_corpus(source, tmp_path))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=run) for _ in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors
  assert len(set(results)) == 1
  assert not list(tmp_path.glob(".wordnet-tmp-*"))
  assert sorted(p.name for p in tmp_path.iterdir()) == [results[0].name]


def test_missing_env_dir_says_how_to_install(tmp_path, monkeypatch):
  monkeypatch.setenv(wordnet.ENV_WORDNET_DIR, str(tmp_path / "nowhere"))
  with pytest.raises(wordnet.WordNetNotFoundError) as info:
    wordnet.get_wordnet()
  message = str(info.value)
  assert "apt-get install wordnet-base wordnet-sense-index" in message
  assert "index.noun" in message


def test_no_wordnet_anywhere_says_how_to_install(tmp_path, monkeypatch):
  monkeypatch.delenv(wordnet.ENV_WORDNET_DIR, raising=False)
  monkeypatch.delenv("WNSEARCHDIR", raising=False)
  monkeypatch.setattr(wordnet, "DEFAULT_SYSTEM_DIRS", (str(tmp_path / "none"),))
  monkeypatch.setattr(wordnet, "_existing_nltk_wordnet", lambda: None)
  with pytest.raises(wordnet.WordNetNotFoundError) as info:
    wordnet.get_wordnet()
  message = str(info.value)
  assert "apt-get install wordnet-base wordnet-sense-index" in message
  assert wordnet.ENV_WORDNET_DIR in message
