"""Billing arithmetic of the local Stripe server: periods, meter aggregation, price amounts, credits.

All money is exact: unit prices are ``Decimal`` cents (``unit_amount_decimal``, up to 12 places),
amounts are computed exactly and rounded ONCE per invoice line, half-up, to integer cents
(``line_amount_cents``). Credits and totals are integer cents from then on.

Pure functions only; no store access.
"""

from __future__ import annotations

import calendar
import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal
from typing import Any

from devtools.stripe_local._store import StoredEvent

INTERVALS = ("day", "week", "month", "year")


def add_interval(anchor: int, interval: str, count: int, k: int) -> int:
    """``anchor`` moved by ``k * count`` intervals in UTC; month ends clamp (Jan 31 + 1 month = Feb 28/29)."""
    if interval == "day":
        return anchor + 86400 * count * k
    if interval == "week":
        return anchor + 7 * 86400 * count * k
    base = dt.datetime.fromtimestamp(anchor, tz=dt.UTC)
    months = count * k * (12 if interval == "year" else 1)
    total = base.year * 12 + (base.month - 1) + months
    year, month = divmod(total, 12)
    day = min(base.day, calendar.monthrange(year, month + 1)[1])
    return int(base.replace(year=year, month=month + 1, day=day).timestamp())


def aggregate(formula: str, events: Sequence[StoredEvent]) -> Decimal:
    """Exact aggregate of counted events (already filtered to one meter, customer and time range)."""
    if formula == "count":
        return Decimal(len(events))
    if formula == "last":
        if not events:
            return Decimal(0)
        latest = max(events, key=lambda e: (e.timestamp, e.seq))
        return Decimal(latest.value or "0")
    return sum((Decimal(e.value or "0") for e in events), Decimal(0))


def transformed_quantity(price: dict[str, Any], quantity: Decimal) -> Decimal:
    tq = price.get("transform_quantity")
    if not tq:
        return quantity
    divided = quantity / Decimal(int(tq["divide_by"]))
    return divided.to_integral_value(rounding=ROUND_CEILING if tq["round"] == "up" else ROUND_FLOOR)


def _tier_unit(tier: dict[str, Any]) -> Decimal:
    return Decimal(tier.get("unit_amount_decimal") or "0")


def _tier_flat(tier: dict[str, Any]) -> Decimal:
    return Decimal(tier.get("flat_amount_decimal") or "0")


def exact_amount(price: dict[str, Any], quantity: Decimal) -> Decimal:
    """Exact amount in (fractional) cents for ``quantity`` units of ``price``; no rounding."""
    if price.get("billing_scheme") == "tiered":
        tiers: list[dict[str, Any]] = price.get("tiers") or []
        if price.get("tiers_mode") == "volume":
            for tier in tiers:
                up_to = tier.get("up_to")
                if up_to is None or quantity <= Decimal(up_to):
                    if quantity == 0:
                        return Decimal(0)
                    return quantity * _tier_unit(tier) + _tier_flat(tier)
            return Decimal(0)
        total = Decimal(0)
        lower = Decimal(0)
        for tier in tiers:  # graduated
            if quantity <= lower:
                break
            up_to = tier.get("up_to")
            upper = quantity if up_to is None else min(quantity, Decimal(up_to))
            in_tier = upper - lower
            if in_tier > 0:
                total += in_tier * _tier_unit(tier) + _tier_flat(tier)
            if up_to is None:
                break
            lower = Decimal(up_to)
        return total
    q = transformed_quantity(price, quantity)
    return q * Decimal(price.get("unit_amount_decimal") or "0")


def round_cents(amount: Decimal) -> int:
    """The single rounding step: half-up to integer cents."""
    return int(amount.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def line_amount_cents(price: dict[str, Any], quantity: Decimal) -> int:
    return round_cents(exact_amount(price, quantity))


# ----------------------------------------------------------------------------- credits


@dataclass
class CreditLine:
    """A metered invoice line eligible for credits."""

    index: int
    price_id: str
    currency: str
    amount: int
    applied: list[tuple[str, int]] = field(default_factory=list)  # (grant id, cents)


def grant_available(grant: dict[str, Any], applied_cents: int, now: int) -> int:
    """Cents still usable on ``grant`` at ``now`` (0 when voided, expired or not yet effective)."""
    if grant.get("voided_at") is not None:
        return 0
    eff = grant.get("effective_at")
    if eff is not None and eff > now:
        return 0
    exp = grant.get("expires_at")
    if exp is not None and exp <= now:
        return 0
    return max(0, int(grant["amount"]["monetary"]["value"]) - applied_cents)


def grant_covers(grant: dict[str, Any], price_id: str, currency: str) -> bool:
    if grant["amount"]["monetary"]["currency"] != currency:
        return False
    scope = grant["applicability_config"]["scope"]
    if scope.get("price_type") == "metered":
        return True
    prices = scope.get("prices") or []
    return any(p.get("id") == price_id for p in prices)


def grant_order(grant: dict[str, Any]) -> tuple[int, int, int, str]:
    """Application order: priority (0 first; default 50), then soonest expiry, then oldest."""
    exp = grant.get("expires_at")
    return (
        int(grant.get("priority") if grant.get("priority") is not None else 50),
        exp if exp is not None else 2**62,
        int(grant["created"]),
        str(grant["id"]),
    )


def apply_credits(lines: Iterable[CreditLine], grants: Sequence[dict[str, Any]], available: dict[str, int]) -> None:
    """Draw grants onto lines in place. ``available`` maps grant id -> cents left; it is decremented."""
    ordered = sorted(grants, key=grant_order)
    for line in lines:
        left = line.amount
        for grant in ordered:
            if left <= 0:
                break
            if not grant_covers(grant, line.price_id, line.currency):
                continue
            take = min(left, available.get(grant["id"], 0))
            if take > 0:
                available[grant["id"]] -= take
                left -= take
                line.applied.append((grant["id"], take))


# ----------------------------------------------------------------------------- subscription periods


def period_bounds(sub: dict[str, Any], k: int) -> tuple[int, int]:
    """Start/end of billing period number ``k``, always counted from the billing cycle anchor (never
    chained), so a subscription anchored on the 31st renews on the 28th/29th, then the 31st again.
    With an explicit future ``billing_cycle_anchor`` period 0 is the short ``[start, anchor)``."""
    anchor = int(sub["billing_cycle_anchor"])
    rec = sub["_recurring"]
    iv, n = rec["interval"], rec["interval_count"]
    if int(sub["start_date"]) < anchor:
        if k == 0:
            return int(sub["start_date"]), anchor
        return add_interval(anchor, iv, n, k - 1), add_interval(anchor, iv, n, k)
    return add_interval(anchor, iv, n, k), add_interval(anchor, iv, n, k + 1)


def set_period(sub: dict[str, Any], k: int) -> None:
    start, end = period_bounds(sub, k)
    sub["_period_index"] = k
    for item in sub["items"]["data"]:
        item["current_period_start"] = start
        item["current_period_end"] = end


def current_period(sub: dict[str, Any]) -> tuple[int, int]:
    return period_bounds(sub, int(sub["_period_index"]))


def full_period_before(sub: dict[str, Any], end: int) -> int:
    """Start of the full interval that ends at ``end`` (the base of a short first period's proration)."""
    rec = sub["_recurring"]
    return add_interval(end, rec["interval"], rec["interval_count"], -1)
