"""The pricing step as a pure function of (record, price engine, dedupe state): no Kafka here.

The faust agent (``pipeline/app.py``) decodes nothing itself: it hands each ``usage-events``
record's bytes with their source position to :meth:`PricingProcessor.process_record` and sends
what comes back. Keeping this step free of I/O is what lets the benchmarks and the tests drive
it at full speed, and what keeps the agent a thin shell.

Per record::

    decode UsageBatch ─┬─ undecodable ───────────────────────────► one dead letter (raw bytes)
                       └─ for each event, in order (validation and pricing run batched, with the
                          same per-event outcomes):
                            validate ── invalid ─────────────────► dead letter (event re-encoded)
                            dedupe ──── seen in an EARLIER record ► counted as duplicate, dropped
                            price ───── no price / no class rate ─► dead letter
                            └───────────────────────────────────► PricedUsage
    ─► one PricedBatch record (same key) + one dedupe-table entry for this record

Dedupe is by **first-seen source position**. The dedupe table remembers, for every event id, the
(partition, offset) of the usage-events record that first carried it. An event is a duplicate
only if it was first seen in a *different* record. Replaying the *same* record (after a crash,
before its offset was committed) re-emits its events instead of swallowing them, so a dedupe
table that ran ahead of the priced output can never lose an event; a table that fell behind
(faust's changelog is not crash-exact here, see shared notes) can only let a duplicate through,
which every consumer of priced usage drops by ``(customer_id, event_id)`` itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from meterline.core.errors import InputError, SchemaError
from pipeline.dedupe import DedupeIndex
from schemas.codec import decode_usage_batch, encode_dead_letter, encode_priced_batch, encode_usage_batch
from schemas.validation import validate_records

DAY_MS = 86_400_000
#: Largest ``usage-priced`` value sent as one record. Pricing adds fields to every event, so a
#: usage record just under the broker's limit (1 MB by default) can price into one above it; such
#: a batch is split into several records (consumers dedupe by event id; the credit agent and the
#: sink take them as they take any record).
MAX_PRICED_BYTES = 900_000
#: Largest payload kept in a dead letter; a bigger one (a whole oversized record) is left out (the
#: dead letter names the source position, where the record still is) so the dead letter itself
#: always fits in a Kafka message.
MAX_DEAD_PAYLOAD_BYTES = 256_000


class PriceEngine(Protocol):
    """What the processor needs from ``meterline.core.pricing``: price one decoded event dict.

    An engine that also has ``price_many(records) -> list[PricedAmounts | UnpriceableEvent]``
    (as :class:`meterline.core.pricing.PricingEngine` does) is given the whole record at once.
    """

    def price(self, record: dict[str, Any]) -> Any:  # returns PricedAmounts
        ...


_DUPLICATE = object()  # plan marker: first seen in an earlier record


@dataclass(slots=True)
class ProcessResult:
    """What the agent must send for one source record, and the dedupe entry to store."""

    priced_value: bytes | None = None
    priced_extra: list[bytes] = field(default_factory=list)  # further parts of a batch split for size
    dead_letters: list[tuple[bytes | None, bytes]] = field(default_factory=list)
    dedupe_key: str | None = None
    dedupe_value: dict[str, Any] | None = None
    priced: int = 0
    rejected: int = 0
    duplicates: int = 0
    charge_picos: int = 0
    reasons: list[str] = field(default_factory=list)  # reason_code of each dead letter (for metrics)
    occurred_ms: list[int] = field(default_factory=list)  # occurred_at of each priced event (for metrics)
    priced_at_ms: int = 0


class PricingProcessor:
    """Decode → validate → dedupe → price for one usage-events record at a time."""

    def __init__(
        self,
        engine: PriceEngine,
        *,
        source_topic: str,
        dedupe_window_days: int = 35,
        max_future_ms: int = 300_000,
    ) -> None:
        self.engine = engine
        self.source_topic = source_topic
        self.max_future_ms = max_future_ms
        self.dedupe = DedupeIndex(dedupe_window_days * DAY_MS)

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
            result.reasons.append(exc.reason_code)
            return result

        # 1. validate the whole batch, 2. drop events first seen in an earlier record, 3. price
        # the rest in one call, 4. walk the events in order: within-record duplicates, dead
        # letters and priced events come out exactly as an event-by-event loop gives them.
        verdicts = validate_records(events, now_ms=now_ms, max_future_ms=self.max_future_ms)
        here = (partition, offset)
        # One vectorised index probe for the valid events (validation guarantees both ids are str).
        valid = [(e["customer_id"], e["event_id"]) for e, invalid in zip(events, verdicts) if invalid is None]
        seen_of = iter(self.dedupe.first_seen_many(valid))
        plan: list[Any] = []  # per event: its InvalidEvent, _DUPLICATE, or its index in to_price
        to_price: list[dict[str, Any]] = []
        for event, invalid in zip(events, verdicts):
            if invalid is not None:
                plan.append(invalid)
                continue
            seen = next(seen_of)
            if seen is not None and seen != here:
                plan.append(_DUPLICATE)
                continue
            plan.append(len(to_price))
            to_price.append(event)
        amounts_of = self._price_all(to_price)

        priced: list[dict[str, Any]] = []
        new_ids: list[str] = []
        in_record: set[tuple[str, str]] = set()
        customer_of_record = ""
        charge_total = 0
        for event, step in zip(events, plan):
            if step is _DUPLICATE:
                result.duplicates += 1
                continue
            if type(step) is not int:
                result.dead_letters.append(
                    (key, self._dead_letter(step, partition, offset, event, None, "usage_batch", now_ms))
                )
                result.rejected += 1
                result.reasons.append(step.reason_code)
                continue
            customer, event_id = ident = (event["customer_id"], event["event_id"])
            if ident in in_record:
                result.duplicates += 1
                continue
            amounts = amounts_of[step]
            if isinstance(amounts, InputError):
                result.dead_letters.append(
                    (key, self._dead_letter(amounts, partition, offset, event, None, "usage_batch", now_ms))
                )
                result.rejected += 1
                result.reasons.append(amounts.reason_code)
                continue
            in_record.add(ident)
            new_ids.append(event_id)
            customer_of_record = customer
            cost, charge, currency, version, card = amounts
            event["cost_picos"] = cost
            event["charge_picos"] = charge
            event["currency"] = currency
            event["price_version"] = version
            event["rate_card"] = card
            event["priced_at"] = now_ms
            event["source_partition"] = partition
            event["source_offset"] = offset
            charge_total += charge
            priced.append(event)
        result.charge_picos = charge_total

        if priced:
            parts = split_priced(priced)
            result.priced_value, result.priced_extra = parts[0], parts[1:]
            result.priced = len(priced)
            result.occurred_ms = [e["occurred_at"] for e in priced]
            result.priced_at_ms = now_ms
            result.dedupe_key = DedupeIndex.table_key(partition, offset)
            result.dedupe_value = {"c": customer_of_record, "ids": new_ids, "t": now_ms}
            self.dedupe.load(result.dedupe_key, result.dedupe_value)
        return result

    def _price_all(self, events: list[dict[str, Any]]) -> list[Any]:
        """PricedAmounts or the InputError pricing raised, per event (price_many when the engine has it)."""
        price_many = getattr(self.engine, "price_many", None)
        if price_many is not None:
            try:
                return price_many(events)  # type: ignore[no-any-return]
            except InputError:  # not an UnpriceableEvent (returned in place): find whose, one by one
                pass
        out: list[Any] = []
        for event in events:
            try:
                out.append(self.engine.price(event))
            except InputError as exc:
                out.append(exc)
        return out

    def _dead_letter(
        self,
        exc: InputError,
        partition: int,
        offset: int,
        event: dict[str, Any] | None,
        raw: bytes | None,
        payload_format: str,
        now_ms: int,
    ) -> bytes:
        payload = raw if raw is not None else b""
        if event is not None:
            try:
                payload = encode_usage_batch([event])
            except Exception:
                payload, payload_format = repr(event).encode("utf-8", "replace"), "repr"
        reason = exc.message
        if len(payload) > MAX_DEAD_PAYLOAD_BYTES:
            reason += f" (payload of {len(payload)} bytes left out: read it at the source position)"
            payload = b""
        occurred = event.get("occurred_at") if event else None
        return encode_dead_letter(
            {
                "reason_code": exc.reason_code,
                "reason": reason,
                "field": exc.field,
                "source_topic": self.source_topic,
                "source_partition": partition,
                "source_offset": offset,
                "customer_id": _str_or_none(event, "customer_id"),
                "event_id": _str_or_none(event, "event_id"),
                "occurred_at": occurred if isinstance(occurred, int) else None,
                "payload": payload,
                "payload_format": payload_format,
                "failed_at": now_ms,
            }
        )


def split_priced(priced: list[dict[str, Any]], limit: int = MAX_PRICED_BYTES) -> list[bytes]:
    """``priced`` as one PricedBatch value, or halved (in order) until every part is ≤ ``limit``."""
    value = encode_priced_batch(priced)
    if len(value) <= limit or len(priced) == 1:
        return [value]
    half = len(priced) // 2
    return split_priced(priced[:half], limit) + split_priced(priced[half:], limit)


def undecodable_dead_letter(
    source_topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    exc: BaseException,
    now_ms: int,
) -> bytes:
    """The dead letter of a record a consumer could not decode (reason ``undecodable``, or the
    error's own reason code), with its bytes, so it lands in ``usage_rejected`` and can be looked at."""
    return _whole_record_dead_letter(
        source_topic,
        partition,
        offset,
        key,
        value,
        getattr(exc, "reason_code", None) or "undecodable",
        f"could not decode the record: {exc}",
        now_ms,
    )


def unforeseen_dead_letter(
    source_topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    exc: BaseException,
    now_ms: int,
    payload_format: str = "raw",
) -> bytes:
    """The dead letter of a whole record whose processing raised something no rule foresaw (a bug,
    a state the code cannot read). Reason ``internal_error`` with the exception; the record's
    bytes are kept (up to MAX_DEAD_PAYLOAD_BYTES) so it can be re-driven once fixed."""
    return _whole_record_dead_letter(
        source_topic,
        partition,
        offset,
        key,
        value,
        "internal_error",
        f"unforeseen error while processing the record: {exc!r}",
        now_ms,
        payload_format,
    )


def _whole_record_dead_letter(
    source_topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    reason_code: str,
    reason: str,
    now_ms: int,
    payload_format: str = "raw",
) -> bytes:
    payload = value or b""
    reason = reason[:2000]
    if len(payload) > MAX_DEAD_PAYLOAD_BYTES:
        reason += f" (payload of {len(payload)} bytes left out: read it at the source position)"
        payload = b""
    customer = key.decode("utf-8", "replace")[:512] if key else None
    return encode_dead_letter(
        {
            "reason_code": reason_code,
            "reason": reason,
            "field": None,
            "source_topic": source_topic,
            "source_partition": partition,
            "source_offset": offset,
            "customer_id": customer,
            "event_id": None,
            "occurred_at": None,
            "payload": payload,
            "payload_format": payload_format,
            "failed_at": now_ms,
        }
    )


def _str_or_none(event: dict[str, Any] | None, name: str) -> str | None:
    if not event:
        return None
    value = event.get(name)
    return value if isinstance(value, str) else None


def iter_table_entries(items: Iterable[tuple[Any, Any]]) -> Iterable[tuple[str, dict[str, Any]]]:
    """Normalise faust table items (keys may come back as str or bytes) for :meth:`DedupeIndex.load`."""
    for key, value in items:
        if isinstance(key, bytes):
            key = key.decode()
        if value is not None:
            yield str(key), value
