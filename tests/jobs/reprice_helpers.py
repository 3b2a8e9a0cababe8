"""Shared pieces of the re-rating tests: two catalogs (as published, and as corrected after the fact)
and seeded priced usage inserted with the sink's own row mapping, priced by the real engine."""

from __future__ import annotations

import random
from decimal import Decimal
from typing import Any

from meterline.core.money import to_decimal
from meterline.core.pricing import PricingEngine, load_price_book
from pipeline.sink import PRICED_COLUMNS, priced_row

T0 = 1_764_547_200  # 2025-12-01T00:00:00Z
PERIOD = "2025-12"

# As published: gpt-4o at 5/15 from Nov, claude with a cache-write rate, acme +20 %, globex list price.
BOOK_BEFORE: dict[str, Any] = {
    "currency": "USD",
    "prices": [
        {
            "provider": "openai",
            "model": "gpt-4o",
            "effective_from": "2025-11-01T00:00:00Z",
            "per_million": {"input": "5.00", "output": "15.00", "cached_input": "2.50"},
        },
        {
            "provider": "anthropic",
            "model": "claude-3-5-sonnet",
            "model_version": "20241022",
            "effective_from": "2025-11-01T00:00:00Z",
            "per_million": {"input": "3.00", "output": "15.00", "cached_input": "0.30", "cache_write": "3.75"},
        },
    ],
    "rate_cards": [
        {"customer_id": "*", "markup_pct": "0"},
        {"customer_id": "acme", "markup_pct": "20"},
    ],
}

# Corrected after the fact: the provider announced late that gpt-4o dropped to 2.50/10.00 on Dec 10
# (a new version), the claude version was wrong (corrected in place: same effective_from, new
# content), and globex was promised 15 % off (a card agreed after the fact).
BOOK_AFTER: dict[str, Any] = {
    "currency": "USD",
    "prices": [
        BOOK_BEFORE["prices"][0],
        {
            "provider": "openai",
            "model": "gpt-4o",
            "effective_from": "2025-12-10T00:00:00Z",
            "per_million": {"input": "2.50", "output": "10.00", "cached_input": "1.25"},
        },
        {
            "provider": "anthropic",
            "model": "claude-3-5-sonnet",
            "model_version": "20241022",
            "effective_from": "2025-11-01T00:00:00Z",
            "per_million": {"input": "3.00", "output": "15.00", "cached_input": "0.30", "cache_write": "3.125"},
        },
    ],
    "rate_cards": [
        {"customer_id": "*", "markup_pct": "0"},
        {"customer_id": "acme", "markup_pct": "20"},
        {"customer_id": "globex", "discount_pct": "15"},
    ],
}

CUSTOMERS = ("acme", "globex", "initech")


def engine(book: dict[str, Any]) -> PricingEngine:
    return PricingEngine.from_book(load_price_book(book))


def make_events(seed: int, n: int, *, days: int = 20, t0: int = T0, seconds: int | None = None) -> list[dict[str, Any]]:
    """Usage events in ``[t0, t0 + days)`` (or ``seconds``), unpriced, seeded."""
    rng = random.Random(seed)
    span = seconds if seconds is not None else days * 86400
    out = []
    for i in range(n):
        claude = rng.random() < 0.4
        ev: dict[str, Any] = {
            "event_id": f"ev-{seed}-{i:06d}",
            "customer_id": rng.choice(CUSTOMERS),
            "occurred_at": (t0 + rng.randrange(span)) * 1000 + rng.randrange(1000),
            "provider": "anthropic" if claude else "openai",
            "model": "claude-3-5-sonnet" if claude else "gpt-4o",
            "model_version": "20241022" if claude else None,
            "project": rng.choice(("chat", "search")),
            "feature": rng.choice(("", "summarize")),
            "input_tokens": rng.randrange(0, 50_000),
            "output_tokens": rng.randrange(0, 8_000),
            "cached_input_tokens": rng.choice((0, 0, rng.randrange(20_000))),
            "cache_write_tokens": rng.choice((0, rng.randrange(10_000))) if claude else 0,
            "reasoning_tokens": 0,
            "requests": 1,
            "labels": {},
        }
        out.append(ev)
    return out


def insert_priced(ch: Any, events: list[dict[str, Any]], eng: PricingEngine) -> None:
    """Price every event with ``eng`` (the engine the pipeline had at the time) and store it."""
    rows = []
    for n, ev in enumerate(events):
        p = eng.price(ev)
        item = {
            **ev,
            "cost_picos": p.cost_picos,
            "charge_picos": p.charge_picos,
            "currency": p.currency,
            "price_version": p.price_version,
            "rate_card": p.rate_card,
            "priced_at": ev["occurred_at"],
            "source_partition": 0,
            "source_offset": n,
        }
        rows.append(priced_row(item, partition=0, offset=n))
    ch.insert("usage_priced", rows, column_names=list(PRICED_COLUMNS))


def expected_totals(events: list[dict[str, Any]], eng: PricingEngine) -> dict[str, tuple[Decimal, Decimal]]:
    """Per customer (Σ cost, Σ charge) as the Python engine prices each event, one by one."""
    picos: dict[str, list[int]] = {}
    for ev in events:
        p = eng.price(ev)
        t = picos.setdefault(ev["customer_id"], [0, 0])
        t[0] += p.cost_picos
        t[1] += p.charge_picos
    return {c: (to_decimal(a), to_decimal(b)) for c, (a, b) in picos.items()}
