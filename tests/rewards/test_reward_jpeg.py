import io

import numpy as np
import pytest
from PIL import Image

from rewards.jpeg import JpegCompressibility, JpegIncompressibility


def pil_kb(image: np.ndarray, quality: int = 95) -> float:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return len(buffer.getvalue()) / 1000


def test_scores_are_signed_jpeg_sizes_in_kb(images, prompts):
    expected = np.array([pil_kb(im) for im in images], dtype=np.float32)
    comp = JpegCompressibility()(images, prompts)
    incomp = JpegIncompressibility()(images, prompts)
    assert comp.scores.dtype == np.float32 and comp.scores.shape == (4,)
    np.testing.assert_allclose(comp.scores, -expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(incomp.scores, expected, rtol=0, atol=1e-6)
    assert comp.embeddings == {} and comp.errors is None


def test_flat_image_is_more_compressible_than_noise():
    rng = np.random.default_rng(1)
    flat = np.full((64, 64, 3), 128, dtype=np.uint8)
    noise = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    batch = np.stack([flat, noise])
    comp = JpegCompressibility()(batch, ["a", "b"]).scores
    incomp = JpegIncompressibility()(batch, ["a", "b"]).scores
    assert comp[0] > comp[1]
    assert incomp[0] < incomp[1]


def test_quality_option(images, prompts):
    low = JpegIncompressibility(quality=10)(images, prompts).scores
    np.testing.assert_allclose(low, [pil_kb(im, 10) for im in images], atol=1e-6)
    assert (low < JpegIncompressibility()(images, prompts).scores).all()
    with pytest.raises(ValueError, match="quality"):
        JpegCompressibility(quality=0)


def test_rejects_bad_batches(images, prompts):
    reward = JpegCompressibility()
    with pytest.raises(ValueError, match="uint8"):
        reward(images.astype(np.float32), prompts)
    with pytest.raises(ValueError, match="4 images but 3 prompts"):
        reward(images, prompts[:3])
