"""meterline's HTTP API: event ingest, read-only SQL, API keys (see docs/api.md).

Names are imported lazily so ``meterline keys ...`` does not pay for starlette/uvicorn.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MAX_BODY_BYTES": "meterline.api.app",
    "MAX_EVENTS": "meterline.api.app",
    "create_api": "meterline.api.app",
    "ApiError": "meterline.api.auth",
    "require_admin": "meterline.api.auth",
    "require_customer": "meterline.api.auth",
    "require_key": "meterline.api.auth",
    "ApiClient": "meterline.api.client",
    "KeyRecord": "meterline.api.keys",
    "KeyStore": "meterline.api.keys",
    "ApiServer": "meterline.api.server",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'meterline.api' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
