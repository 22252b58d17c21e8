"""Part-of-speech tagging of captions, by rules over lexicons: tokens, classes, lemmas.

The text hard negatives (`negatives.py`) replace a caption's nouns, verbs, adjectives
and adverbs, so they need each word's class and lemma; the image negatives
(`image_negatives.py`) match object tags to caption words by noun lemma. Both read
them here, one lexicon memoised per word.

Part of speech is tagged offline without a trained tagger (none ships offline here):
a small closed-class lexicon (determiners, pronouns, prepositions, auxiliaries, ...)
decides function words; for content words, the candidate classes come from WordNet and
lemminflect's lexicons, weighted by WordNet's SemCor sense counts, then adjusted by a
handful of context rules suited to captions ("a red shirt": adjective before a noun,
"is sitting": verb after "is", "runs quickly": adverb in -ly, ...). `tag_caption`
shows the decisions. See benchmarks/text_negative_rate.py for figures on Flickr8k.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import threading

import lemminflect

from vldeformer_jax.wordnet import get_wordnet

CONTENT_POS: tuple[str, ...] = ("NOUN", "VERB", "ADJ", "ADV")
_WN_POS = {"NOUN": "n", "VERB": "v", "ADJ": "a", "ADV": "r"}

# Serialises WordNet reads (here and in `negatives.antonyms`): the reader seeks in
# shared file handles. Lookups are memoised per word, so the lock is taken once per
# distinct word.
_WN_LOCK = threading.RLock()


# Tokens.

# A word: letters, optionally hyphen-joined ("t-shirt"), optionally with a clitic
# ("man's", "don't"), which is kept as a suffix and never replaced.
_LETTERS = r"[^\W\d_]+"
_WORD_RE = re.compile(rf"({_LETTERS}(?:-{_LETTERS})*)((?:['\u2019]{_LETTERS})?)")


@dataclasses.dataclass(frozen=True)
class Token:
  """A piece of the caption: a word (`stem` + clitic `suffix`) or anything else."""

  text: str
  is_word: bool
  stem: str = ""
  suffix: str = ""


def tokenize(text: str) -> list[Token]:
  """Splits text into word tokens and the exact text between them (kept verbatim)."""
  tokens: list[Token] = []
  pos = 0
  for m in _WORD_RE.finditer(text):
    if m.start() > pos:
      tokens.append(Token(text[pos:m.start()], False))
    tokens.append(Token(m.group(0), True, m.group(1), m.group(2)))
    pos = m.end()
  if pos < len(text):
    tokens.append(Token(text[pos:], False))
  return tokens


# Closed-class lexicon: function words are never replaced and give context.

_CLOSED: dict[str, str] = {}


def _closed(kind: str, words: str) -> None:
  for w in words.split():
    _CLOSED.setdefault(w, kind)


# "many", "few", "several", "other", "much" are left open: WordNet tags them as
# adjectives, some with antonyms ("many" <-> "few").
_closed("DET", "a an the this that these those another each every some any no both "
        "either neither all most such what which whose")
_closed("POSS", "his her its their our my your")
_closed("NUM", "one two three four five six seven eight nine ten eleven twelve "
        "thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty thirty "
        "forty fifty hundred thousand dozen dozens hundreds thousands")
_closed("PRON", "i me we us you he him she it they them myself yourself himself "
        "herself itself ourselves themselves someone somebody something everyone "
        "everybody everything anyone anybody anything nobody nothing none who whom "
        "whoever mine yours hers ours theirs")
_closed("BE", "is are was were be been being am")
_closed("HAVE", "has have had having")
_closed("DO", "do does did")  # "doing a trick", "done" stay open (main verbs)
_closed("MODAL", "will would can could may might must shall should")
_closed("TO", "to")
_closed("PREP", "about above across after against along alongside amid amidst among "
        "around as at atop before behind below beneath beside besides between beyond "
        "by despite down during except for from in inside into like near nearby of "
        "off on onto opposite out outside over past per round since than through "
        "throughout till toward towards under underneath until up upon via with "
        "within without")
_closed("CONJ", "and or but nor so yet while whilst because although though if "
        "whether then when where whereas once unless")
_closed("OTHER", "not there how why etc")
# Adverbs that only modify ("very small"): tagged ADV without scoring.
_PLAIN_ADVERBS = frozenset(
    "very too also just only even ever still really quite rather almost nearly "
    "together".split())
_closed("MODAL", "cannot")

# Prepositions that also work as adverbial particles ("sits down", "runs outside").
# They are adverbs when no noun phrase follows, else prepositions.
_PARTICLES = frozenset(
    "up down out off in on inside outside over around away back along through "
    "together behind ahead above below across underneath nearby".split())
# Particles that stay adverbs before an -ing verb ("sits outside reading").
_CLAUSE_PARTICLES = frozenset(
    "up down out off inside outside away back around over nearby".split())
# Plural nouns that are their own lemma.
_PLURAL_NOUNS = frozenset(("people", "police", "cattle"))
# Fixed phrases whose words are function words here ("in front of", "next to").
_FIXED_PHRASES: tuple[tuple[str, ...], ...] = (
    ("in", "front", "of"), ("on", "top", "of"), ("out", "of"), ("next", "to"),
    ("ahead", "of"), ("instead", "of"), ("because", "of"), ("each", "other"),
    ("one", "another"), ("kind", "of"), ("sort", "of"), ("a", "lot", "of"),
    ("lots", "of"), ("a", "couple", "of"), ("a", "bunch", "of"), ("at", "least"),
)
_PHRASES_BY_FIRST: dict[str, list[tuple[str, ...]]] = {}
for _phrase in _FIXED_PHRASES:
  _PHRASES_BY_FIRST.setdefault(_phrase[0], []).append(_phrase)
_NOUN_PHRASE_STARTERS = frozenset(("DET", "POSS", "NUM", "PRON"))


# Open-class lexicon: WordNet + lemminflect, memoised per word.


@dataclasses.dataclass(frozen=True)
class _Lex:
  """What the lexicons say about one lower-cased word form."""

  # POS -> (lemma, SemCor count summed over the lemma's senses).
  cands: tuple[tuple[str, str, int], ...]
  # Penn tags this form has as a verb / noun / adjective / adverb inflection.
  verb_tags: frozenset[str]
  noun_plural: bool
  adj_tags: frozenset[str]

  def has(self, pos: str) -> bool:
    return any(p == pos for p, _, _ in self.cands)

  def lemma(self, pos: str) -> str | None:
    for p, lemma, _ in self.cands:
      if p == pos:
        return lemma
    return None


def _inflection_tags(word: str, lemma: str, upos: str) -> frozenset[str]:
  forms = dict(lemminflect.getAllInflections(lemma, upos=upos))
  if not forms:
    forms = dict(lemminflect.getAllInflectionsOOV(lemma, upos=upos))
  if upos == "VERB" and "VBN" not in forms and "VBD" in forms:
    forms["VBN"] = forms["VBD"]  # regular verbs: lemminflect lists the form once
  return frozenset(tag for tag, words in forms.items() if word in words)


@functools.lru_cache(maxsize=1)
def _sense_counts() -> dict[tuple[str, str], int]:
  """SemCor tag counts summed per (lemma, WordNet POS), from WordNet's cntlist.rev.

  The same numbers as summing `Lemma.count()` over a lemma's senses, read once
  instead of one binary search per lemma. Empty when the file is missing.
  """
  ss_pos = {"1": "n", "2": "v", "3": "a", "4": "r", "5": "a"}
  counts: dict[tuple[str, str], int] = {}
  wn = get_wordnet()
  try:
    with _WN_LOCK, wn.open("cntlist.rev") as f:
      for line in f:
        fields = line.split()
        if len(fields) != 3 or "%" not in fields[0]:
          continue
        lemma, rest = fields[0].split("%", 1)
        key = (lemma, ss_pos.get(rest[:1], "?"))
        counts[key] = counts.get(key, 0) + int(fields[2])
  except (OSError, ValueError):
    return {}
  return counts


_OOV_ADJ_SUFFIXES = ("less", "ful", "ous", "ish", "able", "ible", "ive")


def _guess_oov(word: str) -> tuple[str, str, int]:
  """A class for a word neither lexicon knows ("shirtless", "wetsuit"), by suffix.

  Unknown words in captions are mostly nouns; lemminflect's rules give the lemma.
  They have no WordNet antonyms, so only OOV nouns can be replaced (by a tag).
  """
  if word.endswith(_OOV_ADJ_SUFFIXES):
    return ("ADJ", word, 0)
  if word.endswith("ly"):
    return ("ADV", word, 0)
  if word.endswith(("ing", "ed")):
    lemma = lemminflect.getLemma(word, upos="VERB", lemmatize_oov=True)
    return ("VERB", (lemma[0] if lemma else word).lower(), 0)
  lemma = lemminflect.getLemma(word, upos="NOUN", lemmatize_oov=True)
  return ("NOUN", (lemma[0] if lemma else word).lower(), 0)


@functools.lru_cache(maxsize=200_000)
def _lex(word: str) -> _Lex:
  """Candidate classes, lemmas and prior counts of a lower-cased word."""
  wn = get_wordnet()
  cands: list[tuple[str, str, int]] = []
  li = lemminflect.getAllLemmas(word)
  for pos in CONTENT_POS:
    p = _WN_POS[pos]
    with _WN_LOCK:
      base = wn.morphy(word, p)
      if pos in ("ADJ", "ADV") and pos in li and li[pos][0].lower() != word:
        # WordNet lists some comparatives as lemmas ("bigger"); the base form is
        # the one with the antonyms, and the inflection goes back on afterwards.
        alt = li[pos][0].lower()
        if wn.morphy(alt, p) == alt:
          base = alt
    if base is None and pos in li:
      base = li[pos][0].lower()
    if base is not None:
      cands.append((pos, base, _sense_counts().get((base, p), 0)))
  if not cands and word.isalpha() and len(word) > 2:
    cands.append(_guess_oov(word))
  verb = next((lem for p, lem, _ in cands if p == "VERB"), None)
  noun = next((lem for p, lem, _ in cands if p == "NOUN"), None)
  adj = next((lem for p, lem, _ in cands if p == "ADJ"), None)
  verb_tags = _inflection_tags(word, verb, "VERB") if verb else frozenset()
  noun_plural = bool(noun) and noun != word and "NNS" in _inflection_tags(
      word, noun, "NOUN")
  adj_tags = _inflection_tags(word, adj, "ADJ") if adj else frozenset()
  return _Lex(tuple(cands), verb_tags, noun_plural, adj_tags)


@functools.lru_cache(maxsize=100_000)
def _noun_lemma(word: str) -> str:
  """A lower-cased word's noun lemma, or the word itself when it has none."""
  if not _WORD_RE.fullmatch(word):
    return word
  return _lex(word).lemma("NOUN") or word


# Tagging.

_SENTENCE_END = re.compile(r"[.!?]")
_CLAUSE_BREAK = re.compile(r"[,;:()\[\]\"]|[.!?]")
_APOSTROPHE_END = re.compile(r"['\u2019]\s*$")
_FINITE = frozenset(("VBZ", "VBD", "VBG", "VBN", "VBP"))


@dataclasses.dataclass(frozen=True)
class TaggedWord:
  """A word token with its class (a content POS, or a closed class, or PROPN)."""

  index: int  # position in the token list
  word: str  # the word as written (without clitic)
  # NOUN/VERB/ADJ/ADV; a closed class (DET, POSS, NUM, PRON, BE, HAVE, DO, MODAL,
  # TO, PREP, CONJ, OTHER); FIXED (part of "in front of", ...); or PROPN.
  cls: str
  lemma: str  # lower-cased lemma for content words, the lower-cased word otherwise


def _closed_class(lower: str) -> str | None:
  return _CLOSED.get(lower)


def _next_kind(lower_words: list[str], i: int, boundary_after: list[bool]) -> str:
  """What follows word i: END, a closed class, or OPEN (an open-class word)."""
  if boundary_after[i] or i + 1 >= len(lower_words):
    return "END"
  return _closed_class(lower_words[i + 1]) or "OPEN"


def _score(lex: _Lex, pos: str, prev: str, before_conj: str | None, nxt: str,
           next_lex: _Lex | None, word: str, after_conj: _Lex | None,
           verb_forms: set[str]) -> float:
  """Log-score of `pos` for a word: SemCor prior plus caption context rules."""
  counts = {p: c for p, _, c in lex.cands}
  total = sum(counts.values()) + 0.5 * len(counts)
  s = math.log((counts[pos] + 0.5) / total)
  # Can the next word go on with a noun phrase ("white quilted jacket")?
  next_noun = next_lex is not None and (
      next_lex.has("NOUN") or next_lex.has("ADJ") or "VBN" in next_lex.verb_tags)
  vbg_vbn = bool(lex.verb_tags & {"VBG", "VBN"})
  if prev in ("DET", "POSS", "NUM", "ADJ", "PREP"):
    # Inside a noun phrase. A bare word after a preposition is often a colour
    # adjective used as a noun phrase ("in white"): no noun bonus there.
    end_bonus = 0.0 if prev == "PREP" else 1.5
    if pos == "VERB":
      if prev == "PREP" and "VBG" in lex.verb_tags and not next_noun:
        s += 0.0  # "after swimming"
      elif vbg_vbn and next_noun and not lex.has("ADJ"):
        s -= 1.0  # "a running dog": a participle used as a modifier
      else:
        s -= 6.0
    elif pos == "ADJ":
      s += 1.5 if next_noun else -0.5
    elif pos == "NOUN":
      s += 0.5 if next_noun or nxt == "CONJ" else end_bonus
    elif pos == "ADV":
      s -= 2.0
  elif prev == "BE":
    if pos == "VERB":
      s += 3.0 if vbg_vbn else -1.0
    elif pos == "ADJ":
      s += 1.5
    elif pos == "NOUN":
      s -= 1.0
  elif prev == "HAVE":
    if pos == "VERB" and "VBN" in lex.verb_tags:
      s += 2.0
  elif prev in ("MODAL", "DO", "TO"):
    if pos == "VERB" and ("VB" in lex.verb_tags or word == lex.lemma("VERB")):
      s += 2.5
  elif prev in ("NOUN", "NOUNS", "PRON", "PROPN"):
    if pos == "VERB" and lex.verb_tags & (_FINITE - {"VBP"}):
      s += 1.5  # "a dog runs", "a man sitting"
    elif pos == "VERB" and "VBP" in lex.verb_tags:
      # "dogs play" / "they play"; after a singular noun a base form is the head of
      # a compound ("a water slide"), since the verb would read "slides".
      s += 1.5 if prev in ("NOUNS", "PRON") else -1.5
    elif pos == "ADJ":
      s -= 0.5
  elif prev == "VERB":
    if pos == "ADV":
      s += 1.0
    elif pos == "VERB":
      s -= 1.0
    elif pos in ("NOUN", "ADJ"):
      s += 0.5
  elif prev == "ADV":
    if pos == "ADJ":
      s += 1.0  # "very small"
  elif prev in ("START", "CONJ"):
    if pos == "VERB":
      s += 0.0 if "VBG" in lex.verb_tags else -1.0
    elif pos == "ADJ" and next_noun:
      s += 0.5
  if (prev == "CONJ" and pos == "VERB"
      and lex.verb_tags & verb_forms & {"VBZ", "VBD", "VBG"}):
    s += 2.0  # "holds a racket and smiles": a verb form already used in the sentence
  if before_conj is not None and pos == before_conj and nxt != "OPEN":
    s += 1.5  # coordination of single words: "runs and jumps", "black and white"
  if nxt in ("DET", "POSS", "PRON", "NUM"):
    s += 1.5 if pos == "VERB" else (-0.5 if pos == "NOUN" else 0.0)
  elif nxt == "BE":
    s += 1.0 if pos == "NOUN" else (-2.0 if pos == "VERB" else 0.0)
  elif nxt == "CONJ" and after_conj is not None and after_conj.cands and pos == max(
      after_conj.cands, key=lambda c: c[2])[0]:
    s += 1.0  # "white and brown puppies": conjuncts share their class
  if next_lex is not None and _verb_share(next_lex) >= 0.5 and (
      next_lex.verb_tags & {"VBZ", "VBD", "VBG"}):
    # A clear verb follows ("pajama pants jumps", "girls participating"): this
    # word most likely ends the subject noun phrase.
    s += 1.0 if pos == "NOUN" else (-1.0 if pos == "VERB" else 0.0)
  if pos == "ADV" and word.endswith("ly"):
    s += 2.0
  return s


def _starts_clause(particle: str, word: str) -> bool:
  """True for a clear -ing verb after an adverb ("sits outside reading")."""
  if particle not in _CLAUSE_PARTICLES:
    return False  # "in swimming trunks"
  lex = _lex(word)
  return "VBG" in lex.verb_tags and _verb_share(lex) >= 0.5


def _verb_share(lex: _Lex) -> float:
  """Share of a word's SemCor counts (smoothed) that are verb senses."""
  counts = {p: c + 0.5 for p, _, c in lex.cands}
  return counts.get("VERB", 0.0) / sum(counts.values()) if counts else 0.0


def tag_caption(caption: str) -> list[TaggedWord]:
  """Tags every word token of a caption (see the module docstring for the method)."""
  return _tag_tokens(tokenize(caption))


def _tag_tokens(tokens: list[Token]) -> list[TaggedWord]:
  """`tag_caption` on an already tokenised caption."""
  word_idx = [i for i, t in enumerate(tokens) if t.is_word]
  words = [tokens[i].stem for i in word_idx]
  lowers = [w.lower() for w in words]
  n = len(words)
  # Punctuation between two words breaks the context (a clause boundary); . ! ?
  # start a new sentence. Plain whitespace (the common case) does neither.
  boundary_after = [False] * n
  sentence_start = [k == 0 for k in range(n)]
  for k in range(n - 1):
    if word_idx[k + 1] - word_idx[k] > 2 or not tokens[word_idx[k] + 1].text.isspace():
      between = "".join(t.text for t in tokens[word_idx[k] + 1:word_idx[k + 1]])
      boundary_after[k] = bool(_CLAUSE_BREAK.search(between))
      sentence_start[k + 1] = bool(_SENTENCE_END.search(between))
  fixed = [False] * n
  for k in range(n):
    for phrase in _PHRASES_BY_FIRST.get(lowers[k], ()):
      m = len(phrase)
      if tuple(lowers[k:k + m]) == phrase and not any(boundary_after[k:k + m - 1]):
        fixed[k:k + m] = [True] * m
  out: list[TaggedWord] = []
  verb_forms: set[str] = set()  # inflections of the verbs seen in this sentence
  prev = "START"
  before_conj: str | None = None
  for k, (word, lower) in enumerate(zip(words, lowers)):
    nxt = _next_kind(lowers, k, boundary_after)
    closed = _closed_class(lower)
    cls: str
    lemma = lower
    if fixed[k]:
      cls = "FIXED"
    elif tokens[word_idx[k]].suffix.lower() in ("'t", "\u2019t"):
      cls = "OTHER"  # the host of a negation clitic ("don't", "isn't")
    elif lower in _PLAIN_ADVERBS:
      cls = "ADV"
    elif (lower in _PARTICLES and nxt not in _NOUN_PHRASE_STARTERS
          and prev not in ("DET", "POSS", "ADJ", "NUM")
          and (nxt != "OPEN" or _starts_clause(lower, lowers[k + 1]))):
      lex = _lex(lower)
      cls = "ADV" if lex.has("ADV") else (closed or "PREP")
      if cls == "ADV":
        lemma = lex.lemma("ADV") or lower
    elif closed is not None:
      cls = closed
    elif "-" in lower and not _lex(lower).cands:
      cls = "OTHER"  # an unknown compound ("tri-colored"): left alone
    elif (word[:1].isupper() and not sentence_start[k] and not word.isupper()
          and prev != "START" and not (_lex(lower).has("ADJ") and nxt == "OPEN"
                                       and _lex(lowers[k + 1]).has("NOUN"))):
      cls = "PROPN"  # "a Blitz hat": a name, not a replaceable noun
    elif len(lower) < 2:
      cls = "OTHER"
    else:
      lex = _lex(lower)
      if not lex.cands:
        cls = "OTHER"
      else:
        next_lex = _lex(lowers[k + 1]) if nxt == "OPEN" else None
        after_conj = (_lex(lowers[k + 2]) if nxt == "CONJ" and k + 2 < n
                      and not boundary_after[k + 1]
                      and _closed_class(lowers[k + 2]) is None else None)
        scores = {p: _score(lex, p, prev, before_conj, nxt, next_lex, lower,
                            after_conj, verb_forms) for p, _, _ in lex.cands}
        cls = max(CONTENT_POS, key=lambda p: scores.get(p, -math.inf))
        lemma = lex.lemma(cls) or lower
    out.append(TaggedWord(word_idx[k], word, cls, lemma))
    if cls == "VERB":
      verb_forms.update(_lex(lower).verb_tags)
    if k + 1 < n and sentence_start[k + 1]:
      verb_forms.clear()
    possessive = bool(tokens[word_idx[k]].suffix) or (
        k + 1 < n and lowers[k + 1] == "s" and _APOSTROPHE_END.search(
            tokens[word_idx[k + 1] - 1].text) is not None)
    if cls == "OTHER" and lower == "s" and k > 0 and _APOSTROPHE_END.search(
        tokens[word_idx[k] - 1].text):
      prev, before_conj = "POSS", None  # "man 's hat" (pre-tokenised captions)
    elif boundary_after[k] or possessive:
      prev, before_conj = "START", None
      if possessive and cls in ("NOUN", "PROPN", "PRON"):
        prev = "POSS"  # "the man's hat": a possessive works like a determiner
    elif cls == "CONJ":
      before_conj = out[-2].cls if len(out) > 1 and out[-2].cls in CONTENT_POS else None
      prev = "CONJ"
    else:
      prev = "PREP" if cls == "FIXED" else cls
      if cls == "NOUN" and (lower in _PLURAL_NOUNS or _lex(lower).noun_plural):
        prev = "NOUNS"
      before_conj = None if cls != "CONJ" else before_conj
  return out
