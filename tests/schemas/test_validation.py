"""validate_record: reason codes, and agreement with the pydantic UsageEvent (property test)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterline.core.errors import InvalidEvent
from schemas.codec import decode_usage_batch, encode_usage_batch, record_to_event
from schemas.models import MAX_ID_LEN, MAX_LABEL_LEN, MAX_LABELS, MAX_TOKENS_PER_EVENT, TOKEN_FIELDS, TOOL_FIELDS
from schemas.validation import MIN_OCCURRED_AT_MS, REASON_CODES, validate_record, validate_records

NOW = 1_750_000_000_000


def rec(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event_id": "evt-1",
        "occurred_at": NOW - 1_000,
        "customer_id": "cus_1",
        "api_key_id": None,
        "project": None,
        "feature": None,
        "user_id": None,
        "session_id": None,
        "gateway": None,
        "provider": "anthropic",
        "model": "claude-sonnet-4",
        "model_version": None,
        "request_id": None,
        "input_tokens": 10,
        "output_tokens": 5,
        "cached_input_tokens": 0,
        "cache_write_tokens": 0,
        "reasoning_tokens": 0,
        "requests": 1,
        "labels": {},
    }
    base.update(over)
    return base


def code_of(d: dict[str, Any], **kw: Any) -> tuple[str, str | None]:
    with pytest.raises(InvalidEvent) as err:
        validate_record(d, now_ms=NOW, **kw)
    assert err.value.reason_code in REASON_CODES
    return err.value.reason_code, err.value.field


def test_valid_record_passes() -> None:
    validate_record(rec(), now_ms=NOW)
    validate_record(rec(input_tokens=0, output_tokens=0, requests=1), now_ms=NOW)  # a per-request fee only
    validate_record(rec(occurred_at=NOW + 300_000), now_ms=NOW)  # exactly the allowed skew
    validate_record(rec(labels={"k" * MAX_LABEL_LEN: "v" * MAX_LABEL_LEN}), now_ms=NOW)


@pytest.mark.parametrize(
    ("over", "code", "field"),
    [
        ({"event_id": ""}, "missing_event_id", "event_id"),
        ({"event_id": None}, "missing_event_id", "event_id"),
        ({"customer_id": ""}, "missing_customer_id", "customer_id"),
        ({"provider": ""}, "missing_provider", "provider"),
        ({"model": ""}, "missing_model", "model"),
        ({"occurred_at": None}, "missing_occurred_at", "occurred_at"),
        ({"customer_id": "c" * (MAX_ID_LEN + 1)}, "id_too_long", "customer_id"),
        ({"request_id": "r" * (MAX_ID_LEN + 1)}, "id_too_long", "request_id"),
        ({"input_tokens": -1}, "negative_count", "input_tokens"),
        ({"requests": -1}, "negative_count", "requests"),
        ({"reasoning_tokens": MAX_TOKENS_PER_EVENT + 1}, "absurd_count", "reasoning_tokens"),
        ({"requests": 10**6 + 1}, "absurd_count", "requests"),
        ({"occurred_at": NOW + 300_001}, "timestamp_in_future", "occurred_at"),
        ({"occurred_at": MIN_OCCURRED_AT_MS - 1}, "timestamp_too_old", "occurred_at"),
        ({"labels": {str(i): "v" for i in range(MAX_LABELS + 1)}}, "too_many_labels", "labels"),
        ({"labels": {"k": "v" * (MAX_LABEL_LEN + 1)}}, "label_too_long", "labels"),
        ({"labels": {"k" * (MAX_LABEL_LEN + 1): "v"}}, "label_too_long", "labels"),
        ({"input_tokens": 0, "output_tokens": 0, "requests": 0}, "empty_usage", None),
        ({"model": 5}, "invalid_type", "model"),
        ({"input_tokens": 1.5}, "invalid_type", "input_tokens"),
        ({"occurred_at": "2025-01-01T00:00:00Z"}, "invalid_type", "occurred_at"),
    ],
)
def test_reason_codes(over: dict[str, Any], code: str, field: str | None) -> None:
    assert code_of(rec(**over)) == (code, field)


def test_max_future_is_configurable() -> None:
    assert code_of(rec(occurred_at=NOW + 1), max_future_ms=0) == ("timestamp_in_future", "occurred_at")


def test_absent_optional_keys_take_defaults() -> None:
    minimal = {"event_id": "e", "occurred_at": NOW, "customer_id": "c", "provider": "p", "model": "m"}
    validate_record(minimal, now_ms=NOW)  # requests defaults to 1


# ---- agreement with the pydantic model --------------------------------------------------------------

_good_ids = st.text(min_size=1, max_size=6)
_edge_ids = st.one_of(st.just(""), st.text(alphabet="x", min_size=MAX_ID_LEN - 1, max_size=MAX_ID_LEN + 2))
_good_counts = st.integers(min_value=0, max_value=50)
_edge_counts = st.one_of(
    st.integers(min_value=-3, max_value=0),
    st.integers(min_value=MAX_TOKENS_PER_EVENT - 1, max_value=MAX_TOKENS_PER_EVENT + 1),
    st.integers(min_value=10**6 - 1, max_value=10**6 + 1),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
_label_text = st.text(max_size=3)
_edge_labels = st.one_of(
    st.sampled_from(
        [
            {"y" * (MAX_LABEL_LEN + 1): "v"},
            {"k": "y" * (MAX_LABEL_LEN + 1)},
            {"y" * MAX_LABEL_LEN: "y" * MAX_LABEL_LEN},
        ]
    ),
    st.integers(min_value=MAX_LABELS - 1, max_value=MAX_LABELS + 1).map(lambda n: {f"l{i}": "v" for i in range(n)}),
)
_REQUIRED = ("event_id", "customer_id", "provider", "model")
_OPTIONAL = (
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
_COUNTS = (*TOKEN_FIELDS, *TOOL_FIELDS, "requests")

# A mostly valid record with 0-2 fields pushed to an edge, so both outcomes are common.
# occurred_at stays within 2000..now: the time checks only validate_record makes stay out.
_valid = st.fixed_dictionaries(
    {
        **{f: _good_ids for f in _REQUIRED},
        **{f: st.one_of(st.none(), _good_ids) for f in _OPTIONAL},
        "occurred_at": st.integers(min_value=MIN_OCCURRED_AT_MS, max_value=NOW),
        **{f: _good_counts for f in _COUNTS},
        "labels": st.dictionaries(_label_text, _label_text, max_size=3),
    }
)
_edge_for = {
    **{f: _edge_ids for f in (*_REQUIRED, *_OPTIONAL)},
    **{f: _edge_counts for f in _COUNTS},
    "labels": _edge_labels,
}


@st.composite
def records(draw: st.DrawFn) -> dict[str, Any]:
    d = draw(_valid)
    n = draw(st.sampled_from([0, 1, 1, 2]))
    for name in draw(st.lists(st.sampled_from(sorted(_edge_for)), min_size=n, max_size=n, unique=True)):
        d[name] = draw(_edge_for[name])
    return d


def _model_accepts(d: dict[str, Any]) -> bool:
    try:
        record_to_event(d)
    except InvalidEvent:
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(records())
def test_validate_record_agrees_with_pydantic(d: dict[str, Any]) -> None:
    """Accepts iff UsageEvent accepts, apart from empty_usage (only validate_record checks it)."""
    try:
        validate_record(d, now_ms=NOW)
        ours: bool | None = True
    except InvalidEvent as exc:
        ours = None if exc.reason_code == "empty_usage" else False
    if ours is None:  # the model has no empty_usage rule; it must accept what is otherwise fine
        assert all(d[f] == 0 for f in _COUNTS)
        assert _model_accepts(d)
    else:
        assert ours == _model_accepts(d)


@settings(max_examples=100, deadline=None)
@given(records())
def test_valid_records_survive_the_wire(d: dict[str, Any]) -> None:
    try:
        validate_record(d, now_ms=NOW)
    except InvalidEvent:
        return
    (back,) = decode_usage_batch(encode_usage_batch([d]))
    assert back == d
    validate_record(back, now_ms=NOW)


# --------------------------------------------------------------------------- validate_records


def _one(d: dict[str, Any], **kw: Any) -> tuple[str, str | None, str] | None:
    try:
        validate_record(d, now_ms=NOW, **kw)
    except InvalidEvent as exc:
        return exc.reason_code, exc.field, exc.message
    return None


def _verdicts(ds: list[dict[str, Any]], **kw: Any) -> list[tuple[str, str | None, str] | None]:
    return [None if e is None else (e.reason_code, e.field, e.message) for e in validate_records(ds, now_ms=NOW, **kw)]


@st.composite
def batch_records(draw: st.DrawFn) -> dict[str, Any]:
    d = draw(records())
    pick = draw(st.integers(0, 19))
    if pick == 0:
        d["occurred_at"] = draw(
            st.sampled_from([NOW + 300_000, NOW + 300_001, MIN_OCCURRED_AT_MS, MIN_OCCURRED_AT_MS - 1])
        )
    elif pick == 1:
        del d[draw(st.sampled_from(sorted(d)))]  # absent: defaults or missing_*
    elif pick == 2:
        d[draw(st.sampled_from(sorted(d)))] = draw(st.sampled_from([None, True, 1.5, "x", b"x", [], {"a": 1}]))
    elif pick == 3:
        for f in _COUNTS:
            d[f] = 0
    return d


@settings(max_examples=300, deadline=None)
@given(st.lists(batch_records(), max_size=12), st.sampled_from([300_000, 0]))
def test_validate_records_agrees_with_validate_record(ds: list[dict[str, Any]], skew: int) -> None:
    assert _verdicts(ds, max_future_ms=skew) == [_one(d, max_future_ms=skew) for d in ds]


@settings(max_examples=100, deadline=None)
@given(st.lists(_valid, min_size=1, max_size=12))
def test_validate_records_clean_batches(ds: list[dict[str, Any]]) -> None:
    """Mostly-clean batches take the batch path; it must agree too (empty_usage included)."""
    assert _verdicts(ds) == [_one(d) for d in ds]


def test_validate_records_examples() -> None:
    assert validate_records([], now_ms=NOW) == []
    assert validate_records([rec(), rec(event_id="e2")], now_ms=NOW) == [None, None]
    got = validate_records(
        [rec(), rec(input_tokens=-1), rec(labels={"k": 1}), rec(occurred_at=NOW + 300_001)], now_ms=NOW
    )
    assert got[0] is None
    assert [(e.reason_code, e.field) for e in got[1:] if e is not None] == [
        ("negative_count", "input_tokens"),
        ("invalid_type", "labels"),
        ("timestamp_in_future", "occurred_at"),
    ]
    absent = rec()
    del absent["requests"], absent["labels"]  # Avro defaults: requests=1, no labels
    assert validate_records([absent, rec()], now_ms=NOW) == [None, None]
