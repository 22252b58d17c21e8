"""Part-of-speech tagging of captions (the rule-based tagger the negatives use)."""

from vldeformer_jax import pos_tagger


def test_pos_of_hand_tagged_captions():
  expected = {
      "A little girl in a pink dress is climbing up a set of stairs.": {
          "little": "ADJ", "girl": "NOUN", "pink": "ADJ", "dress": "NOUN",
          "climbing": "VERB", "set": "NOUN", "stairs": "NOUN"},
      "Two dogs play in the water.": {"dogs": "NOUN", "play": "VERB",
                                      "water": "NOUN"},
      "A black and white dog runs quickly.": {
          "black": "ADJ", "white": "ADJ", "dog": "NOUN", "runs": "VERB",
          "quickly": "ADV"},
      "The man sits down on a park bench.": {
          "man": "NOUN", "sits": "VERB", "down": "ADV", "park": "NOUN",
          "bench": "NOUN"},
      "A boy wearing a red shirt jumps into the pool.": {
          "boy": "NOUN", "wearing": "VERB", "red": "ADJ", "shirt": "NOUN",
          "jumps": "VERB", "pool": "NOUN"},
      "A woman in front of a building.": {"woman": "NOUN", "front": "FIXED",
                                           "building": "NOUN"},
  }
  for caption, want in expected.items():
    got = {tw.word: tw.cls for tw in pos_tagger.tag_caption(caption)}
    for word, pos in want.items():
      assert got[word] == pos, (caption, word, got[word])
