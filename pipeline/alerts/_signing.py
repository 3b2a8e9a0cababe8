"""Webhook signatures: ``Meterline-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, f"{t}.{body}")>``.

The signed string is the decimal timestamp, a ``.``, then the raw request body bytes exactly as
sent. Receivers must verify over the raw bytes (not re-serialised JSON), compare in constant
time, and refuse timestamps outside a tolerance (replay protection). A header may carry several
``v1=`` values (secret rotation); any match is accepted.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from pydantic import SecretStr

SIGNATURE_HEADER = "Meterline-Signature"
ALERT_ID_HEADER = "Meterline-Alert-Id"


def _secret_bytes(secret: str | bytes | SecretStr) -> bytes:
    if isinstance(secret, SecretStr):
        secret = secret.get_secret_value()
    return secret if isinstance(secret, bytes) else secret.encode("utf-8")


def _digest(secret: bytes, t: int, body: bytes) -> str:
    return hmac.new(secret, str(t).encode("ascii") + b"." + body, hashlib.sha256).hexdigest()


def sign(secret: str | bytes | SecretStr, body: bytes, t: int | None = None) -> str:
    """The ``Meterline-Signature`` header value for ``body`` at unix time ``t`` (default: now)."""
    ts = int(time.time()) if t is None else t
    return f"t={ts},v1={_digest(_secret_bytes(secret), ts, body)}"


def verify_signature(
    secret: str | bytes | SecretStr,
    header: str | None,
    body: bytes | str,
    tolerance_s: int = 300,
    *,
    now: int | None = None,
) -> bool:
    """True when ``header`` is a valid signature of ``body`` made with ``secret`` within
    ``tolerance_s`` seconds of ``now`` (default: the current time). Never raises on bad input."""
    if not header or not isinstance(header, str):
        return False
    raw = body.encode("utf-8") if isinstance(body, str) else body
    t: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        k, sep, v = part.strip().partition("=")
        if not sep:
            return False
        if k == "t":
            if not v.isdigit() or t is not None:
                return False
            t = int(v)
        elif k == "v1":
            candidates.append(v)
    if t is None or not candidates:
        return False
    current = int(time.time()) if now is None else now
    if abs(current - t) > tolerance_s:
        return False
    expected = _digest(_secret_bytes(secret), t, raw).encode("ascii")
    ok = False
    for c in candidates:  # no early exit
        ok |= hmac.compare_digest(expected, c.encode("utf-8", "replace"))
    return ok
