"""Builders shared by the credit tests: priced events, command messages, the pure-replay oracle."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from meterline.core.ledger import CustomerLedger, LedgerEntry, fold_entries, parse_amount
from pipeline.credits.processor import ALERTS, ENTRIES, REPLIES, STATUS, CreditProcessor
from schemas.codec import encode_priced_batch
from schemas.credits import encode_message

PRICED, COMMANDS, SUBSCRIPTIONS = "p.usage-priced", "p.ledger-commands", "p.subscriptions"


def priced_event(
    customer: str,
    event_id: str,
    charge: str,
    occurred_ms: int,
    *,
    request_id: str | None = None,
    currency: str = "usd",
    provider: str = "openai",
    model: str = "gpt-4o",
) -> dict[str, Any]:
    picos = parse_amount(charge)
    return {
        "event_id": event_id,
        "occurred_at": occurred_ms,
        "customer_id": customer,
        "api_key_id": None,
        "project": None,
        "feature": None,
        "user_id": None,
        "session_id": None,
        "gateway": None,
        "provider": provider,
        "model": model,
        "model_version": None,
        "request_id": request_id,
        "input_tokens": 1000,
        "output_tokens": 100,
        "cached_input_tokens": 0,
        "cache_write_tokens": 0,
        "reasoning_tokens": 0,
        "requests": 1,
        "labels": {},
        "cost_picos": picos,
        "charge_picos": picos,
        "currency": currency,
        "price_version": "v1",
        "rate_card": "",
        "priced_at": occurred_ms,
        "source_partition": 0,
        "source_offset": 0,
    }


def priced_record(events: list[dict[str, Any]]) -> bytes:
    return encode_priced_batch(events)


def grant_msg(
    customer: str,
    gid: str,
    amount: str,
    at_ms: int,
    *,
    expires: int | None = None,
    priority: int = 50,
    kind: str = "grant",
    effective: int | None = None,
    category: str = "paid",
) -> dict[str, Any]:
    return {
        "type": kind,
        "command_id": f"{kind}:{gid}",
        "customer_id": customer,
        "at_ms": at_ms,
        "grant_id": gid,
        "amount": amount,
        "currency": "usd",
        "effective_at_ms": at_ms if effective is None else effective,
        "expires_at_ms": expires,
        "priority": priority,
        "category": category,
        "scope": None,
    }


class Replay:
    """The oracle: feed the same records to a CreditProcessor with an in-memory dict as the table,
    exactly once, in order. Returns final ledgers and every entry emitted."""

    def __init__(
        self,
        pricer: Any = None,
        priced_topic: str = PRICED,
        commands_topic: str = COMMANDS,
        *,
        subscriptions_topic: str = SUBSCRIPTIONS,
        plans: Any = None,
    ) -> None:
        self.proc = CreditProcessor(
            pricer,
            priced_topic=priced_topic,
            commands_topic=commands_topic,
            subscriptions_topic=subscriptions_topic,
            plans=plans,
        )
        self.alerts: dict[str, dict[str, Any]] = {}
        self.table: dict[str, dict[str, Any]] = {}
        self.entries: dict[str, dict[str, Any]] = {}
        self.offsets: dict[tuple[str, int], int] = {}
        self.statuses: dict[str, dict[str, Any]] = {}
        self.replies: dict[str, dict[str, Any]] = {}

    def feed(self, topic: str, partition: int, key: str, value: bytes, ts_ms: int) -> Any:
        off = self.offsets.get((topic, partition), 0)
        self.offsets[(topic, partition)] = off + 1
        out = self.proc.process(topic, partition, off, ts_ms, key.encode(), value, self.table.get)
        import json

        for name, _k, v, _same in out.sends:
            if name == ENTRIES:
                for e in json.loads(v)["entries"]:
                    self.entries[e["entry_id"]] = e
            elif name == STATUS:
                self.statuses[_k.decode()] = json.loads(v)
            elif name == REPLIES:
                self.replies[_k.decode()] = json.loads(v)
            elif name == ALERTS:
                doc = json.loads(v)
                self.alerts[doc["alert_id"]] = doc
        if out.state is not None and out.customer_id is not None:
            self.table[out.customer_id] = out.state
        return out

    def ledger(self, customer: str) -> CustomerLedger:
        return CustomerLedger.from_dict(self.table[customer])


def fold(entries: Iterable[LedgerEntry]) -> dict[str, Any]:
    return fold_entries(entries)


def enc(msg: dict[str, Any]) -> bytes:
    return encode_message(msg)
