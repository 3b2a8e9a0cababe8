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

from meterline.errors import UnpriceableEvent
from meterline.pricing import TOKEN_CLASSES, PricedAmounts, PricingEngine

__all__ = ["RATE_FIELDS", "Segment", "all_segments", "group_segments", "unit_rates"]

# The usage_priced count columns multiplied by a rate, in the engine's class order, then requests.
RATE_FIELDS: tuple[str, ...] = (*(f"{c}_tokens" for c in TOKEN_CLASSES), "requests")


@dataclass(frozen=True, slots=True)
class Segment:
    """One customer × model's events in ``[t_from_ms, t_to_ms)``, all priced the same way now.

    ``error`` is the engine's reason code when nothing prices them now (``unknown_model``,
    ``no_price_at_time``): they keep what they were billed. Otherwise ``cost`` / ``charge`` are the
    picos per unit of each of :data:`RATE_FIELDS` (``None`` = no rate for that class)."""

    customer_id: str
    provider: str
    model: str
    model_version: str  # '' = none, as stored in usage_priced
    t_from_ms: int
    t_to_ms: int
    price_version: str
    rate_card: str
    error: str
    cost: tuple[int | None, ...]
    charge: tuple[int | None, ...]


def _record(customer: str, provider: str, model: str, mv: str, ms: int, field: str | None) -> dict[str, Any]:
    rec: dict[str, Any] = {"customer_id": customer, "provider": provider, "model": model,
                           "model_version": mv or None, "occurred_at": ms}  # fmt: skip
    for f in RATE_FIELDS:
        rec[f] = 1 if f == field else 0
    return rec


def _version(engine: PricingEngine, customer: str, provider: str, model: str, mv: str, ms: int) -> str:
    """What prices this group at ``ms``: ``v:<version>|<card>``, or ``e:<reason_code>``."""
    try:
        p = engine.price(_record(customer, provider, model, mv, ms, None))
    except UnpriceableEvent as exc:
        return f"e:{exc.reason_code}"
    return f"v:{p.price_version}|{p.rate_card}"


def unit_rates(engine: PricingEngine, customer: str, provider: str, model: str, mv: str,
               ms: int) -> tuple[tuple[int | None, ...], tuple[int | None, ...], PricedAmounts]:  # fmt: skip
    """(cost picos per unit, charge picos per unit) of every :data:`RATE_FIELDS` entry at ``ms``."""
    zero = engine.price(_record(customer, provider, model, mv, ms, None))
    cost: list[int | None] = []
    charge: list[int | None] = []
    for f in RATE_FIELDS:
        try:
            p = engine.price(_record(customer, provider, model, mv, ms, f))
        except UnpriceableEvent as exc:
            if exc.reason_code != "no_rate_for_token_class":
                raise
            cost.append(None)
            charge.append(None)
            continue
        cost.append(p.cost_picos - zero.cost_picos)
        charge.append(p.charge_picos - zero.charge_picos)
    return tuple(cost), tuple(charge), zero


def _timeline(engine: PricingEngine, customer: str, provider: str, model: str, mv: str, lo_ms: int,
              hi_ms: int) -> list[tuple[int, int, str]]:  # fmt: skip
    """``[t_from, t_to)`` pieces of ``[lo_ms, hi_ms]`` each priced by one version (or one error)."""
    def code(ms: int) -> str:
        return _version(engine, customer, provider, model, mv, ms).split("|", 1)[0]

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


def group_segments(engine: PricingEngine, customer: str, provider: str, model: str, mv: str,
                   lo_ms: int, hi_ms: int) -> list[Segment]:  # fmt: skip
    """The segments covering every event of the group stamped in ``[lo_ms, hi_ms]``."""
    return all_segments(engine, [(customer, provider, model, mv, lo_ms, hi_ms)])


def all_segments(engine: PricingEngine, groups: Iterable[tuple[str, str, str, str, int, int]],
                 progress: Callable[[int], None] | None = None) -> list[Segment]:  # fmt: skip
    """The segments of every ``(customer, provider, model, model_version, lo_ms, hi_ms)`` group.

    Where a price changes depends on the model only, and the rates on the version and the customer's
    card (:meth:`PricingEngine.card_for`), so the bisection runs once per model over the union of
    its groups' ranges and unit prices once per card × version: each group then costs a lookup."""
    groups = list(groups)
    span: dict[tuple[str, str, str], tuple[int, int, str]] = {}
    for customer, provider, model, mv, lo, hi in groups:
        k = (provider, model, mv)
        a, b, c = span.get(k, (lo, hi, customer))
        span[k] = (min(a, lo), max(b, hi), c)
    timelines = {k: _timeline(engine, c, *k, lo, hi) for k, (lo, hi, c) in span.items()}
    rates: dict[tuple[str, str, str, str, int], tuple[Any, ...]] = {}
    out: list[Segment] = []
    for i, (customer, provider, model, mv, lo, hi) in enumerate(groups):
        card = engine.card_for(customer).card_id
        for t_from, t_to, code in timelines[(provider, model, mv)]:
            if t_to <= lo or t_from > hi:
                continue
            if code.startswith("e:"):
                out.append(Segment(customer, provider, model, mv, t_from, t_to, "", "", code[2:], (), ()))
                continue
            key = (card, provider, model, mv, t_from)
            if key not in rates:
                cost, charge, p = unit_rates(engine, customer, provider, model, mv, t_from)
                rates[key] = (cost, charge, p.price_version, p.rate_card)
            cost, charge, version, rate_card = rates[key]
            out.append(Segment(customer, provider, model, mv, t_from, t_to, version, rate_card, "", cost, charge))
        if progress is not None:
            progress(i + 1)
    return out
