"""Validation and decoding of the reward HTTP API's JSON requests (no Ray, no Serve: pure functions).

Request:  ``{"prompts": [str, ...], "images": [base64 PNG or JPEG, ...], "return_embeddings": false}``
Response: ``{"scores": [float | null, ...], "captions": [...]?, "embeddings": {modality: [[...]]}?,
"errors": [...]?}``. Every bad input raises ``RequestError`` with an HTTP status (4xx) and a message
naming what was wrong; nothing here unpickles or evaluates anything.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass

import numpy as np

_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}


class RequestError(ValueError):
    """A client error: ``status`` is the HTTP status code to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class HttpLimits:
    max_body_bytes: int = 16 * 2**20
    max_image_pixels: int = 2048 * 2048
    max_batch: int = 256


def _decode_image(index: int, text, limits: HttpLimits) -> np.ndarray:
    from PIL import Image

    if not isinstance(text, str):
        raise RequestError(400, f"images[{index}] must be a base64 string, got {type(text).__name__}")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"images[{index}] is not valid base64") from None
    kind = next((name for magic, name in _MAGIC.items() if data.startswith(magic)), None)
    if kind is None:
        raise RequestError(400, f"images[{index}] is not a PNG or JPEG image (first bytes {data[:8]!r}); "
                                "send base64 PNG or JPEG bytes")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size  # read from the header, before any pixel is decoded
            if width * height > limits.max_image_pixels:
                raise RequestError(413, f"images[{index}] is {width}x{height} = {width * height} pixels, above the "
                                        f"limit of {limits.max_image_pixels}")
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except RequestError:
        raise
    except Exception as err:  # noqa: BLE001 - any decoder failure is the client's bad image
        raise RequestError(400, f"images[{index}] could not be decoded as {kind}: {err}") from None


def parse_request(body: bytes, limits: HttpLimits) -> tuple[list[np.ndarray], list[str], bool]:
    """Body bytes -> (images uint8 [H, W, 3] each, prompts, return_embeddings)."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(413, f"request body is {len(body)} bytes, above the limit of {limits.max_body_bytes}")
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, f"request body is not valid JSON: {err}") from None
    if not isinstance(payload, dict):
        raise RequestError(400, f"request body must be a JSON object with 'prompts' and 'images', got {type(payload).__name__}")
    unknown = sorted(set(payload) - {"prompts", "images", "return_embeddings"})
    if unknown:
        raise RequestError(400, f"unknown field(s) {unknown}; expected 'prompts', 'images', 'return_embeddings'")
    prompts, images = payload.get("prompts"), payload.get("images")
    for field_name, value in (("prompts", prompts), ("images", images)):
        if not isinstance(value, list):
            raise RequestError(400, f"'{field_name}' must be a list, got {type(value).__name__}")
    if not images:
        raise RequestError(400, "empty batch: 'images' and 'prompts' must hold at least one item")
    if len(images) != len(prompts):
        raise RequestError(400, f"got {len(images)} images but {len(prompts)} prompts; they must match")
    if len(images) > limits.max_batch:
        raise RequestError(413, f"batch of {len(images)} images is above the limit of {limits.max_batch}")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise RequestError(400, f"prompts[{i}] must be a string, got {type(prompt).__name__}")
    return_embeddings = payload.get("return_embeddings", False)
    if not isinstance(return_embeddings, bool):
        raise RequestError(400, f"'return_embeddings' must be true or false, got {return_embeddings!r}")
    return [_decode_image(i, text, limits) for i, text in enumerate(images)], prompts, return_embeddings


def encode_response(output, *, return_embeddings: bool) -> dict:
    """RewardOutput -> JSON-safe dict (NaN scores become null, with the reason in 'errors')."""
    scores = [float(s) if math.isfinite(float(s)) else None for s in output.scores]
    response: dict = {"scores": scores}
    if output.captions is not None:
        response["captions"] = list(output.captions)
    if output.errors is not None and any(e is not None for e in output.errors):
        response["errors"] = list(output.errors)
    if return_embeddings and output.embeddings:
        response["embeddings"] = {k: np.asarray(v, dtype=np.float32).tolist() for k, v in output.embeddings.items()}
    return response


def encode_image(image: np.ndarray, *, format: str = "PNG") -> str:
    """uint8 [H, W, 3] -> base64 string (what HTTP clients send)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=format)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
