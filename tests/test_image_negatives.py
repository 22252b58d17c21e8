"""Image hard negatives: objects (tag + region row) swapped between batch examples."""

import math

import numpy as np
import pytest

from vldeformer_jax import image_negatives as neg

VG = ["man", "woman", "dog", "cat", "tree", "car", "shirt", "ball", "tennis racket",
      "umbrella", "bench", "horse", "grass", "sky", "building", "hat"]
FEATURE_DIM = 10  # 4 identity dims + 6 box dims


def make_batch(rng, batch=6, max_objects=8):
  """Tags, and features whose rows encode (example, object, tag id) and a box."""
  captions, tags, regions = [], [], []
  for i in range(batch):
    n = int(rng.integers(0 if i == batch - 1 else 2, max_objects + 1))
    t = [VG[int(k)] for k in rng.integers(len(VG), size=n)]
    feats = np.zeros((n, FEATURE_DIM), np.float32)
    feats[:, 0] = i
    feats[:, 1] = np.arange(n)
    feats[:, 2] = [VG.index(x) for x in t]
    feats[:, 3] = 1000 * i + np.arange(n)
    feats[:, 4:] = rng.random((n, 6))
    mentioned = t[:2]
    captions.append(f"A photo of {' and '.join(mentioned) or 'nothing'} outside.")
    tags.append(t)
    regions.append(feats)
  return captions, tags, regions


def test_image_negatives_keep_objects_whole():
  rng = np.random.default_rng(0)
  for _ in range(20):
    captions, tags, regions = make_batch(rng)
    copies = [r.copy() for r in regions]
    out = neg.image_negatives(captions, tags, regions, rng)
    for i in range(len(captions)):
      assert len(out.object_tags[i]) == len(tags[i])
      assert out.regions[i].shape == regions[i].shape
      assert out.regions[i].dtype == regions[i].dtype
      for k, (tag, row) in enumerate(zip(out.object_tags[i], out.regions[i])):
        j, m = out.source[i][k]
        assert VG[int(row[2])] == tag  # tag and features stayed together
        np.testing.assert_array_equal(row, regions[j][m])  # with their box
        assert tags[j][m] == tag
        if out.replaced[i][k]:
          assert j != i  # from another example
          assert not neg.tags_in_caption(captions[i], [tag])[0]
        else:
          assert (j, m) == (i, k)
    for r, c in zip(regions, copies):  # inputs untouched
      np.testing.assert_array_equal(r, c)


def test_caption_objects_always_replaced_and_half_of_the_rest():
  rng = np.random.default_rng(1)
  rest = rest_replaced = 0
  for _ in range(60):
    captions, tags, regions = make_batch(rng)
    out = neg.image_negatives(captions, tags, regions, rng)
    for i in range(len(captions)):
      expect = neg.tags_in_caption(captions[i], tags[i])
      np.testing.assert_array_equal(out.in_caption[i], expect)
      assert out.replaced[i][expect].all()
      if len(tags[i]) >= 2:
        assert expect[:2].all()  # the first two tags are in the caption
      rest += int((~expect).sum())
      rest_replaced += int(out.replaced[i][~expect].sum())
  assert rest > 200
  assert abs(rest_replaced / rest - 0.5) < 5 * math.sqrt(0.25 / rest)


@pytest.mark.parametrize("ratio,share", [(0.0, 0.0), (1.0, 1.0)])
def test_remaining_ratio_extremes(ratio, share):
  rng = np.random.default_rng(2)
  captions, tags, regions = make_batch(rng)
  out = neg.image_negatives(captions, tags, regions, rng, remaining_ratio=ratio)
  for i in range(len(captions)):
    rest = ~out.in_caption[i]
    if rest.any():
      assert out.replaced[i][rest].mean() == share


def test_tags_in_caption_words_plurals_and_phrases():
  caption = "Two dogs play with tennis rackets near a woman's bench."
  tags = ["dog", "tennis racket", "racket", "man", "cat", "bench", "tennis",
          "Dogs", "play area", ""]
  got = neg.tags_in_caption(caption, tags).tolist()
  assert got == [True, True, True, False, False, True, True, True, False, False]


def test_image_negatives_errors():
  rng = np.random.default_rng(0)
  one = np.zeros((1, FEATURE_DIM), np.float32)
  with pytest.raises(ValueError, match="at least 2"):
    neg.image_negatives(["a dog"], [["dog"]], [one], rng)
  with pytest.raises(ValueError, match="one entry per example"):
    neg.image_negatives(["a", "b"], [["dog"]], [one, one], rng)
  with pytest.raises(ValueError, match="2 tags but 1 region rows"):
    neg.image_negatives(["a", "b"], [["dog", "cat"], ["cat"]], [one, one], rng)
  with pytest.raises(ValueError, match="feature dims"):
    neg.image_negatives(["a", "b"], [["dog"], ["cat"]],
                        [one, np.zeros((1, 3), np.float32)], rng)
  with pytest.raises(ValueError, match="remaining_ratio"):
    neg.image_negatives(["a", "b"], [["dog"], ["cat"]], [one, one], rng,
                        remaining_ratio=2.0)
  with pytest.raises(ValueError, match="other examples have none"):
    neg.image_negatives(["a dog", "b"], [["dog"], []],
                        [one, np.zeros((0, FEATURE_DIM), np.float32)], rng)
  with pytest.raises(TypeError, match="list of tags"):
    neg.image_negatives(["a", "b"], ["dog", ["cat"]], [one, one], rng)


def test_only_mentioned_objects_elsewhere_are_still_used():
  rng = np.random.default_rng(0)
  rows = [np.full((1, FEATURE_DIM), i, np.float32) for i in range(2)]
  out = neg.image_negatives(["a dog", "a dog"], [["dog"], ["dog"]], rows, rng)
  assert out.replaced[0].all() and out.source[0][0].tolist() == [1, 0]
  assert out.source[1][0].tolist() == [0, 0]


def test_swap_objects_draws_do_not_depend_on_the_tag_vocabulary():
  """The pipeline passes a dataset's tag ids, `image_negatives` the batch's own: the
  draws must be the same."""
  captions = ["A man holding a tennis racket.", "A dog on the grass.",
              "Two people near a tree.", "A red ball."]
  tags = [["man", "tennis racket", "shirt"], ["dog", "grass"], ["person", "tree", "sky"],
          ["ball", "grass", "dog"]]
  regions = [np.full((len(t), 3), i, np.float32) for i, t in enumerate(tags)]
  want = neg.image_negatives(captions, tags, regions, np.random.default_rng(5))
  vocab = sorted({t for ts in tags for t in ts} | {"zebra", "a man"})
  ids = np.array([vocab.index(t) for ts in tags for t in ts])
  mentioned = np.stack([neg.tags_in_caption(c, vocab) for c in captions])
  got = neg.swap_objects(np.array([len(t) for t in tags]), ids, mentioned,
                         np.random.default_rng(5))
  for a, b in zip(got.source, want.source):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(got.replaced, want.replaced):
    np.testing.assert_array_equal(a, b)
  assert any(r.any() for r in got.replaced)
