"""A small synthetic dataset in exactly the released VinVL/Oscar retrieval layout.

Why: the real COCO/Flickr region features are tens of GB; this writes a few MB that
every reader, the input pipeline and a short training run can use, offline and
deterministically (same arguments, byte-identical files).

What is in it. Each image is a scene: one subject (a person or an animal) doing an
action, 1-5 other objects and one background region ("sky", "wall", ...). Every region
feature is a class prototype plus attribute directions plus noise, then a ReLU (a
detector's features are non-negative), followed by the real normalised box:
  * subject: colour (of fur or clothing), pose (sitting / standing / lying), age
    (old / young), wetness (wet / dry);
  * object: colour, size (large / small, also visible in its box), and a class-specific
    state (open / closed, full / empty, new / old);
  * every region: the image's lighting (light / dark) and setting (inside / outside).
Most attributes have WordNet antonyms (sit/stand/lie, large/small, big/little,
open/closed, full/empty, old/new/young, wet/dry, black/white, light/dark,
inside/outside, indoors/outdoors), so an antonym hard negative of a caption describes a
scene that can really occur. Five varied English captions per image mention the subject
with its colour and pose (always), and some of its age, the objects with some of their
attributes, the setting and the lighting.

Not solvable by tags alone: images come in groups of `images_per_layout` that share
the subject, object classes and background (so the same tag multiset) and differ in
the subject's (pose, colour) pair, which every caption states; the other attributes
are drawn freely. Only the region features tell the images of a group apart.

Files (in `out_dir`): features.tsv, features.lineidx, imageid2idx.json,
predictions.tsv (alternating the dict-with-objects and bare-list JSON shapes, some
objects with a base64 `feature`), {train,test}_captions.pt (torch.save of int ->
list of captions; test stores each list as a JSON string, the other shape Oscar
accepts) and .json twins, train_img_keys.tsv, test_img_keys.tsv, test_img_keys_1k.tsv.

  python -m vldeformer_jax.data.synthetic OUT_DIR   # as scripts/demo.sh does

OUT_DIR must be new, empty or an earlier demo dataset (`is_demo_dataset`), whose files
are rewritten; --overwrite writes into any other directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from vldeformer_jax.data import readers, tsv
from vldeformer_jax.fileio import OutputError, check_output

logger = logging.getLogger(__name__)

# Vocabulary ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClassSpec:
  """A detector class: its caption nouns, where it occurs and which attributes it has."""

  nouns: tuple[str, ...]
  settings: tuple[str, ...] = ("inside", "outside")
  kind: str = "object"  # "person", "animal", "object" or "stuff".
  state: str | None = None  # "openness", "fullness" or "newness" (objects).
  seat: bool = False  # Can be sat or lain on.
  poses: tuple[str, ...] = ("sitting", "standing", "lying")  # Subjects.


SUBJECTS: dict[str, ClassSpec] = {
    "man": ClassSpec(("man", "guy"), kind="person"),
    "woman": ClassSpec(("woman", "lady"), kind="person"),
    "boy": ClassSpec(("boy", "young boy", "kid"), kind="person"),
    "girl": ClassSpec(("girl", "young girl"), kind="person"),
    "dog": ClassSpec(("dog",), kind="animal"),
    "cat": ClassSpec(("cat", "kitty"), kind="animal"),
    "horse": ClassSpec(("horse",), ("outside",), kind="animal",
                       poses=("standing", "lying")),
}
OBJECTS: dict[str, ClassSpec] = {
    "umbrella": ClassSpec(("umbrella",), state="openness"),
    "laptop": ClassSpec(("laptop", "laptop computer"), ("inside",), state="openness"),
    "book": ClassSpec(("book",), state="openness"),
    "box": ClassSpec(("box", "cardboard box"), state="openness"),
    "suitcase": ClassSpec(("suitcase",), state="openness"),
    "door": ClassSpec(("door",), state="openness"),
    "window": ClassSpec(("window",), state="openness"),
    "bag": ClassSpec(("bag", "handbag"), state="openness"),
    "cup": ClassSpec(("cup", "mug"), ("inside",), state="fullness"),
    "bottle": ClassSpec(("bottle",), state="fullness"),
    "bowl": ClassSpec(("bowl",), ("inside",), state="fullness"),
    "vase": ClassSpec(("vase",), ("inside",), state="fullness"),
    "car": ClassSpec(("car",), ("outside",), state="newness"),
    "bus": ClassSpec(("bus",), ("outside",), state="newness"),
    "bicycle": ClassSpec(("bicycle", "bike"), ("outside",), state="newness"),
    "bench": ClassSpec(("bench", "park bench"), ("outside",), state="newness", seat=True),
    "chair": ClassSpec(("chair",), state="newness", seat=True),
    "couch": ClassSpec(("couch", "sofa"), ("inside",), state="newness", seat=True),
    "table": ClassSpec(("table",), ("inside",), state="newness", seat=True),
    "cell phone": ClassSpec(("cell phone", "phone"), state="newness"),
    "teddy bear": ClassSpec(("teddy bear", "stuffed bear"), ("inside",), state="newness"),
    "tennis racket": ClassSpec(("tennis racket", "racket"), ("outside",),
                               state="newness"),
    "fire hydrant": ClassSpec(("fire hydrant", "hydrant"), ("outside",), state="newness"),
}
STUFF: dict[str, ClassSpec] = {
    "wall": ClassSpec(("wall",), ("inside",), kind="stuff"),
    "floor": ClassSpec(("floor",), ("inside",), kind="stuff"),
    "sky": ClassSpec(("sky",), ("outside",), kind="stuff"),
    "grass": ClassSpec(("grass",), ("outside",), kind="stuff"),
    "street": ClassSpec(("street",), ("outside",), kind="stuff"),
}
CLASSES: dict[str, ClassSpec] = {**SUBJECTS, **OBJECTS, **STUFF}

PERSON_COLOURS = ("black", "white", "red", "blue", "green", "yellow")
ANIMAL_COLOURS = ("black", "white", "brown", "grey")
OBJECT_COLOURS = ("black", "white", "red", "blue", "green", "yellow", "brown", "grey")
POSES = ("sitting", "standing", "lying")
STATES = {"openness": ("open", "closed"), "fullness": ("full", "empty"),
          "newness": ("new", "old")}
# Attribute name -> its values; each (name, value) is one direction in feature space.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": OBJECT_COLOURS, "size": ("large", "small"), "pose": POSES,
    "age": ("old", "young"), "wet": ("wet", "dry"), "lighting": ("light", "dark"),
    "setting": ("inside", "outside"),
    **{f"state_{kind}": values for kind, values in STATES.items()},
}

# Caption words.
POSE_WORDS = {"sitting": ("sitting", "sitting down", "seated"),
              "standing": ("standing", "standing up"),
              "lying": ("lying", "lying down")}
POSE_VERBS = {"sitting": "sits", "standing": "stands", "lying": "lies"}
SIZE_WORDS = {"large": ("large", "big"), "small": ("small", "little")}
AGE_WORDS = {("old", "person"): ("old", "elderly"), ("young", "person"): ("young",),
             ("old", "animal"): ("old",), ("young", "animal"): ("young",)}
GARMENTS = ("shirt", "jacket", "coat", "sweater", "t-shirt", "hoodie")
SETTING_WORDS = {"inside": ("inside", "indoors", "in a room"),
                 "outside": ("outside", "outdoors", "out in the open")}
LIGHTING_WORDS = {
    ("light", "inside"): ("in a bright room", "in a light room", "in a well lit room"),
    ("dark", "inside"): ("in a dark room", "in a dim room"),
    ("light", "outside"): ("on a bright day", "in broad daylight",
                           "on a light, sunny day"),
    ("dark", "outside"): ("in the dark", "on a dark evening", "at night"),
}
IMAGE_SIZES = ((640, 480), (480, 640), (640, 427), (427, 640), (500, 375), (375, 500),
               (640, 360))
TRAIN_ID_RANGE = (1, 500_000)  # COCO-like integer ids; test ids follow, disjoint.
TEST_ID_RANGE = (500_000, 600_000)
NUM_CAPTIONS = 5


# Scenes ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DemoRegion:
  """One detected region: its tag, attributes, pixel box and detector confidence."""

  label: str
  attributes: Mapping[str, str]
  rect: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels.
  conf: float


@dataclasses.dataclass(frozen=True, eq=False)
class DemoScene:
  """The ground truth of one image, with its captions and region features.

  `regions` are in the order of the tags in predictions.tsv and of the rows of its
  features (descending confidence); `subject` indexes the acting region.
  """

  image_id: int
  width: int
  height: int
  layout: int  # Images with the same layout share subject, objects and background.
  regions: tuple[DemoRegion, ...]
  subject: int
  captions: tuple[str, ...]
  features: np.ndarray  # [num_regions, feature_dim] float32, box dims last.

  @property
  def tags(self) -> list[str]:
    return [r.label for r in self.regions]


@dataclasses.dataclass(frozen=True, eq=False)
class DemoWorld:
  """The fixed 'visual' space: a prototype per class and a direction per attribute."""

  prototypes: Mapping[str, np.ndarray]
  directions: Mapping[tuple[str, str], np.ndarray]
  visual_dim: int


def make_world(feature_dim: int, world_seed: int = 0) -> DemoWorld:
  """Random class prototypes (N(0, 1) per dim) and attribute directions (N(0, 0.5^2))."""
  visual_dim = feature_dim - readers.NUM_BOX_DIMS
  rng = np.random.default_rng([world_seed, 1])
  prototypes = {label: rng.standard_normal(visual_dim) for label in CLASSES}
  directions = {(name, value): 0.5 * rng.standard_normal(visual_dim)
                for name, values in ATTRIBUTES.items() for value in values}
  return DemoWorld(prototypes, directions, visual_dim)


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
  return options[int(rng.integers(len(options)))]


def _attribute_key(name: str, region_attrs: Mapping[str, str]) -> tuple[str, str]:
  value = region_attrs[name]
  if name == "state":
    kind = next(k for k, values in STATES.items() if value in values)
    return f"state_{kind}", value
  return name, value


def region_features(world: DemoWorld, region: DemoRegion, width: int, height: int,
                    rng: np.random.Generator, box_order: str) -> np.ndarray:
  """relu(prototype + attribute directions + noise) followed by the 6 box dims."""
  z = world.prototypes[region.label].copy()
  for name in region.attributes:
    z += world.directions[_attribute_key(name, region.attributes)]
  z += 0.5 * rng.standard_normal(world.visual_dim)
  visual = np.maximum(z, 0.0)
  x1, y1, x2, y2 = region.rect
  box = np.array([x1 / width, y1 / height, x2 / width, y2 / height,
                  (x2 - x1) / width, (y2 - y1) / height])
  box = readers.convert_box_order(box, "x1y1x2y2wh", box_order)
  return np.concatenate([visual, box]).astype(np.float32)


def _rect(rng: np.random.Generator, width: int, height: int, area: float,
          aspect: float) -> tuple[float, float, float, float]:
  """A box of `area` (fraction of the image) and `aspect` (h/w in pixels), inside."""
  w = min(np.sqrt(area * width * height / aspect), width * 0.98)
  h = min(w * aspect, height * 0.98)
  x1 = rng.uniform(0, width - w)
  y1 = rng.uniform(0, height - h)
  return tuple(round(float(v), 2) for v in (x1, y1, x1 + w, y1 + h))


SUBJECT_ASPECT = {("person", "standing"): (2.0, 3.0), ("person", "sitting"): (1.1, 1.6),
                  ("person", "lying"): (0.3, 0.55), ("animal", "standing"): (0.6, 0.9),
                  ("animal", "sitting"): (1.1, 1.5), ("animal", "lying"): (0.3, 0.5)}
STUFF_BOX = {"sky": (0.0, 0.0, 1.0, 0.35), "grass": (0.0, 0.6, 1.0, 1.0),
             "street": (0.0, 0.65, 1.0, 1.0), "wall": (0.0, 0.0, 1.0, 0.7),
             "floor": (0.0, 0.7, 1.0, 1.0)}


@dataclasses.dataclass(frozen=True)
class _Layout:
  subject: str
  objects: tuple[str, ...]
  stuff: str
  setting: str


def _sample_layout(rng: np.random.Generator) -> _Layout:
  setting = _pick(rng, ("inside", "outside"))
  subject = _pick(rng, [s for s, spec in SUBJECTS.items() if setting in spec.settings])
  candidates = [o for o, spec in OBJECTS.items() if setting in spec.settings]
  num_objects = int(rng.integers(1, 6))  # 2-6 objects including the subject.
  objects = tuple(rng.choice(candidates, size=num_objects, replace=False).tolist())
  stuff = _pick(rng, [s for s, spec in STUFF.items() if setting in spec.settings])
  return _Layout(subject, objects, stuff, setting)


def _sample_regions(rng: np.random.Generator, layout: _Layout, pose: str, colour: str,
                    lighting: str, width: int, height: int
                    ) -> tuple[tuple[DemoRegion, ...], int]:
  """The regions of one image (sorted by confidence) and the subject's index."""
  scene = {"lighting": lighting, "setting": layout.setting}
  kind = SUBJECTS[layout.subject].kind
  subject_attrs = {**scene, "colour": colour, "pose": pose,
                   "age": _pick(rng, ("old", "young")),
                   "wet": "wet" if rng.random() < 0.3 else "dry"}
  if layout.subject in ("boy", "girl"):
    subject_attrs["age"] = "young"
  aspect = rng.uniform(*SUBJECT_ASPECT[(kind, pose)])
  regions = [DemoRegion(layout.subject, subject_attrs,
                        _rect(rng, width, height, rng.uniform(0.08, 0.3), aspect),
                        round(float(rng.uniform(0.75, 0.99)), 4))]
  for label in layout.objects:
    size = _pick(rng, ("large", "small"))
    attrs = {**scene, "colour": _pick(rng, OBJECT_COLOURS), "size": size,
             "state": _pick(rng, STATES[OBJECTS[label].state])}
    area = rng.uniform(0.08, 0.25) if size == "large" else rng.uniform(0.005, 0.04)
    rect = _rect(rng, width, height, area, float(np.exp(rng.uniform(-0.7, 0.7))))
    conf = round(float(rng.uniform(0.4, 0.95)), 4)
    regions.append(DemoRegion(label, attrs, rect, conf))
  fx1, fy1, fx2, fy2 = STUFF_BOX[layout.stuff]
  jitter = rng.uniform(-0.05, 0.05, size=4) * [0, 1, 0, 1]
  rect = tuple(round(float(v), 2) for v in (
      fx1 * width, np.clip(fy1 + jitter[1], 0, 1) * height, fx2 * width,
      np.clip(fy2 + jitter[3], 0, 1) * height))
  regions.append(DemoRegion(layout.stuff, dict(scene), rect,
                            round(float(rng.uniform(0.3, 0.75)), 4)))
  order = sorted(range(len(regions)), key=lambda i: (-regions[i].conf, i))
  return tuple(regions[i] for i in order), order.index(0)


# Captions ----------------------------------------------------------------------------


def _article(phrase: str) -> str:
  return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _subject_phrase(rng: np.random.Generator, region: DemoRegion) -> str:
  """The subject with its colour always, and sometimes its age or wetness."""
  spec = SUBJECTS[region.label]
  attrs = region.attributes
  adjectives = []
  if region.label not in ("boy", "girl") and rng.random() < 0.5:
    adjectives.append(_pick(rng, AGE_WORDS[(attrs["age"], spec.kind)]))
  if attrs["wet"] == "wet" and rng.random() < 0.4:
    adjectives.append(_pick(rng, ("wet", "soaking wet")))
  elif attrs["wet"] == "dry" and rng.random() < 0.05:
    adjectives.append("dry")
  noun = _pick(rng, spec.nouns)
  if spec.kind == "animal":
    return _article(" ".join(adjectives + [attrs["colour"], noun]))
  head = _article(" ".join(adjectives + [noun]))
  dress = ("dress",) if region.label in ("woman", "girl") else ()
  garment = _pick(rng, GARMENTS + dress)
  clothes = _pick(rng, (f"in {_article(attrs['colour'] + ' ' + garment)}",
                        f"wearing {_article(attrs['colour'] + ' ' + garment)}",
                        f"dressed in {attrs['colour']}"))
  return f"{head} {clothes}"


def _object_phrase(rng: np.random.Generator, region: DemoRegion, p: float = 0.5) -> str:
  """An object with a random subset of its size, state and colour."""
  attrs = region.attributes
  adjectives = []
  if rng.random() < p:
    adjectives.append(_pick(rng, SIZE_WORDS[attrs["size"]]))
  state_first = rng.random() < p
  if state_first:
    adjectives.append(attrs["state"])
  if rng.random() < p:
    adjectives.append(attrs["colour"])
  phrase = _article(" ".join(adjectives + [_pick(rng, OBJECTS[region.label].nouns)]))
  if not state_first and rng.random() < p / 2:
    phrase += f" that is {attrs['state']}"
  return phrase


def _join(phrases: Sequence[str]) -> str:
  if len(phrases) == 1:
    return phrases[0]
  return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _captions(rng: np.random.Generator, regions: Sequence[DemoRegion], subject: int,
              setting: str) -> tuple[str, ...]:
  """NUM_CAPTIONS distinct captions; each names the subject's colour and pose."""
  subj = regions[subject]
  pose = subj.attributes["pose"]
  lighting = subj.attributes["lighting"]
  others = [r for r in regions if r.label in OBJECTS]
  seats = [r for r in others if OBJECTS[r.label].seat]
  anchor = (_pick(rng, seats) if seats and pose != "standing" and rng.random() < 0.8
            else _pick(rng, others))
  on_anchor = OBJECTS[anchor.label].seat and pose != "standing"
  captions: list[str] = []
  for _ in range(100):
    if len(captions) == NUM_CAPTIONS:
      break
    s = _subject_phrase(rng, subj)
    p = _pick(rng, POSE_WORDS[pose])
    a = _object_phrase(rng, anchor)
    prep = "on" if on_anchor else _pick(rng, ("next to", "near", "beside", "by"))
    r = f"{prep} {a}"
    roll = rng.random()
    x = ("" if roll < 0.45 else " " + _pick(rng, SETTING_WORDS[setting]) if roll < 0.7
         else " " + _pick(rng, LIGHTING_WORDS[(lighting, setting)]))
    rest = [o for o in others if o is not anchor]
    chosen = rng.permutation(len(rest))[:int(rng.integers(1, 3))].tolist()
    extra = [_object_phrase(rng, rest[i]) for i in chosen] if rest else [a]
    template = int(rng.integers(10))
    if template == 0:
      text = f"{s} {p} {r}{x}"
    elif template == 1:
      text = f"{s} is {p} {r}{x}"
    elif template == 2:
      text = f"{s} {POSE_VERBS[pose]} {r}{x}"
    elif template == 3:
      text = f"there is {s} {p} {r}{x}"
    elif template == 4:
      text = f"{p} {r}{x} is {s}"
    elif template == 5:
      text = f"{s} {p}{x} with {_join(extra)} nearby"
    elif template == 6:
      be = "is" if len(extra) == 1 else "are"
      text = f"{_join(extra)} {be} near {s} who is {p}{x}"
    elif template == 7:
      text = f"a photo of {s} {p} {r}{x}"
    elif template == 8:
      place = "on it" if on_anchor else _pick(rng, ("next to it", "beside it", "near it"))
      text = f"{a} with {s} {p} {place}{x}"
    else:
      text = f"{x.strip() + ', ' if x else ''}{s} {p} {r}"
    text = " ".join(text.split())
    if rng.random() < 0.7:
      text = text[0].upper() + text[1:] + "."
    if text not in captions:
      captions.append(text)
  if len(captions) < NUM_CAPTIONS:
    raise RuntimeError("could not draw distinct captions")  # Not reached in practice.
  return tuple(captions)


# Splits ------------------------------------------------------------------------------


def generate_split(num_images: int, split: str, *, seed: int = 0,
                   world: DemoWorld, images_per_layout: int = 4,
                   box_order: str = readers.CANONICAL_BOX_ORDER) -> list[DemoScene]:
  """The scenes of one split; depends only on (seed, split, num_images, world, ...)."""
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  if box_order not in readers.BOX_ORDERS:
    raise ValueError(f"box_order must be one of {readers.BOX_ORDERS}, got {box_order!r}")
  lo, hi = TRAIN_ID_RANGE if split == "train" else TEST_ID_RANGE
  if not 0 <= num_images <= hi - lo:
    raise ValueError(f"num_images for {split} must be in [0, {hi - lo}], got "
                     f"{num_images}")
  if images_per_layout < 1:
    raise ValueError(f"images_per_layout must be >= 1, got {images_per_layout}")
  rng = np.random.default_rng([seed, 0 if split == "train" else 1])
  ids = (lo + rng.choice(hi - lo, size=num_images, replace=False)).tolist()
  num_layouts = max(1, num_images // images_per_layout)
  group_sizes = [len(g) for g in np.array_split(np.arange(num_images), num_layouts)]
  scenes: list[DemoScene] = []
  for layout_index, group_size in enumerate(group_sizes):
    layout = _sample_layout(rng)
    colours = (PERSON_COLOURS if SUBJECTS[layout.subject].kind == "person"
               else ANIMAL_COLOURS)
    signatures = [(p, c) for p in SUBJECTS[layout.subject].poses for c in colours]
    picks = rng.permutation(len(signatures)).tolist()
    picks = (picks * (group_size // len(picks) + 1))[:group_size]
    for pose, colour in (signatures[i] for i in picks):
      width, height = _pick(rng, IMAGE_SIZES)
      lighting = _pick(rng, ("light", "dark"))
      regions, subject = _sample_regions(rng, layout, pose, colour, lighting, width,
                                         height)
      captions = _captions(rng, regions, subject, layout.setting)
      features = np.stack([region_features(world, r, width, height, rng, box_order)
                           for r in regions])
      scenes.append(DemoScene(image_id=int(ids[len(scenes)]), width=width,
                              height=height, layout=layout_index, regions=regions,
                              subject=subject, captions=captions, features=features))
  return scenes


# Writing -----------------------------------------------------------------------------


def _prediction_json(scene: DemoScene, index: int) -> str:
  """The predictions.tsv JSON of a scene: dict shape, bare list every third row."""
  objects = []
  for r, feature in zip(scene.regions, scene.features):
    obj: dict[str, Any] = {"rect": list(r.rect), "class": r.label, "conf": r.conf}
    if index % 16 == 1:  # Some VinVL files carry the 2048-d detector feature.
      obj["feature"] = readers.encode_features(feature[:-readers.NUM_BOX_DIMS][None])
    objects.append(obj)
  if index % 3 == 2:
    return json.dumps(objects)
  return json.dumps({"image_h": scene.height, "image_w": scene.width,
                     "num_boxes": len(objects), "objects": objects})


def _write_bytes(path: Path, data: bytes) -> None:
  with open(path, "wb") as f:
    f.write(data)


def _save_torch_captions(path: Path, captions: dict[int, Any]) -> bool:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  torch.save(captions, path)
  return True


@dataclasses.dataclass(frozen=True, eq=False)
class DemoDataset:
  """What `write_demo_dataset` wrote: the scenes (ground truth) and the files."""

  out_dir: Path
  train: list[DemoScene]
  test: list[DemoScene]
  files: dict[str, int]  # File name -> size in bytes.
  wrote_pt: bool


def write_demo_dataset(out_dir: str | os.PathLike, num_train_images: int = 512,
                       num_test_images: int = 100, seed: int = 0,
                       feature_dim: int = readers.DEFAULT_FEATURE_DIM, *,
                       world_seed: int = 0, images_per_layout: int = 4,
                       box_order: str = readers.CANONICAL_BOX_ORDER,
                       write_pt: bool = True) -> DemoDataset:
  """Writes the demo dataset to `out_dir` (created if needed; files overwritten).

  Deterministic: the same arguments give byte-identical files. Train and test scenes
  are drawn from separate streams, so changing one split's size leaves the other
  alone. Without torch (or with `write_pt=False`) only the JSON captions are written,
  and a warning says so.
  """
  if feature_dim < readers.NUM_BOX_DIMS + 10:
    raise ValueError(f"feature_dim must be >= {readers.NUM_BOX_DIMS + 10}, got "
                     f"{feature_dim}")
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  world = make_world(feature_dim, world_seed)
  splits = {
      split: generate_split(n, split, seed=seed, world=world,
                            images_per_layout=images_per_layout, box_order=box_order)
      for split, n in (("train", num_train_images), ("test", num_test_images))}
  scenes = splits["train"] + splits["test"]

  # features.tsv (train then test, in drawing order) with its lineidx and id map.
  rows, offsets, position = [], [], 0
  for scene in scenes:
    row = (f"{scene.image_id}\t{len(scene.regions)}\t"
           f"{readers.encode_features(scene.features)}\n").encode("ascii")
    offsets.append(position)
    position += len(row)
    rows.append(row)
  _write_bytes(out / "features.tsv", b"".join(rows))
  _write_bytes(out / "features.lineidx", tsv.format_lineidx(np.array(offsets)))
  id_map = {str(s.image_id): i for i, s in enumerate(scenes)}
  _write_bytes(out / "imageid2idx.json", json.dumps(id_map).encode())

  # predictions.tsv, in image-id order (a different order from the features).
  by_id = sorted(scenes, key=lambda s: s.image_id)
  _write_bytes(out / "predictions.tsv", "".join(
      f"{s.image_id}\t{_prediction_json(s, i)}\n" for i, s in enumerate(by_id)).encode())

  wrote_pt = write_pt
  for split, split_scenes in splits.items():
    captions = {s.image_id: list(s.captions) for s in split_scenes}
    _write_bytes(out / f"{split}_captions.json", json.dumps(
        {str(k): v for k, v in captions.items()}, indent=1).encode())
    if write_pt:
      # Test stores each list as a JSON string, the other shape Oscar reads.
      payload = (captions if split == "train"
                 else {k: json.dumps(v) for k, v in captions.items()})
      wrote_pt = _save_torch_captions(out / f"{split}_captions.pt", payload) and wrote_pt
    keys = "".join(f"{s.image_id}\n" for s in split_scenes)
    _write_bytes(out / f"{split}_img_keys.tsv", keys.encode())
  _write_bytes(out / "test_img_keys_1k.tsv", "".join(
      f"{s.image_id}\n" for s in splits["test"][:1000]).encode())
  if write_pt and not wrote_pt:
    logger.warning("torch is not installed: wrote only the JSON captions "
                   "({train,test}_captions.json), no .pt files")
  files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
  return DemoDataset(out, splits["train"], splits["test"], files, wrote_pt)


# What `write_demo_dataset` writes, and what reading and training add beside it.
DATASET_FILES = frozenset(
    ["features.tsv", "features.lineidx", "imageid2idx.json", "predictions.tsv",
     "test_img_keys_1k.tsv"]
    + [f"{split}_{name}" for split in ("train", "test")
       for name in ("captions.pt", "captions.json", "img_keys.tsv")])


def is_demo_dataset(path: Path) -> bool:
  """Whether `path` holds only a demo dataset's files (`DATASET_FILES`), the line
  indexes readers write beside them and the prepared splits."""
  from vldeformer_jax.data import prepared  # pylint: disable=g-import-not-at-top
  return all(e.name in DATASET_FILES or e.suffix == ".lineidx"
             or e.name == prepared.DEFAULT_DIRNAME for e in path.iterdir())


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m vldeformer_jax.data.synthetic",
      description="Write a small synthetic dataset in the VinVL/Oscar retrieval layout.")
  parser.add_argument("out_dir")
  parser.add_argument("--num_train", type=int, default=512)
  parser.add_argument("--num_test", type=int, default=100)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--world_seed", type=int, default=0)
  parser.add_argument("--feature_dim", type=int, default=readers.DEFAULT_FEATURE_DIM)
  parser.add_argument("--images_per_layout", type=int, default=4)
  parser.add_argument("--box_order", choices=readers.BOX_ORDERS,
                      default=readers.CANONICAL_BOX_ORDER)
  parser.add_argument("--no_pt", action="store_true", help="write JSON captions only")
  parser.add_argument("--overwrite", action="store_true",
                      help="write into OUT_DIR even when it holds other files")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  try:
    check_output(args.out_dir, is_dir=True, what="a demo dataset",
                 is_own=is_demo_dataset, option="OUT_DIR", overwrite=args.overwrite)
  except OutputError as e:
    parser.exit(1, f"{parser.prog}: error: {e}\n")
  data = write_demo_dataset(args.out_dir, args.num_train, args.num_test, args.seed,
                            args.feature_dim, world_seed=args.world_seed,
                            images_per_layout=args.images_per_layout,
                            box_order=args.box_order, write_pt=not args.no_pt)
  total = sum(data.files.values())
  logger.info("wrote %d train + %d test images to %s (%d files, %.1f MB)",
              len(data.train), len(data.test), data.out_dir, len(data.files), total / 1e6)
  return 0


if __name__ == "__main__":
  sys.exit(main())
