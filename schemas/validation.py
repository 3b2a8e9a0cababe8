"""Fast contract checks on decoded ``UsageEvent`` dicts, with stable reason codes.

:func:`validate_record` is the pipeline's per-event gate (pure Python, no pydantic, a few µs per
event). It raises :class:`meterline.core.errors.InvalidEvent` with one of these ``reason_code`` values
(snake_case, stable: they land in the dead-letter topic and ``usage_rejected.reason_code``), and
``field`` naming the offending field:

=========================  ==============================================================
missing_event_id           event_id empty or absent (likewise missing_customer_id,
                           missing_provider, missing_model, missing_occurred_at)
id_too_long                a string id longer than MAX_ID_LEN (128) characters
invalid_encoding           a string that is not valid Unicode (a lone surrogate from JSON ``\\ud800``);
                           reported by the model (JSON and SDK paths), Avro cannot carry one
invalid_customer_id        customer_id not of the allowed form (:data:`schemas.models.CUSTOMER_ID_PATTERN`:
                           ASCII letters, digits, ``. _ : @ + = -``; no spaces, controls, ``/``)
invalid_type               a field holds a value of the wrong type (only for dicts that did not
                           come from the Avro decoder, which guarantees types)
negative_count             a token count or ``requests`` below zero
absurd_count               a token count > MAX_TOKENS_PER_EVENT, or requests > MAX_REQUESTS_PER_EVENT
timestamp_in_future        occurred_at later than now + max_future_ms
timestamp_too_old          occurred_at before 2000-01-01T00:00:00Z
too_many_labels            more than MAX_LABELS labels
label_too_long             a label key or value longer than MAX_LABEL_LEN characters
empty_usage                all token counts and requests are zero: an event that bills nothing is a
                           producer bug, never a silent $0
=========================  ==============================================================

Agreement with the pydantic :class:`~schemas.models.UsageEvent` (checked by a hypothesis property
test): for a well-typed record, ``validate_record`` accepts iff ``record_to_event`` accepts, except
for the checks only ``validate_record`` makes — ``timestamp_in_future`` (needs "now", which a
model must not read), ``timestamp_too_old`` and ``empty_usage`` (pipeline policy, kept out of the
model so adapters/tests can still build such objects and have them rejected with a reason). The
model alone checks types (the Avro decoder already guarantees them) and timezone-awareness (an
epoch-ms int has no zone).

:func:`validate_records` is the batch form (same verdicts, codes, fields and messages, per event):
it proves a whole batch clean with a few C-level passes per field (``map``/``set``/``min``/``max``)
and runs :func:`validate_record` event by event only when a batch is not provably clean.

:func:`invalid_event_from_pydantic` maps a pydantic ``ValidationError`` of ``UsageEvent`` to the
same codes, so the JSON and Avro paths report the same reason for the same fault.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import chain
from operator import itemgetter
from typing import Any

from pydantic import ValidationError

from meterline.core.errors import InvalidEvent
from meterline.core.ids import CUSTOMER_ID_RULE, is_customer_id
from schemas.models import (
    MAX_ID_LEN,
    MAX_LABEL_LEN,
    MAX_LABELS,
    MAX_REQUESTS_PER_EVENT,
    MAX_TOKENS_PER_EVENT,
    TOKEN_FIELDS,
    TOOL_FIELDS,
)

MIN_OCCURRED_AT_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
DEFAULT_MAX_FUTURE_MS = 300_000

REQUIRED_ID_FIELDS: tuple[str, ...] = ("event_id", "customer_id", "provider", "model")
OPTIONAL_ID_FIELDS: tuple[str, ...] = (
    "api_key_id",
    "project",
    "feature",
    "user_id",
    "session_id",
    "gateway",
    "model_version",
    "request_id",
    "service_tier",
)
COUNT_FIELDS: tuple[str, ...] = (*TOKEN_FIELDS, *TOOL_FIELDS, "requests")

REASON_CODES: frozenset[str] = frozenset(
    {
        *(f"missing_{f}" for f in (*REQUIRED_ID_FIELDS, "occurred_at")),
        "id_too_long",
        "invalid_customer_id",
        "invalid_encoding",
        "invalid_type",
        "invalid_timestamp",
        "negative_count",
        "absurd_count",
        "timestamp_in_future",
        "timestamp_too_old",
        "too_many_labels",
        "label_too_long",
        "empty_usage",
    }
)

__all__ = [
    "MIN_OCCURRED_AT_MS",
    "REASON_CODES",
    "invalid_event_from_pydantic",
    "validate_record",
    "validate_records",
]

_COUNT_DEFAULTS = {f: 0 for f in (*TOKEN_FIELDS, *TOOL_FIELDS)} | {"requests": 1}
_COUNT_LIMITS = (
    {f: MAX_TOKENS_PER_EVENT for f in TOKEN_FIELDS}
    | {f: MAX_REQUESTS_PER_EVENT for f in TOOL_FIELDS}
    | {"requests": MAX_REQUESTS_PER_EVENT}
)


def validate_record(d: Mapping[str, Any], *, now_ms: int, max_future_ms: int = DEFAULT_MAX_FUTURE_MS) -> None:
    """Raise InvalidEvent(reason_code, field) if the decoded UsageEvent dict breaks the contract.

    Absent optional fields take their Avro defaults. ``now_ms`` is the caller's clock (UTC epoch
    ms), passed in so the check is deterministic.
    """
    for name in REQUIRED_ID_FIELDS:
        v = d.get(name)
        if type(v) is not str and v is not None:
            raise InvalidEvent(
                f"{name} must be a string, got {type(v).__name__}", reason_code="invalid_type", field=name
            )
        if not v:
            raise InvalidEvent(f"{name} is required and must not be empty", reason_code=f"missing_{name}", field=name)
        if len(v) > MAX_ID_LEN:
            raise InvalidEvent(
                f"{name} is {len(v)} characters, at most {MAX_ID_LEN}", reason_code="id_too_long", field=name
            )
    if not is_customer_id(d.get("customer_id")):
        raise InvalidEvent(CUSTOMER_ID_RULE, reason_code="invalid_customer_id", field="customer_id")
    for name in OPTIONAL_ID_FIELDS:
        v = d.get(name)
        if v is not None:
            if not isinstance(v, str):
                raise InvalidEvent(f"{name} must be a string or null", reason_code="invalid_type", field=name)
            if len(v) > MAX_ID_LEN:
                raise InvalidEvent(
                    f"{name} is {len(v)} characters, at most {MAX_ID_LEN}", reason_code="id_too_long", field=name
                )

    ts = d.get("occurred_at")
    if ts is None:
        raise InvalidEvent("occurred_at is required", reason_code="missing_occurred_at", field="occurred_at")
    if type(ts) is not int:
        raise InvalidEvent(
            "occurred_at must be int epoch milliseconds", reason_code="invalid_type", field="occurred_at"
        )
    if ts > now_ms + max_future_ms:
        raise InvalidEvent(
            f"occurred_at {ts} is {ts - now_ms} ms in the future (allowed skew {max_future_ms} ms)",
            reason_code="timestamp_in_future",
            field="occurred_at",
        )
    if ts < MIN_OCCURRED_AT_MS:
        raise InvalidEvent(
            f"occurred_at {ts} is before 2000-01-01T00:00:00Z", reason_code="timestamp_too_old", field="occurred_at"
        )

    total = 0
    for name in COUNT_FIELDS:
        v = d.get(name, _COUNT_DEFAULTS[name])
        if type(v) is not int:
            raise InvalidEvent(f"{name} must be an integer", reason_code="invalid_type", field=name)
        if v < 0:
            raise InvalidEvent(f"{name} is negative ({v})", reason_code="negative_count", field=name)
        if v > _COUNT_LIMITS[name]:
            raise InvalidEvent(
                f"{name} {v} exceeds the per-event maximum {_COUNT_LIMITS[name]}",
                reason_code="absurd_count",
                field=name,
            )
        total += v

    labels = d.get("labels")
    if labels:
        if not isinstance(labels, Mapping):
            raise InvalidEvent("labels must be a string->string map", reason_code="invalid_type", field="labels")
        if len(labels) > MAX_LABELS:
            raise InvalidEvent(
                f"{len(labels)} labels, at most {MAX_LABELS}", reason_code="too_many_labels", field="labels"
            )
        for k, v in labels.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise InvalidEvent("labels must be a string->string map", reason_code="invalid_type", field="labels")
            if len(k) > MAX_LABEL_LEN or len(v) > MAX_LABEL_LEN:
                raise InvalidEvent(
                    f"label {k[:32]!r} key or value longer than {MAX_LABEL_LEN} characters",
                    reason_code="label_too_long",
                    field="labels",
                )

    if total == 0:
        raise InvalidEvent(
            "all token counts and requests are zero: the event bills nothing", reason_code="empty_usage", field=None
        )


_IDS = itemgetter(*REQUIRED_ID_FIELDS, *OPTIONAL_ID_FIELDS)
_N_IDS = len(REQUIRED_ID_FIELDS) + len(OPTIONAL_ID_FIELDS)
_CUSTOMER_AT = REQUIRED_ID_FIELDS.index("customer_id")
_OCCURRED = itemgetter("occurred_at")
_COUNTS = itemgetter(*COUNT_FIELDS)  # requests last
_N_COUNTS = len(COUNT_FIELDS)
_LABELS = itemgetter("labels")
_STR_OR_NONE = {str, type(None)}
_STR = {str}
_INT = {int}


def validate_records(
    events: Sequence[Mapping[str, Any]], *, now_ms: int, max_future_ms: int = DEFAULT_MAX_FUTURE_MS
) -> list[InvalidEvent | None]:
    """:func:`validate_record` over a batch: element ``i`` is the :class:`InvalidEvent` that
    ``validate_record(events[i], ...)`` raises, or None when it accepts the event."""
    if events and _provably_clean(events, now_ms + max_future_ms):
        return [None] * len(events)
    out: list[InvalidEvent | None] = []
    for d in events:
        try:
            validate_record(d, now_ms=now_ms, max_future_ms=max_future_ms)
        except InvalidEvent as exc:
            out.append(exc)
        else:
            out.append(None)
    return out


def _provably_clean(events: Sequence[Mapping[str, Any]], latest_ms: int) -> bool:
    """True only if :func:`validate_record` accepts every event (False = "not sure": the caller
    checks event by event). Each check is as strict as validate_record's or stricter (exact
    ``str``/``int``/``dict`` types, every field present), and runs as C-level passes over columns."""
    try:
        ids = list(chain.from_iterable(map(_IDS, events)))
        occurred = list(map(_OCCURRED, events))
        counts = list(chain.from_iterable(map(_COUNTS, events)))
        labels = list(map(_LABELS, events))
    except (KeyError, TypeError):  # an absent field takes a default: validate_record knows which
        return False
    if not set(map(type, ids)) <= _STR_OR_NONE or max(map(len, filter(None, ids)), default=0) > MAX_ID_LEN:
        return False
    for i in range(len(REQUIRED_ID_FIELDS)):  # required ids: present and non-empty
        column = ids[i::_N_IDS]
        if None in column or "" in column:
            return False
    if not all(map(is_customer_id, set(ids[_CUSTOMER_AT::_N_IDS]))):  # few distinct customers per batch
        return False
    if set(map(type, occurred)) != _INT or min(occurred) < MIN_OCCURRED_AT_MS or max(occurred) > latest_ms:
        return False
    if set(map(type, counts)) != _INT or min(counts) < 0 or max(counts) > MAX_TOKENS_PER_EVENT:
        return False
    for i in range(len(TOKEN_FIELDS), _N_COUNTS):  # tool calls and requests have the lower limit
        if max(counts[i::_N_COUNTS]) > MAX_REQUESTS_PER_EVENT:
            return False
    requests = counts[_N_COUNTS - 1 :: _N_COUNTS]
    if min(requests) == 0 and min(map(sum, map(_COUNTS, events))) == 0:  # empty_usage
        return False
    for lab in filter(None, labels):
        if (
            type(lab) is not dict
            or len(lab) > MAX_LABELS
            or not set(map(type, lab)) <= _STR
            or not set(map(type, lab.values())) <= _STR
            or max(map(len, chain(lab, lab.values()))) > MAX_LABEL_LEN
        ):
            return False
    return True


_TYPE_ERRORS_TIMESTAMP = ("datetime", "date", "time", "timezone")


def invalid_event_from_pydantic(exc: ValidationError) -> InvalidEvent:
    """The first error of a UsageEvent ValidationError as an InvalidEvent with a stable code."""
    errors = exc.errors(include_url=False)
    if not errors:
        return InvalidEvent(str(exc), reason_code="invalid_event")
    err = errors[0]
    loc = err.get("loc", ())
    field = str(loc[0]) if loc else None
    kind = err.get("type", "")
    msg = err.get("msg", "")
    where = ".".join(str(p) for p in loc) or "event"
    message = f"{where}: {msg}"
    required = field in REQUIRED_ID_FIELDS or field == "occurred_at"
    if kind == "missing" or (required and (kind == "string_too_short" or err.get("input", "") is None)):
        code = f"missing_{field}"
    elif kind == "string_too_long":
        code = "id_too_long"
    elif kind == "string_unicode":  # a lone surrogate (JSON "\\ud800"): pydantic refuses it
        code = "invalid_encoding"
    elif field == "customer_id" and kind == "value_error":
        code = "invalid_customer_id"
    elif kind == "greater_than_equal":
        code = "negative_count"
    elif kind == "less_than_equal":
        code = "absurd_count"
    elif field == "occurred_at" and (kind == "value_error" or kind.startswith(_TYPE_ERRORS_TIMESTAMP)):
        code = "invalid_timestamp"
    elif field == "labels" and kind == "value_error":
        code = "too_many_labels" if f"at most {MAX_LABELS} labels" in msg else "label_too_long"
    else:
        code = "invalid_type"
    return InvalidEvent(message, reason_code=code, field=field)
