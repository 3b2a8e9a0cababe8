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
- ``occurred_at`` defaults to the response's creation time when it carries one, else now (UTC);
- the input may be the provider SDK's response object (any pydantic model: ``openai``,
  ``anthropic``, ``google-genai``, ``litellm`` types), a dict (snake_case or camelCase keys: a
  Gemini ``.model_dump()`` and its REST JSON read the same) or JSON text (``str``/``bytes``), see
  :func:`as_mapping`; anything else is ``InvalidEvent(reason_code="invalid_input")``;
- provider and model go through :func:`meterline.core.naming.normalize_model` (the same function the
  price lookup applies), so every adapter reports one canonical name per model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from meterline.core.errors import InvalidEvent
from meterline.core.naming import normalize_model, normalize_service_tier
from schemas.models import UsageEvent
from schemas.validation import invalid_event_from_pydantic

MISSING_USAGE = "missing_usage"
INVALID_USAGE = "invalid_usage"
INCONSISTENT_USAGE = "inconsistent_usage"
MISSING_EVENT_ID = "missing_event_id"
MISSING_FIELD = "missing_field"
INVALID_TIMESTAMP = "invalid_timestamp"
INVALID_INPUT = "invalid_input"
UNSUPPORTED_USAGE = "unsupported_usage"

#: Keyword context an adapter copies onto the event unchanged.
CONTEXT_FIELDS: frozenset[str] = frozenset(
    {
        "api_key_id",
        "project",
        "feature",
        "user_id",
        "session_id",
        "gateway",
        "labels",
        "requests",
        "request_id",
        "service_tier",
    }
)

_DATED_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")
_CAMEL_HUMP = re.compile(r"(?<=[a-z0-9])([A-Z])")


def snake_key(key: Any) -> Any:
    """``"promptTokenCount"`` → ``"prompt_token_count"``; snake_case and non-str keys unchanged."""
    if isinstance(key, str) and not key.islower() and any(c.isupper() for c in key):
        return _CAMEL_HUMP.sub(r"_\1", key).lower()
    return key


def _snake(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {snake_key(k): _snake(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_snake(v) for v in value]
    return value


def as_mapping(obj: Any, *, where: str) -> dict[str, Any]:
    """The response as a plain dict with snake_case keys, whatever form it came in.

    - a pydantic model (every provider SDK's response type) → ``model_dump(mode="json")``
      (datetimes and enums become their JSON strings, as in the REST body);
    - a ``Mapping`` → a copy with camelCase keys turned to snake_case, recursively;
    - ``str`` / ``bytes`` → parsed as JSON (it must be an object);
    - anything else, or JSON that is not an object → ``InvalidEvent(reason_code="invalid_input")``.
    """
    if isinstance(obj, Mapping):
        return _snake(obj)  # type: ignore[no-any-return]
    dump = getattr(obj, "model_dump", None)
    if callable(dump) and not isinstance(obj, type):
        try:
            data = dump(mode="json")
        except Exception as exc:  # a foreign model whose dump fails: say so, never crash the caller
            raise InvalidEvent(
                f"{where}: cannot read the {type(obj).__name__} object: {exc}", reason_code=INVALID_INPUT, field=None
            ) from exc
        if isinstance(data, Mapping):
            return _snake(data)  # type: ignore[no-any-return]
    elif isinstance(obj, (str, bytes, bytearray)):
        try:
            data = json.loads(obj)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidEvent(
                f"{where}: the response text is not JSON: {exc}", reason_code=INVALID_INPUT, field=None
            ) from exc
        if isinstance(data, Mapping):
            return _snake(data)  # type: ignore[no-any-return]
        raise InvalidEvent(
            f"{where}: the response JSON is a {type(data).__name__}, not an object",
            reason_code=INVALID_INPUT,
            field=None,
        )
    raise InvalidEvent(
        f"{where}: cannot read a {type(obj).__name__}; pass the SDK response object, a dict or JSON text",
        reason_code=INVALID_INPUT,
        field=None,
    )


def get_mapping(obj: Mapping[str, Any], key: str, *, where: str, required: bool = False) -> Mapping[str, Any] | None:
    """``obj[key]`` if it is a mapping; None when absent/null (or ``missing_usage`` if ``required``)."""
    value = obj.get(key)
    if value is None:
        if required:
            raise InvalidEvent(f"{where}: no {key!r} block in the response", reason_code=MISSING_USAGE, field=key)
        return None
    if not isinstance(value, Mapping):
        raise InvalidEvent(
            f"{where}: {key!r} must be an object, got {type(value).__name__}", reason_code=INVALID_USAGE, field=key
        )
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
        raise InvalidEvent(
            f"{where}: usage field {key!r} must be an integer, got {value!r}", reason_code=INVALID_USAGE, field=key
        )
    if isinstance(value, float):
        if not value.is_integer():
            raise InvalidEvent(
                f"{where}: usage field {key!r} must be an integer, got {value!r}", reason_code=INVALID_USAGE, field=key
            )
        value = int(value)
    if value < 0:
        raise InvalidEvent(f"{where}: usage field {key!r} is negative ({value})", reason_code=INVALID_USAGE, field=key)
    return int(value)


def subtract(total: int, part: int, *, total_name: str, part_name: str, where: str) -> int:
    """``total - part``, refusing a part larger than the total it is said to be included in."""
    if part > total:
        raise InvalidEvent(
            f"{where}: {part_name} ({part}) exceeds {total_name} ({total}) that should include it",
            reason_code=INCONSISTENT_USAGE,
            field=part_name,
        )
    return total - part


def check_total(total: int | None, parts: int, *, total_name: str, parts_name: str, where: str) -> None:
    """The provider's own total must equal the sum of the counts meterline bills (when it sent one)."""
    if total is not None and total != parts:
        raise InvalidEvent(
            f"{where}: {total_name} ({total}) != {parts_name} ({parts})",
            reason_code=INCONSISTENT_USAGE,
            field=total_name,
        )


def optional_count(block: Mapping[str, Any] | None, key: str, *, where: str) -> int | None:
    """Like :func:`count`, but None when the field is absent or null."""
    if block is None or block.get(key) is None:
        return None
    return count(block, key, where=where)


def dated_model_version(model: str) -> str | None:
    """The date suffix of a dated model name (``gpt-4o-2024-08-06`` → ``2024-08-06``,
    ``claude-3-5-sonnet-20241022`` → ``20241022``), else None. Never invents a version."""
    m = _DATED_SUFFIX.search(model)
    return m.group(1) if m else None


def epoch_seconds(value: Any, *, where: str, field: str) -> datetime | None:
    """A UTC datetime from epoch seconds (int or float); None when absent."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise InvalidEvent(
            f"{where}: {field!r} must be epoch seconds, got {value!r}", reason_code=INVALID_TIMESTAMP, field=field
        )
    try:
        return datetime.fromtimestamp(value, tz=UTC)
    except (OverflowError, OSError, ValueError) as exc:  # beyond year 9999 / the platform's time_t
        raise InvalidEvent(
            f"{where}: {field!r} {value!r} is not a representable time", reason_code=INVALID_TIMESTAMP, field=field
        ) from exc


def rfc3339(value: Any, *, where: str, field: str) -> datetime | None:
    """A UTC datetime from an RFC 3339 string (``2025-01-01T00:00:00.123456Z``); None when absent."""
    if value is None:
        return None
    if isinstance(value, datetime):  # a google-genai object's create_time
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)
    if not isinstance(value, str):
        raise InvalidEvent(f"{where}: {field!r} must be an RFC 3339 string", reason_code=INVALID_TIMESTAMP, field=field)
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    # Python 3.11 parses at most 6 fractional digits; Google timestamps may carry 9.
    text = re.sub(r"(\.\d{6})\d+", r"\1", text)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidEvent(
            f"{where}: {field!r} is not RFC 3339: {value!r}", reason_code=INVALID_TIMESTAMP, field=field
        ) from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


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
    input_tokens: int = 0,
    output_tokens: int = 0,
    cached_input_tokens: int = 0,
    cache_write_tokens: int = 0,
    reasoning_tokens: int = 0,
    cache_write_long_tokens: int = 0,
    input_audio_tokens: int = 0,
    output_audio_tokens: int = 0,
    input_image_tokens: int = 0,
    output_image_tokens: int = 0,
    web_search_requests: int = 0,
    service_tier: str | None = None,
    counts: Mapping[str, int] | None = None,
    context: Mapping[str, Any],
) -> UsageEvent:
    """Assemble and validate the event; every failure surfaces as :class:`InvalidEvent`.

    ``context`` keys must be in :data:`CONTEXT_FIELDS` (an unknown key is a programming error:
    ``TypeError``). ``request_id`` defaults to the provider's response id. Provider, model and
    version are normalised with :func:`meterline.core.naming.normalize_model`, the tier with
    :func:`meterline.core.naming.normalize_service_tier`.
    """
    unknown = set(context) - CONTEXT_FIELDS
    if unknown:
        raise TypeError(f"unexpected context keyword(s): {', '.join(sorted(unknown))}")
    where = source
    if event_id is None:
        if not response_id:
            raise InvalidEvent(
                f"{where}: the response has no id; pass event_id= so retries of this report dedupe",
                reason_code=MISSING_EVENT_ID,
                field="event_id",
            )
        event_id = f"{source}:{response_id}"
    when = occurred_at or created or datetime.now(UTC)
    if not provider or not model:
        raise InvalidEvent(f"{where}: no provider/model", reason_code=MISSING_FIELD, field="model")
    provider, model, model_version = normalize_model(provider, model, model_version)
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
        "cache_write_long_tokens": cache_write_long_tokens,
        "input_audio_tokens": input_audio_tokens,
        "output_audio_tokens": output_audio_tokens,
        "input_image_tokens": input_image_tokens,
        "output_image_tokens": output_image_tokens,
        "web_search_requests": web_search_requests,
        "service_tier": normalize_service_tier(context.get("service_tier") or service_tier),
    }
    if counts:  # an adapter's disjoint counts (``*_counts()``), overriding the keyword defaults
        fields.update(counts)
    fields.update({k: v for k, v in context.items() if v is not None and k != "service_tier"})
    try:
        return UsageEvent(**fields)
    except ValidationError as exc:
        err = invalid_event_from_pydantic(exc)
        raise InvalidEvent(f"{where}: {err.message}", reason_code=err.reason_code, field=err.field) from exc
