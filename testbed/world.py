"""The shapes world: 32×32 RGB scenes of flat shapes, their captions, and a deterministic generator.

Every constant of the world lives here (the judge and the model builders read them from here):

- ``IMAGE_SIZE`` = 32 px, background ``BACKGROUND`` (light grey), colours ``PALETTE`` (exact RGB),
  shapes ``SHAPES`` (circle, square, triangle pointing up), drawn flat (no antialiasing).
- Object size ``SIZE_RANGE`` = 8..11 px (the side of the bounding square), placed fully inside the image
  with ``MARGIN`` px free at the border and at least ``GAP`` px between objects' bounding squares.
- Caption families (``FAMILIES``):
    single    "a red circle"                        one object
    count     "two blue squares" / "three ..."      2 or 3 objects of one kind
    relation  "a green triangle left of a yellow circle"  two objects; left of / right of / above / below
  A relation holds between centres along its axis by at least ``RELATION_MIN_PX`` px, and that axis
  dominates: left of ⇔ x_a + RELATION_MIN_PX <= x_b and |x_a - x_b| >= |y_a - y_b|.
- ``HELD_OUT``: colour-shape kinds that never appear in the text-to-image model's training data, in any
  family (``training_split``); prompts that mention them measure generalisation.

A scene is a ``Scene`` (caption, family and the list of ``Obj``); ``render`` draws it; ``sample_scene``
draws one from a ``numpy.random.Generator``, and ``scene_for_seed`` is the seed -> scene map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
BACKGROUND = (200, 200, 200)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZE_RANGE = (8, 11)  # inclusive, px: the side of the object's bounding square
MARGIN = 1
GAP = 2
RELATION_MIN_PX = 4
RELATIONS = ("left of", "right of", "above", "below")
COUNT_WORDS = {2: "two", 3: "three"}
FAMILIES = ("single", "count", "relation")
HELD_OUT: frozenset[tuple[str, str]] = frozenset({("green", "triangle"), ("yellow", "square")})
KINDS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)


@dataclass(frozen=True)
class Obj:
    """One object: its kind and its bounding square (top-left x, y and side, px)."""

    color: str
    shape: str
    x: int
    y: int
    size: int

    @property
    def center(self) -> tuple[float, float]:
        return self.x + (self.size - 1) / 2, self.y + (self.size - 1) / 2

    @property
    def kind(self) -> tuple[str, str]:
        return self.color, self.shape


@dataclass(frozen=True)
class Scene:
    caption: str
    family: str
    objects: tuple[Obj, ...]


def relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float], *, slack: float = 0.0) -> bool:
    """Whether centre ``a`` is ``relation`` centre ``b`` (image coordinates: y grows downwards); the
    generator asks for ``slack`` px more on both conditions, so rasterisation cannot flip the judge."""
    dx, dy = b[0] - a[0], b[1] - a[1]  # b relative to a
    if relation in ("left of", "right of"):
        along, across = (dx if relation == "left of" else -dx), dy
    elif relation in ("above", "below"):
        along, across = (dy if relation == "above" else -dy), dx
    else:
        raise ValueError(f"unknown relation {relation!r}; valid relations: {list(RELATIONS)}")
    return along >= RELATION_MIN_PX + slack and abs(along) >= abs(across) + slack


def noun(shape: str, n: int = 1) -> str:
    return shape if n == 1 else shape + "s"


def caption_for(family: str, kinds: list[tuple[str, str]], *, count: int = 1, relation: str | None = None) -> str:
    """The caption of a family: ``kinds`` = [kind] for single/count, [kind_a, kind_b] for relation."""
    if family == "single":
        (c, s), = kinds
        return f"a {c} {s}"
    if family == "count":
        (c, s), = kinds
        return f"{COUNT_WORDS[count]} {c} {noun(s, count)}"
    if family == "relation":
        (ca, sa), (cb, sb) = kinds
        return f"a {ca} {sa} {relation} a {cb} {sb}"
    raise ValueError(f"unknown caption family {family!r}; valid families: {list(FAMILIES)}")


def _place(rng: np.random.Generator, placed: list[Obj], color: str, shape: str, *, tries: int = 200) -> Obj | None:
    for _ in range(tries):
        size = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
        hi = IMAGE_SIZE - MARGIN - size
        x, y = int(rng.integers(MARGIN, hi + 1)), int(rng.integers(MARGIN, hi + 1))
        clear = all(x + size + GAP <= o.x or o.x + o.size + GAP <= x or y + size + GAP <= o.y or o.y + o.size + GAP <= y
                    for o in placed)
        if clear:
            return Obj(color, shape, x, y, size)
    return None


def sample_scene(rng: np.random.Generator, *, family: str | None = None,
                 kinds: tuple[tuple[str, str], ...] = KINDS) -> Scene:
    """One scene drawn from ``rng``: the family (uniform if None), kinds out of ``kinds``, sizes and
    places (re-drawn until the objects fit without overlap and a relation holds clearly)."""
    family = family or FAMILIES[int(rng.integers(len(FAMILIES)))]
    while True:
        if family == "relation":
            a, b = (kinds[int(i)] for i in rng.choice(len(kinds), size=2, replace=len(kinds) < 2))
            relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
            first = _place(rng, [], *a)
            second = _place(rng, [first], *b)
            if second is not None and relation_holds(relation, first.center, second.center, slack=1.0):
                return Scene(caption_for("relation", [a, b], relation=relation), family, (first, second))
            continue
        kind = kinds[int(rng.integers(len(kinds)))]
        count = 1 if family == "single" else int(rng.integers(2, 4))
        placed: list[Obj] = []
        for _ in range(count):
            obj = _place(rng, placed, *kind)
            if obj is None:
                break
            placed.append(obj)
        if len(placed) == count:
            return Scene(caption_for(family, [kind], count=count), family, tuple(placed))


def training_kinds() -> tuple[tuple[str, str], ...]:
    """The kinds the text-to-image model is trained on: all but the held-out ones."""
    return tuple(k for k in KINDS if k not in HELD_OUT)


def scene_for_seed(seed: int, *, family: str | None = None, held_out: bool = False) -> Scene:
    """The scene of ``seed``: from the training kinds, or (``held_out``) with at least one held-out kind."""
    rng = np.random.default_rng([seed, 1 if held_out else 0])
    if not held_out:
        return sample_scene(rng, family=family, kinds=training_kinds())
    while True:
        scene = sample_scene(rng, family=family)
        if any(o.kind in HELD_OUT for o in scene.objects):
            return scene


def render(scene: Scene) -> np.ndarray:
    """uint8 [32, 32, 3]: the objects drawn flat on the background."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        box = (o.x, o.y, o.x + o.size - 1, o.y + o.size - 1)
        fill = PALETTE[o.color]
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            draw.rectangle(box, fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(o.x + (o.size - 1) / 2, o.y), (o.x, o.y + o.size - 1), (o.x + o.size - 1, o.y + o.size - 1)],
                         fill=fill)
        else:
            raise ValueError(f"unknown shape {o.shape!r}; valid shapes: {list(SHAPES)}")
    return np.asarray(image, dtype=np.uint8)


def training_split(n: int, *, seed: int = 0) -> list[Scene]:
    """``n`` scenes of the training distribution (no held-out kind, families uniform)."""
    return [scene_for_seed(seed * 1_000_003 + i) for i in range(n)]
