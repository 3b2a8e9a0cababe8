"""Avro single-object codec: round trips, schema evolution both ways, and error reason codes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterline.core.errors import InvalidEvent, SchemaError
from schemas import codec as codec_mod
from schemas.codec import (
    MAGIC,
    AvroCodec,
    decode_dead_letter,
    decode_priced_batch,
    decode_usage_batch,
    encode_dead_letter,
    encode_priced_batch,
    encode_usage_batch,
    event_to_record,
    record_to_event,
)
from schemas.models import UsageEvent
from schemas.registry import SchemaRegistry, bundled_schemas, default_registry, fingerprint, load_schemas

FIXTURES = Path(__file__).parent / "fixtures"
T0 = datetime(2025, 3, 14, 15, 9, 26, 535000, tzinfo=UTC)


def make_event(i: int = 0, **over: Any) -> UsageEvent:
    fields: dict[str, Any] = {
        "event_id": f"evt-{i:06d}",
        "occurred_at": T0 + timedelta(milliseconds=i),
        "customer_id": "cus_42",
        "provider": "openai",
        "model": "gpt-4o",
        "project": "search",
        "user_id": f"u{i % 7}",
        "input_tokens": 1000 + i,
        "output_tokens": 200,
        "cached_input_tokens": 50,
        "reasoning_tokens": 7,
        "labels": {"env": "prod", "team": "core"},
    }
    fields.update(over)
    return UsageEvent(**fields)


@pytest.fixture(scope="module")
def v2() -> dict[str, dict[str, Any]]:
    return load_schemas(FIXTURES)


# ---- round trips ----------------------------------------------------------------------------------


def test_pydantic_record_bytes_round_trip() -> None:
    events = [make_event(i) for i in range(20)] + [
        make_event(
            99,
            api_key_id="k",
            feature="f",
            session_id="s",
            gateway="litellm",
            model_version="2024-08-06",
            request_id="req_1",
            cache_write_tokens=3,
            requests=2,
            labels={},
        ),
        make_event(100, occurred_at=datetime(2030, 1, 1, 1, tzinfo=timezone(timedelta(hours=1)))),
    ]
    data = encode_usage_batch([event_to_record(e) for e in events])
    assert data[:2] == MAGIC
    assert data[2:10] == fingerprint(bundled_schemas()["meterline.v1.UsageBatch"])
    records = decode_usage_batch(data)
    assert all(type(r["occurred_at"]) is int for r in records)  # raw epoch ms, not datetime
    assert [record_to_event(r) for r in records] == events  # order kept, all fields equal


def test_occurred_at_is_epoch_millis_on_the_wire() -> None:
    rec = event_to_record(make_event(0))
    assert rec["occurred_at"] == int(T0.timestamp() * 1000)
    assert decode_usage_batch(encode_usage_batch([rec]))[0]["occurred_at"] == rec["occurred_at"]


def test_missing_optional_fields_take_avro_defaults() -> None:
    minimal = {"event_id": "e", "occurred_at": 1_700_000_000_000, "customer_id": "c", "provider": "p", "model": "m"}
    (back,) = decode_usage_batch(encode_usage_batch([minimal]))
    assert back["project"] is None and back["labels"] == {}
    assert back["input_tokens"] == 0 and back["requests"] == 1


def test_priced_batch_and_dead_letter_round_trip() -> None:
    priced = {
        **event_to_record(make_event(1)),
        "cost_picos": 12_345_678_901,
        "charge_picos": 14_814_814_681,
        "currency": "usd",
        "price_version": "2025-03-01",
        "rate_card": "default",
        "priced_at": 1_741_964_966_600,
        "source_partition": 3,
        "source_offset": 2**40,
    }
    assert decode_priced_batch(encode_priced_batch([priced, priced])) == [priced, priced]
    one = encode_usage_batch([event_to_record(make_event(2))])
    dl = {
        "reason_code": "missing_customer_id",
        "reason": "customer_id is required",
        "field": "customer_id",
        "source_topic": "meterline.usage-events",
        "source_partition": 0,
        "source_offset": 17,
        "customer_id": None,
        "event_id": "evt-000002",
        "occurred_at": 1_741_964_966_537,
        "payload": one,
        "payload_format": "usage_batch",
        "failed_at": 1_741_964_966_999,
    }
    back = decode_dead_letter(encode_dead_letter(dl))
    assert back == dl
    assert record_to_event(decode_usage_batch(back["payload"])[0]) == make_event(2)


def test_codec_accepts_full_name_and_bytes_like() -> None:
    codec = AvroCodec("meterline.v1.UsageBatch")
    data = codec.encode({"events": [event_to_record(make_event(3))]})
    assert codec.decode(memoryview(data)) == codec.decode(bytearray(data))


# ---- schema evolution --------------------------------------------------------------------------------


def test_v1_reader_reads_v2_bytes(v2: dict[str, dict[str, Any]]) -> None:
    registry = default_registry()
    writer = AvroCodec(v2["meterline.v1.UsageBatch"], registry=registry)
    assert writer.fingerprint != registry.fingerprint_of("UsageBatch")
    rec = {**event_to_record(make_event(5)), "region": "eu-west-1"}
    data = writer.encode({"events": [rec]})
    reader = AvroCodec("UsageBatch", registry=registry)  # still v1: v2 was registered second
    (back,) = reader.decode(data)["events"]
    assert "region" not in back
    assert record_to_event(back) == make_event(5)


def test_v2_reader_reads_v1_bytes(v2: dict[str, dict[str, Any]]) -> None:
    data = encode_usage_batch([event_to_record(make_event(6))])
    reader = AvroCodec(v2["meterline.v1.UsageBatch"], registry=default_registry())
    (back,) = reader.decode(data)["events"]
    assert back["region"] is None
    assert record_to_event(back) == make_event(6)


def test_unknown_writer_learned_through_resolver(v2: dict[str, dict[str, Any]]) -> None:
    v2_batch = v2["meterline.v1.UsageBatch"]
    data = AvroCodec(v2_batch, registry=SchemaRegistry()).encode(
        {"events": [{**event_to_record(make_event(7)), "region": "us"}]}
    )
    asked: list[bytes] = []
    store = {fingerprint(v2_batch): json.loads(json.dumps(v2_batch))}

    def resolver(fp: bytes) -> dict[str, Any] | None:
        asked.append(fp)
        return store.get(fp)

    reader = AvroCodec("UsageBatch", registry=default_registry(resolver))
    assert reader.decode(data)["events"][0]["event_id"] == "evt-000007"
    assert reader.decode(data)["events"][0]["event_id"] == "evt-000007"
    assert asked == [fingerprint(v2_batch)]  # asked once, then cached

    with pytest.raises(SchemaError) as err:
        AvroCodec("UsageBatch").decode(data)  # no resolver
    assert err.value.reason_code == "unknown_schema"


def test_resolver_returning_wrong_schema_is_unknown_schema(v2: dict[str, dict[str, Any]]) -> None:
    data = AvroCodec(v2["meterline.v1.UsageBatch"], registry=SchemaRegistry()).encode({"events": []})
    reader = AvroCodec("UsageBatch", registry=default_registry(lambda fp: bundled_schemas()["meterline.v1.UsageEvent"]))
    with pytest.raises(SchemaError) as err:
        reader.decode(data)
    assert err.value.reason_code == "unknown_schema"


def test_incompatible_writer_is_undecodable() -> None:
    other = {
        "type": "record",
        "name": "UsageBatch",
        "namespace": "meterline.v1",
        "fields": [{"name": "events", "type": "string"}],
    }
    registry = default_registry()
    data = AvroCodec(other, registry=registry).encode({"events": "nope"})
    with pytest.raises(SchemaError) as err:
        AvroCodec("UsageBatch", registry=registry).decode(data)
    assert err.value.reason_code == "undecodable"


# ---- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"\xc3", b"\xc3\x01\x00", b'{"event_id": 1}', b"\x00\x01" + b"\x00" * 20])
def test_bad_magic_is_not_single_object(data: bytes) -> None:
    with pytest.raises(SchemaError) as err:
        decode_usage_batch(data)
    assert err.value.reason_code == "not_single_object"
    assert "magic" in err.value.message


def test_unknown_fingerprint() -> None:
    with pytest.raises(SchemaError) as err:
        decode_usage_batch(MAGIC + b"\x01\x02\x03\x04\x05\x06\x07\x08" + b"\x00")
    assert err.value.reason_code == "unknown_schema"
    assert "0102030405060708" in err.value.message


def test_truncated_and_trailing_bytes_are_undecodable() -> None:
    data = encode_usage_batch([event_to_record(make_event(i)) for i in range(3)])
    for cut in (11, 20, len(data) // 2, len(data) - 1):
        with pytest.raises(SchemaError) as err:
            decode_usage_batch(data[:cut])
        assert err.value.reason_code == "undecodable", cut
    with pytest.raises(SchemaError) as err:
        decode_usage_batch(data + b"\x00")
    assert err.value.reason_code == "undecodable"


def test_invalid_utf8_is_undecodable() -> None:
    # One event whose event_id is the 2 bytes ff fe (invalid UTF-8).
    body = b"\x02" + b"\x04\xff\xfe"
    data = MAGIC + fingerprint(bundled_schemas()["meterline.v1.UsageBatch"]) + body
    with pytest.raises(SchemaError) as err:
        decode_usage_batch(data)
    assert err.value.reason_code == "undecodable"


def test_encode_wrong_shape_is_unencodable() -> None:
    for bad in (
        {"event_id": None, "occurred_at": 1, "customer_id": "c", "provider": "p", "model": "m"},
        {"event_id": "e", "occurred_at": "2025-01-01", "customer_id": "c", "provider": "p", "model": "m"},
        {"event_id": "e", "occurred_at": 1, "customer_id": "c", "provider": "p", "model": "m", "input_tokens": 2**64},
    ):
        with pytest.raises(SchemaError) as err:
            encode_usage_batch([bad])
        assert err.value.reason_code == "unencodable"


_FP = fingerprint(bundled_schemas()["meterline.v1.UsageBatch"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=200), st.binary(max_size=200).map(lambda b: MAGIC + _FP + b)))
def test_random_bytes_only_raise_schema_error(data: bytes) -> None:
    try:
        events = decode_usage_batch(data)
    except SchemaError as exc:
        assert exc.reason_code in {"not_single_object", "unknown_schema", "undecodable"}
    else:
        assert isinstance(events, list)


_VALID = encode_usage_batch([event_to_record(make_event(i)) for i in range(4)])


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=10, max_value=len(_VALID) - 1), st.integers(min_value=1, max_value=255))
def test_corrupted_valid_bytes_only_raise_schema_error(pos: int, xor: int) -> None:
    data = bytearray(_VALID)
    data[pos] ^= xor
    try:
        decode_usage_batch(bytes(data))
    except SchemaError as exc:
        assert exc.reason_code == "undecodable"


def test_record_to_event_maps_model_errors() -> None:
    rec = event_to_record(make_event(1))
    with pytest.raises(InvalidEvent) as err:
        record_to_event({**rec, "customer_id": ""})
    assert (err.value.reason_code, err.value.field) == ("missing_customer_id", "customer_id")
    with pytest.raises(InvalidEvent) as err:
        record_to_event({**rec, "occurred_at": 2**62})
    assert err.value.reason_code == "invalid_timestamp"


def test_datetime_ms_conversion_floors_submillisecond() -> None:
    ev = make_event(0, occurred_at=datetime(2025, 1, 1, 0, 0, 0, 999, tzinfo=UTC))
    assert codec_mod.datetime_to_ms(ev.occurred_at) == 1_735_689_600_000
    assert codec_mod.datetime_to_ms(datetime(1969, 12, 31, 23, 59, 59, 999_500, tzinfo=UTC)) == -1


def test_public_surface_is_pinned() -> None:
    import schemas

    assert sorted(schemas.__all__) == [
        "AvroCodec",
        "SchemaRegistry",
        "UsageEvent",
        "decode_dead_letter",
        "decode_priced_batch",
        "decode_usage_batch",
        "default_registry",
        "encode_dead_letter",
        "encode_priced_batch",
        "encode_usage_batch",
        "event_to_json",
        "event_to_record",
        "fingerprint",
        "iter_jsonl",
        "parse_json_event",
        "record_to_event",
        "validate_record",
    ]
    assert all(hasattr(schemas, name) for name in schemas.__all__)


def test_bundled_avsc_files_document_every_field() -> None:
    for name, schema in bundled_schemas().items():
        assert schema.get("doc"), name
        assert all(f.get("doc") for f in schema["fields"]), name
    usage = bundled_schemas()["meterline.v1.UsageEvent"]
    assert [f["name"] for f in usage["fields"]] == list(UsageEvent.model_fields)
    priced = bundled_schemas()["meterline.v1.PricedUsage"]
    assert [f["name"] for f in priced["fields"]][: len(usage["fields"])] == list(UsageEvent.model_fields)


def _zigzag(n: int) -> bytes:
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


@pytest.mark.parametrize(
    "body",
    [
        _zigzag(1) + _zigzag(2**50) + b"abc",  # a string claiming 1 PiB
        _zigzag(1) + _zigzag(-5) + b"abc",  # a negative length
        _zigzag(2**62) + b"\x00" * 30,  # an absurd array block count
        _zigzag(-3) + _zigzag(10**15) + b"\x00",  # a negative block count with a huge byte size
    ],
)
def test_hostile_lengths_are_undecodable_without_huge_allocations(body: bytes) -> None:
    with pytest.raises(SchemaError) as err:
        decode_usage_batch(MAGIC + _FP + body)
    assert err.value.reason_code == "undecodable"
