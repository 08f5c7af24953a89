"""data: the shapes world, its GenEval prompts and pixel scorer, and real-data sources (tar shards, folders).

The toy pipeline cannot download images, so it draws them: a 32x32 canvas (any `image_size` works, sizes
scale with it) on a flat grey BACKGROUND holding 1-4 flat SHAPES (circle, square, triangle) in COLORS
(GenEval's ten colour names, one exact RGB each). Every image comes from a `Scene` (its object list), so
its caption, its questions and its GenEval score are exact. Objects fill 8 or 12 px boxes on the CLIP's
4-px patch lattice, at least one patch apart (see `_place`), without anti-aliasing, so grouping pixels by
colour into connected components finds every object again: that detector plus GenEval's rules is the
scorer of section 3 (pixel arithmetic in place of GenEval's Mask2Former + CLIP detector).

Prompts follow GenEval's six tags and phrasing (the official `evaluation_metadata.jsonl` records):

    single_object  "a photo of a circle"                      two_object "a photo of a circle and a square"
    counting       "a photo of three squares" (exclude four)  colors     "a photo of a red circle"
    position       "a photo of a circle left of a square"
    color_attr     "a photo of a red circle and a blue square"

Held-out compositions (the generalisation test). HELDOUT_COMBOS are pairs of coloured objects ("a red
circle" with "a blue square") that never share a train image; every single (colour, shape) pair is seen.
HELDOUT_RELATIONS are spatial configurations in both phrasings ("circle above triangle" is the same
picture as "triangle below circle"); no train *image* shows one under GenEval's position rule, so neither
its prompt, its caption nor its questions can mention one. Split "test":
  * every scene with two different shapes holds a held-out colour composition;
  * color_attr prompts name a held-out composition; position prompts use a held-out relation triple;
  * the other tags' prompts are those of training (GenEval's phrasing leaves few of them), on new
    images; two_object's hold a held-out composition.

Sections: 1. the world (Scene, make_scene, draw, captions, make_image_set); 2. understanding data
(one-word questions, VOCAB); 3. GenEval (prompts, render, the pixel detector and scorer, folder layout);
4. data at scale (tar shards and image folders, robust to bad samples, streamed to train.py).
"""
from __future__ import annotations

import functools
import glob
import hashlib
import io
import itertools
import json
import os
import random
import re
import tarfile
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from blip3o import PROMPT_TEMPLATE, toy_words  # the generation prompt: its words join VOCAB

# --- 1. The world -------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
# One exact RGB per colour, far apart (and far from each other's blends with the background), so that
# noisy or blurred pixels still map back to the right name.
COLOR_RGB = {"red": (220, 20, 20), "orange": (255, 140, 0), "yellow": (255, 230, 0), "green": (0, 160, 40),
    "blue": (30, 60, 230), "purple": (130, 20, 210), "pink": (255, 120, 200), "brown": (120, 60, 0),
    "black": (0, 0, 0), "white": (255, 255, 255)}
BACKGROUND = (128, 128, 128)  # mid grey: not a GenEval colour, and as far from black as from white
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
MAX_OBJECTS = 4

# Held-out colour compositions: about one in six of the 300 pairs, by a fixed arithmetic rule. Holding
# out single (colour, shape) pairs instead would teach a shortcut, not test composition (NOTES.md).
def _combo(a: tuple, b: tuple) -> frozenset:  # an unordered pair of (colour, shape) objects
    return frozenset((a, b))


HELDOUT_COMBOS = frozenset(
    _combo((c1, s1), (c2, s2))
    for i1, s1 in enumerate(SHAPES) for i2, s2 in enumerate(SHAPES) if i1 < i2
    for j1, c1 in enumerate(COLORS) for j2, c2 in enumerate(COLORS)
    if (3 * j1 + 7 * j2 + i1 + 2 * i2) % 6 == 0)
HELDOUT_RELATIONS = frozenset({("circle", "above", "triangle"), ("triangle", "below", "circle"),
    ("square", "left of", "triangle"), ("triangle", "right of", "square"),
    ("square", "above", "circle"), ("circle", "below", "square")})

POSITION_THRESHOLD = 0.1  # GenEval's position rule (evaluation/evaluate_images.py): see relation_direction
# Our stricter "clearly" for drawing position scenes and asking position questions: the offset direction
# points at least this much along one axis and at most CLEAR_OTHER along the other.
CLEAR_MAIN, CLEAR_OTHER = 0.75, 0.35


@dataclass(frozen=True)
class Obj:
    """One flat shape: its class, colour name and box (x0, y0, x1, y1) in pixels, x1/y1 exclusive."""
    shape: str
    color: str
    box: tuple


@dataclass
class Scene:
    """Ground truth of one image: its objects, GenEval tag, prompt, free caption and GenEval record."""
    objects: list
    tag: str
    prompt: str
    caption: str
    metadata: dict  # the GenEval record of `prompt`: {"tag", "include", "exclude"?, "prompt"}
    image_size: int = 32


def stable_seed(*parts) -> int:
    """A 64-bit seed from str/int parts, identical in every process (unlike hash(), salted per process)."""
    text = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def article(word: str) -> str:
    """GenEval's article rule: "an" before a vowel letter ("an orange circle"), else "a"."""
    return "an" if word[0] in "aeiou" else "a"


def plural(word: str) -> str:
    """GenEval's plural rule, kept verbatim for its prompts: +es after a final s, else +s ("benchs")."""
    return word + ("es" if word.endswith("s") else "s")


def relation_direction(box_a, box_b) -> tuple[float, float]:
    """GenEval's direction (dx, dy) of A relative to B, y down: the centre offset A - B shrunk towards zero
    by POSITION_THRESHOLD x (size A + size B) per axis, over the *unshrunk* offset's length (or (0, 0))."""
    a, b = np.asarray(box_a, dtype=np.float64), np.asarray(box_b, dtype=np.float64)  # (x0, y0, x1, y1)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    sizes = a[2:] - a[:2] + b[2:] - b[:2]
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * sizes, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return 0.0, 0.0
    dx, dy = revised / np.linalg.norm(offset)
    return float(dx), float(dy)


def relative_position(box_a, box_b) -> set:
    """The set of GenEval relations that hold for A relative to B (a diagonal offset gives two)."""
    dx, dy = relation_direction(box_a, box_b)
    return {rel for rel, holds in (("left of", dx < -0.5), ("right of", dx > 0.5),
                                   ("above", dy < -0.5), ("below", dy > 0.5)) if holds}


def clear_relation(box_a, box_b) -> str | None:
    """The one relation of A to B when it is unmistakable (mostly along one axis), else None."""
    dx, dy = relation_direction(box_a, box_b)
    if abs(dx) >= CLEAR_MAIN and abs(dy) <= CLEAR_OTHER:
        return "left of" if dx < 0 else "right of"
    if abs(dy) >= CLEAR_MAIN and abs(dx) <= CLEAR_OTHER:
        return "above" if dy < 0 else "below"
    return None


# --- GenEval records: the prompt space of every tag -------------------------------------------------

def geneval_prompt(record: dict) -> str:
    """The prompt GenEval writes for a record (reproduces all 553 official prompts exactly)."""
    tag, inc = record["tag"], record["include"]

    def noun(req):  # "a circle" / "an orange circle"
        words = f"{req['color']} {req['class']}" if "color" in req else req["class"]
        return f"{article(words)} {words}"

    if tag == "counting":
        return f"a photo of {NUMBER_WORDS[inc[0]['count']]} {plural(inc[0]['class'])}"
    if tag == "position":  # the reference object comes first in "include", the positioned one second
        return f"a photo of {noun(inc[1])} {inc[1]['position'][0]} {noun(inc[0])}"
    return "a photo of " + " and ".join(noun(req) for req in inc)


def _record(tag: str, include: list, exclude: list | None = None) -> dict:
    record = {"tag": tag, "include": include}
    if exclude:
        record["exclude"] = exclude
    record["prompt"] = geneval_prompt(record)
    return record


@functools.lru_cache(maxsize=None)
def _prompt_space(tag: str, split: str) -> tuple:
    """Every GenEval record of `tag` allowed in `split` (as JSON strings, so the cache stays immutable)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    test = split == "test"
    pairs = [(c, s) for s in SHAPES for c in COLORS]
    if tag == "single_object":
        records = [_record(tag, [{"class": s, "count": 1}]) for s in SHAPES]
    elif tag == "two_object":
        records = [_record(tag, [{"class": a, "count": 1}, {"class": b, "count": 1}])
                   for a in SHAPES for b in SHAPES if a != b]
    elif tag == "counting":  # GenEval: include N, exclude N + 1
        records = [_record(tag, [{"class": s, "count": n}], [{"class": s, "count": n + 1}])
                   for s in SHAPES for n in (2, 3, 4)]
    elif tag == "colors":
        records = [_record(tag, [{"class": s, "count": 1, "color": c}]) for c, s in pairs]
    elif tag == "position":
        records = [_record(tag, [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}])
                   for a in SHAPES for b in SHAPES for rel in RELATIONS
                   if a != b and ((a, rel, b) in HELDOUT_RELATIONS) == test]
    elif tag == "color_attr":
        records = [_record(tag, [{"class": s1, "count": 1, "color": c1},
                                 {"class": s2, "count": 1, "color": c2}])
                   for c1, s1 in pairs for c2, s2 in pairs
                   if s1 != s2 and (_combo((c1, s1), (c2, s2)) in HELDOUT_COMBOS) == test]
    else:
        raise ValueError(f"unknown tag {tag!r}; expected one of {TAGS}")
    return tuple(json.dumps(r) for r in records)


# --- Turning a record into objects: colours, sizes, a layout ----------------------------------------

def _check_in_world(record: dict) -> None:
    """Raise ValueError unless the shapes world can draw an image that satisfies `record`."""
    includes, excludes = record.get("include", []), record.get("exclude", [])
    classes = [req["class"] for req in includes]
    for req in includes + excludes:
        if req["class"] not in SHAPES:
            raise ValueError(f"class {req['class']!r} is not in the shapes world {SHAPES}")
        if not isinstance(req.get("count"), int) or req["count"] < 1:
            raise ValueError(f"bad count in {req}")
    if not includes or len(set(classes)) != len(classes):
        raise ValueError("the includes must name distinct classes (as every GenEval record does)")
    for i, req in enumerate(includes):
        if "color" in req and req["color"] not in COLORS:
            raise ValueError(f"colour {req['color']!r} is not one of {COLORS}")
        if "position" in req:
            rel, target = req["position"]
            if rel not in RELATIONS or not 0 <= target < i:
                raise ValueError(f"bad position {req['position']} in include {i}")
    if sum(req["count"] for req in includes) > MAX_OBJECTS:
        raise ValueError(f"more than {MAX_OBJECTS} objects")
    for req in excludes:
        if sum(inc["count"] for inc in includes if inc["class"] == req["class"]) >= req["count"]:
            raise ValueError(f"include and exclude contradict each other for {req['class']!r}")


def in_world(metadata: dict) -> bool:
    """True when `metadata` (a GenEval record) can be drawn in the shapes world (False for "bench")."""
    try:
        _check_in_world(metadata)
    except (ValueError, KeyError, TypeError, AttributeError):  # malformed records are not in the world
        return False
    return True


def _choose_colors(includes: list, rng: random.Random, split: str | None) -> list:
    """One (shape, colour, include index) per object: the record's colours, free ones drawn at random so
    that on split "train" no two objects form a held-out composition, on "test" (two shapes) one does."""
    specs = [[req["class"], req.get("color"), i]
             for i, req in enumerate(includes) for _ in range(req["count"])]
    fixed = [spec[1] for spec in specs]
    for _ in range(1000):  # rejection sampling of the free colours; a handful of tries in practice
        for spec, colour in zip(specs, fixed):
            spec[1] = colour if colour is not None else rng.choice(COLORS)
        heldout = any(_combo((c1, s1), (c2, s2)) in HELDOUT_COMBOS
                      for s1, c1, _ in specs for s2, c2, _ in specs if s1 != s2)
        if split is None or len({spec[0] for spec in specs}) < 2 or heldout == (split == "test"):
            return specs
    raise ValueError(f"no colouring of {includes} fits the {split!r} split's held-out compositions")


def _apart(a, b, gap: int) -> bool:
    """True when boxes a and b have at least `gap` background pixels between them on some axis."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _place(specs: list, rng: random.Random, image_size: int, accept, tries: int = 2000) -> list:
    """Random sizes and lattice positions for the objects, redrawn until none overlap and accept(objects).

    Boxes of 2x2 or 3x3 patches of the toy CLIP (4 px at 32 px), corners on the patch lattice, at least a
    patch apart: every patch token lies wholly in one object or the background, so its content is one of a
    few kinds (which object, which part of it), not an arbitrary cut through an outline."""
    step = max(1, round(4 * image_size / 32))  # one patch: the lattice step and the least gap
    sizes = (2 * step, 3 * step)
    for attempt in range(tries):
        # Four large objects rarely fit: after 100 failed layouts only the small size is drawn.
        allowed = sizes if attempt < 100 else sizes[:1]
        boxes = []
        for _ in specs:
            for _ in range(50):
                s = rng.choice(allowed)
                x0 = step * rng.randint(0, (image_size - s) // step)
                y0 = step * rng.randint(0, (image_size - s) // step)
                box = (x0, y0, x0 + s, y0 + s)
                if all(_apart(box, other, step) for other in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == len(specs):
            objects = [Obj(shape, color, box) for (shape, color, _), box in zip(specs, boxes)]
            if accept(objects):
                return objects
    raise ValueError(f"could not lay out {len(specs)} objects on a {image_size}px canvas")


def _objects_for(record: dict, rng: random.Random, split: str | None, image_size: int) -> list:
    """Objects whose image satisfies `record` under GenEval's rules (plus the split's held-out rules)."""
    _check_in_world(record)
    includes = record["include"]
    specs = _choose_colors(includes, rng, split)
    group = [i for _, _, i in specs]  # which include each object belongs to

    def accept(objects):  # positions drawn clearly; a train image shows no held-out relation (GenEval's rule)
        for (a, ga), (b, gb) in itertools.product(zip(objects, group), repeat=2):
            rel, target = includes[ga].get("position", (None, None))
            if rel is not None and gb == target and clear_relation(a.box, b.box) != rel:
                return False
        return split != "train" or not any((a.shape, rel, b.shape) in HELDOUT_RELATIONS
                                           for a in objects for b in objects if a.shape != b.shape
                                           for rel in relative_position(a.box, b.box))

    return _place(specs, rng, image_size, accept)


# --- Captions ---------------------------------------------------------------------------------------

def caption_for(objects: list) -> str:
    """A complete description naming every object's colour and shape, objects left to right.

    one object:        "a red circle"
    two objects:       "a red circle left of a blue square"  (or "... and ..." when no clear relation)
    one shape, >= 2:   "three squares in red green and blue"
    otherwise:         "a red circle and a blue square and a green triangle"
    """
    objects = sorted(objects, key=lambda o: (o.box[0] + o.box[2], o.box[1] + o.box[3]))  # left to right
    nouns = [f"{article(o.color)} {o.color} {o.shape}" for o in objects]
    if len(objects) >= 2 and len({o.shape for o in objects}) == 1:
        colors = [o.color for o in objects]
        color_list = " ".join(colors[:-1]) + " and " + colors[-1]
        return f"{NUMBER_WORDS[len(objects)]} {plural(objects[0].shape)} in {color_list}"
    if len(objects) == 2:
        rel = clear_relation(objects[0].box, objects[1].box)
        if rel is not None:
            return f"{nouns[0]} {rel} {nouns[1]}"
    return " and ".join(nouns)


# --- Scenes and drawing -----------------------------------------------------------------------------

def make_scene(index: int, split: str = "train", seed: int = 0, tag: str | None = None,
               image_size: int = 32) -> Scene:
    """Scene number `index` of a split, a pure function of (seed, split, index, tag, image_size): a record
    drawn uniformly from the split's prompt space of `tag` (None: TAGS[index % 6], so any six indices are
    balanced), realised with random colours and layout."""
    tag = TAGS[index % len(TAGS)] if tag is None else tag
    rng = random.Random(stable_seed("scene", seed, split, index, tag))
    record = json.loads(rng.choice(_prompt_space(tag, split)))
    objects = _objects_for(record, rng, split, image_size)
    return Scene(objects, tag, record["prompt"], caption_for(objects), record, image_size)


@functools.lru_cache(maxsize=None)
def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean (size, size) mask of a shape touching every edge row/column of its box; a pixel belongs to
    the shape when its centre does (no anti-aliasing, so colours stay exact)."""
    centres = np.arange(size) + 0.5
    u, v = np.meshgrid(centres, centres)  # (size, size): u = x, v = y, both measured from the box corner
    half = size / 2
    if shape == "square":
        mask = np.ones((size, size), dtype=bool)
    elif shape == "circle":
        mask = (u - half) ** 2 + (v - half) ** 2 <= half ** 2
    elif shape == "triangle":
        # Half-width grows linearly from the apex; the extra pixel of width gives the apex row 2-3 pixels,
        # so no pixel of the shape hangs on by a single neighbour (the detector prunes such spurs).
        mask = np.abs(u - half) <= v / size * half + 1.0
    else:
        raise ValueError(f"unknown shape {shape!r}")
    mask.setflags(write=False)
    return mask


def draw_objects(objects: list, image_size: int = 32) -> np.ndarray:
    """uint8 (H, W, 3) image of the objects on the background."""
    img = np.full((image_size, image_size, 3), BACKGROUND, dtype=np.uint8)
    for o in objects:
        x0, y0, x1, y1 = o.box
        img[y0:y1, x0:x1][shape_mask(o.shape, x1 - x0)] = COLOR_RGB[o.color]
    return img


def token_labels(scene: Scene, grid: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-token ground truth for the toy CLIP's dense objective, on a grid x grid token layout.

    A cell (4x4 px at 32 px, grid 8) belongs to the object covering most of its pixels if that is at least
    a quarter, else to the background. Returns colour and shape (grid*grid,) int into COLORS / SHAPES
    (len(COLORS) / len(SHAPES): background) and box (grid*grid, 4) float, the owner's (x0, y0, x1, y1) /
    image size or zeros: every token of an object carries the whole object, not a copy of its pixels."""
    size, cell = scene.image_size, scene.image_size // grid
    owner = np.full((size, size), -1, dtype=np.int64)  # (H, W) index of the object drawn at each pixel
    for k, o in enumerate(scene.objects):
        x0, y0, x1, y1 = o.box
        owner[y0:y1, x0:x1][shape_mask(o.shape, x1 - x0)] = k
    cells = owner.reshape(grid, cell, grid, cell).transpose(0, 2, 1, 3).reshape(grid * grid, cell * cell)
    objs = scene.objects
    counts = (cells[:, :, None] == np.arange(len(objs))).sum(1)  # (grid*grid, K) pixels of each object
    best, owned = counts.argmax(1), counts.max(1) * 4 >= cell * cell  # (grid*grid,) each
    colour = np.where(owned, np.array([COLORS.index(o.color) for o in objs])[best], len(COLORS))
    shape = np.where(owned, np.array([SHAPES.index(o.shape) for o in objs])[best], len(SHAPES))
    box = np.array([o.box for o in objs], dtype=np.float32)[best] / size  # (grid*grid, 4)
    box = np.where(owned[:, None], box, 0).astype(np.float32)
    return colour.astype(np.int64), shape.astype(np.int64), box


def slot_order(objects):
    """The objects top-left first: by x + y of the box centre. Of two objects in a clear relation the one
    left of or above the other comes first (the main axis's offset is over twice the other's), so "A left
    of B" and "A above B" both put A in the first slot: a relation word says which slot holds which."""
    return sorted(objects, key=lambda o: (o.box[0] + o.box[2] + o.box[1] + o.box[3], o.box[0] + o.box[2]))


def scene_labels(scene: Scene, slots: int = MAX_OBJECTS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ground truth for the scene tokens, the objects in slot_order, one per slot: colour, shape (slots,)
    and box (slots, 4) as in token_labels (len(COLORS) / len(SHAPES) and zeros: an empty slot)."""
    colour = np.full(slots, len(COLORS), dtype=np.int64)
    shape = np.full(slots, len(SHAPES), dtype=np.int64)
    box = np.zeros((slots, 4), dtype=np.float32)
    for k, o in enumerate(slot_order(scene.objects)):
        colour[k], shape[k] = COLORS.index(o.color), SHAPES.index(o.shape)
        box[k] = np.asarray(o.box, dtype=np.float32) / scene.image_size
    return colour, shape, box


def objects_from_slots(colour, shape, box, image_size: int = 32) -> list:
    """Read-out slots -> Obj list, the inverse of scene_labels: one object per slot whose colour and
    shape are both named; its box a square of the read size (rounded to a pixel, at least 2) around the
    read centre, clipped to the canvas. Used to draw exactly what generated scene tokens say."""
    objects = []
    for c, s, b in zip(colour, shape, box):
        if int(c) >= len(COLORS) or int(s) >= len(SHAPES):
            continue
        x0, y0, x1, y1 = (float(v) * image_size for v in b)
        size = min(image_size, max(2, round((x1 - x0 + y1 - y0) / 2)))
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        left = min(max(round(cx - size / 2), 0), image_size - size)
        top = min(max(round(cy - size / 2), 0), image_size - size)
        objects.append(Obj(SHAPES[int(s)], COLORS[int(c)], (left, top, left + size, top + size)))
    return objects


def draw(scene: Scene, image_size: int | None = None) -> np.ndarray:
    """uint8 (H, W, 3) image of a scene (its boxes are in pixels, so the size must be the scene's own)."""
    if image_size is not None and image_size != scene.image_size:
        raise ValueError(f"scene was laid out for {scene.image_size}px, not {image_size}px")
    return draw_objects(scene.objects, scene.image_size)


def make_image_set(n: int, split: str = "train", seed: int = 0, image_size: int = 32,
                   tags: tuple | None = None) -> tuple[torch.Tensor, list]:
    """Scenes 0..n-1 of a split drawn at once: (uint8 images (n, 3, H, W), scenes); scene i gets tag
    tags[i % len(tags)] (tags None: all TAGS in turn)."""
    scenes = [make_scene(i, split, seed, None if tags is None else tags[i % len(tags)], image_size)
              for i in range(n)]
    images = np.array([draw(s) for s in scenes], dtype=np.uint8).reshape(n, image_size, image_size, 3)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), scenes  # (n, 3, H, W)


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [0, 1], the project's image convention."""
    return as_float(torch.tensor(np.asarray(arr)).permute(2, 0, 1))  # copy: arr may be read-only; (3, H, W)


def as_float(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 images (..., 3, H, W) -> float32 in [0, 1]: what every model here reads."""
    return images_u8.float().div(255)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images (..., 3, H, W) in [0, 1] -> uint8 (..., H, W, 3), the layout files and detectors use."""
    return (images.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1)


# --- 2. Understanding data: questions with one-word answers -------------------------------------------

QTYPES = ("color", "shape", "count", "position")  # what eval.py scores
# Teaching questions, asked in training when the recipe says so (train.py), never scored: a relation
# between two objects named by their colours, which no (shape pair, axis) prior answers, and an object's
# own place in the picture.
AUX_QTYPES = ("color_position", "place")
caption_question = "describe the image ."  # its answer is scene.caption


def place_of(box, image_size: int) -> str | None:
    """Where an object sits in the picture, from its centre: "above left", "below", ...; None near the
    middle on both axes (within a patch of it)."""
    cx, cy = (box[0] + box[2]) / 2 / image_size - 0.5, (box[1] + box[3]) / 2 / image_size - 0.5
    margin = 1 / 16  # 2 px at 32 px
    words = [w for w, holds in (("above", cy < -margin), ("below", cy > margin),
                                ("left", cx < -margin), ("right", cx > margin)) if holds]
    return " ".join(words) or None


def make_qa(scene: Scene, rng: random.Random, aux: tuple = ()) -> list[tuple[str, str, str]]:
    """Every (qtype, question, answer) about a scene whose answer is certain, shuffled by `rng`: the colour
    of a shape present once, the shape of a colour present once, the count (1-4) of each present shape and
    of all objects, the position of a unique shape relative to another when clear_relation() finds one;
    and the AUX_QTYPES in `aux`: the same relation between objects of unique colours, the place of a unique
    shape."""
    objs = scene.objects
    by_shape = {s: [o for o in objs if o.shape == s] for s in SHAPES}
    by_color = {c: [o for o in objs if o.color == c] for c in COLORS}
    qa = []
    for s, group in by_shape.items():
        if len(group) == 1:
            qa.append(("color", f"what color is the {s} ?", group[0].color))
        if group:
            qa.append(("count", f"how many {plural(s)} are there ?", NUMBER_WORDS[len(group)]))
    qa.append(("count", "how many objects are there ?", NUMBER_WORDS[len(objs)]))
    for c, group in by_color.items():
        if len(group) == 1:
            qa.append(("shape", f"what shape is the {c} object ?", group[0].shape))
    for qtype, groups, name in (("position", by_shape, "the {}"),
                                ("color_position", by_color, "the {} object")):
        if qtype != "position" and qtype not in aux:
            continue
        for a, b in itertools.permutations(groups, 2):
            if len(groups[a]) == 1 and len(groups[b]) == 1:
                rel = clear_relation(groups[a][0].box, groups[b][0].box)
                if rel is not None:
                    q = f"where is {name.format(a)} relative to {name.format(b)} ?"
                    qa.append((qtype, q, rel.split()[0]))
    if "place" in aux:
        for s, group in by_shape.items():
            if len(group) == 1 and (where := place_of(group[0].box, scene.image_size)) is not None:
                qa.append(("place", f"where is the {s} ?", where))
    rng.shuffle(qa)
    return qa


# Every word of every prompt, caption, question and answer (plus the generation template) as the toy
# tokenizer reads it (lower case, punctuation as separate words): it never meets an unknown word.
VOCAB = sorted({"a", "an", "and", "in", "photo", "of", "objects"}
               | set(SHAPES) | {plural(s) for s in SHAPES} | set(COLORS) | set(NUMBER_WORDS.values())
               | {w for rel in RELATIONS for w in rel.split()}
               | set("what color is the shape object how many are there where relative to ?".split())
               | set(caption_question.split()) | set(toy_words(PROMPT_TEMPLATE.format(""))))


# --- 3. GenEval: prompts, rendering, a pixel detector and the official scoring rules ------------------

def geneval_prompts(split: str = "test", n_per_tag: int | None = 16, seed: int = 0) -> list[dict]:
    """GenEval-schema records of the shapes world, up to `n_per_tag` distinct prompts per tag (None: all;
    a smaller prompt space gives all of it); split "test" gives the held-out compositions."""
    records = []
    for tag in TAGS:
        space = [json.loads(r) for r in _prompt_space(tag, split)]
        if n_per_tag is not None and n_per_tag < len(space):
            space = random.Random(stable_seed("prompts", seed, split, tag)).sample(space, n_per_tag)
        records.extend(space)
    return records


def render(metadata: dict, seed: int = 0, image_size: int = 32) -> np.ndarray:
    """uint8 (H, W, 3) image that satisfies any in-world GenEval record (ValueError for e.g. "bench"):
    free colours drawn at random, positions drawn clearly (see clear_relation)."""
    rng = random.Random(stable_seed("render", seed, json.dumps(metadata, sort_keys=True)))
    return draw_objects(_objects_for(metadata, rng, None, image_size), image_size)


def load_geneval_metadata(path) -> list[dict]:
    """Records of an official `evaluation_metadata.jsonl`; a bad line raises ValueError naming it."""
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not (isinstance(record, dict) and "tag" in record and isinstance(record.get("prompt"), str)):
                raise ValueError(f"{path}:{n}: not a GenEval record (needs 'tag' and 'prompt')")
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


# --- The detector: pixels -> palette colours -> connected components -> shapes ----------------------

_PALETTE = np.array([COLOR_RGB[c] for c in COLORS], dtype=np.float32)  # (K, 3)
_BG = np.array(BACKGROUND, dtype=np.float32)
MAX_COLOR_DISTANCE = 60.0  # RGB distance beyond which a pixel matches no palette colour (and counts as bg)
MIN_AREA_FRACTION = 0.01  # components smaller than this fraction of the image are noise


def classify_pixels(img: np.ndarray) -> np.ndarray:
    """(H, W) index into COLORS of each pixel's colour (-1: background): the colour c whose segment
    BACKGROUND -> c in RGB (blur's edges) is nearest, if the pixel is at least half-way along it and near."""
    p = img.astype(np.float32) - _BG  # (H, W, 3) offsets from the background
    d = _PALETTE - _BG  # (K, 3) segment directions
    alpha = np.clip(p @ d.T / (d * d).sum(1), 0.0, 1.0)  # (H, W, K) position along each segment
    residual = np.linalg.norm(p[:, :, None, :] - alpha[..., None] * d, axis=-1)  # (H, W, K)
    best = residual.argmin(-1)  # (H, W)
    best_alpha = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
    best_residual = np.take_along_axis(residual, best[..., None], -1)[..., 0]
    return np.where((best_alpha >= 0.5) & (best_residual <= MAX_COLOR_DISTANCE), best, -1)


def connected_components(labels: np.ndarray) -> np.ndarray:
    """(H, W) component ids (-1 for background) of 4-connected pixels sharing the same label >= 0, by
    min-label propagation: each pixel starts with its flat index and takes its neighbours' smallest id."""
    big = labels.size
    ids = np.where(labels >= 0, np.arange(big).reshape(labels.shape), big)
    while True:
        new = ids.copy()
        # Each pixel against its neighbour below, then (transposed views) to the right; new.T writes to new.
        for ids_v, labels_v in ((new, labels), (new.T, labels.T)):
            same = (labels_v[1:] == labels_v[:-1]) & (labels_v[1:] >= 0)  # (H-1, W) / (W-1, H)
            low = np.minimum(ids_v[1:], ids_v[:-1])
            ids_v[1:] = np.where(same, low, ids_v[1:])
            ids_v[:-1] = np.where(same, np.minimum(ids_v[:-1], low), ids_v[:-1])
        if np.array_equal(new, ids):
            break
        ids = new
    return np.where(ids == big, -1, ids)


def prune_spurs(labels: np.ndarray) -> np.ndarray:
    """Drop foreground pixels with fewer than two 4-neighbours of their colour (noise beside a shape widens
    its box and lowers the fill ratio). Drawn shapes have none (shape_mask): clean images are unchanged."""
    padded = np.pad(labels, 1, constant_values=-1)  # (H + 2, W + 2)
    neighbours = sum((padded[1 + dy:padded.shape[0] - 1 + dy, 1 + dx:padded.shape[1] - 1 + dx] == labels)
                     for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)))  # (H, W) same-colour neighbours
    return np.where((labels >= 0) & (neighbours < 2), -1, labels)


def classify_shape(mask: np.ndarray) -> str:
    """Shape of a component from its (h, w) box mask: a triangle (apex up) widens downwards by about half a
    box; the fill ratio tells a square (~1.0) from a circle (~0.785; ~0.85 if small, odd)."""
    h, w = mask.shape
    widths = mask.sum(1)  # (h,) pixels per row
    half = max(1, h // 2)
    widening = (widths[h - half:].mean() - widths[:half].mean()) / w
    if widening > 0.2:
        return "triangle"
    return "square" if mask.mean() > 0.9 else "circle"


def detect_objects(img: np.ndarray) -> list[dict]:
    """Objects in a uint8 (H, W, 3) image: dicts {class, color, box (x0, y0, x1, y1), area}, largest first
    (the area stands in for the confidence GenEval sorts by: it checks the top `count` of a class)."""
    img = np.asarray(img)
    labels = prune_spurs(classify_pixels(img))
    comps = connected_components(labels)
    min_area = max(3, MIN_AREA_FRACTION * labels.size)
    objects = []
    for comp_id in np.unique(comps[comps >= 0]):
        ys, xs = np.nonzero(comps == comp_id)
        if len(ys) < min_area:
            continue
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        mask = comps[y0:y1, x0:x1] == comp_id  # (h, w)
        color = COLORS[labels[ys[0], xs[0]]]
        objects.append({"class": classify_shape(mask), "color": color, "box": (x0, y0, x1, y1),
                        "area": int(len(ys))})
    return sorted(objects, key=lambda o: -o["area"])


# --- GenEval's rules ---------------------------------------------------------------------------------

def score_record(metadata: dict, objects: list[dict]) -> tuple[bool, str]:
    """(correct, reason) of detected objects against a GenEval record, with the official semantics."""
    by_class = {}
    for obj in sorted(objects, key=lambda o: -o["area"]):
        by_class.setdefault(obj["class"], []).append(obj)
    reasons, matched_groups = [], []  # every failed clause adds a reason
    # Include clauses are ANDed: the top `count` objects of the class (largest first) must exist, have the
    # clause's colour if any, and for a position [rel, i] each stand in relation rel to all include i matched.
    for req in metadata.get("include", []):
        cls, count, colour = req["class"], req["count"], req.get("color")
        found = by_class.get(cls, [])[:count]
        colors = [o["color"] for o in found]
        rel, target = req.get("position", (None, None))
        reason = None
        if len(found) < count:
            reason = f"expected {cls}>={count}, found {len(found)}"
        elif "color" in req and colors.count(colour) < count:
            seen = ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
            reason = f"expected {colour} {cls}>={count}, found {colors.count(colour)} {colour}; and {seen}"
        elif "position" in req and matched_groups[target] is None:
            reason = f"no target for {cls} to be {rel}"
        elif "position" in req:
            shown = [relative_position(o["box"], t["box"]) for o in found for t in matched_groups[target]]
            if wrong := [rels for rels in shown if rel not in rels]:
                reason = f"expected {cls} {rel} target, found {' and '.join(sorted(wrong[0]))} target"
        if reason is not None:
            reasons.append(reason)
        matched_groups.append(found if reason is None else None)
    for req in metadata.get("exclude", []):  # ORed: `count` or more objects of the class make it wrong
        n = len(by_class.get(req["class"], []))
        if n >= req["count"]:
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return not reasons, "\n".join(reasons)


# --- GenEval's folder layout --------------------------------------------------------------------------

def _to_hwc_uint8(image) -> np.ndarray:
    """uint8 (H, W, 3) from either a uint8 array (H, W, 3) or a float tensor/array (3, H, W) in [0, 1]."""
    if isinstance(image, torch.Tensor) and image.dtype != torch.uint8:
        return to_uint8(image).numpy()  # float (3, H, W) -> uint8 (H, W, 3)
    image = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image)
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
        image = image.transpose(1, 2, 0)  # (H, W, 3)
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return image


def write_geneval_folder(outdir: str, records: list[dict], images_per_record: list) -> None:
    """GenEval's layout: outdir/00000/metadata.jsonl (the record) + outdir/00000/samples/0000.png, ...;
    images_per_record[i]: the images of records[i], uint8 (H, W, 3) or float (3, H, W) in [0, 1]."""
    if len(records) != len(images_per_record):
        raise ValueError(f"{len(records)} records but {len(images_per_record)} image lists")
    for i, (record, images) in enumerate(zip(records, images_per_record)):
        folder = os.path.join(outdir, f"{i:05d}")
        os.makedirs(os.path.join(folder, "samples"), exist_ok=True)
        with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for j, image in enumerate(images):
            Image.fromarray(_to_hwc_uint8(image)).save(os.path.join(folder, "samples", f"{j:04d}.png"))


def score_folder(outdir: str) -> tuple[list[dict], dict]:
    """Score a GenEval folder with the pixel detector -> (one result per image, with the official keys;
    summary {"per_tag": {tag: accuracy}, "overall": mean over the tags present, "images": n})."""
    results = []
    for sub in sorted(os.listdir(outdir)):
        folder = os.path.join(outdir, sub)
        if not (sub.isdigit() and os.path.isdir(folder)):
            continue
        with open(os.path.join(folder, "metadata.jsonl"), encoding="utf-8") as f:
            metadata = json.loads(f.readline())
        samples = os.path.join(folder, "samples")
        for name in sorted(os.listdir(samples)):
            if not re.fullmatch(r"\d+\.png", name):
                continue
            path = os.path.join(samples, name)
            with Image.open(path) as im:
                objects = detect_objects(np.asarray(im.convert("RGB")))
            correct, reason = score_record(metadata, objects)
            details = {}
            for obj in objects:
                details.setdefault(obj["class"], []).append(list(obj["box"]))
            results.append({"filename": path, "tag": metadata["tag"], "prompt": metadata["prompt"],
                            "correct": correct, "reason": reason, "metadata": json.dumps(metadata),
                            "details": json.dumps(details)})
    per_tag = {}
    for tag in sorted({r["tag"] for r in results}):
        hits = [r["correct"] for r in results if r["tag"] == tag]
        per_tag[tag] = sum(hits) / len(hits)
    overall = sum(per_tag.values()) / len(per_tag) if per_tag else 0.0
    return results, {"per_tag": per_tag, "overall": overall, "images": len(results)}


# --- 4. Data at scale: WebDataset-style tar shards and image folders, robust to bad samples -----------
# Real caption data is messy (corrupt files, bad captions, odd image modes, decompression bombs) and must
# not stop a multi-day run: a bad sample is skipped and counted; only a pass with nothing readable fails.

MAX_IMAGE_PIXELS = 4096 * 4096  # larger images are refused from their header, before any decoding
MAX_MEMBER_BYTES = 64 * 2 ** 20  # larger tar members are not even read into memory
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # first one present is the sample's image


def encode_image(arr: np.ndarray, format: str = "PNG") -> bytes:
    """Bytes of a uint8 (H, W, 3) image in a file format (PNG, JPEG, ...), for writing shards."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=format)
    return buf.getvalue()


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: 16-bit/float grey rescaled to 8 bits, transparency composited on white."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        arr = np.asarray(im, dtype=np.float64)
        arr = arr / 257 if arr.max(initial=0) > 255 else arr  # 16-bit range
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGB


def decode_image(data: bytes, image_size: int, max_pixels: int = MAX_IMAGE_PIXELS):
    """Encoded image bytes -> (float (3, S, S) in [0, 1], None): shorter side resized to S, centre cropped;
    or (None, reason): "empty_image", "too_large" (from the header), "bad_image" (corrupt, unsupported)."""
    if not data:
        return None, "empty_image"
    try:
        with warnings.catch_warnings():
            # PIL only warns between its own limit and twice that; make it an error like the rest.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # reads the header only
            if im.width * im.height > max_pixels:
                return None, "too_large"
            im = ImageOps.exif_transpose(im)  # decodes; honours camera rotation as GenEval does
            im = ImageOps.fit(_to_rgb(im), (image_size, image_size), method=Image.Resampling.BICUBIC)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "too_large"
    except Exception:  # noqa: BLE001 -- a decoder can fail in many ways; any failure means "bad image"
        return None, "bad_image"
    return to_tensor(np.asarray(im)), None


def _decode_caption(caption):
    """Caption bytes or str -> (text, None) or (None, reason)."""
    if caption is None:
        return None, "missing_caption"
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError:
            return None, "bad_caption"
    if not isinstance(caption, str):
        return None, "bad_caption"
    caption = caption.strip()
    return (caption, None) if caption else (None, "empty_caption")


class _CaptionStream(torch.utils.data.IterableDataset):
    """Shared machinery of the readers: splitting, decoding, skipping with counts, resume. A reader defines
    `_describe()` (its input, for errors) and `_raw(slot, slots)`, yielding (is_sample, image bytes, caption,
    reason) for its slot's samples in order (is_sample False: a bad shard). The world_size x num_workers
    readers are "slots": slot k owns sample i when i % slots == k or, splitting tar shards by shard (the
    default once there are as many shards as slots), whole shards j % slots == k. `position` counts the
    pass's samples handed out or skipped; load_state_dict() makes the next pass skip them (exact with
    num_workers=0, as train.py reads: with workers, `position` and `stats` live in the workers)."""

    def __init__(self, image_size: int, rank: int, world_size: int, start: int, max_pixels: int):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.image_size, self.rank, self.world_size = image_size, rank, world_size
        self.start, self.position, self.max_pixels = start, start, max_pixels
        self.stats = {"ok": 0, "skipped": {}}

    def _skip(self, reason: str) -> None:
        self.stats["skipped"][reason] = self.stats["skipped"].get(reason, 0) + 1

    def __iter__(self):
        info = torch.utils.data.get_worker_info()  # this reader's slot from its rank and DataLoader worker
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        slot, slots = self.rank * workers + worker, self.world_size * workers
        self.stats = {"ok": 0, "skipped": {}}
        index = 0  # this slot's sample index in the pass
        for is_sample, image_bytes, caption, reason in self._raw(slot, slots):
            if not is_sample:
                self._skip(reason)  # a whole unreadable input: counted, but not a position
                continue
            index += 1
            if index <= self.start:
                continue
            self.position = index
            if reason is None:
                caption, reason = _decode_caption(caption)
            if reason is None and image_bytes is None:
                reason = "missing_image"
            elif reason is None:
                image, reason = decode_image(image_bytes, self.image_size, self.max_pixels)
            if reason is not None:
                self._skip(reason)
                continue
            self.stats["ok"] += 1
            yield image, caption
        if self.stats["ok"] == 0 and self.stats["skipped"]:
            raise RuntimeError(f"no readable samples in {self._describe()} (reader {slot} of {slots}): "
                               f"skipped {self.stats['skipped']}")
        self.start, self.position = 0, 0  # a finished pass: the next one starts from the beginning

    def state_dict(self) -> dict:
        """{"position": samples of this reader's current pass already consumed or skipped}."""
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next pass skips the first state["position"] samples of this reader."""
        self.start = self.position = int(state["position"])


def _tar_groups(path: str, max_member_bytes: int):
    """Yield (key, {ext: bytes | None (over max_member_bytes)}, reason) per sample of a tar stream; a broken
    stream ends it with reason "truncated_shard" (or, no sample started, key None and "bad_shard")."""
    key, members = None, {}
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                folder, base = os.path.split(info.name)  # WebDataset: "dir/0001.jpg" -> "dir/0001", "jpg"
                if "." not in base or base.startswith("."):
                    continue
                stem, ext = base.split(".", 1)
                member_key, ext = os.path.join(folder, stem), ext.lower()
                if member_key != key:
                    if key is not None:
                        yield key, members, None
                    key, members = member_key, {}
                if info.size > max_member_bytes:
                    members[ext] = None
                    continue
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError("unexpected end of data")
                members[ext] = data
    except (tarfile.TarError, EOFError, OSError, ValueError):  # how a damaged tar stream fails
        yield key, members, "truncated_shard" if key is not None else "bad_shard"
        return
    if key is not None:
        yield key, members, None


class TarShards(_CaptionStream):
    """WebDataset-style .tar shards -> (image float (3, S, S) in [0, 1], caption str), bad samples skipped.
    A sample is the run of consecutive members sharing a key: KEY.jpg / .jpeg / .png / .webp (image) and
    KEY.txt (UTF-8 caption). `stats` = {"ok": n, "skipped": {reason: n}}, reasons empty_image, bad_image,
    too_large, missing_image, missing_caption, bad_caption, empty_caption, truncated_shard, bad_shard."""

    def __init__(self, shards: list, image_size: int = 32, rank: int = 0, world_size: int = 1,
                 start: int = 0, split_by: str = "auto", max_pixels: int = MAX_IMAGE_PIXELS,
                 max_member_bytes: int = MAX_MEMBER_BYTES):
        super().__init__(image_size, rank, world_size, start, max_pixels)
        if isinstance(shards, str):
            shards = [shards]
        if not shards:
            raise ValueError("no shards given")
        if split_by not in ("auto", "shard", "sample"):
            raise ValueError(f"split_by must be auto, shard or sample, got {split_by!r}")
        self.shards, self.split_by, self.max_member_bytes = list(shards), split_by, max_member_bytes

    def _describe(self) -> str:
        return f"{len(self.shards)} shard(s) starting {self.shards[0]}"

    def _raw(self, slot: int, slots: int):
        by_shard = self.split_by == "shard" or (self.split_by == "auto" and len(self.shards) >= slots)
        i = 0  # sample index in the whole stream (sample split)
        for k, path in enumerate(self.shards):
            if by_shard and k % slots != slot:
                continue
            for key, members, reason in _tar_groups(path, self.max_member_bytes):
                if key is None:  # an unreadable shard: counted once, by the reader that owns shard k
                    if by_shard or k % slots == slot:
                        yield False, None, None, reason
                    continue
                mine = by_shard or i % slots == slot
                i += 1
                if not mine:
                    continue
                image_ext = next((e for e in IMAGE_EXTS if e in members), None)
                image, caption = members.get(image_ext), members.get("txt")
                unread = (image_ext and image is None) or ("txt" in members and caption is None)
                if reason is None and unread:
                    reason = "too_large"  # a member over max_member_bytes was left unread
                yield True, image, caption, reason


class ImageFolderCaptions(_CaptionStream):
    """An image folder plus a JSONL file of {"file": path under root, "caption": str} lines -> (image,
    caption) as TarShards; bad lines are skipped as "bad_record", unreadable files as "missing_image"."""

    def __init__(self, root: str, captions: str, image_size: int = 32, rank: int = 0, world_size: int = 1,
                 start: int = 0, max_pixels: int = MAX_IMAGE_PIXELS):
        super().__init__(image_size, rank, world_size, start, max_pixels)
        self.root, self.captions = root, captions

    def _describe(self) -> str:
        return f"{self.captions} (images under {self.root})"

    def _raw(self, slot: int, slots: int):
        with open(self.captions, "rb") as f:
            for i, line in enumerate(line for line in f if line.strip()):
                if i % slots != slot:
                    continue
                try:
                    record = json.loads(line.decode("utf-8"))
                    name, caption = record["file"], record.get("caption")
                    if not isinstance(name, str):
                        raise TypeError(name)
                except (ValueError, KeyError, TypeError):
                    yield True, None, None, "bad_record"
                    continue
                try:
                    with open(os.path.join(self.root, name), "rb") as img:
                        data = img.read()
                except OSError:
                    data = None
                yield True, data, caption, None


class DataError(ValueError):
    """Training data that cannot be read as asked (train.py reports it in one line, exit status 2)."""


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's brace notation: 'a/{000..002}.tar' -> a/000.tar a/001.tar a/002.tar; '{x,y}' too."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    if ".." in body:
        lo, hi = body.split("..", 1)
        if not (lo.isdigit() and hi.isdigit()):
            raise DataError(f"--data: cannot expand {{{body}}} (numbers expected, as in {{00000..00099}})")
        items = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [name for item in items for name in expand_braces(pattern[:m.start()] + item + pattern[m.end():])]


def open_source(source: str, captions: str | None, image_size: int, rank: int, world: int):
    """This rank's reader of train.py's --data: tar shards (glob / brace list), or a folder + --captions."""
    if captions:
        if not os.path.isdir(source) or not os.path.isfile(captions):
            raise DataError(f"--data {source} must be a folder and --captions {captions} a JSONL file")
        return ImageFolderCaptions(source, captions, image_size, rank=rank, world_size=world)
    shards = []
    for name in expand_braces(source):
        if glob.has_magic(name):
            shards += sorted(glob.glob(name))
        elif os.path.isfile(name):
            shards.append(name)
        else:
            raise DataError(f"--data: no shard {name}")
    if not shards:
        raise DataError(f"--data {source!r} matches no files")
    return TarShards(shards, image_size, rank=rank, world_size=world)


def _add_counts(a: dict, b: dict) -> dict:  # two {reason: count} tallies added up
    return {k: a.get(k, 0) + b.get(k, 0) for k in a | b}


class StreamBatches:
    """This rank's endless stream of (images, captions) batches, pass after pass, resumable: read in the
    training process (no workers), so the saved position is exactly what the finished steps consumed."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.epoch = 0  # passes completed over this rank's share
        self.counts = {"ok": 0, "skipped": {}}  # finished passes (and the part of this one before a resume)
        self.truncated = 0  # prompts cut to the backbone's length limit
        self._it, self._yielded, self._fresh = None, 0, True

    def take(self, n: int) -> tuple[torch.Tensor, list]:
        """The next n good samples -> images (n, 3, S, S) in [0, 1] and n captions."""
        images, captions = [], []
        while len(images) < n:
            if self._it is None:
                self._it, self._yielded, self._fresh = iter(self.dataset), 0, self.dataset.start == 0
            try:
                image, caption = next(self._it)
            except StopIteration:
                if self._yielded == 0 and self._fresh:  # a whole pass without one sample: would spin forever
                    raise DataError(f"--data: no samples for rank {self.dataset.rank} of "
                                    f"{self.dataset.world_size}") from None
                self.counts = self.totals()  # the pass's counts join the totals (and are zeroed: once only)
                self.dataset.stats = {"ok": 0, "skipped": {}}
                self._it, self.epoch = None, self.epoch + 1
                continue
            except RuntimeError as e:  # the reader's "no readable samples" (every sample was bad)
                raise DataError(f"--data: {e}") from None
            self._yielded += 1
            images.append(image)
            captions.append(caption)
        return torch.stack(images), captions

    def totals(self) -> dict:
        now, done = self.dataset.stats, self.counts
        return {"ok": done["ok"] + now["ok"], "skipped": _add_counts(done["skipped"], now["skipped"])}

    def state(self) -> dict:
        """This rank's position and counts, as saved (for every rank) in the checkpoint."""
        return {"epoch": self.epoch, "position": self.dataset.state_dict()["position"],
                "truncated": self.truncated, **self.totals()}

    def load_state(self, mine: dict) -> None:
        """Continue where this rank's saved `state()` stopped reading."""
        self.epoch, self.truncated = mine["epoch"], mine["truncated"]
        self.counts = {"ok": mine["ok"], "skipped": dict(mine["skipped"])}
        self.dataset.load_state_dict({"position": mine["position"]})


def stream_summary(ranks: list) -> str:
    """One line for the log: samples read and skipped (with reasons), summed over every rank's state()."""
    ok, truncated = sum(r["ok"] for r in ranks), sum(r["truncated"] for r in ranks)
    skipped = functools.reduce(_add_counts, (r["skipped"] for r in ranks), {})
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "none"
    return (f"{ok} samples read, {sum(skipped.values())} skipped ({reasons}), {truncated} prompts "
            f"truncated; {max(r['epoch'] for r in ranks)} full passes, {len(ranks)} rank(s)")
