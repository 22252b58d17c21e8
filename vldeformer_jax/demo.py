"""The README's demo: encode a few captions with a converted model and rank them."""

from __future__ import annotations

import argparse

import numpy as np

from vldeformer_jax.encoder import load_pretrained
from vldeformer_jax.retrieval import l2_normalize

CAPTIONS = [
    "A man is sitting on a wooden bench in the park.",
    "Two dogs run across the wet grass.",
    "A red bus drives down a busy street.",
    "A woman holds a tennis racket on the court.",
    "A plate of pizza on a table next to a window.",
]
QUERIES = ["a person resting on a park bench", "puppies playing outside"]


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--model", required=True, help="a bin/convert or bin/train model dir")
  args = p.parse_args(argv)
  model = load_pretrained(args.model)
  gallery, _ = l2_normalize(model.encode_text(CAPTIONS))
  for query in QUERIES:
    q, _ = l2_normalize(model.encode_text([query]))
    scores = gallery @ q[0]
    print(f"\nquery: {query!r}")
    for i in np.argsort(-scores)[:3]:
      print(f"  {scores[i]:.3f}  {CAPTIONS[i]}")


if __name__ == "__main__":
  main()
