"""End to end on real parts: gateway events → faust pricing worker → usage-priced → sink → chDB.

The expected money is computed here, independently of meterline.core.pricing, from the list prices
the pricing issue names (per million input/output tokens) and plain Decimal arithmetic.
"""

from __future__ import annotations

import random
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from schemas.models import UsageEvent

pytestmark = pytest.mark.broker

# (provider, model, version) -> per-million rates {class: Decimal}; the independent oracle.
LIST = {
    ("openai", "gpt-4o", None): {"input": "5.00", "output": "15.00", "cached_input": "2.50"},
    ("anthropic", "claude-3-5-sonnet", "20241022"): {
        "input": "3.00",
        "output": "15.00",
        "cached_input": "0.30",
        "cache_write": "3.75",
    },
    ("google", "gemini-1.5-pro", None): {"input": "3.50", "output": "10.50", "cached_input": "0.875"},
    ("meta", "llama-3.1-405b", None): {"input": "2.00", "output": "6.00"},
    ("mistral", "mistral-large-2", None): {"input": "2.00", "output": "6.00"},
    ("mistral", "mixtral-8x22b", None): {"input": "1.20", "output": "1.20"},
    ("meta", "llama-3-70b", None): {"input": "0.59", "output": "0.79"},
}
MARKUP = {"acme": Decimal("1.20")}
CUSTOMERS = ["acme", "globex", "initech", "umbrella", "hooli"]


def expected_cost(ev: UsageEvent, rates: dict[str, str]) -> Decimal:
    r = {k: Decimal(v) for k, v in rates.items()}
    total = Decimal(ev.input_tokens) * r["input"] + Decimal(ev.output_tokens + ev.reasoning_tokens) * r["output"]
    if ev.cached_input_tokens:
        total += Decimal(ev.cached_input_tokens) * r["cached_input"]
    if ev.cache_write_tokens:
        total += Decimal(ev.cache_write_tokens) * r["cache_write"]
    return total / Decimal(1_000_000)


def make_events(rng: random.Random, n: int, *, at: datetime) -> list[UsageEvent]:
    events = []
    for _ in range(n):
        key = rng.choice(list(LIST))
        provider, model, version = key
        rates = LIST[key]
        events.append(
            UsageEvent(
                event_id=str(uuid.UUID(int=rng.getrandbits(128))),
                occurred_at=at - timedelta(seconds=rng.randint(0, 3600)),
                customer_id=rng.choice(CUSTOMERS),
                project=rng.choice(["alpha", "beta"]),
                feature="chat",
                provider=provider,
                model=model,
                model_version=version,
                input_tokens=rng.randint(1, 200_000),
                output_tokens=rng.randint(0, 8_000),
                cached_input_tokens=rng.randint(0, 50_000) if "cached_input" in rates else 0,
                cache_write_tokens=rng.randint(0, 9_999) if "cache_write" in rates else 0,
            )
        )
    return events


def totals_by_customer(rows: list[tuple]) -> dict[str, tuple[Decimal, Decimal, int]]:
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def test_priced_sums_exact_replays_collapse_price_change_and_rejects(pipeline) -> None:
    rng = random.Random(20261122)
    now = datetime.now(UTC)
    pipeline.publish_prices()
    pipeline.start_worker()

    events = make_events(rng, 600, at=now - timedelta(hours=2))
    pipeline.produce(events)
    pipeline.wait_priced(len(events))

    # 1. usage_priced equals the independent Decimal computation, per customer, to the last digit.
    want: dict[str, list[Decimal]] = defaultdict(lambda: [Decimal(0), Decimal(0), 0])
    for ev in events:
        cost = expected_cost(ev, LIST[(ev.provider, ev.model, ev.model_version)])
        want[ev.customer_id][0] += cost
        want[ev.customer_id][1] += cost * MARKUP.get(ev.customer_id, Decimal(1))
        want[ev.customer_id][2] += 1
    got = totals_by_customer(
        pipeline.query("SELECT customer_id, sum(cost), sum(charge), count() FROM usage_priced GROUP BY customer_id")
    )
    assert got == {c: (v[0], v[1], v[2]) for c, v in want.items()}

    # 2. The same events produced again change no total; a marker per customer proves the
    #    replays were processed (per-customer order: the marker comes after them).
    pipeline.produce(events)
    markers = [
        UsageEvent(
            event_id=f"marker-{c}",
            occurred_at=now - timedelta(minutes=5),
            customer_id=c,
            provider="meta",
            model="llama-3-70b",
            input_tokens=1_000_000,
            output_tokens=1_000_000,
        )
        for c in CUSTOMERS
    ]
    pipeline.produce(markers)
    pipeline.wait_priced(len(events) + len(markers))
    got_after = totals_by_customer(
        pipeline.query(
            "SELECT customer_id, sum(cost), sum(charge), count() FROM usage_priced WHERE event_id NOT LIKE 'marker-%' GROUP BY customer_id"
        )
    )
    assert got_after == got
    raw_count = pipeline.query("SELECT count() FROM usage_priced")[0][0]
    assert raw_count == len(events) + len(markers), "the sink let a replayed event into usage_priced"

    # 3. A price change published while the worker runs takes effect at effective_from, and a
    #    late event from before it keeps the old price.
    change_at = (datetime.now(UTC) + timedelta(seconds=3)).replace(microsecond=0)
    pipeline.publish_prices(
        {
            "currency": "USD",
            "prices": [
                {
                    "provider": "openai",
                    "model": "gpt-4o",
                    "effective_from": change_at.isoformat().replace("+00:00", "Z"),
                    "per_million": {"input": "2.50", "output": "10.00", "cached_input": "1.25"},
                }
            ],
        }
    )
    time.sleep(max(0.0, (change_at - datetime.now(UTC)).total_seconds()) + 0.5)
    after = UsageEvent(
        event_id="after-change",
        occurred_at=change_at + timedelta(milliseconds=1),
        customer_id="globex",
        provider="openai",
        model="gpt-4o",
        input_tokens=1_000_000,
        output_tokens=1_000_000,
        cached_input_tokens=1_000_000,
        request_id="req-after",
        labels={"team": "search"},
    )
    at_boundary = after.model_copy(update={"event_id": "at-change", "occurred_at": change_at})
    late = after.model_copy(update={"event_id": "late", "occurred_at": change_at - timedelta(milliseconds=1)})
    unknown = after.model_copy(update={"event_id": "unknown-model", "model": "gpt-7-preview"})
    pipeline.produce([after, at_boundary, late, unknown])
    pipeline.wait_priced(len(events) + len(markers) + 3)
    priced = dict(
        pipeline.query(
            "SELECT event_id, cost FROM usage_priced WHERE event_id IN ('after-change', 'at-change', 'late')"
        )
    )
    assert priced == {"after-change": Decimal("13.75"), "at-change": Decimal("13.75"), "late": Decimal("22.50")}
    assert pipeline.query("SELECT request_id, labels['team'] FROM usage_priced WHERE event_id = 'after-change'") == [
        ("req-after", "search")
    ]

    # 4. The unknown model is dead-lettered with its reason, never priced at $0.
    pipeline.wait_for(
        "the rejected event",
        lambda: pipeline.query("SELECT count() FROM usage_rejected WHERE event_id = 'unknown-model'")[0][0] == 1,
    )
    reason = pipeline.query(
        "SELECT reason_code, customer_id FROM usage_rejected FINAL WHERE event_id = 'unknown-model'"
    )
    assert reason == [("unknown_model", "globex")]
    assert pipeline.query("SELECT count() FROM usage_priced WHERE event_id = 'unknown-model'")[0][0] == 0

    # 5. Rollups equal raw sums exactly.
    raw = pipeline.query(
        "SELECT customer_id, model, toDate(occurred_at) d, sum(cost), sum(charge), sum(input_tokens), count() "
        "FROM usage_priced GROUP BY customer_id, model, d ORDER BY customer_id, model, d"
    )
    daily = pipeline.query(
        "SELECT customer_id, model, day, sum(cost), sum(charge), sum(input_tokens), sum(events) "
        "FROM usage_daily GROUP BY customer_id, model, day ORDER BY customer_id, model, day"
    )
    assert [tuple(r) for r in daily] == [tuple(r) for r in raw]
