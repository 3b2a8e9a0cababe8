"""Canonical JSON form of a UsageEvent, for ``meterline produce FILE.jsonl`` and the HTTP ingest.

One JSON object per event, keyed by the Avro field names. ``occurred_at`` is either an ISO-8601
string WITH a zone (``"2025-01-31T12:00:00Z"``, ``"…+02:00"``) or an integer of UTC epoch
milliseconds. Types are strict: counts are JSON integers (not ``"12"``, not ``12.0``), ids are
strings, ``labels`` an object of strings. Unknown keys are ignored (forward compatibility).

Errors are :class:`meterline.core.errors.InvalidEvent` with ``field`` and a ``reason_code`` shared
with :mod:`schemas.validation` (``missing_customer_id``, ``id_too_long``, ``negative_count``,
``invalid_type`` ...) plus:

- ``invalid_json``: a JSONL line that is not JSON;
- ``invalid_json_type``: the JSON value is not an object;
- ``invalid_timestamp``: occurred_at is not an ISO-8601 string with a zone or an int of ms.

Parsing checks the model's rules only; the pipeline's time-dependent and policy checks
(``timestamp_in_future``, ``timestamp_too_old``, ``empty_usage``) are in
:func:`schemas.validation.validate_record` — an edge that wants to reject early calls it on
``event_to_record(ev)``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from meterline.core.errors import InvalidEvent
from schemas.codec import ms_to_datetime
from schemas.models import UsageEvent
from schemas.validation import invalid_event_from_pydantic

__all__ = ["event_to_json", "iter_jsonl", "parse_json_event", "parse_timestamp"]


def parse_timestamp(value: Any) -> datetime:
    """ISO-8601 string with a zone, or int epoch ms -> aware UTC datetime; else InvalidEvent."""
    if isinstance(value, bool):
        pass
    elif isinstance(value, int):
        return ms_to_datetime(value)
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidEvent(
                f"occurred_at {value[:64]!r} is not an ISO-8601 timestamp",
                reason_code="invalid_timestamp",
                field="occurred_at",
            ) from None
        if dt.tzinfo is None or dt.utcoffset() is None:
            raise InvalidEvent(
                f"occurred_at {value[:64]!r} has no timezone (add 'Z' for UTC)",
                reason_code="invalid_timestamp",
                field="occurred_at",
            )
        return dt
    if value is None:
        raise InvalidEvent("occurred_at is required", reason_code="missing_occurred_at", field="occurred_at")
    raise InvalidEvent(
        f"occurred_at must be an ISO-8601 string or int epoch milliseconds, got {type(value).__name__}",
        reason_code="invalid_timestamp",
        field="occurred_at",
    )


def parse_json_event(obj: Any) -> UsageEvent:
    """A decoded JSON value -> UsageEvent, or InvalidEvent(reason_code, field)."""
    if not isinstance(obj, dict):
        raise InvalidEvent(
            f"a usage event must be a JSON object, got {type(obj).__name__}", reason_code="invalid_json_type"
        )
    data = dict(obj)
    data["occurred_at"] = parse_timestamp(obj.get("occurred_at"))
    for key, value in obj.items():  # explicit null for a defaulted field means "absent"
        if value is None and key in UsageEvent.model_fields and key != "occurred_at":
            if not UsageEvent.model_fields[key].is_required():
                del data[key]
    try:
        return UsageEvent.model_validate(data, strict=True)
    except ValidationError as exc:
        raise invalid_event_from_pydantic(exc) from None


def event_to_json(ev: UsageEvent) -> dict[str, Any]:
    """UsageEvent -> canonical JSON dict (occurred_at as ISO-8601 UTC with 'Z'; ms, or µs if any)."""
    d = ev.model_dump()
    ts = ev.occurred_at
    spec = "milliseconds" if ts.microsecond % 1000 == 0 else "microseconds"
    d["occurred_at"] = ts.isoformat(timespec=spec).replace("+00:00", "Z")
    d["labels"] = dict(ev.labels)
    return d


def iter_jsonl(path_or_lines: str | Path | Iterable[str | bytes]) -> Iterator[tuple[int, UsageEvent | InvalidEvent]]:
    """Yield ``(line_number, UsageEvent or InvalidEvent)`` for each non-blank line (1-based).

    A bad line yields its InvalidEvent and the iteration goes on, so one bad line never hides
    the good ones. ``path_or_lines`` is a file path (UTF-8) or any iterable of lines (str or bytes).
    """
    if isinstance(path_or_lines, (str, Path)):
        with open(path_or_lines, "rb") as fh:
            yield from _iter_lines(fh)
    else:
        yield from _iter_lines(path_or_lines)


def _iter_lines(lines: Iterable[str | bytes]) -> Iterator[tuple[int, UsageEvent | InvalidEvent]]:
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)  # bytes are decoded as UTF-8 (with or without BOM)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, nesting bombs
            yield lineno, InvalidEvent(f"line {lineno}: not JSON: {exc}", reason_code="invalid_json")
            continue
        try:
            yield lineno, parse_json_event(obj)
        except InvalidEvent as exc:
            yield lineno, exc
