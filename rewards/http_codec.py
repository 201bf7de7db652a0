"""Validation and decoding of the reward HTTP API's JSON requests (no Ray, no Serve: pure functions).

Request:  ``{"prompts": [str, ...], "images": [base64 PNG or JPEG, ...], "return_embeddings": false}``
Response: ``{"scores": [float | null, ...], "captions": [...]?, "embeddings": {modality: [[...]]}?,
"errors": [...]?}``. Every bad input raises ``RequestError`` with an HTTP status (4xx) and a message
naming what was wrong; nothing here unpickles or evaluates anything.

Two phases, so that a request beyond a bound costs no more than reading it: ``parse_request`` checks
the JSON and reads every image's header (format and size, which PIL reads without decoding a pixel),
then the request's total pixels; only an accepted request is decoded by ``decode_images``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass, fields

import numpy as np

_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}
_FIELDS = ("prompts", "images", "return_embeddings")


class RequestError(ValueError):
    """A client error: ``status`` is the HTTP status code to answer with; ``details`` (the limit's name,
    the request's value and the maximum, for 413 and 429) go into the JSON error body."""

    def __init__(self, status: int, message: str, **details):
        super().__init__(message)
        self.status = status
        self.details = details


@dataclass(frozen=True)
class HttpLimits:
    """Bounds of the HTTP API (config: ``reward_service``). Bytes, images and pixels bound the memory a
    request can claim once decoded (3 bytes per pixel); images in flight bound a replica's backlog."""

    max_body_bytes: int = 16 * 2**20
    max_image_pixels: int = 2048 * 2048
    max_request_pixels: int = 64 * 2**20  # decoded pixels summed over a request's images
    # Rewards resize the shorter side to the model's input (CLIP: 224), so a 1 x 4,000,000 image would
    # become 224 x 896,000,000: the ratio of the sides, not the pixel count, bounds that tensor.
    max_aspect_ratio: float = 16.0
    max_batch: int = 256
    max_inflight_images: int = 1024  # per replica, over its concurrent requests (HTTP and handle)

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
                raise ValueError(f"{f.name} = {value!r} must be a number > 0")
        if self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio = {self.max_aspect_ratio} must be >= 1 (the longer side over the "
                             f"shorter); 1 accepts only square images")
        if self.max_request_pixels < self.max_image_pixels:
            raise ValueError(f"max_request_pixels = {self.max_request_pixels} is below max_image_pixels = "
                             f"{self.max_image_pixels}: a request of one image at the per-image limit would be "
                             f"refused; raise max_request_pixels or lower max_image_pixels")
        if self.max_inflight_images < self.max_batch:
            raise ValueError(f"max_inflight_images = {self.max_inflight_images} is below max_batch = "
                             f"{self.max_batch}: a request of max_batch images could never be admitted; raise "
                             f"max_inflight_images or lower max_batch")


@dataclass(frozen=True)
class EncodedImage:
    """One request image, checked but not decoded: ``data`` holds the PNG or JPEG bytes."""

    index: int
    kind: str
    width: int
    height: int
    data: bytes


@dataclass(frozen=True)
class ParsedRequest:
    images: list[EncodedImage]
    prompts: list[str]
    return_embeddings: bool

    @property
    def pixels(self) -> int:
        return sum(image.width * image.height for image in self.images)


def _show(value, limit: int = 60) -> str:
    """A client's value in a message, cut short: error bodies must stay small whatever was sent."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def over_limit(status: int, what: str, value: int, name: str, maximum) -> RequestError:
    return RequestError(status, f"{what} is {value}, above the limit of {maximum} ({name})", limit=name, value=value,
                        maximum=maximum)


def _read_header(index: int, text, limits: HttpLimits) -> EncodedImage:
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
        with Image.open(io.BytesIO(data), formats=[kind]) as image:
            width, height = image.size  # from the header: no pixel is decoded here
    except Image.DecompressionBombError as err:  # PIL's own ceiling, far above ours: still a size refusal
        raise RequestError(413, f"images[{index}] is too large: {err}", limit="max_image_pixels",
                           maximum=limits.max_image_pixels) from None
    except Exception as err:  # noqa: BLE001 - any header failure is the client's bad image
        raise RequestError(400, f"images[{index}] could not be decoded as {kind}: {err}") from None
    if width * height > limits.max_image_pixels:
        raise RequestError(413, f"images[{index}] is {width}x{height} = {width * height} pixels, above the limit of "
                                f"{limits.max_image_pixels} (max_image_pixels)", limit="max_image_pixels",
                           value=width * height, maximum=limits.max_image_pixels)
    if width < 1 or height < 1 or max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise RequestError(422, f"images[{index}] is {width}x{height}, an aspect ratio of "
                                f"{max(width, height) / max(min(width, height), 1):.0f}:1, above the limit of "
                                f"{limits.max_aspect_ratio:g}:1 (max_aspect_ratio); rewards resize the shorter side "
                                "to the model's input, so send images closer to square", limit="max_aspect_ratio",
                           maximum=limits.max_aspect_ratio)
    return EncodedImage(index=index, kind=kind, width=width, height=height, data=data)


def parse_request(body: bytes, limits: HttpLimits) -> ParsedRequest:
    """Body bytes -> the checked request, images read up to their headers (nothing decoded yet)."""
    if len(body) > limits.max_body_bytes:
        raise over_limit(413, "the request body (bytes)", len(body), "max_body_bytes", limits.max_body_bytes)
    try:
        payload = json.loads(body)
    except RecursionError:
        raise RequestError(400, "request body is not valid JSON: nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        raise RequestError(400, f"request body is not valid JSON: {_show(str(err), 200)}") from None
    if not isinstance(payload, dict):
        raise RequestError(400, f"request body must be a JSON object with 'prompts' and 'images', got "
                                f"{type(payload).__name__}")
    unknown = sorted(set(payload) - set(_FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field(s) {_show(unknown)}; expected {list(_FIELDS)}")
    prompts, images = payload.get("prompts"), payload.get("images")
    for field_name, value in (("prompts", prompts), ("images", images)):
        if not isinstance(value, list):
            raise RequestError(400, f"'{field_name}' must be a list, got {type(value).__name__}")
    if not images:
        raise RequestError(400, "empty batch: 'images' and 'prompts' must hold at least one item")
    if len(images) != len(prompts):
        raise RequestError(400, f"got {len(images)} images but {len(prompts)} prompts; they must match")
    if len(images) > limits.max_batch:
        raise over_limit(413, "the number of images", len(images), "max_batch", limits.max_batch)
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise RequestError(400, f"prompts[{i}] must be a string, got {type(prompt).__name__}")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\ud800") decodes from JSON but encodes nowhere
            raise RequestError(400, f"prompts[{i}] is not valid Unicode text: {_show(prompt)}") from None
    return_embeddings = payload.get("return_embeddings", False)
    if not isinstance(return_embeddings, bool):
        raise RequestError(400, f"'return_embeddings' must be true or false, got {_show(return_embeddings)}")
    parsed = ParsedRequest([_read_header(i, text, limits) for i, text in enumerate(images)], prompts,
                           return_embeddings)
    if parsed.pixels > limits.max_request_pixels:
        raise over_limit(413, f"the decoded size of the request's {len(images)} images (pixels)", parsed.pixels,
                         "max_request_pixels", limits.max_request_pixels)
    return parsed


def decode_images(request: ParsedRequest) -> list[np.ndarray]:
    """The accepted request's images as uint8 [H, W, 3] each (a 400 names the first that fails)."""
    from PIL import Image

    decoded = []
    for image in request.images:
        try:
            with Image.open(io.BytesIO(image.data), formats=[image.kind]) as pil:
                decoded.append(np.asarray(pil.convert("RGB"), dtype=np.uint8))
        except Exception as err:  # noqa: BLE001 - truncated or corrupt data shows only when decoding
            raise RequestError(400, f"images[{image.index}] could not be decoded as {image.kind}: {err}") from None
    return decoded


def _json_safe(array) -> list:
    """float array -> nested lists with null for NaN/inf (strict JSON has no NaN)."""
    values = np.asarray(array, dtype=np.float32)
    return np.where(np.isfinite(values), values, None).tolist()


def encode_response(output, *, return_embeddings: bool) -> dict:
    """RewardOutput -> JSON-safe dict (NaN scores become null, with the reason in 'errors')."""
    scores = [float(s) if math.isfinite(float(s)) else None for s in output.scores]
    response: dict = {"scores": scores}
    if output.captions is not None:
        response["captions"] = list(output.captions)
    if output.errors is not None and any(e is not None for e in output.errors):
        response["errors"] = list(output.errors)
    if return_embeddings and output.embeddings:
        response["embeddings"] = {k: _json_safe(v) for k, v in output.embeddings.items()}
    return response


def encode_image(image: np.ndarray, *, format: str = "PNG") -> str:
    """uint8 [H, W, 3] -> base64 string (what HTTP clients send)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=format)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
