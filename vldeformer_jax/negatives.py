"""Text hard negatives (VLDeformer Sec. 3.4), as pure functions of an explicit rng.

Verbs, nouns, adjectives and adverbs of a caption are each selected with probability
`ratio` (0.5 in the paper); a selected noun becomes a random object tag, a selected
verb, adjective or adverb becomes a WordNet antonym, inflected like the word it
replaces ("is sitting" -> "is standing", "bigger" -> "smaller"). A word with no
replacement stays; when nothing was replaced but something could be, one replaceable
word is replaced anyway, so a negative never equals its positive (it would be a false
negative in the contrastive loss).

Two steps, so the costly one can run once per caption, ahead of training
(`data/prepared.py`): `caption_template` (tagging, antonyms, inflection) then
`fill_text_negative` (the draws, the tags of the moment). `text_negative` runs both.

The words' classes and lemmas come from `pos_tagger.py`; the image negatives (object
swaps) are `image_negatives.py`, which shares the argument checks at the end of this
module.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Literal

import lemminflect
import numpy as np

from vldeformer_jax.pos_tagger import (_WN_LOCK, _WN_POS, TaggedWord, _Lex, _lex,
                                       _noun_lemma, _tag_tokens, tag_caption, tokenize)
from vldeformer_jax.wordnet import get_wordnet


# Replacements.


@functools.lru_cache(maxsize=100_000)
def antonyms(lemma: str, pos: str) -> tuple[str, ...]:
  """WordNet antonyms of a lemma in its most frequent sense that has any.

  Senses come in WordNet's frequency order; the first one with antonyms wins, which
  avoids rare-sense antonyms ("stand" -> "sit", not "yield"). For verbs and adverbs
  the antonyms are the lemma's own antonym pointers. For adjectives they are those
  of every lemma of the sense's synset: adjective synsets are tight clusters
  ("big" shares large.a.01 with "large", so it gets "small" as well as "little"),
  while verb synsets are loose ("run" shares a synset with "function", whose
  antonym "malfunction" would be a poor one). Multiword antonyms come with spaces
  ("let go of"). Returns () when there are none.
  """
  if pos not in ("VERB", "ADJ", "ADV"):
    raise ValueError(f"antonyms are looked up for VERB/ADJ/ADV, got {pos!r}")
  wn = get_wordnet()
  p = _WN_POS[pos]
  with _WN_LOCK:
    for synset in wn.synsets(lemma, p):
      if not any(lem.name().lower() == lemma for lem in synset.lemmas()):
        continue  # reached through morphology, not a sense of this lemma
      found: list[str] = []
      for lem in synset.lemmas():
        if pos != "ADJ" and lem.name().lower() != lemma:
          continue
        for ant in lem.antonyms():
          name = ant.name().replace("_", " ")
          if name.lower() != lemma and name not in found:
            found.append(name)
      if found:
        return tuple(found)
  return ()


def _verb_tag(tagged: TaggedWord, lex: _Lex, prev_cls: str | None) -> str:
  tags = lex.verb_tags
  if not tags or tagged.word.lower() == tagged.lemma:
    return "VB"
  for tag in ("VBG", "VBZ"):
    if tag in tags:
      return tag
  if "VBN" in tags and ("VBD" not in tags or prev_cls in ("BE", "HAVE")):
    return "VBN"
  return "VBD" if "VBD" in tags else sorted(tags)[0]


@functools.lru_cache(maxsize=100_000)
def _inflect(lemma: str, tag: str, head: Literal["first", "last"]) -> str:
  """Inflects the head word of a (possibly multiword) lemma with a Penn tag."""
  parts = lemma.split(" ")
  k = 0 if head == "first" else len(parts) - 1
  forms = lemminflect.getInflection(parts[k], tag=tag)
  if forms:
    parts[k] = forms[0]
  return " ".join(parts)


def _match_case(original: str, new: str) -> str:
  """Gives `new` the capitalisation of `original` (all caps, or a capital first)."""
  if len(original) > 1 and original.isupper():
    return new.upper()
  if original[:1].isupper():
    return new[:1].upper() + new[1:]
  return new


def _tag_lemma(tag: str) -> str:
  """A lower-cased tag with its last word reduced to a noun lemma ("dogs" -> "dog")."""
  words = tag.lower().split()
  if not words:
    return ""
  words[-1] = _noun_lemma(words[-1])
  return " ".join(words)


class _TagChoices(Sequence[str]):
  """The tags of a pool minus those with one lemma, as a lazy sequence."""

  def __init__(self, tags: tuple[str, ...], excluded: tuple[int, ...]):
    self._tags = tags
    self._excluded = excluded  # sorted pool indices left out

  def __len__(self) -> int:
    return len(self._tags) - len(self._excluded)

  def __getitem__(self, k):  # type: ignore[override]
    if isinstance(k, slice):
      return [self[j] for j in range(*k.indices(len(self)))]
    if not -len(self) <= k < len(self):
      raise IndexError(k)
    k %= len(self)
    for e in self._excluded:  # step over the excluded indices, in order
      if e <= k:
        k += 1
      else:
        break
    return self._tags[k]


@dataclasses.dataclass(frozen=True)
class _TagPool:
  tags: tuple[str, ...]
  by_lemma: dict[str, tuple[int, ...]]

  def without(self, lemma: str) -> _TagChoices:
    return _TagChoices(self.tags, self.by_lemma.get(lemma, ()))


@functools.lru_cache(maxsize=64)
def _tag_pool_cached(object_tags: tuple[str, ...]) -> _TagPool:
  tags: list[str] = []
  by_lemma: dict[str, list[int]] = {}
  for tag in object_tags:
    if not isinstance(tag, str):
      raise TypeError(f"object tags must be strings, got {type(tag).__name__}")
    clean = " ".join(tag.split())
    if clean:
      by_lemma.setdefault(_tag_lemma(clean), []).append(len(tags))
      tags.append(clean)
  return _TagPool(tuple(tags), {k: tuple(v) for k, v in by_lemma.items()})


def _tag_pool(object_tags: Sequence[str]) -> _TagPool:
  if isinstance(object_tags, str):
    raise TypeError("object_tags must be a sequence of tag strings, not one string")
  try:
    return _tag_pool_cached(tuple(object_tags))
  except TypeError as e:
    if "unhashable" in str(e):
      raise TypeError("object tags must be strings") from e
    raise


@dataclasses.dataclass(frozen=True)
class Replacement:
  """A content word of a caption and what `text_negative` may put in its place."""

  index: int  # token index in `tokenize(caption)`
  word: str
  pos: str  # NOUN, VERB, ADJ or ADV
  lemma: str
  # Replacement texts before inflection: the object tags other than the noun
  # (compared by lemma), or the WordNet antonyms. Empty: cannot be replaced.
  options: Sequence[str]


def _replacements(tagged: list[TaggedWord], pool: _TagPool) -> list[Replacement]:
  out = []
  for tw in tagged:
    if tw.cls == "NOUN":
      options: Sequence[str] = pool.without(tw.lemma)
    elif tw.cls in ("VERB", "ADJ", "ADV"):
      options = antonyms(tw.lemma, tw.cls)
    else:
      continue
    out.append(Replacement(tw.index, tw.word, tw.cls, tw.lemma, options))
  return out


def replaceable_words(caption: str, object_tags: Sequence[str]) -> list[Replacement]:
  """The content words of a caption (nouns, verbs, adjectives, adverbs), in order.

  `text_negative` selects each with probability `ratio`; one with empty `options`
  stays as it is when selected (no other tag, or no antonym).
  """
  return _replacements(tag_caption(caption), _tag_pool(object_tags))


def _render(tw: TaggedWord, pos: str, choice: str, prev_cls: str | None) -> str:
  """The replacement text for a verb, adjective or adverb: inflected like the word it
  replaces, with its capitalisation (nouns: `_render_noun`, as their text comes from
  the tags only when the negative is drawn)."""
  lex = _lex(tw.word.lower())
  if pos == "VERB":
    tag = _verb_tag(tw, lex, prev_cls)
    text = choice if tag == "VB" else _inflect(choice, tag, "first")
  elif pos == "ADJ":
    tag = next((t for t in ("JJR", "JJS") if t in lex.adj_tags), None)
    text = _inflect(choice, tag, "last") if tag and " " not in choice else choice
  else:
    text = choice
  return _match_case(tw.word, text)


def _render_noun(word: str, plural: bool, tag: str) -> str:
  """A tag in place of a noun: pluralised when the noun was, with its capitalisation."""
  return _match_case(word, _inflect(tag, "NNS", "last") if plural else tag)


def _fix_article(tokens: list[str], word_index: int, new_word: str,
                 is_word: list[bool]) -> None:
  """Makes an "a"/"an" right before a replaced word agree with the new word."""
  k = word_index - 1
  if k >= 0 and not is_word[k] and tokens[k].isspace():
    k -= 1
  if k < 0 or not is_word[k] or tokens[k].lower() not in ("a", "an"):
    return
  article = "an" if new_word[:1].lower() in "aeiou" else "a"
  if tokens[k].lower() != article:
    tokens[k] = _match_case(tokens[k], article) if tokens[k][:1].isupper() else article


@dataclasses.dataclass(frozen=True)
class TextNegative:
  """A text hard negative with the decisions that made it.

  `candidates` are the caption's content words (see `replaceable_words`),
  `selected[k]` whether candidate k was drawn for replacement, `forced` whether
  nothing drawn was replaceable so one replaceable word was taken anyway, and
  `replaced` the (candidate, new text) pairs in caption order.
  """

  caption: str
  text: str
  candidates: tuple[Replacement, ...]
  selected: tuple[bool, ...]
  forced: bool
  replaced: tuple[tuple[Replacement, str], ...]


@dataclasses.dataclass(frozen=True)
class Slot:
  """A content word of a caption and everything a negative needs to replace it.

  Nouns take a tag drawn when the negative is made (`plural` says whether to
  pluralise it); verbs, adjectives and adverbs take an antonym, and `rendered[k]` is
  `antonyms[k]` already inflected and cased like the word.
  """

  index: int  # token index in `tokenize(caption)`
  word: str
  pos: str  # NOUN, VERB, ADJ or ADV
  lemma: str
  suffix: str  # the word's clitic ("'s"), kept after a replacement
  plural: bool = False
  antonyms: tuple[str, ...] = ()
  rendered: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class CaptionTemplate:
  """A caption analysed for text negatives: its tokens and replaceable words (slots).

  The costly part of `make_text_negative` (tagging, WordNet antonyms, inflection) is a
  function of the caption alone, so a template can be made once per caption (in
  another process, stored with the data) and filled for each negative with the rng
  and the tags of the moment: `fill_text_negative(caption_template(c), tags, rng)`
  is `make_text_negative(c, tags, rng)`, draw for draw. `to_json`/`from_json` store it.
  """

  caption: str
  tokens: tuple[str, ...]
  is_word: tuple[bool, ...]
  slots: tuple[Slot, ...]

  def to_json(self) -> list:
    return [self.caption, list(self.tokens), [int(w) for w in self.is_word],
            [[t.index, t.word, t.pos, t.lemma, t.suffix, int(t.plural),
              list(t.antonyms), list(t.rendered)] for t in self.slots]]

  @classmethod
  def from_json(cls, data: list) -> "CaptionTemplate":
    caption, tokens, is_word, slots = data
    return cls(caption, tuple(tokens), tuple(bool(w) for w in is_word), tuple(
        Slot(i, w, pos, lemma, suffix, bool(plural), tuple(ants), tuple(rendered))
        for i, w, pos, lemma, suffix, plural, ants, rendered in slots))


def caption_template(caption: str) -> CaptionTemplate:
  """Tags a caption and looks up what each content word may become (see `Slot`)."""
  if not isinstance(caption, str):
    raise TypeError(f"caption must be a str, got {type(caption).__name__}")
  tokens = tokenize(caption)
  tagged = _tag_tokens(tokens)
  slots = []
  prev_cls: str | None = None
  for tw in tagged:
    if tw.cls == "NOUN":
      slots.append(Slot(tw.index, tw.word, "NOUN", tw.lemma, tokens[tw.index].suffix,
                        plural=_lex(tw.word.lower()).noun_plural))
    elif tw.cls in ("VERB", "ADJ", "ADV"):
      options = antonyms(tw.lemma, tw.cls)
      slots.append(Slot(tw.index, tw.word, tw.cls, tw.lemma, tokens[tw.index].suffix,
                        antonyms=options, rendered=tuple(
                            _render(tw, tw.cls, o, prev_cls) for o in options)))
    prev_cls = tw.cls
  return CaptionTemplate(caption, tuple(t.text for t in tokens),
                         tuple(t.is_word for t in tokens), tuple(slots))


def fill_text_negative(template: CaptionTemplate, object_tags: Sequence[str],
                       rng: np.random.Generator, ratio: float = 0.5) -> TextNegative:
  """`make_text_negative` of the template's caption: the draws and the noun tags only."""
  ratio = _check_ratio("ratio", ratio)
  _check_rng(rng)
  pool = _tag_pool(object_tags)
  caption = template.caption
  candidates = tuple(
      Replacement(t.index, t.word, t.pos, t.lemma,
                  pool.without(t.lemma) if t.pos == "NOUN" else t.antonyms)
      for t in template.slots)
  if not candidates:
    return TextNegative(caption, caption, (), (), False, ())
  selected = tuple(bool(x) for x in rng.random(len(candidates)) < ratio)
  chosen = [k for k, (c, sel) in enumerate(zip(candidates, selected))
            if sel and c.options]
  forced = False
  if not chosen:
    replaceable = [k for k, c in enumerate(candidates) if c.options]
    if not replaceable:
      return TextNegative(caption, caption, candidates, selected, False, ())
    chosen = [replaceable[int(rng.integers(len(replaceable)))]]
    forced = True
  texts = list(template.tokens)
  replaced = []
  for k in chosen:
    cand, slot = candidates[k], template.slots[k]
    pick = int(rng.integers(len(cand.options)))
    new = (_render_noun(slot.word, slot.plural, cand.options[pick])
           if slot.pos == "NOUN" else slot.rendered[pick])
    texts[cand.index] = new + slot.suffix
    _fix_article(texts, cand.index, new, template.is_word)
    replaced.append((cand, new))
  return TextNegative(caption, "".join(texts), candidates, selected, forced,
                      tuple(replaced))


def make_text_negative(caption: str, object_tags: Sequence[str],
                       rng: np.random.Generator, ratio: float = 0.5) -> TextNegative:
  """`text_negative` with its decisions (what was tagged, selected and replaced)."""
  if not isinstance(caption, str):
    raise TypeError(f"caption must be a str, got {type(caption).__name__}")
  _check_ratio("ratio", ratio)
  _check_rng(rng)
  _tag_pool(object_tags)  # Type errors before the costly tagging.
  return fill_text_negative(caption_template(caption), object_tags, rng, ratio)


def text_negative(caption: str, object_tags: Sequence[str], rng: np.random.Generator,
                  ratio: float = 0.5) -> str:
  """A hard negative caption (paper Sec. 3.4): content words swapped for wrong ones.

  Each noun, verb, adjective and adverb is selected with probability `ratio`. A
  selected noun becomes a random tag of `object_tags` other than itself (pluralised
  when the noun was plural; a tag may be several words). A selected verb, adjective
  or adverb becomes a WordNet antonym of its lemma, inflected like it. Words with no
  replacement stay. If no word got replaced but one could be, one replaceable word
  chosen by `rng` is replaced, so the result differs from the caption whenever
  possible (even with ratio 0). Whitespace, punctuation and the capitalisation of
  replaced words are kept; "a"/"an" before a replaced word follows the new word.

  Consumes `rng` deterministically: the same caption, tags, ratio and rng state give
  the same output. `make_text_negative` returns the decisions too.

  Raises:
    ValueError: `ratio` outside [0, 1].
    TypeError: a non-str caption, `object_tags` given as one string, or an `rng`
      that is not a `np.random.Generator`.
  """
  return make_text_negative(caption, object_tags, rng, ratio).text


# Argument checks, shared with image_negatives.py.


def _check_ratio(name: str, value: float) -> float:
  value = float(value)
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {value}")
  return value


def _check_rng(rng: np.random.Generator) -> None:
  if not isinstance(rng, np.random.Generator):
    raise TypeError(
        f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got "
        f"{type(rng).__name__}")
