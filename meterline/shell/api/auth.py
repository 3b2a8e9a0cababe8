"""Bearer-key authentication and the JSON error shape shared by every route.

Every error response is ``{"error": {"code": str, "message": str, "field"?: str}}``.
Route handlers raise :class:`ApiError`; the app's exception handler renders it.

Routes (including ``extra_routes`` added by other packages) authenticate with::

    record = require_key(request)               # 401 unless a live key is presented
    require_admin(record)                       # 403 unless it is an admin key
    require_customer(record, customer_id)       # 403 unless admin or that customer's key

The key store is found at ``request.app.state.key_store`` (set by :func:`create_api`).
The presented secret is never logged nor echoed back.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from meterline.shell.api.keys import KeyRecord, KeyStore

__all__ = ["ApiError", "error_response", "require_admin", "require_customer", "require_key"]


class ApiError(Exception):
    """An HTTP error with a stable machine-readable ``code``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers

    def to_dict(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            err["field"] = self.field
        return {"error": err}


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.to_dict(), status_code=exc.status, headers=exc.headers)


_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="meterline"'}


def _bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


def require_key(request: Request) -> KeyRecord:
    """The live key record of this request; ApiError 401 when missing, unknown or revoked."""
    token = _bearer_token(request)
    if token is None:
        raise ApiError(401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>'", headers=_CHALLENGE)
    store: KeyStore = request.app.state.key_store
    record = store.verify(token)
    if record is None:
        raise ApiError(401, "unauthorized", "invalid or revoked API key", headers=_CHALLENGE)
    request.state.api_key = record
    return record


def require_admin(record: KeyRecord) -> None:
    if not record.is_admin:
        raise ApiError(403, "forbidden", "this endpoint needs an admin key")


def require_customer(record: KeyRecord, customer_id: str) -> None:
    if not record.can_act_for(customer_id):
        raise ApiError(403, "forbidden", "this key may not act on that customer", field="customer_id")
