"""Request parsing for the local Stripe server: bracket-notation forms, JSON, and typed accessors.

Contract:
- ``parse_form`` turns ``a[b][0][c]=1&expand[]=x`` into ``{"a": {"b": [{"c": "1"}]}, "expand": ["x"]}``;
  every leaf stays a string, exactly as Stripe receives it.
- ``ApiError`` is the one exception handlers raise; the server turns it into Stripe's error JSON
  ``{"error": {"type", "code", "param", "message"}}`` with ``status``.
- The ``p_*`` helpers read one parameter, coerce it, and raise ``ApiError(400, param=...)`` when it is
  missing or malformed, so handlers stay declarative.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl

_TOKEN = re.compile(r"\[([^\]]*)\]")


class ApiError(Exception):
    """An HTTP error in Stripe's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.code is not None:
            err["code"] = self.code
        if self.param is not None:
            err["param"] = self.param
        return {"error": err}


def missing(name: str) -> ApiError:
    return ApiError(400, f"Missing required param: {name}.", code="parameter_missing", param=name)


def invalid(name: str, message: str, code: str = "parameter_invalid") -> ApiError:
    return ApiError(400, message, code=code, param=name)


def not_found(kind: str, ident: str, param: str = "id") -> ApiError:
    return ApiError(404, f"No such {kind}: '{ident}'", code="resource_missing", param=param)


def _split_key(key: str) -> list[str]:
    head, _, rest = key.partition("[")
    parts = [head]
    if rest:
        parts.extend(_TOKEN.findall("[" + rest))
    return parts


def _listify(node: Any) -> Any:
    if isinstance(node, dict):
        fixed = {k: _listify(v) for k, v in node.items()}
        if fixed and all(k.isdigit() for k in fixed):
            return [fixed[k] for k in sorted(fixed, key=int)]
        return fixed
    return node


def parse_form(query: str) -> dict[str, Any]:
    """Parse a form / query string with Stripe's bracket notation into nested dicts and lists."""
    root: dict[str, Any] = {}
    appends: dict[int, int] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        parts = _split_key(key)
        node: dict[str, Any] = root
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if part == "":  # ``expand[]=x``: append to the list being built
                idx = appends.get(id(node), 0)
                appends[id(node)] = idx + 1
                part = str(idx)
            if last:
                node[part] = value
            else:
                nxt = node.get(part)
                if not isinstance(nxt, dict):
                    nxt = {}
                    node[part] = nxt
                node = nxt
    return _listify(root)


def canonical(params: Any) -> Any:
    """A comparable form of parsed params (used for idempotency-key parameter checks)."""
    if isinstance(params, dict):
        return {k: canonical(v) for k, v in sorted(params.items())}
    if isinstance(params, list):
        return [canonical(v) for v in params]
    return params


# ----------------------------------------------------------------------------- typed accessors


def p_str(
    params: dict[str, Any],
    name: str,
    *,
    required: bool = False,
    default: str | None = None,
    choices: tuple[str, ...] | None = None,
    max_len: int = 5000,
) -> str | None:
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise missing(name)
        return default
    if not isinstance(value, str):
        raise invalid(name, f"Invalid {name}: must be a string.")
    if len(value) > max_len:
        raise invalid(name, f"Invalid {name}: must be at most {max_len} characters.")
    if choices is not None and value not in choices:
        raise invalid(name, f"Invalid {name}: must be one of {', '.join(choices)}.")
    return value


def p_int(
    params: dict[str, Any],
    name: str,
    *,
    required: bool = False,
    default: int | None = None,
    lo: int | None = None,
    hi: int | None = None,
) -> int | None:
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise missing(name)
        return default
    if isinstance(value, bool):
        raise invalid(name, f"Invalid integer: {value}")
    try:
        out = int(value) if isinstance(value, int) else int(str(value), 10)
    except ValueError:
        raise invalid(name, f"Invalid integer: {value}") from None
    if lo is not None and out < lo:
        raise invalid(name, f"Invalid {name}: must be at least {lo}.")
    if hi is not None and out > hi:
        raise invalid(name, f"Invalid {name}: must be at most {hi}.")
    return out


def p_bool(params: dict[str, Any], name: str, *, default: bool) -> bool:
    value = params.get(name)
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    if value in ("true", "false"):
        return value == "true"
    raise invalid(name, f"Invalid boolean: {value}")


def p_decimal(params: dict[str, Any], name: str, *, max_places: int = 12) -> Decimal | None:
    """A non-negative decimal with at most ``max_places`` fractional digits (``unit_amount_decimal``)."""
    value = params.get(name)
    if value is None or value == "":
        return None
    try:
        dec = Decimal(str(value))
    except InvalidOperation:
        raise invalid(name, f"Invalid decimal: {value}") from None
    if not dec.is_finite() or dec < 0:
        raise invalid(name, f"Invalid {name}: must be a non-negative number.")
    exp = dec.as_tuple().exponent
    if isinstance(exp, int) and exp < -max_places:
        raise invalid(name, f"Invalid {name}: at most {max_places} decimal places are allowed.")
    return dec


def p_dict(params: dict[str, Any], name: str, *, required: bool = False) -> dict[str, Any]:
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise missing(name)
        return {}
    if not isinstance(value, dict):
        raise invalid(name, f"Invalid {name}: must be an object.")
    return value


def p_list(params: dict[str, Any], name: str) -> list[Any]:
    value = params.get(name)
    if value is None or value == "":
        return []
    if isinstance(value, dict):  # a single non-indexed entry
        return [value]
    if not isinstance(value, list):
        raise invalid(name, f"Invalid {name}: must be an array.")
    return value


def p_metadata(params: dict[str, Any], current: dict[str, str] | None = None) -> dict[str, str]:
    """Merge ``metadata[k]=v`` into ``current``; an empty value unsets the key (Stripe semantics)."""
    out = dict(current or {})
    meta = params.get("metadata")
    if meta is None:
        return out
    if meta == "":
        return {}
    if not isinstance(meta, dict):
        raise invalid("metadata", "Invalid metadata: must be an object.")
    for k, v in meta.items():
        if v == "" or v is None:
            out.pop(k, None)
        else:
            out[str(k)] = str(v)
    return out


def fmt_decimal(dec: Decimal) -> str:
    """Fixed-point text without exponent or trailing zeros (``Decimal('1E-7')`` -> ``'0.0000001'``)."""
    text = format(dec, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"
