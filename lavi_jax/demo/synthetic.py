"""A synthetic VQA set in LLaVA format for the demo: coloured shapes and short answers.

Each image shows 1-3 shapes (circle, square, triangle; at most one of each)
in distinct colours on a white background, every shape wholly in the left or
the right half. Each record asks one question, the three kinds taking turns:

* colour: "What colour is the circle?" -> one of six colours
* count: "How many shapes are there?" -> "one" | "two" | "three"
* side: "Which side is the square on?" -> "left" | "right"

Shape count, colours and sides are drawn uniformly and independently of the
wording, so the text alone predicts no better than the majority answer of
each kind (1/6, 1/3 and 1/2). Records carry ``question_type``, ``answer`` and
the drawn ``scene`` for evaluation. Output is deterministic given the seed.

Options (``write_synthetic_vqa``):

* ``grid=N``: each shape inside its own cell of an N x N grid (free placement
  when 0); with ViT patches equal to the cells, every shape lies in one patch.
* ``jitter`` (grid only): shapes of random size at random offsets in their
  cells; without it every shape fills the middle 75 % of its cell.
* ``sentences``: answers restate their subject: "The circle is red.", "The
  square is on the left.", "There are two shapes."
* ``train_kinds``: the training records' kinds, asked in turn (a kind
  listed twice is asked twice as often). Besides the three above, one may add

  - shape: "What shape is red?" -> "circle" | "square" | "triangle"
  - caption: "Describe the image." -> "red circle left, blue square right"
    (left to right)

* ``train_turns`` > 1: each training image gets a multi-turn conversation of
  that many questions (kinds in random order, one of each before any
  repeats), as in LLaVA's instruction data; ``question_type`` / ``answer``
  then describe the last turn.
* ``eval_kinds``: the held-out records' kinds, asked in turn (default the
  three above), e.g. ``("shape",)`` to test a kind the model never trained on.
* ``eval_unseen``: every held-out image differs from every training image
  (a held-out scene drawn again as long as its image is a training one).
  Off by default: in a 4 x 4 grid there are only 288 one-shape scenes, so a
  large training set holds most of them.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from lavi_jax import storage

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 180),
    "orange": (250, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (255, 255, 255)
NUMBERS = ("one", "two", "three")
QUESTION_TYPES = ("colour", "count", "side")  # the default held-out kinds
EXTRA_TYPES = ("shape", "caption")  # may be added to the training records
_TEMPLATES = {
    "colour": ("What colour is the {shape}?", "What is the colour of the {shape}?"),
    "count": ("How many shapes are there?", "How many shapes are in the image?"),
    "side": ("Which side is the {shape} on?", "On which side is the {shape}?"),
    "shape": ("What shape is {colour}?", "Which shape is {colour}?"),
    "caption": ("Describe the image.", "What is in the image?"),
}


def make_scene(rng: np.random.Generator, image_size: int = 64, grid: int = 0, jitter: bool = True) -> list[dict[str, Any]]:
    """1-3 non-overlapping shapes: ``[{"shape", "colour", "side", "box": [x0, y0, x1, y1]}]``.

    ``grid=0`` places shapes freely (13-18 px at 64 px). ``grid=N`` (even)
    puts each shape inside its own cell of an N x N grid, filling 60-85 % of
    the cell at a random offset (``jitter``) or 75 % of it, centred: with the
    tower's patches equal to the cells, every shape lies within one patch.
    """
    if image_size < 32:
        raise ValueError("image_size must be at least 32")
    if grid and (grid % 2 or image_size % grid or image_size // grid < 8):
        raise ValueError(f"grid must be even, divide image_size ({image_size}) and give cells of at least 8 px; got {grid}")
    count = int(rng.integers(1, 4))
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:count]]
    colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))[:count]]
    sides = [("left", "right")[int(rng.integers(2))] for _ in range(count)]
    boxes = _grid_boxes(rng, sides, image_size, grid, jitter) if grid else _free_boxes(rng, sides, image_size)
    return [{"shape": s, "colour": c, "side": d, "box": b} for s, c, d, b in zip(shapes, colours, sides, boxes)]


def _grid_boxes(rng, sides, image_size: int, grid: int, jitter: bool) -> list[list[int]]:
    """One box per side, each inside its own free cell of the grid, in that side's half."""
    boxes, cell, used = [], image_size // grid, set()
    for side in sides:
        while (xy := (int(rng.integers(grid // 2)) + (grid // 2 if side == "right" else 0),
                      int(rng.integers(grid)))) in used:
            pass
        used.add(xy)
        if jitter:
            extent = int(rng.integers(cell * 60 // 100, cell * 85 // 100 + 1))
            x0, y0 = (c * cell + int(rng.integers(cell - extent + 1)) for c in xy)
        else:
            extent = cell * 3 // 4
            x0, y0 = (c * cell + (cell - extent) // 2 for c in xy)
        boxes.append([x0, y0, x0 + extent, y0 + extent])
    return boxes


def _free_boxes(rng, sides, image_size: int) -> list[list[int]]:
    """One box per side, anywhere in that side's half, rejection-sampled until no two touch."""
    half, margin = image_size // 2, max(1, image_size // 32)
    while True:
        boxes = []
        for side in sides:
            extent = int(rng.integers(image_size * 20 // 100, image_size * 28 // 100 + 1))
            low = margin if side == "left" else half + margin
            x0 = int(rng.integers(low, low + half - 2 * margin - extent + 1))
            y0 = int(rng.integers(margin, image_size - margin - extent + 1))
            boxes.append([x0, y0, x0 + extent, y0 + extent])
        if all(_apart(a, b, margin) for i, a in enumerate(boxes) for b in boxes[i + 1 :]):
            return boxes


def _apart(a, b, gap) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def draw_scene(scene: list[dict[str, Any]], image_size: int = 64) -> Image.Image:
    """The scene as an RGB image (no anti-aliasing: every shape pixel has its exact colour)."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for item in scene:
        x0, y0, x1, y1 = item["box"]
        fill = COLOURS[item["colour"]]
        if item["shape"] == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif item["shape"] == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
    return image


def make_question(rng: np.random.Generator, scene: list[dict[str, Any]], kind: str,
                  sentences: bool = False) -> tuple[str, str]:
    """``(question, answer)`` of the given kind about ``scene``; a one-word answer or, with
    ``sentences``, one that restates the subject first ("The circle is red.")."""
    template = _TEMPLATES[kind][int(rng.integers(len(_TEMPLATES[kind])))]
    if kind == "count":
        n = NUMBERS[len(scene) - 1]
        if not sentences:
            return template, n
        return template, "There is one shape." if n == "one" else f"There are {n} shapes."
    if kind == "caption":  # left to right: "red circle left, blue square right"
        return template, ", ".join(f"{s['colour']} {s['shape']} {s['side']}" for s in sorted(scene, key=lambda s: s["box"][0]))
    target = scene[int(rng.integers(len(scene)))]
    if kind == "shape":
        answer = f"The {target['colour']} shape is a {target['shape']}." if sentences else target["shape"]
        return template.format(colour=target["colour"]), answer
    answer = target["colour"] if kind == "colour" else target["side"]
    if sentences:
        answer = f"The {target['shape']} is {'on the ' if kind == 'side' else ''}{answer}."
    return template.format(shape=target["shape"]), answer


def scene_key(scene: list[dict[str, Any]]) -> tuple:
    """What a scene's image shows, order-free: two scenes with one key draw the same pixels."""
    return tuple(sorted((s["shape"], s["colour"], tuple(s["box"])) for s in scene))


def make_split(out_dir: str, split: str, num_records: int, seed: int, image_size: int,
               turns: int = 1, kinds: tuple[str, ...] = QUESTION_TYPES, grid: int = 0,
               sentences: bool = False, jitter: bool = True, exclude: frozenset = frozenset()) -> list[dict[str, Any]]:
    """Draws and saves the images of one split; returns its LLaVA records (``turns`` questions each).
    A scene whose :func:`scene_key` is in ``exclude`` is drawn again."""
    rng = np.random.default_rng([seed, sum(map(ord, split))])
    records = []
    for i in range(num_records):
        scene = make_scene(rng, image_size, grid, jitter)
        while exclude and scene_key(scene) in exclude:
            scene = make_scene(rng, image_size, grid, jitter)
        if turns == 1:
            asked = [kinds[i % len(kinds)]]
        else:
            asked = [kinds[k] for k in np.concatenate(
                [rng.permutation(len(kinds)) for _ in range(-(-turns // len(kinds)))])[:turns]]
        conversation = []
        for kind in asked:
            question, answer = make_question(rng, scene, kind, sentences)
            prefix = "<image>\n" if not conversation else ""
            conversation += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
        name = f"images/{split}-{i:05d}.png"
        png = io.BytesIO()
        draw_scene(scene, image_size).save(png, format="PNG")
        storage.write_bytes(storage.join(out_dir, *name.split("/")), png.getvalue())
        records.append({
            "id": f"{split}-{i:05d}",
            "image": name,
            "conversations": conversation,
            "question_type": asked[-1],
            "answer": conversation[-1]["value"],
            "scene": scene,
        })
    return records


def write_synthetic_vqa(
    out_dir: str, num_train: int = 3000, num_eval: int = 300, seed: int = 0, image_size: int = 64,
    train_turns: int = 1, train_kinds: tuple[str, ...] = QUESTION_TYPES, grid: int = 0, sentences: bool = False,
    jitter: bool = True, eval_kinds: tuple[str, ...] = QUESTION_TYPES, eval_unseen: bool = False,
) -> dict[str, str]:
    """Writes ``train.json``, ``eval.json`` and ``images/`` under ``out_dir``.

    Returns ``{"train_json", "eval_json", "image_root"}``, ready for
    ``config.data.update(**paths)``.
    """
    paths = {
        "train_json": storage.join(out_dir, "train.json"),
        "eval_json": storage.join(out_dir, "eval.json"),
        "image_root": out_dir,
    }
    if train_turns < 1:
        raise ValueError(f"train_turns must be at least 1, got {train_turns}")
    for name, kinds in (("train_kinds", train_kinds), ("eval_kinds", eval_kinds)):
        if set(kinds) - set(QUESTION_TYPES + EXTRA_TYPES) or not kinds:
            raise ValueError(f"{name} {tuple(kinds)}: each must be one of {QUESTION_TYPES + EXTRA_TYPES}")
    seen = frozenset()
    for split, count, turns, kinds in (("train", num_train, train_turns, tuple(train_kinds)),
                                       ("eval", num_eval, 1, tuple(eval_kinds))):
        records = make_split(out_dir, split, count, seed, image_size, turns, kinds, grid, sentences, jitter,
                             exclude=seen)
        storage.write_json(paths[f"{split}_json"], records, indent=1)
        if eval_unseen:
            seen = frozenset(scene_key(r["scene"]) for r in records)
    return paths
