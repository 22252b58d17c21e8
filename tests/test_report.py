"""The qualitative report (`vldeformer_jax.report`, `bin/report`) on a tiny demo split."""

import html
import json
import re

import numpy as np
import pytest

from conftest import run_bin
from vldeformer_jax import drawing, report
from vldeformer_jax.data import readers
from vldeformer_jax.data.synthetic import write_demo_dataset
from vldeformer_jax.encoder import load_pretrained


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  return write_demo_dataset(tmp_path_factory.mktemp("report_data"), num_train_images=8,
                            num_test_images=12)


def test_joint_flips():
  encoder_top = np.array([[3, 1, 2], [0, 1, 2], [5, 4, 6], [7, 8, 9], [1, 2, 0]])
  joint = np.array([[0.1, 0.9, 0.2],   # joint picks 1 == gt, encoder 3: a case
                    [0.9, 0.1, 0.2],   # both right
                    [0.1, 0.2, 0.9],   # joint picks 6, gt 4: both wrong
                    [0.5, 0.5, 0.1],   # tie: encoder order wins -> 7, gt 8: not a case
                    [0.0, 0.3, 0.3]])  # tie between 2 and 0 -> 2 == gt: a case
  gt = np.array([1, 0, 4, 8, 2])
  np.testing.assert_array_equal(report.joint_flips(encoder_top, joint, gt), [0, 4])
  with pytest.raises(ValueError, match="shapes"):
    report.joint_flips(encoder_top, joint[:, :2], gt)


def test_image_size_from_predictions_or_inferred():
  rects = np.array([[10, 20, 110, 220], [0, 0, 320, 240]], np.float32)
  tags = readers.ImageTags("1", ["a", "b"], np.ones(2, np.float32), rects, 480, 640)
  assert drawing.image_size(tags, np.zeros((2, 6))) == (640, 480)
  bare = readers.ImageTags("1", ["a", "b"], np.ones(2, np.float32), rects)
  boxes = np.array([[10 / 640, 20 / 480, 110 / 640, 220 / 480, 0, 0],
                    [0, 0, 0.5, 0.5, 0.5, 0.5]])
  assert drawing.image_size(bare, boxes) == (640, 480)
  assert drawing.image_size(bare, np.zeros((0, 6))) == (800, 600)


def test_bin_report_writes_html(demo, minilm_dir, tmp_path):
  out = tmp_path / "report.html"
  free_text = "a dog sitting on a red couch"
  proc = run_bin("report", "--model", str(minilm_dir), "--data_dir", str(demo.out_dir),
                 "--split", "test", "--out", str(out), "--num_queries", "2",
                 "--queries", demo.test[5].captions[1], free_text,
                 "--num_cases", "2", "--top_m", "4", "--scan", "30")
  summary = json.loads(proc.stdout)
  page = out.read_text()
  cases = page.count('data-kind="case"')
  assert page.count('data-kind="query"') == 2 and summary["queries"] == 2
  assert cases == summary["cases"] == min(2, summary["case_summary"][
      "joint_right_encoder_wrong"])
  assert cases >= 1  # with these weights and data the search finds some
  # Top-5 per query; per case the encoder's top-5 and the joint's ranking of the
  # encoder's top-4 (M = 4 < 5).
  drawn = 2 * 5 + cases * (5 + 4)
  assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', page)) == drawn
  assert summary["images_drawn"] == drawn
  assert summary["case_summary"]["scanned_captions"] == 30
  assert summary["case_summary"]["joint_pairs_scored"] == 30 * 4

  by_id = {str(s.image_id): s for s in demo.test}
  shown = re.findall(r'<figure class="(gt|hit)" data-image-id="(\d+)">.*?'
                     r'<span class="tags">\d+ tags: (.*?)</span>', page)
  assert len(shown) == drawn
  for _, image_id, tags in shown:  # every drawn image lists its own tags
    assert html.unescape(tags) == ", ".join(r.label for r in by_id[image_id].regions)
  # The caption query has its image as ground truth; the free text has none.
  first, second = page.split('data-kind="query"')[1:3]
  assert f"ground truth: image {demo.test[5].image_id}," in first
  assert "ground truth: none" in second

  # Each case really is joint-right / encoder-wrong (checked with the model directly).
  model = load_pretrained(minilm_dir)
  split = report.load_split(model, demo.out_dir, "test")
  image_emb = model.encode_image(split.tag_strings, split.regions)
  for block in page.split('data-kind="case"')[1:]:
    caption = html.unescape(re.search(r"&ldquo;(.*?)&rdquo;", block).group(1))
    gt_id = re.search(r"ground truth: image (\d+),", block).group(1)
    gt = split.image_ids.index(gt_id)
    assert split.image_ids[split.caption_to_image[split.captions.index(caption)]] == gt_id
    q = model.encode_text([caption])[0]
    sim = image_emb @ q / np.linalg.norm(image_emb, axis=1)
    top = np.argsort(-sim, kind="stable")[:4]
    assert top[0] != gt
    joint = model.score_pairs([caption] * 4, [split.tag_strings[i] for i in top],
                              [split.regions[i] for i in top])
    assert top[np.argmax(joint)] == gt
    gt_figures = re.findall(r'<figure class="gt" data-image-id="(\d+)"', block)
    assert gt_figures and set(gt_figures) == {gt_id}


def test_bin_report_rejects_bad_input(tmp_path, minilm_dir):
  bad = run_bin("report", "--model", str(minilm_dir), "--data_dir", str(tmp_path),
                "--out", str(tmp_path / "r.html"), check=False)
  assert bad.returncode == 1 and "bin/report: error:" in bad.stderr
