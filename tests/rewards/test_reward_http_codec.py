"""The HTTP codec on its own (no Ray): a request beyond a pixel bound is refused from the images'
headers, before any pixel is decoded; a batch item that fails is isolated; answers stay strict JSON."""

from __future__ import annotations

import json
import time
import tracemalloc

import numpy as np
import pytest

from rewards.base import RewardOutput
from rewards.http_codec import (
    HttpLimits,
    RequestError,
    decode_images,
    encode_image,
    encode_response,
    parse_request,
)
from rewards.jpeg import JpegCompressibility
from rewards.serve_batch import ItemScoringError, score_batch

SIDE = 2048  # one decoded image: 2048 * 2048 * 3 bytes = 12.6 MB; its zero PNG is about 12 kB


def _body(n: int, side: int = SIDE) -> bytes:
    image = encode_image(np.zeros((side, side, 3), dtype=np.uint8))
    return json.dumps({"prompts": ["a"] * n, "images": [image] * n}).encode()


def _measure(fn):
    """-> (result or RequestError, peak bytes traced, seconds)."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        result = fn()
    except RequestError as err:
        result = err
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, peak, seconds


def test_a_request_beyond_max_request_pixels_is_refused_before_any_image_is_decoded():
    # Eight 2048 x 2048 images, each within max_image_pixels, 33.5 M pixels (100 MB decoded) in all.
    body = _body(8)
    one_image = SIDE * SIDE * 3
    limits = HttpLimits(max_image_pixels=SIDE * SIDE, max_request_pixels=3 * SIDE * SIDE)
    refused, refused_peak, refused_s = _measure(lambda: parse_request(body, limits))
    assert isinstance(refused, RequestError) and refused.status == 413
    assert str(refused) == (f"the decoded size of the request's 8 images (pixels) is {8 * SIDE * SIDE}, above the "
                            f"limit of {3 * SIDE * SIDE} (max_request_pixels)")
    assert refused.details == {"limit": "max_request_pixels", "value": 8 * SIDE * SIDE, "maximum": 3 * SIDE * SIDE}
    # The same request within the bound, decoded: every image's pixels are allocated.
    roomy = HttpLimits(max_image_pixels=SIDE * SIDE, max_request_pixels=8 * SIDE * SIDE)
    decoded, decoded_peak, decoded_s = _measure(lambda: decode_images(parse_request(body, roomy)))
    assert len(decoded) == 8 and decoded[0].shape == (SIDE, SIDE, 3)
    # Measured here (2 shared cores, 131 kB body): refused in 2-4 ms with a 0.26 MB traced peak (the
    # JSON and the PNG bytes); decoded in 0.8-1.3 s with a 113 MB peak. The refusal stays below one image.
    assert refused_peak < one_image < 8 * one_image <= decoded_peak, (refused_peak, decoded_peak)
    assert refused_s < decoded_s, (refused_s, decoded_s)


def test_headers_are_checked_per_image_before_decoding():
    limits = HttpLimits(max_image_pixels=96 * 96, max_request_pixels=10**6, max_aspect_ratio=4)
    wide = encode_image(np.zeros((8, 64, 3), dtype=np.uint8))  # 64 x 8 = 8:1
    with pytest.raises(RequestError, match=r"images\[1\] is 64x8, an aspect ratio of 8:1, above the limit of 4:1 "
                                           r"\(max_aspect_ratio\)") as err:
        parse_request(json.dumps({"prompts": ["a", "b"], "images": [encode_image(np.zeros((8, 8, 3), np.uint8)),
                                                                    wide]}).encode(), limits)
    assert err.value.status == 422
    parsed = parse_request(_body(2, side=32), limits)
    assert parsed.pixels == 2 * 32 * 32 and [im.kind for im in parsed.images] == ["PNG", "PNG"]


@pytest.mark.parametrize("values", [{}, {"max_aspect_ratio": 0.5}, {"max_request_pixels": 10},
                                    {"max_inflight_images": 8}, {"max_batch": 0}, {"max_body_bytes": True}])
def test_limits_that_contradict_each_other_are_refused(values):
    if not values:
        HttpLimits()
        return
    with pytest.raises(ValueError, match=next(iter(values))):
        HttpLimits(**values)


def test_a_failing_item_gets_its_own_error_and_the_rest_of_the_batch_is_scored():
    rng = np.random.default_rng(0)
    good = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3)]
    bad = np.zeros((1, 70_000, 3), dtype=np.uint8)  # wider than JPEG's 65,500 pixels: the encoder raises
    rewards = {"jpeg_compressibility": JpegCompressibility()}
    items = [("jpeg_compressibility", good[0], "a"), ("jpeg_compressibility", bad, "b"),
             ("jpeg_compressibility", good[1], "c"), ("jpeg_compressibility", good[2], "d")]
    results, failed = score_batch(rewards, items)
    assert failed == 1 and isinstance(results[1], ItemScoringError)
    assert "reward 'jpeg_compressibility' failed on this 70000x1 image: OSError" in results[1].message
    expected = JpegCompressibility()(np.stack(good), ["a", "c", "d"]).scores
    np.testing.assert_allclose([results[i]["score"] for i in (0, 2, 3)], expected)


class _FailsOnPrompt:
    """A reward that raises when one prompt of its batch is "boom" (as a model can on one bad input)."""

    def __call__(self, images: np.ndarray, prompts: list[str]) -> RewardOutput:
        if "boom" in prompts:
            raise ValueError("cannot score 'boom'")
        return RewardOutput(scores=images.reshape(len(images), -1).mean(axis=1).astype(np.float32))


def test_a_failing_item_of_a_same_size_group_is_found_by_scoring_the_group_one_by_one():
    images = np.arange(4 * 8 * 8 * 3, dtype=np.uint8).reshape(4, 8, 8, 3)
    items = [("r", image, prompt) for image, prompt in zip(images, ["a", "boom", "c", "d"], strict=True)]
    results, failed = score_batch({"r": _FailsOnPrompt()}, items)
    assert failed == 1 and results[1].message == "reward 'r' failed on this 8x8 image: ValueError: cannot score 'boom'"
    np.testing.assert_allclose([results[i]["score"] for i in (0, 2, 3)], images[[0, 2, 3]].reshape(3, -1).mean(1))


def test_non_finite_embeddings_become_null_in_strict_json():
    output = RewardOutput(scores=np.array([np.nan, 1.0], dtype=np.float32),
                          embeddings={"image": np.array([[np.nan, 1.0], [0.5, np.inf]], dtype=np.float32)})
    response = encode_response(output, return_embeddings=True)
    assert json.loads(json.dumps(response, allow_nan=False)) == {
        "scores": [None, 1.0], "embeddings": {"image": [[None, 1.0], [0.5, None]]}}
