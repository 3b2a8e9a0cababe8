"""Shared helpers for the provider usage adapters.

Every adapter reads a provider's usage block, normalises it to meterline's DISJOINT token classes
(see :mod:`schemas.models`) and builds a :class:`~schemas.models.UsageEvent` through
:func:`build_event`. The rules applied everywhere:

- a missing usage block raises ``InvalidEvent(reason_code="missing_usage")`` — a request whose
  usage is unknown is never turned into a zero-cost event;
- a count that is not a non-negative integer raises ``reason_code="invalid_usage"``;
- an unreadable creation time (``created``, ``createTime``, ...) raises ``invalid_timestamp``;
- a count that contradicts another (cached > prompt, reasoning > completion) raises
  ``reason_code="inconsistent_usage"``;
- the default ``event_id`` is ``f"{source}:{response_id}"`` so a retried report of the same
  provider response dedupes downstream; with no response id the caller must pass ``event_id``
  (else ``reason_code="missing_event_id"``);
- ``occurred_at`` defaults to the response's creation time when it carries one, else now (UTC).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError

from meterline.errors import InvalidEvent
from schemas.models import UsageEvent
from schemas.validation import invalid_event_from_pydantic

MISSING_USAGE = "missing_usage"
INVALID_USAGE = "invalid_usage"
INCONSISTENT_USAGE = "inconsistent_usage"
MISSING_EVENT_ID = "missing_event_id"
MISSING_FIELD = "missing_field"
INVALID_TIMESTAMP = "invalid_timestamp"

#: Keyword context an adapter copies onto the event unchanged.
CONTEXT_FIELDS: frozenset[str] = frozenset(
    {"api_key_id", "project", "feature", "user_id", "session_id", "gateway", "labels", "requests", "request_id"}
)

_DATED_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")


def get_mapping(obj: Mapping[str, Any], key: str, *, where: str, required: bool = False) -> Mapping[str, Any] | None:
    """``obj[key]`` if it is a mapping; None when absent/null (or ``missing_usage`` if ``required``)."""
    value = obj.get(key)
    if value is None:
        if required:
            raise InvalidEvent(f"{where}: no {key!r} block in the response", reason_code=MISSING_USAGE, field=key)
        return None
    if not isinstance(value, Mapping):
        raise InvalidEvent(f"{where}: {key!r} must be an object, got {type(value).__name__}",
                           reason_code=INVALID_USAGE, field=key)
    return value


def count(block: Mapping[str, Any] | None, key: str, *, where: str, required: bool = False) -> int:
    """A token count from ``block``: absent/null is 0 (or ``missing_usage`` if ``required``).

    Rejects booleans, floats with a fraction, strings and negative numbers (``invalid_usage``).
    """
    value = None if block is None else block.get(key)
    if value is None:
        if required:
            raise InvalidEvent(f"{where}: usage field {key!r} is missing", reason_code=MISSING_USAGE, field=key)
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidEvent(f"{where}: usage field {key!r} must be an integer, got {value!r}",
                           reason_code=INVALID_USAGE, field=key)
    if isinstance(value, float):
        if not value.is_integer():
            raise InvalidEvent(f"{where}: usage field {key!r} must be an integer, got {value!r}",
                               reason_code=INVALID_USAGE, field=key)
        value = int(value)
    if value < 0:
        raise InvalidEvent(f"{where}: usage field {key!r} is negative ({value})", reason_code=INVALID_USAGE, field=key)
    return int(value)


def subtract(total: int, part: int, *, total_name: str, part_name: str, where: str) -> int:
    """``total - part``, refusing a part larger than the total it is said to be included in."""
    if part > total:
        raise InvalidEvent(
            f"{where}: {part_name} ({part}) exceeds {total_name} ({total}) that should include it",
            reason_code=INCONSISTENT_USAGE, field=part_name,
        )
    return total - part


def dated_model_version(model: str) -> str | None:
    """The date suffix of a dated model name (``gpt-4o-2024-08-06`` → ``2024-08-06``,
    ``claude-3-5-sonnet-20241022`` → ``20241022``), else None. Never invents a version."""
    m = _DATED_SUFFIX.search(model)
    return m.group(1) if m else None


def epoch_seconds(value: Any, *, where: str, field: str) -> datetime | None:
    """A UTC datetime from epoch seconds (int or float); None when absent."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise InvalidEvent(f"{where}: {field!r} must be epoch seconds, got {value!r}",
                           reason_code=INVALID_TIMESTAMP, field=field)
    return datetime.fromtimestamp(value, tz=timezone.utc)


def rfc3339(value: Any, *, where: str, field: str) -> datetime | None:
    """A UTC datetime from an RFC 3339 string (``2025-01-01T00:00:00.123456Z``); None when absent."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidEvent(f"{where}: {field!r} must be an RFC 3339 string", reason_code=INVALID_TIMESTAMP,
                           field=field)
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    # Python 3.11 parses at most 6 fractional digits; Google timestamps may carry 9.
    text = re.sub(r"(\.\d{6})\d+", r"\1", text)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidEvent(f"{where}: {field!r} is not RFC 3339: {value!r}",
                           reason_code=INVALID_TIMESTAMP, field=field) from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


def require_str(obj: Mapping[str, Any], key: str, *, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidEvent(f"{where}: response has no {key!r}", reason_code=MISSING_FIELD, field=key)
    return value


def optional_str(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) and value else None


def build_event(
    *,
    source: str,
    provider: str,
    model: str,
    response_id: str | None,
    customer_id: str,
    event_id: str | None,
    occurred_at: datetime | None,
    created: datetime | None,
    model_version: str | None,
    input_tokens: int,
    output_tokens: int,
    cached_input_tokens: int = 0,
    cache_write_tokens: int = 0,
    reasoning_tokens: int = 0,
    context: Mapping[str, Any],
) -> UsageEvent:
    """Assemble and validate the event; every failure surfaces as :class:`InvalidEvent`.

    ``context`` keys must be in :data:`CONTEXT_FIELDS` (an unknown key is a programming error:
    ``TypeError``). ``request_id`` defaults to the provider's response id.
    """
    unknown = set(context) - CONTEXT_FIELDS
    if unknown:
        raise TypeError(f"unexpected context keyword(s): {', '.join(sorted(unknown))}")
    where = source
    if event_id is None:
        if not response_id:
            raise InvalidEvent(
                f"{where}: the response has no id; pass event_id= so retries of this report dedupe",
                reason_code=MISSING_EVENT_ID, field="event_id",
            )
        event_id = f"{source}:{response_id}"
    when = occurred_at or created or datetime.now(timezone.utc)
    fields: dict[str, Any] = {
        "event_id": event_id,
        "occurred_at": when,
        "customer_id": customer_id,
        "provider": provider,
        "model": model,
        "model_version": model_version,
        "request_id": response_id,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cached_input_tokens": cached_input_tokens,
        "cache_write_tokens": cache_write_tokens,
        "reasoning_tokens": reasoning_tokens,
    }
    fields.update({k: v for k, v in context.items() if v is not None})
    try:
        return UsageEvent(**fields)
    except ValidationError as exc:
        err = invalid_event_from_pydantic(exc)
        raise InvalidEvent(f"{where}: {err.message}", reason_code=err.reason_code, field=err.field) from exc
