"""JPEG (in)compressibility rewards (DDPO).

Each image is encoded with PIL at ``quality`` (95 by default, as DDPO) and its size taken in kB
(bytes / 1000, as DDPO): ``jpeg_compressibility`` scores ``-kB`` (smaller files score higher),
``jpeg_incompressibility`` scores ``+kB``.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from rewards.base import RewardOutput, check_batch


def jpeg_size_kb(images: np.ndarray, *, quality: int = 95) -> np.ndarray:
    """uint8 [B, H, W, 3] -> float32 [B], each image's JPEG size in kB (bytes / 1000)."""
    sizes = np.empty(images.shape[0], dtype=np.float32)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        sizes[i] = buffer.tell() / 1000.0
    return sizes


class _JpegSize:
    name = ""
    sign = 0.0

    def __init__(self, *, quality: int = 95) -> None:
        self.check_options(quality=quality)
        self.quality = quality

    @classmethod
    def check_options(cls, *, quality: int = 95) -> None:
        """The option rules, checked by the config before anything is built."""
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"{cls.name}: quality must be an int in [1, 100] (PIL's JPEG quality), got {quality!r}")

    def __call__(self, images: np.ndarray, prompts: list[str]) -> RewardOutput:
        check_batch(images, prompts)
        return RewardOutput(scores=self.sign * jpeg_size_kb(images, quality=self.quality))


class JpegCompressibility(_JpegSize):
    """Score = -(JPEG size in kB); rewards images that compress well."""

    name = "jpeg_compressibility"
    sign = -1.0


class JpegIncompressibility(_JpegSize):
    """Score = +(JPEG size in kB); rewards images that compress badly."""

    name = "jpeg_incompressibility"
    sign = 1.0
