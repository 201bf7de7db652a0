"""Sample grids: images laid out row-major, each cell optionally labelled with its prompt (and reward).

A labelled cell is the image, scaled up by a whole factor (nearest neighbour, so every pixel stays a
block of its own colour) to at least ``MIN_LABELLED_WIDTH`` pixels so that a line of the label holds a
useful part of the prompt, above a white band with the prompt in black, wrapped on word boundaries to
at most ``LABEL_LINES`` lines (cut with "..." beyond), and the reward on the band's last line when
given; a white gutter of ``GUTTER`` pixels right of and below each cell keeps neighbouring labels apart.
Text is drawn with PIL's built-in bitmap font: it needs no font file and draws the same pixels on
every machine, so grids of two runs can be compared. It covers Latin-1; other characters print as "?".
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

LABEL_LINES = 3  # prompt lines per cell; a longer prompt ends in "..."
MIN_LABELLED_WIDTH = 128  # a 64 px sample is shown at 2x, so a line holds ~20 characters
_PAD = 2  # pixels around the label text
GUTTER = 6  # white pixels between labelled cells
_ELLIPSIS = "..."  # the bitmap font has no "…"


def _font():
    from PIL import ImageFont

    return ImageFont.load_default_imagefont()


def _line_height(font) -> int:
    return font.getbbox("Ag")[3] + 1


def printable(text: str) -> str:
    """``text`` in the characters the bitmap font has (Latin-1); others become "?", line breaks spaces."""
    return " ".join(text.split()).encode("latin-1", "replace").decode("latin-1")


def wrap_label(text: str, *, width_px: int, max_lines: int = LABEL_LINES, font=None) -> list[str]:
    """``text`` as at most ``max_lines`` lines, each at most ``width_px`` wide in ``font`` (the bitmap
    font by default): words wrap, a word wider than a line is split, and text that does not fit ends
    the last line with "..."."""
    font = font or _font()
    fits = lambda line: font.getlength(line) <= width_px  # noqa: E731
    lines: list[str] = []
    current = ""
    for word in printable(text).split(" "):
        candidate = f"{current} {word}" if current else word
        if fits(candidate):
            current = candidate
            continue
        if current:
            lines.append(current)
        while not fits(word) and len(word) > 1:  # a word longer than a line: split it where it overflows
            cut = max(1, next(i for i in range(1, len(word) + 1) if not fits(word[:i])) - 1)
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    if len(lines) <= max_lines:
        return lines
    last = lines[max_lines - 1]
    while last and not fits(last + _ELLIPSIS):
        last = last[:-1]
    return lines[: max_lines - 1] + [last.rstrip() + _ELLIPSIS]


def reward_line(score: float) -> str:
    return f"reward {score:.4g}" if math.isfinite(score) else "reward n/a"


def _label_band(lines: list[str | None], *, width: int, height: int, font) -> np.ndarray:
    from PIL import Image, ImageDraw

    band = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        if line is not None:  # None: an empty line, so the reward line keeps its place
            draw.text((_PAD, _PAD + i * _line_height(font)), line, font=font, fill=(0, 0, 0))
    return np.asarray(band)


def grid_image(images: np.ndarray, *, columns: int = 4, labels: list[str] | None = None,
               scores: list[float] | np.ndarray | None = None) -> np.ndarray:
    """uint8 [N, H, W, 3] -> one uint8 [rows * cell_h, columns * cell_w, 3] grid, row-major, empty cells
    white (labelled cells end in the gutter, so the grid's last row and column of cells do too). With ``labels`` (one per image, e.g. its prompt) every cell carries its label, and with
    ``scores`` a reward line, as the module docstring describes; without, cells are the images as they are."""
    n, h, w, _ = images.shape
    if labels is not None and len(labels) != n:
        raise ValueError(f"grid_image: {len(labels)} labels for {n} images; give one label per image")
    if scores is not None and len(scores) != n:
        raise ValueError(f"grid_image: {len(scores)} scores for {n} images; give one score per image")
    cells = list(images)
    if labels is not None:
        font = _font()
        scale = max(1, math.ceil(MIN_LABELLED_WIDTH / w))
        h, w = h * scale, w * scale
        band_h = 2 * _PAD + (LABEL_LINES + (scores is not None)) * _line_height(font)
        cells = []
        for i, image in enumerate(images):
            lines: list[str | None] = list(wrap_label(labels[i], width_px=w - 2 * _PAD, font=font))
            if scores is not None:
                lines += [None] * (LABEL_LINES - len(lines)) + [reward_line(float(scores[i]))]
            cell = np.full((h + band_h + GUTTER, w + GUTTER, 3), 255, dtype=np.uint8)
            cell[:h, :w] = image.repeat(scale, axis=0).repeat(scale, axis=1)
            cell[h : h + band_h, :w] = _label_band(lines, width=w, height=band_h, font=font)
            cells.append(cell)
        h, w = h + band_h + GUTTER, w + GUTTER
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * h, columns * w, 3), 255, dtype=np.uint8)
    for i, cell in enumerate(cells):
        r, c = divmod(i, columns)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = cell
    return grid


def save_grid(images: np.ndarray, path: Path, *, columns: int = 4, labels: list[str] | None = None,
              scores: list[float] | np.ndarray | None = None) -> np.ndarray:
    """``grid_image(...)`` written to ``path`` as PNG (parent directories created); returns the grid."""
    from PIL import Image

    grid = grid_image(images, columns=columns, labels=labels, scores=scores)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return grid
