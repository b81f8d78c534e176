"""Shapes world: a procedural domain small enough to train the whole method on a CPU.

One coloured shape (6 colours; circle, square, triangle) in a cell of a 3x3 grid, drawn with
scikit-image on a light background. Three kinds of records, all deterministic per seed:

- pairs: one image, captioned "a red circle at the top left";
- stories of 5 steps about one object. The text narrates ("There is a circle on the left.",
  "It moves to the right.", "It turns into a square.") and never names the colour, which only the
  images show. A story either moves on odd steps and turns on even ones, or the other way round,
  always in one direction and through the shapes in a fixed cycle, so step 5's text follows from
  steps 1-4; its colour can only come from the earlier images;
- dialogues: a request, a reply with a picture, a change, a reply with a picture.

`read_attributes` recovers (colour, shape, position) from pixels alone: exact on these renders,
and tolerant of blur and noise in generated ones.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

PALETTE = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 40), "purple": (150, 60, 190), "orange": (240, 130, 30),
}
SHAPES = ("circle", "square", "triangle")
# Grid cells (row, column) and how a caption says them.
PLACES = {
    (0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
    (1, 0): "on the left", (1, 1): "in the middle", (1, 2): "on the right",
    (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right",
}
MOVES = {"right": (0, 1), "left": (0, -1), "up": (-1, 0), "down": (1, 0)}
BACKGROUND = (245, 245, 240)
SIZE = 32


def _mask(shape: str, cell: tuple[int, int], size: int) -> np.ndarray:
    from skimage.draw import disk, polygon

    s = size / 3
    cy, cx = (cell[0] + 0.5) * s - 0.5, (cell[1] + 0.5) * s - 0.5
    half = 0.36 * s
    mask = np.zeros((size, size), dtype=bool)
    if shape == "circle":
        mask[disk((cy, cx), half + 0.5, shape=mask.shape)] = True
    elif shape == "square":
        mask[int(round(cy - half)):int(round(cy + half)) + 1, int(round(cx - half)):int(round(cx + half)) + 1] = True
    elif shape == "triangle":
        rows = [cy - half, cy + half + 0.5, cy + half + 0.5]
        cols = [cx, cx - half - 0.5, cx + half + 0.5]
        mask[polygon(rows, cols, shape=mask.shape)] = True
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def render(colour: str, shape: str, cell: tuple[int, int], size: int = SIZE) -> Image.Image:
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    img[_mask(shape, cell, size)] = PALETTE[colour]
    return Image.fromarray(img)


def caption(colour: str, shape: str, cell: tuple[int, int]) -> str:
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape} {PLACES[cell]}"


# -- records --------------------------------------------------------------------------------------

def pair(rng: np.random.Generator, size: int = SIZE) -> dict:
    colour, shape, cell = _draw(rng)
    text = caption(colour, shape, cell)
    return {"steps": [{"text": text, "image": render(colour, shape, cell, size), "caption": text}],
            "attributes": [(colour, shape, cell)]}


def _draw(rng: np.random.Generator):
    colour = list(PALETTE)[rng.integers(len(PALETTE))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    cell = (int(rng.integers(3)), int(rng.integers(3)))
    return colour, shape, cell


def story(rng: np.random.Generator, size: int = SIZE) -> dict:
    """Five steps: a start, then moves and turns alternating, one direction, shapes in cycle order."""
    colour = list(PALETTE)[rng.integers(len(PALETTE))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    direction = list(MOVES)[rng.integers(len(MOVES))]
    dr, dc = MOVES[direction]
    # Start where two moves in that direction stay on the grid.
    row = 1 - dr if dr else int(rng.integers(3))
    col = 1 - dc if dc else int(rng.integers(3))
    move_first = bool(rng.integers(2))
    steps, attrs = [], []
    text = f"There is a {shape} {PLACES[(row, col)]}."
    for k in range(5):
        if k:
            if (k % 2 == 1) == move_first:
                row, col = row + dr, col + dc
                text = f"It moves {'to the ' if direction in ('left', 'right') else ''}{direction}."
            else:
                shape = SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)]
                text = f"It turns into a {shape}."
        steps.append({"text": text, "image": render(colour, shape, (row, col), size),
                      "caption": caption(colour, shape, (row, col))})
        attrs.append((colour, shape, (row, col)))
    return {"steps": steps, "attributes": attrs}


def dialog(rng: np.random.Generator, size: int = SIZE) -> dict:
    colour, shape, cell = _draw(rng)
    other = SHAPES[(SHAPES.index(shape) + 1 + int(rng.integers(2))) % len(SHAPES)]
    steps = [
        {"text": f"Draw {caption(colour, shape, cell)}.", "image": None, "caption": None},
        {"text": f"Here is {caption(colour, shape, cell)}.", "image": render(colour, shape, cell, size),
         "caption": caption(colour, shape, cell)},
        {"text": f"Now make it a {other}.", "image": None, "caption": None},
        {"text": f"Here it is as a {other}.", "image": render(colour, other, cell, size),
         "caption": caption(colour, other, cell)},
    ]
    return {"steps": steps, "attributes": [None, (colour, shape, cell), None, (colour, other, cell)]}


KINDS = {"pairs": pair, "stories": story, "dialogs": dialog}
NAMES = {"pairs": "pair", "stories": "story", "dialogs": "dialog"}
SPLITS = ("train", "test", "unseen")  # each draws from its own random stream

# Combinations that `prepare-data toy --hold-out` keeps out of every training record: three colour-shape
# pairs (each in all 9 places) and three shape-place pairs (each in all 6 colours), 42 of the 162 cells.
HELD_OUT_COLOURS = {("red", "circle"), ("green", "triangle"), ("purple", "square")}
HELD_OUT_PLACES = {("circle", (0, 2)), ("square", (2, 1)), ("triangle", (1, 0))}


def held_out(colour: str, shape: str, cell: tuple[int, int]) -> bool:
    """Whether (colour, shape, cell) shows a held-out combination."""
    return (colour, shape) in HELD_OUT_COLOURS or (shape, tuple(cell)) in HELD_OUT_PLACES


def shows_held_out(rec: dict, last: bool = False) -> bool:
    """Whether any picture of `rec` (with `last`, its last one: a story's step to predict) is held out."""
    pictures = [a for a in rec["attributes"] if a is not None]
    return any(held_out(*a) for a in (pictures[-1:] if last else pictures))


def records(kind: str, n: int, seed: int, size: int = SIZE, split: str = "train", unseen: bool | None = None):
    """`n` records of one kind, the same for the same seed; another split draws from another stream.
    `unseen`: None, any record; False, only records that show no held-out combination; True, only
    those whose last picture shows one (drawn until `n` are found)."""
    rng = np.random.default_rng([seed, list(KINDS).index(kind), SPLITS.index(split)])
    i = 0
    while i < n:
        rec = KINDS[kind](rng, size)
        if unseen is not None and shows_held_out(rec, last=unseen) != unseen:
            continue
        rec["id"] = f"{NAMES[kind]}-{split}-{i:05d}"
        i += 1
        yield rec


# -- the attribute checker -------------------------------------------------------------------------

def read_attributes(image: Image.Image) -> tuple[str, str, tuple[int, int]] | None:
    """(colour, shape, cell) of the shape in `image`, from pixels alone; None when nothing stands out.

    The foreground is what differs from the background colour; its largest connected part is the
    object. Colour: the nearest palette entry to the part's median. Cell: its centre on the 3x3
    grid. Shape: the template (drawn at the cell) that overlaps the part best.
    """
    from skimage.measure import label

    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    size = arr.shape[0]
    if arr.shape[1] != size:
        raise ValueError("toy images are square")
    diff = np.abs(arr - np.asarray(BACKGROUND, dtype=np.float32)).sum(-1)
    peak = np.percentile(diff, 99)
    if peak < 90:
        return None
    # Half the object's contrast: on a blurred object this contour stays where the sharp edge was.
    parts = label(diff > peak / 2)
    largest = np.argmax(np.bincount(parts.ravel())[1:]) + 1
    mask = parts == largest
    core = mask & (diff > 0.8 * peak)  # the colour from the inside, away from edges blended with the background
    colour_value = np.median(arr[core if core.any() else mask], axis=0)
    colour = min(PALETTE, key=lambda c: float(((np.asarray(PALETTE[c]) - colour_value) ** 2).sum()))
    ys, xs = np.nonzero(mask)
    cell = (min(2, int(ys.mean() * 3 // size)), min(2, int(xs.mean() * 3 // size)))

    def iou(shape: str) -> float:
        template = _mask(shape, cell, size)
        ty, tx = np.nonzero(template)  # centred on the object: a generated one may sit off its cell's centre
        template = np.roll(template, (round(ys.mean() - ty.mean()), round(xs.mean() - tx.mean())), axis=(0, 1))
        return (template & mask).sum() / (template | mask).sum()

    return colour, max(SHAPES, key=iou), cell


def words() -> list[str]:
    """Every word the shapes world writes, sorted: tokenizers of the toy backbones hold each one whole."""
    import re

    found = set()
    for text in corpus():
        found.update(re.findall(r"[a-z]+|[^a-z\s]", text.lower()))
    return sorted(found)


def corpus() -> list[str]:
    """Every distinct sentence of captions, stories and dialogues."""
    lines = set()
    for colour, shape, cell in combinations():
        lines.update({caption(colour, shape, cell), f"Draw {caption(colour, shape, cell)}.",
                      f"Here is {caption(colour, shape, cell)}.", f"There is a {shape} {PLACES[cell]}.",
                      f"It turns into a {shape}.", f"Now make it a {shape}.", f"Here it is as a {shape}."})
    lines.update(f"It moves {'to the ' if d in ('left', 'right') else ''}{d}." for d in MOVES)
    return sorted(lines)


def combinations() -> list[tuple[str, str, tuple[int, int]]]:
    """All 162 (colour, shape, cell) triples."""
    import itertools

    return list(itertools.product(PALETTE, SHAPES, PLACES))


def accuracy(images: list[Image.Image], truths: list[tuple]) -> dict[str, float]:
    """Share of images whose colour, shape and position `read_attributes` finds as in `truths`."""
    right = np.zeros(3)
    for image, truth in zip(images, truths):
        found = read_attributes(image)
        if found is not None:
            right += [found[k] == truth[k] for k in range(3)]
    right /= max(1, len(truths))
    return {"colour": float(right[0]), "shape": float(right[1]), "position": float(right[2])}
