"""Property tests and a bounded fuzz run: any bytes / any JSON end in a clear, typed error.

Contract under test: :mod:`schemas.codec` decoders raise only ``SchemaError`` (with a reason_code)
for any input; :func:`validate_record` raises only ``InvalidEvent``; :func:`parse_json_event` and
:func:`iter_jsonl` yield ``InvalidEvent`` for anything that is not a valid event. Nothing else
(no KeyError / OverflowError / RecursionError) may escape, or a worker would crash on it.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterline.core.errors import InvalidEvent, SchemaError
from schemas.codec import (
    decode_dead_letter,
    decode_priced_batch,
    decode_usage_batch,
    encode_usage_batch,
    record_to_event,
)
from schemas.jsonio import iter_jsonl, parse_json_event
from schemas.validation import REASON_CODES, validate_record

NOW_MS = 1_767_225_600_000  # 2026-01-01
DECODERS = (decode_usage_batch, decode_priced_batch, decode_dead_letter)
GOOD = {
    "event_id": "e-1",
    "occurred_at": NOW_MS - 1000,
    "customer_id": "c",
    "provider": "openai",
    "model": "gpt-4o",
    "input_tokens": 10,
    "output_tokens": 5,
}
HOSTILE_INTS = st.sampled_from([-1, -(2**63), 2**63 - 1, 2**63, 2**64, 10**30, 0])
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=20,
)
FIELDS = list(GOOD) + [
    "cached_input_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "requests",
    "labels",
    "model_version",
    "project",
]


def _decode_all(data: bytes) -> None:
    for decode in DECODERS:
        try:
            decode(data)
        except SchemaError as exc:
            assert exc.reason_code in {"not_single_object", "unknown_schema", "undecodable"}, exc.reason_code
            assert exc.message


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_decode_or_raise_schema_error(data: bytes) -> None:
    _decode_all(data)
    _decode_all(b"\xc3\x01" + data)  # past the magic check
    _decode_all(encode_usage_batch([GOOD])[:10] + data)  # past the fingerprint check


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_truncated_and_corrupted_records(data: st.DataObject) -> None:
    good = encode_usage_batch([GOOD, {**GOOD, "event_id": "e-2", "labels": {"k": "v"}}])
    cut = data.draw(st.integers(0, len(good) - 1))
    _decode_all(good[:cut])
    pos = data.draw(st.integers(0, len(good) - 1))
    flipped = bytearray(good)
    flipped[pos] ^= data.draw(st.integers(1, 255))
    try:
        events = decode_usage_batch(bytes(flipped))
    except SchemaError:
        return
    for ev in events:  # a flip that still decodes must then pass or fail validation cleanly
        try:
            validate_record(ev, now_ms=NOW_MS)
        except InvalidEvent as exc:
            assert exc.reason_code in REASON_CODES


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), JSONISH | HOSTILE_INTS, max_size=12))
def test_validate_record_only_raises_invalid_event(overrides: dict[str, Any]) -> None:
    record = {**GOOD, **overrides}
    try:
        validate_record(record, now_ms=NOW_MS)
    except InvalidEvent as exc:
        assert exc.reason_code in REASON_CODES and exc.message


@settings(max_examples=200, deadline=None)
@given(JSONISH | st.dictionaries(st.sampled_from(FIELDS), JSONISH | HOSTILE_INTS, max_size=12))
def test_parse_json_event_only_raises_invalid_event(obj: Any) -> None:
    candidate = {**GOOD, "occurred_at": "2025-06-01T00:00:00Z", **obj} if isinstance(obj, dict) else obj
    try:
        parse_json_event(candidate)
    except InvalidEvent as exc:
        assert exc.reason_code and exc.message


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=80) | st.text(max_size=80), max_size=6))
def test_iter_jsonl_yields_an_error_per_bad_line_and_never_raises(lines: list[Any]) -> None:
    for _, item in iter_jsonl(lines):
        assert isinstance(item, InvalidEvent) or item.event_id


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"input_tokens": -1}, "negative_count"),
        ({"output_tokens": 2**63}, "absurd_count"),
        ({"requests": 10**7}, "absurd_count"),
        ({"input_tokens": "NaN"}, "invalid_type"),
        ({"input_tokens": float("nan")}, "invalid_type"),
        ({"input_tokens": "1e3"}, "invalid_type"),
        ({"input_tokens": 0, "output_tokens": 0, "requests": 0}, "empty_usage"),
        ({"input_tokens": None}, "invalid_type"),
        ({"occurred_at": 0}, "timestamp_too_old"),
        ({"occurred_at": 32_503_680_000_000}, "timestamp_in_future"),
        ({"labels": {f"k{i}": "v" for i in range(10_000)}}, "too_many_labels"),
        ({"labels": {"k": "v" * 100_000}}, "label_too_long"),
        ({"event_id": "é" * 129}, "id_too_long"),
        ({"customer_id": ""}, "missing_customer_id"),
        ({"model": None}, "missing_model"),
    ],
)
def test_hostile_fields_have_their_reason(override: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        validate_record({**GOOD, **override}, now_ms=NOW_MS)
    assert info.value.reason_code == reason


def test_unicode_ids_are_valid_and_round_trip() -> None:
    """Unicode event ids are fine; customer ids have one restricted ASCII form (docs/security.md)."""
    ids = ["évènement-✓", "😀" * 30, "\u202eRTL", "中文-ключ", "a\u0301"]
    records = [{**GOOD, "event_id": i, "customer_id": i} for i in ids]
    decoded = decode_usage_batch(encode_usage_batch(records))
    assert [(d["event_id"], d["customer_id"]) for d in decoded] == [(i, i) for i in ids]
    for d in decoded:
        with pytest.raises(InvalidEvent) as info:
            validate_record(d, now_ms=NOW_MS)
        assert (info.value.reason_code, info.value.field) == ("invalid_customer_id", "customer_id")
        d = {**d, "customer_id": "cust-1"}
        validate_record(d, now_ms=NOW_MS)
        assert record_to_event(d).event_id == d["event_id"]


def test_bounded_mutation_fuzz_of_the_decode_validate_path() -> None:
    """20k seeded mutations (flip / insert / delete / splice) of valid records: only typed errors."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    seeds = [
        encode_usage_batch([{**GOOD, "event_id": f"e{i}", "labels": {"a": "b"} if i % 2 else {}}] * (i % 3 + 1))
        for i in range(6)
    ]
    outcomes = {"decoded": 0, "schema_error": 0}
    for _ in range(20_000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            op, pos = rng.randrange(4), rng.randrange(len(data) + 1)
            if op == 0 and pos < len(data):
                data[pos] ^= 1 << rng.randrange(8)
            elif op == 1:
                data[pos:pos] = bytes([rng.getrandbits(8)])
            elif op == 2 and pos < len(data):
                del data[pos]
            else:
                data[pos:] = rng.choice(seeds)[pos:]
        try:
            events = decode_usage_batch(bytes(data))
        except SchemaError:
            outcomes["schema_error"] += 1
            continue
        except Exception as exc:  # pragma: no cover - the failure this test exists to catch
            pytest.fail(f"seed={seed}: {type(exc).__name__} escaped the decoder for {bytes(data).hex()}")
        outcomes["decoded"] += 1
        for ev in events:
            try:
                validate_record(ev, now_ms=NOW_MS)
            except InvalidEvent:
                pass
            except Exception as exc:  # pragma: no cover
                pytest.fail(f"seed={seed}: {type(exc).__name__} escaped validate_record for {ev!r}")
    assert outcomes["schema_error"] > 0 and outcomes["decoded"] > 0, outcomes


def test_json_bombs_are_refused_cleanly() -> None:
    deep = "[" * 50_000 + "]" * 50_000
    results = list(iter_jsonl([deep, json.dumps({"occurred_at": "1970-01-01T00:00:00Z"}), b"\xff\xfe\x00"]))
    assert [type(r) for _, r in results] == [InvalidEvent] * 3
