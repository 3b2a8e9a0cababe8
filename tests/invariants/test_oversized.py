"""Issue #19.1: no customer's activity may grow a message past Kafka's limit (1 MB by default).

The cause found: the credit agent's table value (one Kafka message per write) carried the
customer's remembered event ids (up to 10,000 of up to 128 characters each) and an outbox of
every undelivered effect of the customer; 15,000 events of one customer made a 1,088,109-byte
value and the worker died with MessageSizeTooLargeError (then crash-looped on a durable broker).
Now dedupe ids are packed fixed-size digests, the outbox is bounded by waiting for deliveries,
open holds are capped, entries travel in bounded messages, a priced batch over the limit is split.

Each scenario runs the real parts (Tansu, a faust worker with both agents, both ClickHouse sinks)
and checks the pricing + credit invariants (every event priced once, Σ debits + Σ overage = Σ
charge per customer, each event debited once, statuses), and that no ``ledgers`` changelog value
came near the limit.
"""

from __future__ import annotations

import random
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from devtools.verify import ChaosStack, Expected, make_events, plan_credits
from devtools.verify.oracle import CUSTOMERS
from meterline.stack.kafka import read_topic
from schemas.codec import encode_usage_batch, event_to_record
from schemas.models import MAX_ID_LEN, MAX_LABEL_LEN, MAX_LABELS
from tests.invariants.helpers import assert_credit_invariant

DAY_MS = 86_400_000
KAFKA_LIMIT = 1_000_000


def _one_customer(events: list[Any], customer: str) -> list[Any]:
    return [e.model_copy(update={"customer_id": customer}) for e in events]


def _setup_credits(chaos: ChaosStack, rng: random.Random, expected: Expected, customers: list[str]) -> None:
    plans = plan_credits(rng, {c: t[2] for c, t in expected.per_customer().items()}, customers=customers)
    expected.credit_plans = {p.customer_id: p for p in plans}
    chaos.send_commands([m for p in plans for m in p.commands(time.time_ns() // 1_000_000 - DAY_MS)])
    grants = sum(1 for p in plans if p.grant)
    assert chaos.wait_ledger(0, grants, timeout=90, quiet=0.2), "grants not in the ledger"


def _largest_ledger_value(chaos: ChaosStack) -> int:
    topic = f"{chaos.settings.topic_prefix}pricing-ledgers-changelog"
    return max((len(m.value() or b"") for m in read_topic(chaos.bootstrap, topic, timeout=30)), default=0)


@pytest.mark.timeout(900)
def test_one_customer_100k_events_in_one_burst(chaos: ChaosStack, rng: random.Random, seed: int) -> None:
    """100,000 events of ONE customer (with 500 re-sent ones) in one burst: every event priced
    once, the balance exact to the pico-unit, the worker alive, every value far below 1 MB."""
    busy = CUSTOMERS[0]
    events = _one_customer(make_events(rng, 100_000, prefix="busy-"), busy)
    expected = Expected()
    expected.add_priced(events)
    chaos.start_sink()
    chaos.start_ledger_sink()
    worker = chaos.start_worker()
    _setup_credits(chaos, rng, expected, [busy])

    chaos.produce(events + rng.sample(events, 500))
    assert_credit_invariant(chaos, expected, seed, timeout=900)
    assert worker.alive(), worker.log_tail()
    (n,) = chaos.query("SELECT count() FROM usage_priced FINAL WHERE customer_id = {c:String}", {"c": busy})[0]
    assert n == 100_000
    assert _largest_ledger_value(chaos) < KAFKA_LIMIT * 9 // 10


@pytest.mark.timeout(900)
def test_customer_with_10k_undelivered_effects(chaos: ChaosStack, rng: random.Random, seed: int) -> None:
    """A customer with 60 grants (so every status message is ~20 KB) sends 5,000 single-event
    records in one burst: 10,000 effect messages (debits + statuses, ~100 MB) are produced faster
    than they are delivered. The outbox (undelivered effects in the customer's value) stays
    bounded; totals exact."""
    busy = CUSTOMERS[1]
    events = _one_customer(make_events(rng, 5_000, prefix="fx-"), busy)
    expected = Expected()
    expected.add_priced(events)
    chaos.start_sink()
    chaos.start_ledger_sink()
    worker = chaos.start_worker()
    _setup_credits(chaos, rng, expected, [busy])
    at = time.time_ns() // 1_000_000 - DAY_MS
    extra = [
        {
            "type": "grant",
            "command_id": f"small-{i}",
            "customer_id": busy,
            "at_ms": at,
            "grant_id": f"small-{i}-{'g' * 100}",
            "amount": "0.000001",
            "currency": "usd",
            "effective_at_ms": at,
            "expires_at_ms": None,
            "priority": 90,
            "category": "promotional",
            "scope": None,
        }
        for i in range(60)
    ]
    chaos.send_commands(extra)
    plan = expected.credit_plans[busy]
    assert chaos.wait_ledger(0, 60 + (1 if plan.grant else 0), timeout=90, quiet=0.2)
    # The oracle's plan knows one grant: the 60 tiny ones (unscoped, no expiry) add to it.
    expected.credit_plans[busy] = replace(plan, grant=(plan.grant or Decimal(0)) + Decimal("0.000060"))
    from meterline.stack.producer import UsageProducer

    one_per_record = UsageProducer(
        chaos.bootstrap,
        chaos.settings.topic("usage-events"),
        max_batch_events=1,
        linger_ms=0,
        max_pending_records=20_000,
    )
    try:
        for e in events:
            one_per_record.send(e)
        one_per_record.flush(60)
    finally:
        one_per_record.close()
    assert_credit_invariant(chaos, expected, seed, timeout=900)
    assert worker.alive(), worker.log_tail()
    assert _largest_ledger_value(chaos) < KAFKA_LIMIT * 9 // 10


def _max_labels(i: int) -> dict[str, str]:
    return {f"{i:04d}-{k:02d}-".ljust(MAX_LABEL_LEN, "k"): f"{k}".ljust(MAX_LABEL_LEN, "v") for k in range(MAX_LABELS)}


def test_events_with_the_largest_labels_and_ids_the_contract_allows(
    chaos: ChaosStack, rng: random.Random, seed: int
) -> None:
    """Events with 64 labels of 256-character keys and values and 128-character ids: through the
    normal producer (which splits records under 900 KB) and as one raw record just under 1 MB,
    which pricing makes larger (it adds fields to every event) and must split, not die on."""
    customer = CUSTOMERS[2]
    now = datetime.now(UTC)
    base = make_events(rng, 120, now=now)
    events = [
        e.model_copy(
            update={
                "customer_id": customer,
                "event_id": f"L{i:05d}".ljust(MAX_ID_LEN, "x"),
                "labels": _max_labels(i),
                "project": "p".ljust(MAX_ID_LEN, "p"),
                "api_key_id": "k".ljust(MAX_ID_LEN, "k"),
                "request_id": f"r{i}".ljust(MAX_ID_LEN, "r"),
                "user_id": "u".ljust(MAX_ID_LEN, "u"),
                "session_id": "s".ljust(MAX_ID_LEN, "s"),
                "feature": "f".ljust(MAX_ID_LEN, "f"),
                "gateway": "g".ljust(MAX_ID_LEN, "g"),
                "occurred_at": now - timedelta(minutes=5),
            }
        )
        for i, e in enumerate(base)
    ]
    expected = Expected()
    expected.add_priced(events)
    chaos.start_sink()
    chaos.start_ledger_sink()
    worker = chaos.start_worker()
    _setup_credits(chaos, rng, expected, [customer])

    normal, raw = events[:60], events[60:]
    chaos.produce(normal)
    records = [event_to_record(e) for e in raw]
    while len(encode_usage_batch(records)) > 990_000:
        records.pop()
    value = encode_usage_batch(records)
    assert len(value) > 900_000  # bigger than our producer ever makes, legal for any Kafka producer
    expected = Expected(credit_plans=expected.credit_plans)
    expected.add_priced(normal + raw[: len(records)])
    chaos.produce_raw([(customer.encode(), value)])
    assert_credit_invariant(chaos, expected, seed, timeout=600)
    assert worker.alive(), worker.log_tail()
    labels = chaos.query(
        "SELECT labels FROM usage_priced FINAL WHERE event_id = {e:String}", {"e": events[0].event_id}
    )[0][0]
    assert dict(labels) == events[0].labels
    assert _largest_ledger_value(chaos) < KAFKA_LIMIT
