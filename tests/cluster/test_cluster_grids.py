"""Labelled sample grids (cluster/grids.py): every cell shows its image (scaled by a whole factor) above
a band with exactly its prompt's wrapped lines and its reward drawn in the bitmap font; long prompts end
in "...", characters outside Latin-1 print as "?"; the evaluation's PNG and JSON carry the prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from cluster.evaluation import EvalResult, save_eval
from cluster.grids import (
    GUTTER,
    LABEL_LINES,
    MIN_LABELLED_WIDTH,
    grid_image,
    printable,
    reward_line,
    wrap_label,
)
from cluster.metrics import MetricsWriter

FONT = ImageFont.load_default_imagefont()
LINE = FONT.getbbox("Ag")[3] + 1


def _images(n: int, h: int, w: int) -> np.ndarray:
    """Image i is filled with the value 10 * (i + 1), so every cell of a grid can be identified."""
    return np.stack([np.full((h, w, 3), 10 * (i + 1), dtype=np.uint8) for i in range(n)])


def _expected_band(lines: dict[int, str], width: int, height: int) -> np.ndarray:
    """The band as drawn independently here: {line number: text}, black on white, 2 px in, LINE apart."""
    band = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    for i, line in lines.items():
        draw.text((2, 2 + i * LINE), line, font=FONT, fill=(0, 0, 0))
    return np.asarray(band)


def test_each_cell_is_its_image_scaled_up_above_its_own_prompt_and_reward():
    prompts = ["a cat", "a red circle above a blue square beside a green triangle", "a dog"]
    scores = [0.5, -1.25, float("nan")]
    grid = grid_image(_images(3, 64, 64), columns=2, labels=prompts, scores=scores)

    scale = MIN_LABELLED_WIDTH // 64  # 64 px samples are shown at 2x
    image_w = image_h = 64 * scale
    band_h = 4 + (LABEL_LINES + 1) * LINE
    cell_w, cell_h = image_w + GUTTER, image_h + band_h + GUTTER
    assert grid.shape == (2 * cell_h, 2 * cell_w, 3) and grid.dtype == np.uint8
    for i, prompt in enumerate(prompts):
        r, c = divmod(i, 2)
        cell = grid[r * cell_h : (r + 1) * cell_h, c * cell_w : (c + 1) * cell_w]
        assert (cell[:image_h, :image_w] == 10 * (i + 1)).all()  # the image, untouched by the label
        lines = dict(enumerate(wrap_label(prompt, width_px=image_w - 4))) | {LABEL_LINES: reward_line(scores[i])}
        band = cell[image_h : image_h + band_h, :image_w]
        assert np.array_equal(band, _expected_band(lines, image_w, band_h)), prompt
        assert (cell[image_h + band_h :] == 255).all() and (cell[:, image_w:] == 255).all()  # the gutter
    assert (grid[cell_h:, cell_w:] == 255).all()  # the fourth cell is empty: white
    # The prompts are really different text: the bands of "a cat" and "a dog" differ.
    assert not np.array_equal(grid[image_h : image_h + band_h, :image_w],
                              grid[cell_h + image_h : cell_h + image_h + band_h, :image_w])
    assert [reward_line(s) for s in scores] == ["reward 0.5", "reward -1.25", "reward n/a"]


def test_without_scores_the_band_holds_the_prompt_lines_only_and_wide_images_are_not_scaled():
    grid = grid_image(_images(1, 20, 200), labels=["a horse"])
    band_h = 4 + LABEL_LINES * LINE
    assert grid.shape == (20 + band_h + GUTTER, 200 + GUTTER, 3)
    assert (grid[:20, :200] == 10).all()
    assert np.array_equal(grid[20 : 20 + band_h, :200], _expected_band({0: "a horse"}, 200, band_h))


def test_unlabelled_grids_stay_the_plain_images():
    grid = grid_image(_images(2, 8, 6), columns=2)
    assert grid.shape == (8, 12, 3) and (grid[:, :6] == 10).all() and (grid[:, 6:] == 20).all()


def test_long_prompts_wrap_on_words_and_end_in_an_ellipsis_within_the_width():
    text = "a red circle above a blue square beside a green triangle on the left of a yellow star"
    lines = wrap_label(text, width_px=124)
    assert len(lines) == LABEL_LINES and lines[-1].endswith("...")
    assert all(FONT.getlength(line) <= 124 for line in lines)
    assert text.startswith(" ".join(lines).removesuffix("..."))  # the beginning of the prompt, in order
    assert lines[0] == "a red circle above a"  # whole words while they fit

    assert wrap_label("a cat", width_px=124) == ["a cat"]  # short: as is, no ellipsis
    long_word = "x" * 100
    split = wrap_label(long_word, width_px=60, max_lines=10)
    assert "".join(split) == long_word and all(FONT.getlength(line) <= 60 for line in split)


def test_characters_outside_the_bitmap_font_print_as_question_marks():
    assert printable("café ☕\nat  night") == "café ? at night"
    grid = grid_image(_images(1, 64, 64), labels=["猫 on a mat"])  # would raise UnicodeEncodeError unmapped
    assert grid.shape[1] == MIN_LABELLED_WIDTH + GUTTER


def test_one_label_and_one_score_per_image():
    with pytest.raises(ValueError, match="2 labels for 3 images"):
        grid_image(_images(3, 8, 8), labels=["a", "b"])
    with pytest.raises(ValueError, match="1 scores for 3 images"):
        grid_image(_images(3, 8, 8), labels=["a", "b", "c"], scores=[1.0])


def test_the_evaluation_png_carries_the_prompts_and_its_json_the_same_items(tmp_path):
    prompts = ["a cat", "a cat", "a dog", "a dog"]
    result = EvalResult(mean=0.25, images=_images(4, 64, 64), components={"eval/jpeg": 0.25}, prompts=prompts,
                        scores=np.array([0.1, 0.2, 0.3, float("nan")], dtype=np.float32), captions=None)
    path = save_eval(result, run_dir=tmp_path, updates=3, writer=MetricsWriter(tmp_path, tensorboard=False))

    assert path == tmp_path / "samples" / "eval_epoch0003.png"
    with Image.open(path) as image:
        png = np.asarray(image)
    assert np.array_equal(png, grid_image(result.images, labels=prompts, scores=result.scores))
    items = json.loads(path.with_suffix(".json").read_text())
    assert [item["prompt"] for item in items] == prompts
    assert [item["reward"] for item in items[:3]] == pytest.approx([0.1, 0.2, 0.3]) and items[3]["reward"] is None
