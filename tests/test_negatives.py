"""Text hard negatives: nouns become other tags; verbs, adjectives, adverbs antonyms."""

import functools
import math
import re

import lemminflect
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vldeformer_jax import negatives as neg
from vldeformer_jax.pos_tagger import CONTENT_POS, tag_caption
from vldeformer_jax.wordnet import get_wordnet

# Hand-written captions in the style of COCO / Flickr30k.
CAPTIONS = [
    "A man is sitting on a bench.",
    "Two small dogs run quickly across the wet grass.",
    "A young girl in a red dress is standing near the open door.",
    "The big brown dog is jumping over a white fence.",
    "A woman walks slowly along the dry beach.",
    "Three boys are playing soccer in a large field.",
    "A little boy holds a tennis racket and smiles.",
    "An old man sits alone on a wooden bench.",
    "A black cat sleeps on a soft pillow.",
    "Children laugh happily near a tall tree.",
    "A bigger dog chases a smaller dog through the snow.",
    "Two women are sitting at a long table in a dark restaurant.",
    "A skier goes down a steep snowy hill.",
    "A happy child rides a bicycle on a busy street.",
    "The girl is climbing up a high wall.",
    "A man in a white shirt is riding a horse.",
    "Several people are standing outside a closed shop.",
    "A dog is running fast on the beach.",
    "A cook is preparing food in a clean kitchen.",
    "Two men are pushing a heavy cart up a hill.",
    "a surfer rides a big wave while people watch from the shore",
]
TAGS = ["dog", "cat", "man", "woman", "tennis racket", "tree", "car", "bus", "shirt",
        "ball", "umbrella", "traffic light", "horse", "table", "pizza"]
WORD_RE = re.compile(r"[^\W\d_]+(?:-[^\W\d_]+)*")


def words(text):
  return WORD_RE.findall(text)


# ----- an independent checker: which words changed, and into what -----------------


@functools.lru_cache(maxsize=None)
def wordnet_antonyms(word):
  """Every WordNet antonym (lower, spaces) of any sense of any lemma of `word`.

  Generous on purpose (all senses, all lemmas of a sense's synset): a replacement
  outside this set is certainly not a WordNet antonym of the original.
  """
  wn = get_wordnet()
  out = set()
  lemmas = {(word, p) for p in "vasr"}
  for p in "var":
    for base in wn._morphy(word, p):  # pylint: disable=protected-access
      lemmas.add((base, p))
  for ls in lemminflect.getAllLemmas(word).values():
    for base in ls:
      lemmas.update((base.lower(), p) for p in "var")
  for base, p in lemmas:
    for synset in wn.synsets(base, p):
      if not any(lem.name().lower() == base for lem in synset.lemmas()):
        continue
      for lem in synset.lemmas():
        out.update(a.name().lower().replace("_", " ") for a in lem.antonyms())
  return frozenset(out)


def lemma_forms(word):
  """The word and all its lemmas (any POS), lower-cased."""
  forms = {word.lower()}
  for ls in lemminflect.getAllLemmas(word.lower()).values():
    forms.update(x.lower() for x in ls)
  wn = get_wordnet()
  for p in "nvar":
    forms.update(wn._morphy(word.lower(), p))  # pylint: disable=protected-access
  return forms


def explains(orig, new, tags):
  """True when `new` (words) is a valid replacement of the word `orig`."""
  if not new or new[0].lower() == orig.lower() and len(new) == 1:
    return False
  tag_set = {t.lower() for t in tags}
  head = [w.lower() for w in new[:-1]]
  for last in lemma_forms(new[-1]):  # a tag, maybe pluralised
    if " ".join(head + [last]) in tag_set:
      return True
  ants = wordnet_antonyms(orig.lower())
  for k in (0, len(new) - 1):  # the inflected word of an antonym phrase
    for form in lemma_forms(new[k]):
      phrase = [w.lower() for w in new]
      phrase[k] = form
      if " ".join(phrase) in ants:
        return True
  return False


def changes(caption, negative, tags):
  """The (original word, replacement words) pairs turning caption into negative.

  Aligns the two word sequences so that every original word is either kept or
  replaced by words that `explains` it (a tag, or a WordNet antonym), with as few
  replacements as possible; fails the test when no such alignment exists. An
  "a"/"an" that changed to agree with the next word counts as kept.
  """
  a, b = words(caption), words(negative)
  norm = lambda w: "a" if w.lower() in ("a", "an") else w.lower()

  @functools.lru_cache(maxsize=None)
  def best(i, j):  # fewest replacements aligning a[i:] with b[j:], or None
    if i == len(a):
      return () if j == len(b) else None
    options = []
    if j < len(b) and norm(a[i]) == norm(b[j]):
      rest = best(i + 1, j + 1)
      if rest is not None:
        options.append(rest)
    for n in range(1, 5):
      if j + n <= len(b) and explains(a[i], b[j:j + n], tags):
        rest = best(i + 1, j + n)
        if rest is not None:
          options.append(((a[i], tuple(b[j:j + n])),) + rest)
    return min(options, key=len) if options else None

  out = best(0, 0)
  assert out is not None, (
      f"{caption!r} -> {negative!r}: some change is neither a tag nor a WordNet "
      "antonym")
  return list(out)


# ----- text negatives --------------------------------------------------------------


def test_every_change_is_a_tag_or_a_wordnet_antonym():
  rng = np.random.default_rng(0)
  seen_tag = seen_antonym = 0
  for seed in range(6):
    for caption in CAPTIONS:
      negative = neg.text_negative(caption, TAGS, rng)
      assert negative != caption
      for orig, new in changes(caption, negative, TAGS):
        if " ".join(new).lower() in {t.lower() for t in TAGS} or any(
            f in {t.lower() for t in TAGS} for f in lemma_forms(new[-1])):
          seen_tag += 1
        else:
          seen_antonym += 1
  assert seen_tag > 50 and seen_antonym > 50


def _replaced_count_moments(k, p):
  """Mean and variance of #replaced among k replaceable words (forced if none)."""
  mean = k * p + (1 - p) ** k
  second = k * p * (1 - p) + (k * p) ** 2 + (1 - p) ** k
  return mean, second - mean**2


@pytest.mark.parametrize("ratio", [0.5, 0.2])
def test_replacement_rate_matches_ratio(ratio):
  rng = np.random.default_rng(123)
  observed = expected = variance = 0.0
  for caption in CAPTIONS:
    k = sum(1 for r in neg.replaceable_words(caption, TAGS) if len(r.options))
    assert k > 0, caption
    mean, var = _replaced_count_moments(k, ratio)
    for _ in range(40):
      negative = neg.text_negative(caption, TAGS, rng, ratio=ratio)
      observed += len(changes(caption, negative, TAGS))
      expected += mean
      variance += var
  # Seeded, so deterministic; 4.5 sigma keeps a correct implementation well inside.
  assert abs(observed - expected) < 4.5 * math.sqrt(variance), (observed, expected)


def test_each_content_word_is_selected_with_probability_ratio():
  caption = "A big dog sits on a small bench."
  rng = np.random.default_rng(7)
  hits = {"big": 0, "dog": 0, "sits": 0, "small": 0, "bench": 0}
  n = 400
  for _ in range(n):
    changed = {orig for orig, _ in changes(caption, neg.text_negative(
        caption, TAGS, rng, ratio=0.5), TAGS)}
    for w in hits:
      hits[w] += w in changed
  # p = 0.5 + forced share (1/5 of 0.5**5 ~ 0.006); 5 sigma of 400 draws = 0.125.
  for w, h in hits.items():
    assert abs(h / n - 0.506) < 0.125, (w, h)


def test_inflection_is_kept():
  rng = np.random.default_rng(0)
  out = {neg.text_negative("A man is sitting on a bench.", [], rng, ratio=1.0)
         for _ in range(20)}
  assert out <= {"A man is standing on a bench.", "A man is lying on a bench."}
  assert "A man is standing on a bench." in out
  out = {neg.text_negative("The bigger dog walks quickly.", [], rng, ratio=1.0)
         for _ in range(30)}
  assert out <= {"The smaller dog rides slowly.", "The littler dog rides slowly."}
  assert "The smaller dog rides slowly." in out
  assert neg.text_negative("He sat down.", [], rng, ratio=1.0) in (
      "He stood up.", "He lay up.")


def test_nouns_become_other_tags_with_number_kept():
  rng = np.random.default_rng(0)
  for _ in range(30):
    out = neg.text_negative("Two dogs near a dog.", ["dog", "tennis racket"], rng,
                            ratio=1.0)
    assert out == "Two tennis rackets near a tennis racket."


def test_article_agrees_with_the_new_word():
  rng = np.random.default_rng(0)
  assert neg.text_negative("A dog.", ["umbrella"], rng) == "An umbrella."
  assert neg.text_negative("an apple", ["car"], rng) == "a car"


def test_same_seed_same_output():
  for seed in range(5):
    a = [neg.text_negative(c, TAGS, np.random.default_rng(seed)) for c in CAPTIONS]
    b = [neg.text_negative(c, TAGS, np.random.default_rng(seed)) for c in CAPTIONS]
    assert a == b
  outs = {neg.text_negative(CAPTIONS[1], TAGS, np.random.default_rng(s))
          for s in range(10)}
  assert len(outs) > 3


def test_forced_replacement_when_none_selected():
  rng = np.random.default_rng(0)
  for caption in CAPTIONS:
    negative = neg.text_negative(caption, TAGS, rng, ratio=0.0)
    assert negative != caption
    assert len(changes(caption, negative, TAGS)) == 1


def test_make_text_negative_reports_its_decisions():
  rng = np.random.default_rng(5)
  forced_seen = 0
  for ratio in (0.5, 0.0):
    for caption in CAPTIONS:
      res = neg.make_text_negative(caption, TAGS, rng, ratio)
      assert res.caption == caption and res.text != caption
      assert len(res.selected) == len(res.candidates)
      assert [c.index for c in res.candidates] == [
          tw.index for tw in tag_caption(caption) if tw.cls in CONTENT_POS]
      drawn = [c for c, sel in zip(res.candidates, res.selected) if sel and c.options]
      replaced = [c for c, _ in res.replaced]
      if res.forced:
        forced_seen += 1
        assert not drawn and len(replaced) == 1 and replaced[0].options
      else:
        assert replaced == drawn
      assert len(changes(caption, res.text, TAGS)) == len(replaced)
      for cand, new in res.replaced:
        assert new.lower() != cand.word.lower()
  assert forced_seen >= len(CAPTIONS)  # every caption at ratio 0


@pytest.mark.parametrize("caption,tags", [
    ("This is it.", TAGS),
    ("", TAGS),
    ("  ...  !!", TAGS),
    ("A dog and a cat.", []),  # nouns only, and no tags to put in
    ("The dog.", ["dog", "dogs"]),  # the only tag is the noun itself
])
def test_nothing_replaceable_comes_back_unchanged(caption, tags):
  rng = np.random.default_rng(0)
  assert neg.text_negative(caption, tags, rng, ratio=1.0) == caption


def test_punctuation_whitespace_and_capitals_are_kept():
  rng = np.random.default_rng(3)
  caption = "  Sitting, the man ;  smiles slowly!! "
  for _ in range(20):
    out = neg.text_negative(caption, ["cat"], rng, ratio=1.0)
    assert out.startswith("  ") and out.endswith("!! ")
    assert re.sub(r"[^\W_]+", "", out) == re.sub(r"[^\W_]+", "", caption)
    assert out.split()[0][0].isupper()
  assert neg.text_negative("Quickly.", [], rng) == "Slowly."


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan")])
def test_bad_ratio(ratio):
  with pytest.raises(ValueError, match="ratio"):
    neg.text_negative("A dog.", TAGS, np.random.default_rng(0), ratio=ratio)


def test_bad_arguments():
  rng = np.random.default_rng(0)
  with pytest.raises(TypeError, match="Generator"):
    neg.text_negative("A dog.", TAGS, np.random.RandomState(0))
  with pytest.raises(TypeError, match="sequence of tag strings"):
    neg.text_negative("A dog.", "dog cat", rng)
  with pytest.raises(TypeError, match="caption"):
    neg.text_negative(None, TAGS, rng)


@settings(max_examples=150, deadline=None)
@given(st.text(), st.lists(st.text(max_size=12), max_size=5),
       st.floats(0, 1), st.integers(0, 2**32 - 1))
def test_never_crashes_on_arbitrary_text(text, tags, ratio, seed):
  out = neg.text_negative(text, tags, np.random.default_rng(seed), ratio)
  assert isinstance(out, str)


VOCAB = ["a", "an", "the", "dog", "dogs", "is", "running", "sat", "big", "bigger",
         "quickly", "up", "down", "in", "front", "of", "and", "white", "black",
         "Man", "women", "happy", "t-shirt", "man's", "'s", ".", ",", "!", "open"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(VOCAB), max_size=15), st.integers(0, 2**32 - 1))
def test_word_soup_changes_are_valid(ws, seed):
  caption = " ".join(ws)
  out = neg.text_negative(caption, TAGS, np.random.default_rng(seed))
  assert isinstance(out, str)
  replaceable = any(len(r.options) for r in neg.replaceable_words(caption, TAGS))
  assert (out != caption) == replaceable
  changes(caption, out, TAGS)
