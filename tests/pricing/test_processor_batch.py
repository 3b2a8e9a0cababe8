"""PricingProcessor.process_record (batched validation + price_many) against the event-by-event
loop it replaced: same priced output, dead letters, counts and dedupe entries, record for record."""

from __future__ import annotations

import time
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meterline.core.errors import InputError, SchemaError
from meterline.core.pricing import PricingEngine, load_price_book
from pipeline.processor import DedupeIndex, PricingProcessor, ProcessResult
from schemas.codec import (
    decode_dead_letter,
    decode_priced_batch,
    decode_usage_batch,
    encode_priced_batch,
    encode_usage_batch,
)
from schemas.validation import validate_record
from tests.pricing.conftest import BOOK, ms

NOW = ms("2025-03-01T00:00:00+00:00")


class EventByEvent(PricingProcessor):
    """The pre-batch loop, verbatim: validate, dedupe, price one event at a time."""

    def process_record(
        self, partition: int, offset: int, key: bytes | None, value: bytes | None, now_ms: int | None = None
    ) -> ProcessResult:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        result = ProcessResult()
        try:
            if value is None:
                raise SchemaError("record has no value", reason_code="empty_record")
            events = decode_usage_batch(value)
        except SchemaError as exc:
            result.dead_letters.append(
                (key, self._dead_letter(exc, partition, offset, None, value or b"", "raw", now_ms))
            )
            result.rejected += 1
            return result
        priced: list[dict[str, Any]] = []
        new_ids: list[str] = []
        in_record: set[tuple[str, str]] = set()
        customer_of_record = ""
        for event in events:
            try:
                validate_record(event, now_ms=now_ms, max_future_ms=self.max_future_ms)
                ident = (event["customer_id"], event["event_id"])
                if ident in in_record:
                    result.duplicates += 1
                    continue
                seen = self.dedupe.first_seen(*ident)
                if seen is not None and seen != (partition, offset):
                    result.duplicates += 1
                    continue
                amounts = self.engine.price(event)
            except InputError as exc:
                result.dead_letters.append(
                    (key, self._dead_letter(exc, partition, offset, event, None, "usage_batch", now_ms))
                )
                result.rejected += 1
                continue
            in_record.add(ident)
            new_ids.append(event["event_id"])
            customer_of_record = event["customer_id"]
            event.update(
                cost_picos=amounts.cost_picos,
                charge_picos=amounts.charge_picos,
                currency=amounts.currency,
                price_version=amounts.price_version,
                rate_card=amounts.rate_card,
                priced_at=now_ms,
                source_partition=partition,
                source_offset=offset,
            )
            result.charge_picos += amounts.charge_picos
            priced.append(event)
        if priced:
            result.priced_value = encode_priced_batch(priced)
            result.priced = len(priced)
            result.dedupe_key = DedupeIndex.table_key(partition, offset)
            result.dedupe_value = {"c": customer_of_record, "ids": new_ids, "t": now_ms}
            self.dedupe.load(result.dedupe_key, result.dedupe_value)
        return result


MODELS = [
    ("openai", "gpt-4o", None),
    ("openai", "o3", None),
    ("meta", "llama-3-70b", None),
    ("openai", "gpt-9", None),
    ("anthropic", "claude-3-5-sonnet", "20241022"),
]
TIMES = [
    ms("2024-01-01T00:00:00+00:00"),
    ms("2024-09-30T23:59:59+00:00"),
    ms("2024-10-01T00:00:00+00:00"),
    NOW - 1000,
    NOW + 10**7,
    10**9,
]


@st.composite
def event(draw: Any, customer: str) -> dict[str, Any]:
    provider, model, mv = draw(st.sampled_from(MODELS))
    return {
        "event_id": f"e{draw(st.integers(0, 12))}",
        "occurred_at": draw(st.sampled_from(TIMES)),
        "customer_id": customer,
        "api_key_id": None,
        "project": None,
        "feature": None,
        "user_id": None,
        "session_id": None,
        "gateway": None,
        "provider": provider,
        "model": model,
        "model_version": mv,
        "request_id": None,
        "input_tokens": draw(st.integers(-1, 10**6)),
        "output_tokens": draw(st.integers(0, 99)),
        "cached_input_tokens": draw(st.sampled_from([0, 0, 3])),
        "cache_write_tokens": draw(st.sampled_from([0, 0, 0, 2])),
        "reasoning_tokens": 0,
        "requests": draw(st.sampled_from([0, 1, 1])),
        "labels": {},
    }


@st.composite
def stream(draw: Any) -> list[tuple[int, int, bytes | None]]:
    """(partition, offset, value) records; some replayed, some undecodable."""
    out: list[tuple[int, int, bytes | None]] = []
    for offset in range(draw(st.integers(1, 5))):
        customer = draw(st.sampled_from(["acme", "bigco", "nobody"]))
        kind = draw(st.integers(0, 9))
        value = (
            None
            if kind == 0
            else b"\x00junk"
            if kind == 1
            else encode_usage_batch(draw(st.lists(event(customer), max_size=15)))
        )
        out.append((offset % 2, offset, value))
        if draw(st.integers(0, 3)) == 0:
            out.append(out[draw(st.integers(0, len(out) - 1))])  # replay of an earlier record
    return out


def summary(r: ProcessResult) -> tuple[Any, ...]:
    priced = decode_priced_batch(r.priced_value) if r.priced_value else None
    dead = [(k, decode_dead_letter(v)) for k, v in r.dead_letters]
    return (priced, dead, r.dedupe_key, r.dedupe_value, r.priced, r.rejected, r.duplicates, r.charge_picos)


@settings(max_examples=150, deadline=None)
@given(stream())
def test_batched_process_record_equals_event_by_event(records: list[tuple[int, int, bytes | None]]) -> None:
    engine = PricingEngine.from_book(load_price_book(BOOK))
    new = PricingProcessor(engine, source_topic="t")
    old = EventByEvent(engine, source_topic="t")
    for partition, offset, value in records:
        got = new.process_record(partition, offset, b"k", value, now_ms=NOW)
        want = old.process_record(partition, offset, b"k", value, now_ms=NOW)
        assert summary(got) == summary(want)


class PriceOnly:
    """An engine without price_many: the processor prices event by event."""

    def __init__(self, engine: PricingEngine) -> None:
        self.price = engine.price


def test_engine_without_price_many() -> None:
    engine = PricingEngine.from_book(load_price_book(BOOK))
    evs = [
        {
            "event_id": f"e{i}",
            "occurred_at": NOW - 5,
            "customer_id": "acme",
            "provider": "openai",
            "model": "gpt-4o" if i % 3 else "gpt-9",
            "model_version": None,
            "input_tokens": 10 + i,
            "output_tokens": 1,
            "cached_input_tokens": 0,
            "cache_write_tokens": 0,
            "reasoning_tokens": 0,
            "requests": 1,
            "labels": {},
        }
        for i in range(9)
    ]
    value = encode_usage_batch(evs)
    got = PricingProcessor(PriceOnly(engine), source_topic="t").process_record(0, 1, b"k", value, now_ms=NOW)  # type: ignore[arg-type]
    want = PricingProcessor(engine, source_topic="t").process_record(0, 1, b"k", value, now_ms=NOW)
    assert summary(got) == summary(want)
    assert (got.priced, got.rejected) == (6, 3)
