"""The eval set (`eval_set.py`): every image and caption once, read as training reads
them, and padded batches that cover it exactly once over processes."""

import numpy as np
import pytest

from test_pipeline import FEATURE_DIM, demo_dir, inputs, make_config  # noqa: F401
from vldeformer_jax.data import readers
from vldeformer_jax.data.eval_set import (eval_batches, load_eval_set, load_eval_split,
                                          num_eval_batches)


def test_eval_set_holds_every_image_and_caption_once(demo_dir):
  raw = readers.VinVLRetrievalData(demo_dir, "test", feature_dim=FEATURE_DIM)
  eval_set = load_eval_set(make_config(demo_dir), "test")
  keys = (demo_dir / "test_img_keys.tsv").read_text().split()
  assert eval_set.image_ids == keys
  assert len(eval_set.captions) == sum(len(raw.captions[i]) for i in keys)
  for c, caption in enumerate(eval_set.captions):
    assert caption in raw.captions[keys[eval_set.caption_to_image[c]]]
  assert sorted(eval_set.captions) == sorted(c for i in keys for c in raw.captions[i])
  example = raw.example(keys[0])
  assert eval_set.tags[0] == " ".join(example.tags[:5])
  np.testing.assert_array_equal(eval_set.regions[0], example.regions[:5])
  first5 = load_eval_set(make_config(demo_dir, eval_max_images=5), "test")
  assert first5.image_ids == keys[:5]
  assert set(first5.caption_to_image.tolist()) == set(range(5))

@pytest.mark.parametrize("modality", ["text", "image"])
def test_eval_batches_cover_everything_once_with_padding_masked(demo_dir, inputs,
                                                                modality):
  eval_set = load_eval_set(make_config(demo_dir), "test")
  n = len(eval_set.captions) if modality == "text" else len(eval_set.image_ids)
  assert n % 8  # The last batch is partial.
  seen = []
  for process in (0, 1):
    batches = list(eval_batches(eval_set, inputs, modality=modality,
                                batch_size=8, process_index=process,
                                process_count=2))
    assert len(batches) == num_eval_batches(n, 8)
    for b in batches:
      model, valid, index = b[modality], b["valid"], b["index"]
      assert valid.shape == index.shape == (4,) and model["input_ids"].shape[0] == 4
      assert (index[~valid] == -1).all()
      assert (model["token_mask"][~valid] == 0).all()
      if modality == "image":
        assert (model["region_mask"][~valid] == 0).all()
      for row in np.flatnonzero(valid):
        i = int(index[row])
        text = eval_set.captions[i] if modality == "text" else eval_set.tags[i]
        seq = (inputs.text_sequences if modality == "text" else inputs.image_sequences)(
            [text])[0][0]
        assert model["input_ids"][row, :len(seq)].tolist() == seq
      seen += index[valid].tolist()
  assert sorted(seen) == list(range(n))

def test_eval_split_for_a_model_is_the_trainer_eval_set(demo_dir, inputs):
  """bin/eval's options come from the model's config and the dataclass defaults."""
  trainer = load_eval_set(make_config(demo_dir, eval_max_images=5), "test")
  model = load_eval_split(demo_dir, "test", inputs.config, max_images=5)
  assert (model.image_ids, model.tags, model.captions) == (trainer.image_ids,
                                                           trainer.tags, trainer.captions)
  for a, b in zip(model.regions, trainer.regions):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match=r"^--config\.on_error='ignore'"):
    load_eval_split(demo_dir, "test", inputs.config, on_error="ignore")
  with pytest.raises(ValueError, match=r"^--config\.eval_max_images=-1"):
    load_eval_split(demo_dir, "test", inputs.config, max_images=-1)
