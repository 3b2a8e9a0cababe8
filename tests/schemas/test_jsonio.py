"""Canonical JSON form: parsing with reason codes, round trip, JSONL line numbers."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from meterline.core.errors import InvalidEvent
from schemas.codec import decode_usage_batch, encode_usage_batch, event_to_record, record_to_event
from schemas.jsonio import event_to_json, iter_jsonl, parse_json_event
from schemas.models import UsageEvent


def obj(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event_id": "evt-1",
        "occurred_at": "2025-06-01T12:00:00.250Z",
        "customer_id": "cus_1",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "input_tokens": 900,
        "cached_input_tokens": 100,
        "output_tokens": 40,
        "labels": {"env": "prod"},
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not ...}


def err_of(value: Any) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as err:
        parse_json_event(value)
    return err.value


def test_parse_iso_and_epoch_ms_agree() -> None:
    a = parse_json_event(obj())
    b = parse_json_event(obj(occurred_at=1_748_779_200_250))
    c = parse_json_event(obj(occurred_at="2025-06-01T14:00:00.250+02:00"))
    assert a == b == c
    assert a.occurred_at == datetime(2025, 6, 1, 12, 0, 0, 250_000, tzinfo=UTC)
    assert a.input_tokens == 900 and a.labels == {"env": "prod"} and a.requests == 1


def test_json_round_trip_through_avro() -> None:
    ev = parse_json_event(obj(project="p", request_id="r", requests=3, extra_unknown_key=1))
    j = event_to_json(ev)
    assert j["occurred_at"] == "2025-06-01T12:00:00.250Z"
    assert parse_json_event(json.loads(json.dumps(j))) == ev
    (rec,) = decode_usage_batch(encode_usage_batch([event_to_record(ev)]))
    assert event_to_json(record_to_event(rec)) == j


def test_null_means_default_for_optional_fields() -> None:
    ev = parse_json_event(obj(project=None, output_tokens=None, labels=None))
    assert ev.project is None and ev.output_tokens == 0 and ev.labels == {}


@pytest.mark.parametrize(
    ("value", "code", "field"),
    [
        ([1, 2], "invalid_json_type", None),
        ("event", "invalid_json_type", None),
        (obj(occurred_at="2025-06-01T12:00:00"), "invalid_timestamp", "occurred_at"),
        (obj(occurred_at="yesterday"), "invalid_timestamp", "occurred_at"),
        (obj(occurred_at=1.7e12), "invalid_timestamp", "occurred_at"),
        (obj(occurred_at=True), "invalid_timestamp", "occurred_at"),
        (obj(occurred_at=10**20), "invalid_timestamp", "occurred_at"),
        (obj(occurred_at=...), "missing_occurred_at", "occurred_at"),
        (obj(customer_id=...), "missing_customer_id", "customer_id"),
        (obj(customer_id=""), "missing_customer_id", "customer_id"),
        (obj(event_id=None), "missing_event_id", "event_id"),
        (obj(model="m" * 129), "id_too_long", "model"),
        (obj(input_tokens=-5), "negative_count", "input_tokens"),
        (obj(output_tokens=10**13), "absurd_count", "output_tokens"),
        (obj(input_tokens="12"), "invalid_type", "input_tokens"),
        (obj(input_tokens=12.0), "invalid_type", "input_tokens"),
        (obj(provider=7), "invalid_type", "provider"),
        (obj(labels={"k": 1}), "invalid_type", "labels"),
        (obj(labels={str(i): "v" for i in range(65)}), "too_many_labels", "labels"),
        (obj(labels={"k": "v" * 257}), "label_too_long", "labels"),
    ],
)
def test_reason_codes(value: Any, code: str, field: str | None) -> None:
    err = err_of(value)
    assert (err.reason_code, err.field) == (code, field), err.message


def test_iter_jsonl_reports_bad_lines_and_keeps_good(tmp_path: Path) -> None:
    lines = [
        json.dumps(obj(event_id="a")),
        "",
        "{not json",
        json.dumps(obj(event_id="b", customer_id="")),
        "   ",
        json.dumps([1]),
        json.dumps(obj(event_id="c")),
    ]
    path = tmp_path / "events.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe\n" + json.dumps(obj(event_id="d")).encode())
    results = list(iter_jsonl(path))
    got = [(n, r.event_id if isinstance(r, UsageEvent) else r.reason_code) for n, r in results]
    assert got == [
        (1, "a"),
        (3, "invalid_json"),
        (4, "missing_customer_id"),
        (6, "invalid_json_type"),
        (7, "c"),
        (8, "invalid_json"),
        (9, "d"),
    ]
    assert [(n, getattr(r, "event_id", None)) for n, r in iter_jsonl(lines)][0] == (1, "a")


def test_sub_millisecond_json_keeps_microseconds() -> None:
    ev = parse_json_event(obj(occurred_at="2025-06-01T12:00:00.000123Z"))
    assert event_to_json(ev)["occurred_at"] == "2025-06-01T12:00:00.000123Z"
    assert ev.occurred_at - datetime(2025, 6, 1, 12, tzinfo=UTC) == timedelta(microseconds=123)
