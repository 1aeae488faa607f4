"""A synthetic visual-QA task: coloured shapes on a textured background, one-word answers.

Deterministic by seed: sample ``i`` of a split is drawn from ``numpy.random.default_rng([seed, split, i])``,
so any sample can be regenerated alone. Objects sit on a grid of 28 px cells (2 x 2 patches of 14 px:
one object cell is four LLaVA patches, or exactly one Qwen-VL merged token), so the answer to a question
depends on a few visual tokens and most of the image is irrelevant background. Each shape has its own
fill pattern (solid circles, checkered squares, striped triangles), so any single patch of an object
shows both its colour and its shape.

Questions (``qtype``: answers):

- ``colour``: "What colour is the <shape>?" (the shape is unique in the image): one of `COLOURS`.
- ``shape``: "What shape is the <colour> object?" (the colour is unique): one of `SHAPES`.
- ``count``: "How many shapes are there?": one, two, three, four.
- ``exist``: "Is there a(n) <colour> <shape>?": yes / no (half present, half absent).
- ``side``: "Which side is the <colour> <shape> on?": left / right (the question names neither answer, so a
  model cannot settle for copying one of its words).
- ``size``: "Is the <colour> <shape> big or small?": big (2 x 2 cells) / small (1 cell).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three", "four")
QTYPES = ("colour", "shape", "count", "exist", "side", "size")
ANSWERS = (*COLOURS, *SHAPES, *COUNTS, "yes", "no", "left", "right", "big", "small")
SPLITS = {"train": 0, "test": 1, "calib": 2}
CELL = 28  # px: 2 x 2 patches of 14 px


@dataclass
class ShapeObject:
    colour: str
    shape: str
    big: bool
    row: int  # top-left cell
    col: int

    @property
    def cells(self) -> list[tuple[int, int]]:
        n = 2 if self.big else 1
        return [(self.row + r, self.col + c) for r in range(n) for c in range(n)]

    def box(self) -> tuple[int, int, int, int]:
        """Pixel box ``(x0, y0, x1, y1)`` of the object's cells."""
        n = 2 if self.big else 1
        return self.col * CELL, self.row * CELL, (self.col + n) * CELL, (self.row + n) * CELL


@dataclass
class Sample:
    """One question about one image; ``objects`` lets an oracle pruner find the relevant patches."""

    image: Image.Image
    question: str
    answer: str
    qtype: str
    objects: list[ShapeObject] = field(default_factory=list)
    relevant: list[ShapeObject] = field(default_factory=list)  # the objects the question is about

    def cells(self, which: str = "question") -> list[tuple[int, int]]:
        """``(row, col)`` of the 28 px cells (one visual token each on the toys) of the question's objects
        (``which="question"``) or of every object (``"objects"``)."""
        objs = self.relevant if which == "question" else self.objects
        return sorted({cell for o in objs for cell in o.cells})

    def object_mask(self, grid: int) -> np.ndarray:
        """``[grid, grid]`` bool: patches (of an image split into ``grid`` x ``grid``) that overlap an object."""
        size = self.image.size[0]
        mask = np.zeros((grid, grid), dtype=bool)
        for obj in self.objects:
            x0, y0, x1, y1 = obj.box()
            mask[y0 * grid // size:(y1 * grid + size - 1) // size, x0 * grid // size:(x1 * grid + size - 1) // size] = True
        return mask


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.integers(70, 160)
    noise = rng.normal(0, 18, (size, size, 1))
    yy, xx = np.mgrid[0:size, 0:size]
    angle, freq = rng.uniform(0, np.pi), rng.uniform(0.05, 0.2)
    stripes = 10 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy))[..., None]
    tint = rng.integers(-12, 13, 3)[None, None, :]
    return np.clip(base + noise + stripes + tint, 0, 255).astype(np.uint8)


def _texture(shape: str, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """``[h, w]`` bool over the image window at ``(y0, x0)``: where a shape's fill shows its full colour
    (elsewhere a darker shade). The pattern is anchored to the image, not to the object.

    Each shape has its own fill pattern (circles solid, squares a 4 px checkerboard, triangles 3 px
    horizontal stripes), so every 14 px patch of an object tells its shape, not only the patches on its
    outline: a tiny vision tower learns shape in minutes and any patch of an object answers for it.
    """
    yy, xx = np.mgrid[y0:y0 + h, x0:x0 + w]
    if shape == "square":
        return ((yy // 4 + xx // 4) % 2) == 0
    if shape == "triangle":
        return (yy // 3) % 2 == 0
    return np.ones((h, w), dtype=bool)


def _draw(img: Image.Image, obj: ShapeObject, rng: np.random.Generator) -> None:
    """Paint ``obj`` into ``img``, working only inside the object's cells."""
    bx0, by0, bx1, by1 = obj.box()
    m = 3 if not obj.big else 5
    x0, y0, x1, y1 = m, m, bx1 - bx0 - m - 1, by1 - by0 - m - 1  # in the box's coordinates
    colour = np.clip(np.array(COLOURS[obj.colour]) + rng.integers(-15, 16, 3), 0, 255)
    shape_mask = Image.new("L", (bx1 - bx0, by1 - by0), 0)
    draw = ImageDraw.Draw(shape_mask)
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=255)
    box = (bx0, by0, bx1, by1)
    pixels = np.asarray(img.crop(box)).copy()
    inside = np.asarray(shape_mask) > 0
    h, w = inside.shape
    fill = np.where(_texture(obj.shape, by0, bx0, h, w)[..., None], colour, (0.55 * colour).astype(int))
    pixels[inside] = fill[inside]
    img.paste(Image.fromarray(pixels.astype(np.uint8)), box)


def render(objects: list[ShapeObject], rng: np.random.Generator, size: int = 224) -> Image.Image:
    img = Image.fromarray(_background(rng, size))
    for obj in objects:
        _draw(img, obj, rng)
    return img


def _place(rng: np.random.Generator, n: int, grid: int) -> list[ShapeObject]:
    """``n`` objects with distinct (colour, shape) pairs on free cells; never straddling the centre."""
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    picks = rng.choice(len(combos), size=n, replace=False)
    taken: set[tuple[int, int]] = set()
    out = []
    half = grid // 2
    for p in picks:
        colour, shape = combos[p]
        for _ in range(100):
            big = bool(rng.random() < 0.4)
            k = 2 if big else 1
            row = int(rng.integers(0, grid - k + 1))
            col = int(rng.integers(0, grid - k + 1))
            if col < half < col + k:  # straddles the vertical midline: left/right would be ambiguous
                continue
            obj = ShapeObject(colour, shape, big, row, col)
            # keep a free ring of cells around objects so they never touch
            ring = {(r + dr, c + dc) for r, c in obj.cells for dr in (-1, 0, 1) for dc in (-1, 0, 1)}
            if not ring & taken:
                taken.update(obj.cells)
                out.append(obj)
                break
    return out


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _question(rng: np.random.Generator, objects: list[ShapeObject], qtype: str, grid: int):
    """``(question, answer, relevant)`` of type ``qtype`` for ``objects``, or None when the type does not
    apply; ``relevant``: the objects the question is about (what a model must look at to answer): the named
    object; for a count all of them; for an absent pair the objects sharing its colour or its shape."""
    colours = [o.colour for o in objects]
    shapes = [o.shape for o in objects]
    if qtype == "colour":
        unique = [o for o in objects if shapes.count(o.shape) == 1]
        if not unique:
            return None
        o = unique[rng.integers(len(unique))]
        return f"What colour is the {o.shape}?", o.colour, [o]
    if qtype == "shape":
        unique = [o for o in objects if colours.count(o.colour) == 1]
        if not unique:
            return None
        o = unique[rng.integers(len(unique))]
        return f"What shape is the {o.colour} object?", o.shape, [o]
    if qtype == "count":
        return "How many shapes are there?", COUNTS[len(objects) - 1], list(objects)
    if qtype == "exist":
        present = {(o.colour, o.shape) for o in objects}
        if rng.random() < 0.5:
            c, s = sorted(present)[rng.integers(len(present))]
            return f"Is there {_a(c)} {c} {s}?", "yes", [o for o in objects if (o.colour, o.shape) == (c, s)]
        # an absent pair that shares its colour or its shape with a present object (so it needs looking)
        near = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present
                and (c in colours or s in shapes)]
        c, s = near[rng.integers(len(near))]
        return f"Is there {_a(c)} {c} {s}?", "no", [o for o in objects if o.colour == c or o.shape == s]
    o = objects[rng.integers(len(objects))]
    if qtype == "side":
        return f"Which side is the {o.colour} {o.shape} on?", "left" if o.col < grid // 2 else "right", [o]
    if qtype == "size":
        return f"Is the {o.colour} {o.shape} big or small?", "big" if o.big else "small", [o]
    raise ValueError(f"unknown question type {qtype!r}; known: {QTYPES}")


def scene_rng(split: str, index: int, seed: int = 0) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {sorted(SPLITS)}")
    return np.random.default_rng([seed, SPLITS[split], index])


def _scene(split: str, index: int, seed: int, size: int) -> tuple[np.random.Generator, list[ShapeObject]]:
    """The objects of scene ``index`` and the generator, left where drawing the scene's image continues."""
    rng = scene_rng(split, index, seed + 7919)
    return rng, _place(rng, int(rng.integers(1, 5)), size // CELL)


def make_scene(split: str, index: int, seed: int = 0, size: int = 224) -> tuple[Image.Image, list[ShapeObject]]:
    """An image and its objects, without a question (training draws several questions per image)."""
    rng, objects = _scene(split, index, seed, size)
    return render(objects, rng, size), objects


def scene_objects(split: str, index: int, seed: int = 0, size: int = 224) -> list[ShapeObject]:
    """The objects of ``make_scene(split, index, seed, size)`` without drawing its image."""
    return _scene(split, index, seed, size)[1]


def ask(objects: list[ShapeObject], rng: np.random.Generator, size: int = 224,
        qtype: str | None = None) -> tuple[str, str, str, list[ShapeObject]]:
    """A random applicable ``(question, answer, qtype, relevant)`` about ``objects``; ``relevant``: the
    objects the question is about (as `Sample.relevant`)."""
    while True:
        kind = qtype or QTYPES[int(rng.integers(len(QTYPES)))]
        qa = _question(rng, objects, kind, size // CELL)
        if qa is not None:
            return qa[0], qa[1], kind, qa[2]
        if qtype is not None:
            raise ValueError(f"question type {qtype!r} does not apply to these objects")


def describe(objects: list[ShapeObject], size: int = 224) -> str:
    """A caption listing every object in raster order: "small red circle left. big blue square right."."""
    half = size // CELL // 2
    parts = [f"{'big' if o.big else 'small'} {o.colour} {o.shape} {'left' if o.col < half else 'right'}."
             for o in sorted(objects, key=lambda o: (o.row, o.col))]
    return " ".join(parts)


CROWDED_OBJECTS = (4, 6)  # toy-shapes-crowded: 4 to 6 objects per image
CROWDED_QTYPES = tuple(q for q in QTYPES if q != "count")  # beyond the trained counts (one to four)


def make_sample(split: str, index: int, seed: int = 0, size: int = 224, qtype: str | None = None,
                crowded: bool = False) -> Sample:
    """Sample ``index`` of ``split`` ("train", "test", "calib"), deterministic in (split, index, seed).

    ``crowded=True``: the ``toy-shapes-crowded`` variant, from its own random stream: 4 to 6 objects (as
    many as fit with a free ring around each), every question type but ``count``; at a small budget not
    every object cell fits, so a pruner must keep the cells the question is about.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {sorted(SPLITS)}")
    if size % CELL:
        raise ValueError(f"image size must be a multiple of {CELL} px, got {size}")
    rng = np.random.default_rng([seed, SPLITS[split], index, 1] if crowded else [seed, SPLITS[split], index])
    grid = size // CELL
    qtypes = CROWDED_QTYPES if crowded else QTYPES
    while True:
        if crowded:
            objects = _place(rng, int(rng.integers(CROWDED_OBJECTS[0], CROWDED_OBJECTS[1] + 1)), grid)
            if len(objects) < CROWDED_OBJECTS[0]:
                continue
        else:
            objects = _place(rng, int(rng.integers(1, 5)), grid)
        kind = qtype or qtypes[int(rng.integers(len(qtypes)))]
        qa = _question(rng, objects, kind, grid)
        if qa is not None:
            break
    image = render(objects, rng, size)
    return Sample(image, qa[0], qa[1], kind, objects, qa[2])


def dataset(split: str, n: int, seed: int = 0, size: int = 224, crowded: bool = False) -> list[Sample]:
    """The first ``n`` samples of ``split`` (of the crowded variant with ``crowded=True``)."""
    return [make_sample(split, i, seed, size, crowded=crowded) for i in range(n)]


def chance_accuracy(samples: list[Sample]) -> float:
    """Expected accuracy of answering uniformly at random within each question type's answers."""
    per_type = {"colour": len(COLOURS), "shape": len(SHAPES), "count": len(COUNTS),
                "exist": 2, "side": 2, "size": 2}
    return float(np.mean([1.0 / per_type[s.qtype] for s in samples])) if samples else 0.0
