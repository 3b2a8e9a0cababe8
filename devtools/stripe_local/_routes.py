"""Route table and shared response helpers for the local Stripe handlers.

A handler is ``fn(ctx, params, **path_args) -> dict`` (HTTP 200) and raises ``ApiError`` for
anything else. ``route`` registers it; ``match`` finds it. Paths use ``{name}`` placeholders.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from devtools.stripe_local._params import ApiError, invalid, p_int, p_str
from devtools.stripe_local._store import Store


@dataclass
class Ctx:
    store: Store
    now: int
    path: str
    token: str = ""


Handler = Callable[..., dict[str, Any]]
_ROUTES: list[tuple[str, re.Pattern[str], Handler, str]] = []


def route(method: str, pattern: str) -> Callable[[Handler], Handler]:
    regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")
    key = f"{method} " + re.sub(r"\{\w+\}", "{}", pattern)

    def deco(fn: Handler) -> Handler:
        _ROUTES.append((method, regex, fn, key))
        return fn

    return deco


def route_keys() -> list[str]:
    """``"POST /v1/prices/{}"`` for every registered route (the keys of stripe_params.json)."""
    return [r[3] for r in _ROUTES]


def match(method: str, path: str) -> tuple[Handler, dict[str, str], str]:
    """The handler for ``method path``, its path arguments and its route key."""
    path_known = False
    for m, regex, fn, key in _ROUTES:
        found = regex.match(path)
        if found:
            path_known = True
            if m == method:
                return fn, found.groupdict(), key
    if path_known:
        raise ApiError(405, f"Unrecognized request method {method} for {path}", code="method_not_allowed")
    raise ApiError(404, f"Unrecognized request URL ({method}: {path}).", code="resource_missing")


def list_response(ctx: Ctx, items: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
    """Stripe list envelope with ``limit`` (default 10, max 100), ``starting_after`` / ``ending_before``."""
    limit = p_int(params, "limit", default=10, lo=1, hi=100) or 10
    after = p_str(params, "starting_after")
    before = p_str(params, "ending_before")
    ids = [o.get("id") for o in items]
    if after is not None:
        if after not in ids:
            raise invalid("starting_after", f"No such object: '{after}'", code="resource_missing")
        items = items[ids.index(after) + 1 :]
        page, more = items[:limit], len(items) > limit
    elif before is not None:
        if before not in ids:
            raise invalid("ending_before", f"No such object: '{before}'", code="resource_missing")
        items = items[: ids.index(before)]
        page, more = items[-limit:], len(items) > limit
    else:
        page, more = items[:limit], len(items) > limit
    return {"object": "list", "data": page, "has_more": more, "url": ctx.path}


def base(obj_type: str, ident: str, ctx: Ctx) -> dict[str, Any]:
    return {"id": ident, "object": obj_type, "created": ctx.now, "livemode": False}
