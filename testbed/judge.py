"""The ground-truth judge of the shapes world: caption -> spec, image -> objects, and the verdict.

Parsing: a caption of the world's grammar (``testbed.world``) becomes a ``CaptionSpec`` (the expected
multiset of kinds and, for the relation family, the relation); any other text is a ValueError naming it.

Seeing: each pixel takes the nearest palette colour or the background (squared RGB distance, a pixel
nearer the background than ``FOREGROUND_MARGIN`` of its nearest colour counts as background), a 3×3
filter relabels isolated pixels (VAE reconstructions blur edges), and each colour's
4-connected components of at least ``MIN_AREA`` px are objects. A component's shape comes from its row
profile (``classify_shape``): a square's top and bottom rows are as wide as its middle, an upward
triangle's top rows are much narrower than its bottom rows, a disc is narrow at both ends; a square
decoded with a thin ridge along one side (a row or column narrower than ``FRINGE`` of the widest) is
still a square.

Verdict per image (``Verdict``): ``binding`` every described kind is present (right colour on the
right shape); ``count`` the number of objects equals the caption's; ``relation`` the relation holds for
some pair of the described kinds (None outside the relation family); ``correct`` the detected kinds
equal the described multiset exactly and the relation (if any) holds.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from testbed.world import BACKGROUND, COUNT_WORDS, IMAGE_SIZE, PALETTE, RELATIONS, SHAPES, relation_holds

MIN_AREA = 12
SQUARE_FILL = 0.85  # a square's top and bottom rows are at least this fraction of its middle rows' width
TRIANGLE_TOP = 0.6  # an upward triangle's top rows are narrower than this fraction of its bottom rows
FOREGROUND_MARGIN = 0.6
# An end row (or column) narrower than this fraction of the widest is a decoding fringe, not the shape's
# outline, when testing for a square: a rendered disc's narrowest end row is a third of its width.
FRINGE = 0.3
ISOLATED = 2  # a pixel whose 3×3 window holds at most this many of its own label (itself included) is noise

_COLORS = "|".join(PALETTE)
_SHAPES = "|".join(SHAPES)
_NUMBERS = {word: n for n, word in COUNT_WORDS.items()}
_SINGLE = re.compile(rf"^an? ({_COLORS}) ({_SHAPES})$")
_COUNT = re.compile(rf"^({'|'.join(_NUMBERS)}) ({_COLORS}) ({_SHAPES})s$")
_RELATION = re.compile(rf"^an? ({_COLORS}) ({_SHAPES}) ({'|'.join(RELATIONS)}) an? ({_COLORS}) ({_SHAPES})$")


@dataclass(frozen=True)
class CaptionSpec:
    family: str
    kinds: tuple[tuple[str, str], ...]  # the expected objects, one entry per object
    relation: str | None = None  # for the relation family: kinds[0] <relation> kinds[1]


@dataclass(frozen=True)
class Detected:
    color: str
    shape: str
    center: tuple[float, float]
    area: int


@dataclass(frozen=True)
class Verdict:
    binding: bool
    count: bool
    relation: bool | None
    correct: bool
    detected: tuple[Detected, ...]


def parse_caption(caption: str) -> CaptionSpec:
    """A caption of the world's grammar -> its spec; ValueError naming any other text."""
    text = " ".join(str(caption).lower().split())
    if m := _SINGLE.match(text):
        return CaptionSpec("single", ((m[1], m[2]),))
    if m := _COUNT.match(text):
        return CaptionSpec("count", ((m[2], m[3]),) * _NUMBERS[m[1]])
    if m := _RELATION.match(text):
        return CaptionSpec("relation", ((m[1], m[2]), (m[4], m[5])), relation=m[3])
    raise ValueError(f"caption {caption!r} is not in the shapes world's grammar: expected 'a <colour> <shape>', "
                     f"'two|three <colour> <shape>s' or 'a <colour> <shape> <left of|right of|above|below> a "
                     f"<colour> <shape>' with colours {list(PALETTE)} and shapes {list(SHAPES)}")


_REFERENCE = np.array([BACKGROUND, *PALETTE.values()], dtype=np.float32)  # [5, 3]; label 0 = background
_NAMES = ("background", *PALETTE)


def check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"the judge takes uint8 images of shape ({IMAGE_SIZE}, {IMAGE_SIZE}, 3), got "
                         f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}")


def label_pixels(image: np.ndarray) -> np.ndarray:
    """uint8 [32, 32, 3] -> int [32, 32] labels (0 background, 1.. palette order), majority-filtered."""
    check_image(image)
    dist = ((image[:, :, None, :].astype(np.float32) - _REFERENCE) ** 2).sum(-1)  # [H, W, 5]
    nearest = dist[:, :, 1:].argmin(-1) + 1
    near_fg = np.take_along_axis(dist, nearest[..., None], -1)[..., 0]
    labels = np.where(near_fg < FOREGROUND_MARGIN * dist[:, :, 0] + 1e-6, nearest, 0)
    # 3×3 clean-up: a pixel with at most one neighbour of its own label (isolated noise of a decoded image)
    # takes the most frequent label around it; thin parts of shapes (a triangle's apex) have more.
    padded = np.pad(labels, 1, mode="edge")
    windows = np.stack([padded[i:i + IMAGE_SIZE, j:j + IMAGE_SIZE] for i in range(3) for j in range(3)])  # [9,H,W]
    counts = np.stack([(windows == k).sum(0) for k in range(len(_NAMES))])  # [5, H, W]
    best = counts.argmax(0)
    own = np.take_along_axis(counts, labels[None], 0)[0]
    return np.where(own <= ISOLATED, best, labels)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean [H, W] mask, as arrays of (row, col)."""
    seen = np.zeros_like(mask, dtype=bool)
    found = []
    for r0, c0 in zip(*np.nonzero(mask), strict=True):
        if seen[r0, c0]:
            continue
        stack, pixels = [(r0, c0)], []
        seen[r0, c0] = True
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1] and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        found.append(np.array(pixels))
    return found


def row_widths(pixels: np.ndarray) -> np.ndarray:
    """Pixels per row of one component [(row, col), ...], top to bottom."""
    rows = pixels[:, 0] - pixels[:, 0].min()
    return np.bincount(rows).astype(np.float32)


def _profile_shape(widths: np.ndarray) -> str:
    """The shape a row profile (widths top to bottom) describes: square, triangle or circle."""
    quarter = max(1, len(widths) // 4)
    top, bottom = widths[:quarter].mean(), widths[-quarter:].mean()
    middle = widths[quarter:len(widths) - quarter].mean() if len(widths) > 2 * quarter else widths.mean()
    if top >= SQUARE_FILL * middle and bottom >= SQUARE_FILL * middle:
        return "square"
    return "triangle" if top < TRIANGLE_TOP * bottom else "circle"


def _without_fringe(widths: np.ndarray) -> np.ndarray:
    """The profile without its end rows narrower than FRINGE of the widest row."""
    kept = np.nonzero(widths >= FRINGE * widths.max())[0]
    return widths[kept[0]:kept[-1] + 1]


def classify_shape(pixels: np.ndarray) -> str:
    """The shape of one component from its row profile: a square's rows are all as wide as its middle,
    an upward triangle widens from top to bottom, a disc is narrow at both ends. A component that is not
    a square by its rows is still one when its row or its column profile, without fringe rows, is square:
    the pipeline's decoded squares often carry a one- or two-pixel ridge along one side, which would make
    the row test call them a triangle or a disc."""
    rows = row_widths(pixels)
    by_rows = _profile_shape(rows)
    if by_rows == "square":
        return by_rows
    columns = row_widths(pixels[:, ::-1])  # a (row, col) -> (col, row) swap: the column heights
    if "square" in (_profile_shape(_without_fringe(rows)), _profile_shape(_without_fringe(columns))):
        return "square"
    return by_rows


def detect(image: np.ndarray) -> tuple[Detected, ...]:
    """The objects of an image: one per palette-coloured component of at least MIN_AREA px."""
    labels = label_pixels(image)
    objects = []
    for k, color in enumerate(_NAMES[1:], start=1):
        for pixels in _components(labels == k):
            if len(pixels) >= MIN_AREA:
                # The bounding box's centre, as the world defines positions (a triangle's centroid sits lower).
                center = ((pixels[:, 1].min() + pixels[:, 1].max()) / 2.0, (pixels[:, 0].min() + pixels[:, 0].max()) / 2.0)
                objects.append(Detected(color, classify_shape(pixels), center, len(pixels)))
    return tuple(objects)


def judge(image: np.ndarray, caption: str | CaptionSpec) -> Verdict:
    """The verdict of one image against one caption (see the module docstring)."""
    spec = caption if isinstance(caption, CaptionSpec) else parse_caption(caption)
    objects = detect(image)
    found = Counter((o.color, o.shape) for o in objects)
    wanted = Counter(spec.kinds)
    binding = all(found[kind] > 0 for kind in wanted)
    count = len(objects) == len(spec.kinds)
    relation = None
    if spec.relation is not None:
        first = [o for o in objects if (o.color, o.shape) == spec.kinds[0]]
        second = [o for o in objects if (o.color, o.shape) == spec.kinds[1]]
        relation = any(relation_holds(spec.relation, a.center, b.center) for a in first for b in second)
    correct = found == wanted and relation is not False
    return Verdict(binding=binding, count=count, relation=relation, correct=correct, detected=objects)


def kind_overlap(verdict: Verdict, spec: CaptionSpec) -> float:
    """The multiset overlap (intersection over union) of the detected kinds with the caption's: 1 exactly when
    they are equal, 0 when no detected object is a described one. E.g. "two yellow squares" against a yellow
    square and a yellow circle: 1 / 3."""
    found = Counter((o.color, o.shape) for o in verdict.detected)
    wanted = Counter(spec.kinds)
    return sum((found & wanted).values()) / sum((found | wanted).values())
