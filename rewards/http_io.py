"""The HTTP side of a reward replica: reading a bounded body and writing JSON answers (Starlette).

Answers are encoded as ASCII JSON: a client's text echoed in an error (a field name with a lone
surrogate, say) cannot make the encoding fail and turn a 4xx into a 500.
"""

from __future__ import annotations

import json

from rewards.http_codec import RequestError, over_limit


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes (a declared
    Content-Length, or the bytes received so far when the body is chunked)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise over_limit(413, "the request body (bytes)", int(declared), "max_body_bytes", limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise over_limit(413, "the request body (bytes, at least)", size, "max_body_bytes", limit)
        chunks.append(chunk)
    return b"".join(chunks)


def json_response(payload: dict, status: int = 200, headers: dict | None = None):
    from starlette.responses import Response

    return Response(json.dumps(payload, ensure_ascii=True, allow_nan=False), status_code=status,
                    headers=headers, media_type="application/json")


def error_response(err: RequestError, *, reward: str):
    """``{"error": message, "reward": name, "limit"?: name, "value"?: n, "maximum"?: n}``; a 429 also
    carries a Retry-After header."""
    details = dict(err.details)
    retry_after = details.pop("retry_after_s", None)
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return json_response({"error": str(err), "reward": reward, **details}, err.status, headers)
