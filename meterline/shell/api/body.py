"""Reading request bodies: one size limit, one JSON parser, one error shape for every route."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from meterline.shell.api.auth import ApiError

__all__ = ["json_object", "parse_json", "read_body"]


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it (or its declared Content-Length) exceeds ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, "invalid_request", "Content-Length is not an integer") from None
        if size > limit:
            raise ApiError(413, "body_too_large", f"request body is {size} bytes, at most {limit}")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, "body_too_large", f"request body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}") from None


async def json_object(request: Request, limit: int, shape: str = "a JSON object") -> dict[str, Any]:
    """A body that must be one JSON object; ``shape`` names it in the 400 (e.g. ``{"argv": [...]}``)."""
    doc = parse_json(await read_body(request, limit))
    if not isinstance(doc, dict):
        raise ApiError(400, "invalid_body", f"request body must be {shape}")
    return doc
