"""UsageEvent / PricedUsage v2 (issue 14) next to v1: old writer -> new reader and back.

v1's schemas are kept in ``schemas/avro/history`` and preloaded in every registry, so records an
older gateway wrote keep decoding (the v2 fields read as their defaults: "none of them").
"""

from __future__ import annotations

from schemas.codec import (
    AvroCodec,
    decode_priced_batch,
    decode_usage_batch,
    encode_priced_batch,
    encode_usage_batch,
)
from schemas.models import V2_COUNT_FIELDS
from schemas.registry import default_registry, historical_schemas

V1 = {
    "event_id": "e1",
    "occurred_at": 1_780_000_000_000,
    "customer_id": "acme",
    "provider": "anthropic",
    "model": "claude-3-5-sonnet",
    "model_version": "20241022",
    "input_tokens": 10,
    "output_tokens": 5,
    "cache_write_tokens": 7,
}
V2_ONLY = {
    "cache_write_long_tokens": 11,
    "input_audio_tokens": 12,
    "output_audio_tokens": 13,
    "input_image_tokens": 14,
    "output_image_tokens": 15,
    "web_search_requests": 2,
    "service_tier": "batch",
}
PRICE = {
    "cost_picos": 123,
    "charge_picos": 456,
    "currency": "USD",
    "price_version": "v",
    "rate_card": "c",
    "priced_at": 1_780_000_000_500,
    "source_partition": 1,
    "source_offset": 9,
}


def v1_codec(name: str) -> AvroCodec:
    (schema,) = [s for s in historical_schemas() if s["name"] == name]
    return AvroCodec(schema, default_registry())


def test_history_holds_the_v1_schemas_and_every_registry_knows_them() -> None:
    names = sorted(s["name"] for s in historical_schemas())
    assert names == ["PricedBatch", "PricedUsage", "UsageBatch", "UsageEvent"]
    v1_fields = {f["name"] for f in next(s for s in historical_schemas() if s["name"] == "UsageEvent")["fields"]}
    assert not v1_fields & set(V2_COUNT_FIELDS) and "service_tier" not in v1_fields
    current = AvroCodec("UsageBatch")
    assert v1_codec("UsageBatch").fingerprint != current.fingerprint
    assert v1_codec("UsageBatch").fingerprint in default_registry()


def test_v1_writer_to_v2_reader_defaults_the_new_fields() -> None:
    data = v1_codec("UsageBatch").encode({"events": [V1]})
    (event,) = decode_usage_batch(data)
    assert {k: event[k] for k in V1} == V1
    assert all(event[f] == 0 for f in V2_COUNT_FIELDS) and event["service_tier"] is None
    assert event["requests"] == 1

    priced = v1_codec("PricedBatch").encode({"events": [{**V1, **PRICE}]})
    (row,) = decode_priced_batch(priced)
    assert row["cost_picos"] == 123 and row["cache_write_long_tokens"] == 0 and row["service_tier"] is None


def test_v2_writer_to_v1_reader_keeps_v1_fields_and_drops_the_new_ones() -> None:
    data = encode_usage_batch([{**V1, **V2_ONLY}])
    (event,) = v1_codec("UsageBatch").decode(data)["events"]
    assert {k: event[k] for k in V1} == V1
    assert not set(V2_ONLY) & set(event)
    (row,) = v1_codec("PricedBatch").decode(encode_priced_batch([{**V1, **V2_ONLY, **PRICE}]))["events"]
    assert row["charge_picos"] == 456 and "service_tier" not in row


def test_v2_round_trip_keeps_every_new_field() -> None:
    (event,) = decode_usage_batch(encode_usage_batch([{**V1, **V2_ONLY}]))
    assert {k: event[k] for k in V2_ONLY} == V2_ONLY
