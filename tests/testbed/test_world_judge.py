"""The shapes world and its judge: determinism, the held-out split, the judge on hand-drawn scenes with
known answers (near misses included), its accuracy on clean and noisy renders, and the reward."""

from __future__ import annotations

import numpy as np
import pytest

from rewards.shapes_judge import ShapesJudge
from testbed.judge import judge, parse_caption
from testbed.world import (
    HELD_OUT,
    IMAGE_SIZE,
    PALETTE,
    SIZE_RANGE,
    Obj,
    Scene,
    render,
    scene_for_seed,
    training_split,
)


def _scene(*objects: tuple[str, str, int, int, int]) -> np.ndarray:
    return render(Scene(caption="", family="", objects=tuple(Obj(*o) for o in objects)))


def test_the_generator_is_deterministic_and_seeds_differ():
    assert scene_for_seed(7) == scene_for_seed(7)
    assert np.array_equal(render(scene_for_seed(7)), render(scene_for_seed(7)))
    assert len({scene_for_seed(i).caption for i in range(50)}) > 25
    image = render(scene_for_seed(3))
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8


def test_held_out_kinds_never_appear_in_the_training_split():
    scenes = training_split(3000, seed=0)
    assert not any(o.kind in HELD_OUT for s in scenes for o in s.objects)
    assert not any(k in HELD_OUT for s in scenes for k in parse_caption(s.caption).kinds)
    assert {s.family for s in scenes} == {"single", "count", "relation"}
    held = [scene_for_seed(i, held_out=True) for i in range(200)]
    assert all(any(o.kind in HELD_OUT for o in s.objects) for s in held)


def test_captions_parse_and_other_text_is_refused_by_name():
    assert parse_caption("a red circle").kinds == (("red", "circle"),)
    assert parse_caption("three blue squares").kinds == (("blue", "square"),) * 3
    spec = parse_caption("a green triangle left of a yellow circle")
    assert (spec.family, spec.kinds, spec.relation) == ("relation", (("green", "triangle"), ("yellow", "circle")),
                                                        "left of")
    for bad in ("a purple circle", "four red circles", "a red circle near a blue square", ""):
        with pytest.raises(ValueError, match=f"caption {bad!r} is not in the shapes world's grammar"):
            parse_caption(bad)


RED_CIRCLE_LEFT_OF_BLUE_SQUARE = (("red", "circle", 2, 12, 10), ("blue", "square", 20, 12, 10))


@pytest.mark.parametrize(
    "objects, caption, expected",  # expected (binding, count, relation, correct)
    [
        ((("red", "circle", 10, 10, 10),), "a red circle", (True, True, None, True)),
        ((("blue", "circle", 10, 10, 10),), "a red circle", (False, True, None, False)),  # wrong colour
        ((("red", "square", 10, 10, 10),), "a red circle", (False, True, None, False)),  # wrong shape
        ((("red", "triangle", 10, 10, 11),), "a red triangle", (True, True, None, True)),
        ((("red", "circle", 2, 2, 9), ("green", "square", 20, 20, 9)), "a red circle",
         (True, False, None, False)),  # a distractor
        ((("red", "square", 2, 2, 9), ("red", "square", 20, 20, 9)), "two red squares", (True, True, None, True)),
        ((("red", "square", 2, 2, 9), ("red", "square", 20, 20, 9)), "three red squares",
         (True, False, None, False)),  # wrong count
        ((("red", "square", 2, 2, 9), ("red", "circle", 20, 20, 9)), "two red squares",
         (True, True, None, False)),  # right count, one of the wrong shape
        (RED_CIRCLE_LEFT_OF_BLUE_SQUARE, "a red circle left of a blue square", (True, True, True, True)),
        (RED_CIRCLE_LEFT_OF_BLUE_SQUARE, "a blue square right of a red circle", (True, True, True, True)),
        (RED_CIRCLE_LEFT_OF_BLUE_SQUARE, "a blue square left of a red circle", (True, True, False, False)),  # swapped
        (RED_CIRCLE_LEFT_OF_BLUE_SQUARE, "a red circle above a blue square", (True, True, False, False)),
        ((("yellow", "triangle", 12, 2, 10), ("green", "circle", 12, 20, 10)), "a yellow triangle above a green circle",
         (True, True, True, True)),
    ],
)
def test_the_judge_on_hand_drawn_scenes(objects, caption, expected):
    verdict = judge(_scene(*objects), caption)
    assert (verdict.binding, verdict.count, verdict.relation, verdict.correct) == expected, verdict


def _with_ridges(image: np.ndarray, *, color: str, rows: list[tuple[int, int, int]],
                 columns: list[tuple[int, int, int]]) -> np.ndarray:
    """``image`` with thin one-pixel ridges painted on: rows (y, x0, x1) and columns (x, y0, y1), inclusive."""
    image = image.copy()
    for y, x0, x1 in rows:
        image[y, x0:x1 + 1] = PALETTE[color]
    for x, y0, y1 in columns:
        image[y0:y1 + 1, x] = PALETTE[color]
    return image


@pytest.mark.parametrize("rows, columns", [
    ([(9, 14, 15)], []),  # a 2-px ridge on top: by its rows alone a disc (the top quarter is half width)
    ([(9, 15, 15)], []),  # a 1-px ridge: by its rows alone a triangle
    ([(20, 13, 14)], [(20, 12, 13)]),  # ridges below and to the right
    ([(9, 14, 16)], [(9, 13, 15)]),  # above and to the left, each 3 px of 10
])
def test_a_square_with_a_decoding_ridge_is_still_a_square(rows, columns):
    # The pipeline's decoded squares often carry such a ridge (a one- or two-pixel row or column along a
    # side); the row profile alone called many of them discs or triangles.
    square = _scene(("red", "square", 10, 10, 10))  # rows and columns 10..19
    image = _with_ridges(square, color="red", rows=rows, columns=columns)
    assert [o.shape for o in judge(image, "a red square").detected] == ["square"]
    assert judge(image, "a red square").correct and not judge(image, "a red circle").correct


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_every_rendered_size_keeps_its_shape(shape):
    for size in range(SIZE_RANGE[0], SIZE_RANGE[1] + 1):
        for x in (2, 11):
            detected = judge(_scene(("blue", shape, x, 10, size)), f"a blue {shape}").detected
            assert [o.shape for o in detected] == [shape], (shape, size, x)


def test_the_judge_is_right_on_clean_and_noisy_renders():
    rng = np.random.default_rng(0)
    scenes = [scene_for_seed(i, held_out=i % 3 == 0) for i in range(900)]
    clean = np.mean([judge(render(s), s.caption).correct for s in scenes])
    noisy = np.mean([judge(np.clip(render(s) + rng.normal(0, 16, (32, 32, 3)), 0, 255).astype(np.uint8),
                           s.caption).correct for s in scenes])
    assert clean >= 0.99 and noisy >= 0.97, (clean, noisy)
    # A caption of another scene is (almost always) wrong: the judge is not trivially permissive.
    shuffled = np.mean([judge(render(s), scenes[(i + 1) % len(scenes)].caption).correct for i, s in enumerate(scenes)])
    assert shuffled < 0.05


def test_bad_images_are_refused():
    with pytest.raises(ValueError, match=r"uint8 images of shape \(32, 32, 3\)"):
        judge(np.zeros((64, 64, 3), np.uint8), "a red circle")
    with pytest.raises(ValueError, match=r"uint8 images of shape \(32, 32, 3\)"):
        judge(np.zeros((32, 32, 3), np.float32), "a red circle")


def test_the_reward_scores_verdicts():
    images = np.stack([_scene(*RED_CIRCLE_LEFT_OF_BLUE_SQUARE)] * 3)
    prompts = ["a red circle left of a blue square", "a blue square left of a red circle", "a red circle"]
    assert ShapesJudge()(images, prompts).scores.tolist() == [1.0, 0.0, 0.0]
    # partial: mean of (binding, count, relation) where it applies: 1, 2/3, (1 + 0)/2.
    np.testing.assert_allclose(ShapesJudge(mode="partial")(images, prompts).scores, [1.0, 2 / 3, 0.5], rtol=1e-6)
    # overlap: kinds {red circle, blue square} against the captions' multisets, averaged with the relation
    # where there is one: (1 + 1)/2, (1 + 0)/2, and {red circle} vs both: 1/2.
    np.testing.assert_allclose(ShapesJudge(mode="overlap")(images, prompts).scores, [1.0, 0.5, 0.5], rtol=1e-6)
    # Where the modes part: a yellow square beside a yellow circle passes both of partial's checks for "two
    # yellow squares" (one is present, two objects) but is wrong; overlap gives it 1 / (1 + 1 + 1).
    near_miss = _scene(("yellow", "square", 2, 12, 10), ("yellow", "circle", 20, 12, 10))[None]
    assert ShapesJudge()(near_miss, ["two yellow squares"]).scores.tolist() == [0.0]
    assert ShapesJudge(mode="partial")(near_miss, ["two yellow squares"]).scores.tolist() == [1.0]
    np.testing.assert_allclose(ShapesJudge(mode="overlap")(near_miss, ["two yellow squares"]).scores, [1 / 3], rtol=1e-6)
    # Whatever the mode, the verdict's parts come back beside the score (NaN: no relation in a count caption).
    parts = ShapesJudge()(np.concatenate([near_miss, images[:1]]), ["two yellow squares", prompts[0]]).checks
    np.testing.assert_allclose(parts["binding"], [1, 1])
    np.testing.assert_allclose(parts["count"], [1, 1])
    np.testing.assert_allclose(parts["relation"], [np.nan, 1])
    np.testing.assert_allclose(parts["overlap"], [1 / 3, 1], rtol=1e-6)
    with pytest.raises(ValueError, match="caption 'a cat' is not in the shapes world's grammar"):
        ShapesJudge()(images[:1], ["a cat"])
    with pytest.raises(ValueError, match="mode must be one of"):
        ShapesJudge(mode="lenient")
