"""Plan versions and subscription facts from Kafka into ClickHouse ``plans`` / ``subscription_events``.

Both sinks ARE :class:`pipeline.sink.ClickHouseSink` (same consumer loop, same flush contract:
dedupe against what is stored → one insert → synchronous commit; same failure paths), like
:class:`pipeline.credits.sink.LedgerEntrySink`. Only the row mapping and the dedupe target differ.
A record that does not decode or validate is not dropped: it becomes a ``usage_rejected`` row
with its bytes and the reason (the topics are written only by ``meterline plans``, which
validates first, so this is a defect report, not a data path).

Column positions keep the parent's key positions (id at 0, owner at 2), so the parent's
in-buffer dedupe works unchanged: ``(plan_id, version_key)`` and ``(customer_id, event_id)``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from confluent_kafka import Message

from meterline.core.errors import InputError
from meterline.core.money import to_decimal
from meterline.core.plans import PlanVersion, SubscriptionEvent, decode_plan_record, parse_event
from pipeline import sink as _sink
from pipeline.sink import ClickHouseSink

__all__ = [
    "PLAN_COLUMNS",
    "SUBSCRIPTION_COLUMNS",
    "PlanCatalogSink",
    "SubscriptionSink",
    "plan_row",
    "subscription_row",
]

PLAN_COLUMNS: tuple[str, ...] = (
    "version_key",
    "effective_from",
    "plan_id",
    "version",
    "plan_hash",
    "name",
    "interval",
    "currency",
    "fee",
    "overage_kind",
    "overage_unit",
    "overage_per_million",
    "on_exhausted",
    "cap",
    "minimum_commitment",
    "allowance_ids",
    "allowance_units",
    "allowance_included",
    "definition",
)
SUBSCRIPTION_COLUMNS: tuple[str, ...] = (
    "event_id",
    "at",
    "customer_id",
    "type",
    "plan_id",
    "version",
    "at_period_end",
)
assert PLAN_COLUMNS.index("plan_id") == SUBSCRIPTION_COLUMNS.index("customer_id") == _sink._P_CUSTOMER
assert PLAN_COLUMNS.index("version_key") == SUBSCRIPTION_COLUMNS.index("event_id") == _sink._P_EVENT


def _units(picos: int) -> Decimal:
    return to_decimal(picos)


def _utc(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def plan_row(v: PlanVersion) -> tuple[Any, ...]:
    """One plan version -> a ``plans`` row (exact Decimal amounts)."""
    ov = v.overage
    return (
        v.key,
        _utc(v.effective_from),
        v.plan_id,
        v.version,
        v.plan_hash,
        v.name or "",
        v.interval,
        v.currency,
        _units(v.fee),
        ov.kind,
        ov.unit,
        Decimal(ov.rate_picos).scaleb(-6) if ov.kind == "per_million" else Decimal(0),
        v.on_exhausted,
        _units(v.cap or 0),
        _units(v.minimum_commitment or 0),
        [a.id for a in v.allowances],
        [a.unit for a in v.allowances],
        [Decimal(a.included) if a.unit == "tokens" else _units(a.included) for a in v.allowances],
        json.dumps(v.to_json(), sort_keys=True, separators=(",", ":")),
    )


def subscription_row(ev: SubscriptionEvent) -> tuple[Any, ...]:
    """One subscription fact -> a ``subscription_events`` row."""
    return (ev.event_id, _utc(ev.at), ev.customer_id, ev.type, ev.plan_id or "", ev.version or 0, int(ev.at_period_end))


class _FactSink(ClickHouseSink):
    """A ``ClickHouseSink`` for one JSON fact topic; subclasses say how a record becomes a row."""

    key_columns: tuple[str, str] = ("", "")  # (owner, id) columns for the stored-row lookup

    def __init__(
        self, bootstrap: str, group_id: str, topic: str, clickhouse: Any | Callable[[], Any], **kwargs: Any
    ) -> None:
        super().__init__(
            bootstrap,
            group_id,
            topic,
            None,
            clickhouse,
            decode_priced=lambda b: b,
            decode_dead_letter=lambda b: b,
            **kwargs,
        )

    def _row(self, msg: Message) -> tuple[Any, ...]:
        raise NotImplementedError

    def _buffer(self, msg: Message) -> None:
        try:
            rows, rejected = [self._row(msg)], []
        except InputError as exc:
            rows, rejected = [], [_sink._undecodable_row(msg, exc)]
        except (KeyError, TypeError, ValueError, ArithmeticError, UnicodeDecodeError) as exc:
            rows, rejected = [], [_sink._undecodable_row(msg, exc)]
        self._priced.extend(rows)
        self._rejected.extend(rejected)
        self._offsets[(msg.topic(), msg.partition())] = msg.offset()
        self.messages_consumed += 1
        if self._first_buffered is None:
            self._first_buffered = time.monotonic()

    def _drop_stored_priced(self, client: Any, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        if not rows:
            return rows
        owner, ident = self.key_columns
        keys = [(r[_sink._P_CUSTOMER], r[_sink._P_EVENT]) for r in rows]
        result = client.query(
            f"SELECT {owner}, {ident} FROM {self.main_table} WHERE {owner} IN {{owners:Array(String)}}"
            f" AND ({owner}, {ident}) IN {{keys:Array(Tuple(String, String))}}",
            parameters={"owners": sorted({k[0] for k in keys}), "keys": keys},
        )
        stored = {(str(o), str(i)) for o, i in result.result_rows}
        return [r for r, k in zip(rows, keys, strict=True) if k not in stored]


class PlanCatalogSink(_FactSink):
    """``plans`` topic -> ``plans`` table (a tombstone is skipped: versions are never deleted here)."""

    main_table = "plans"
    main_columns = PLAN_COLUMNS
    key_columns = ("plan_id", "version_key")

    def _buffer(self, msg: Message) -> None:
        if msg.value() is None:  # tombstone: nothing to land, just move on
            self._offsets[(msg.topic(), msg.partition())] = msg.offset()
            self.messages_consumed += 1
            if self._first_buffered is None:
                self._first_buffered = time.monotonic()
            return
        super()._buffer(msg)

    def _row(self, msg: Message) -> tuple[Any, ...]:
        key = (msg.key() or b"").decode("utf-8")
        return plan_row(decode_plan_record(key, msg.value() or b""))


class SubscriptionSink(_FactSink):
    """``subscriptions`` topic -> ``subscription_events``."""

    main_table = "subscription_events"
    main_columns = SUBSCRIPTION_COLUMNS
    key_columns = ("customer_id", "event_id")

    def _row(self, msg: Message) -> tuple[Any, ...]:
        return subscription_row(parse_event(msg.value() or b""))
