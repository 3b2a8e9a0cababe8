"""The catalog as it stands now, as a small table of rate segments ClickHouse can join against.

Re-rating 10M events row by row in Python is too slow, so the job asks the pricing engine only
what it needs per *group* (customer × provider × model × model_version of the period) and lets
ClickHouse do the per-event arithmetic:

1. **Where the price changes.** The engine's public :meth:`PricingEngine.price` is called at the
   model's first and last event time; if the version differs, a binary search over epoch ms finds
   the exact millisecond where the next version (or error) begins (a version ends where the next
   begins, docs/pricing.md rule 2). So a group becomes a few ``[t_from, t_to)`` segments, each
   priced by one version and one card. Versions depend on the model only: this runs once per model.
2. **The rates of a segment.** Pricing is linear in the token counts (cost = Σ tokens × rate +
   requests × fee, the same over the card's rates): pricing a record with exactly one token of one
   class (or one request) returns that class's rate in picos. Those unit prices come from
   :meth:`PricingEngine.price` itself, so whatever the engine does (overrides, markups, the
   reasoning fallback) is what ClickHouse multiplies with. A class the version has no rate for is
   ``None``: events with such tokens are unpriceable now and keep their billed amounts (reported).

Only the engine's public API is used (``price``), so new token classes or lookup rules that keep
the engine linear keep working; ``tests/jobs/test_reprice.py`` proves the ClickHouse result equals
the engine's per-event prices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from meterline.core.errors import UnpriceableEvent
from meterline.core.pricing import TOKEN_CLASSES, PricedAmounts, PricingEngine

__all__ = ["RATE_FIELDS", "Segment", "all_segments", "group_segments", "rated_fields", "unit_rates"]

# The usage_priced count columns multiplied by a rate when the table's schema is not known: the
# engine's token classes, then requests. :func:`rated_fields` reads the real list from ClickHouse.
RATE_FIELDS: tuple[str, ...] = (*(f"{c}_tokens" for c in TOKEN_CLASSES), "requests")


def rated_fields(ch: Any) -> tuple[str, ...]:
    """Every count column of ``usage_priced`` a price can multiply (``*_tokens``, ``requests``,
    ``*_requests`` such as tool calls), in table order: the schema is the list, so a class added
    with its column is re-rated without a change here."""
    rows = ch.query(
        "SELECT name, type FROM system.columns WHERE database = currentDatabase() "
        "AND table = 'usage_priced' ORDER BY position"
    ).result_rows
    return tuple(
        str(n)
        for n, t in rows
        if str(t).startswith("UInt") and (str(n).endswith(("_tokens", "_requests")) or n == "requests")
    )


@dataclass(frozen=True, slots=True)
class Segment:
    """One customer × model's events in ``[t_from_ms, t_to_ms)``, all priced the same way now.

    ``error`` is the engine's reason code when nothing prices them now (``unknown_model``,
    ``no_price_at_time``): they keep what they were billed. Otherwise ``cost`` / ``charge`` are the
    picos per unit of each rated field (``None`` = no rate for that class)."""

    customer_id: str
    provider: str
    model: str
    model_version: str  # '' = none, as stored in usage_priced
    service_tier: str  # '' = the standard tier, as stored in usage_priced
    t_from_ms: int
    t_to_ms: int
    price_version: str
    rate_card: str
    error: str
    cost: tuple[int | None, ...]
    charge: tuple[int | None, ...]


Key = tuple[str, str, str, str]  # provider, model, model_version, service_tier ('' = none)


def _record(customer: str, key: Key, ms: int, field: str | None, fields: tuple[str, ...]) -> dict[str, Any]:
    provider, model, mv, tier = key
    rec: dict[str, Any] = {
        "customer_id": customer,
        "provider": provider,
        "model": model,
        "model_version": mv or None,
        "service_tier": tier or None,
        "occurred_at": ms,
    }
    for f in fields:
        rec[f] = 1 if f == field else 0
    return rec


def _version(engine: PricingEngine, customer: str, key: Key, ms: int, fields: tuple[str, ...]) -> str:
    """What prices this group at ``ms``: ``v:<version>|<card>``, or ``e:<reason_code>``."""
    try:
        p = engine.price(_record(customer, key, ms, None, fields))
    except UnpriceableEvent as exc:
        return f"e:{exc.reason_code}"
    return f"v:{p.price_version}|{p.rate_card}"


def unit_rates(
    engine: PricingEngine,
    customer: str,
    key: Key,
    ms: int,
    fields: tuple[str, ...] = RATE_FIELDS,
) -> tuple[tuple[int | None, ...], tuple[int | None, ...], PricedAmounts]:
    """(cost picos per unit, charge picos per unit) of every rated field at ``ms``."""
    zero = engine.price(_record(customer, key, ms, None, fields))
    cost: list[int | None] = []
    charge: list[int | None] = []
    for f in fields:
        try:
            p = engine.price(_record(customer, key, ms, f, fields))
        except UnpriceableEvent as exc:
            if exc.reason_code != "no_rate_for_token_class":
                raise
            cost.append(None)
            charge.append(None)
            continue
        cost.append(p.cost_picos - zero.cost_picos)
        charge.append(p.charge_picos - zero.charge_picos)
    return tuple(cost), tuple(charge), zero


def _timeline(
    engine: PricingEngine, customer: str, key: Key, lo_ms: int, hi_ms: int, fields: tuple[str, ...]
) -> list[tuple[int, int, str]]:
    """``[t_from, t_to)`` pieces of ``[lo_ms, hi_ms]`` each priced by one version (or one error)."""

    def code(ms: int) -> str:
        return _version(engine, customer, key, ms, fields).split("|", 1)[0]

    out: list[tuple[int, int, str]] = []
    start = lo_ms
    while start <= hi_ms:
        here = code(start)
        if code(hi_ms) == here:
            end = hi_ms + 1
        else:  # the last ms still priced like `start`, by bisection (the timeline is monotone)
            a, b = start, hi_ms  # code(a) == here, code(b) != here
            while b - a > 1:
                m = (a + b) // 2
                if code(m) == here:
                    a = m
                else:
                    b = m
            end = b
        out.append((start, end, here))
        start = end
    return out


def group_segments(
    engine: PricingEngine, customer: str, key: Key, lo_ms: int, hi_ms: int, fields: tuple[str, ...] = RATE_FIELDS
) -> list[Segment]:
    """The segments covering every event of the group stamped in ``[lo_ms, hi_ms]``."""
    return all_segments(engine, [(customer, *key, lo_ms, hi_ms)], fields)


def all_segments(
    engine: PricingEngine,
    groups: Iterable[tuple[str, str, str, str, str, int, int]],
    fields: tuple[str, ...] = RATE_FIELDS,
    progress: Callable[[int], None] | None = None,
) -> list[Segment]:
    """The segments of every ``(customer, provider, model, model_version, service_tier, lo_ms, hi_ms)``.

    Where a price changes depends on the model only, and the rates on the version and the customer's
    card (:meth:`PricingEngine.card_for`), so the bisection runs once per model over the union of
    its groups' ranges and unit prices once per card × version: each group then costs a lookup."""
    groups = list(groups)
    span: dict[Key, tuple[int, int, str]] = {}
    for customer, provider, model, mv, tier, lo, hi in groups:
        k = (provider, model, mv, tier)
        a, b, c = span.get(k, (lo, hi, customer))
        span[k] = (min(a, lo), max(b, hi), c)
    timelines = {k: _timeline(engine, c, k, lo, hi, fields) for k, (lo, hi, c) in span.items()}
    rates: dict[tuple[str, Key, int], tuple[Any, ...]] = {}
    out: list[Segment] = []
    for i, (customer, provider, model, mv, tier, lo, hi) in enumerate(groups):
        card = engine.card_for(customer).card_id
        key = (provider, model, mv, tier)
        for t_from, t_to, code in timelines[key]:
            if t_to <= lo or t_from > hi:
                continue
            if code.startswith("e:"):
                out.append(Segment(customer, provider, model, mv, tier, t_from, t_to, "", "", code[2:], (), ()))
                continue
            rk = (card, key, t_from)
            if rk not in rates:
                cost, charge, p = unit_rates(engine, customer, key, t_from, fields)
                rates[rk] = (cost, charge, p.price_version, p.rate_card)
            cost, charge, version, rate_card = rates[rk]
            out.append(Segment(customer, provider, model, mv, tier, t_from, t_to, version, rate_card, "", cost, charge))
        if progress is not None:
            progress(i + 1)
    return out
