"""meterline's HTTP API: event ingest, read-only SQL, API keys (see docs/api.md).

Names are imported lazily so ``meterline keys ...`` does not pay for starlette/uvicorn.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MAX_BODY_BYTES": "meterline.shell.api.app",
    "MAX_EVENTS": "meterline.shell.api.app",
    "create_api": "meterline.shell.api.app",
    "ApiError": "meterline.shell.api.auth",
    "require_admin": "meterline.shell.api.auth",
    "require_customer": "meterline.shell.api.auth",
    "require_key": "meterline.shell.api.auth",
    "ApiClient": "meterline.shell.api.client",
    "KeyRecord": "meterline.shell.api.keys",
    "KeyStore": "meterline.shell.api.keys",
    "ApiServer": "meterline.shell.api.server",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'meterline.shell.api' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
