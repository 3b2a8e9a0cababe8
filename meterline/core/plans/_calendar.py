"""Billing-period arithmetic: period ``k`` of a subscription anchored at ``A``.

Period boundaries are always computed **from the anchor**, never from the previous boundary, so a
subscription that starts on January 31 renews on February 28 (29), March 31, April 30, May 31...:
the day of month is clamped to the month's length and comes back when the month is long enough
(what Stripe does with a billing-cycle anchor on the 31st). Chaining ``+1 month`` would drift to
the 28th forever. The time of day is kept. ``year`` clamps February 29 to February 28 in
common years. ``day`` and ``week`` are 86 400 and 604 800 seconds (UTC has no DST).
"""

from __future__ import annotations

import calendar
from datetime import UTC, datetime

from meterline.core.plans._values import instant_of

INTERVALS: tuple[str, ...] = ("day", "week", "month", "year")
_FIXED = {"day": 86_400, "week": 7 * 86_400}


def add_intervals(anchor: int, n: int, interval: str) -> int:
    """The instant ``n`` intervals after ``anchor`` (epoch seconds), month ends clamped."""
    if interval in _FIXED:
        return anchor + n * _FIXED[interval]
    dt = datetime.fromtimestamp(anchor, tz=UTC)
    months = n * (12 if interval == "year" else 1) if interval in ("month", "year") else None
    if months is None:
        raise ValueError(f"unknown interval {interval!r}")
    total = dt.year * 12 + (dt.month - 1) + months
    year, month = divmod(total, 12)
    month += 1
    day = min(dt.day, calendar.monthrange(year, month)[1])
    moved = dt.replace(year=year, month=month, day=day)
    return instant_of(moved)


def period_index(anchor: int, at: int, interval: str) -> int:
    """The index ``k`` of the period ``[add(anchor,k), add(anchor,k+1))`` containing ``at`` (>= anchor)."""
    if at < anchor:
        raise ValueError("at is before the anchor")
    if interval in _FIXED:
        return (at - anchor) // _FIXED[interval]
    a = datetime.fromtimestamp(anchor, tz=UTC)
    b = datetime.fromtimestamp(at, tz=UTC)
    per = 12 if interval == "year" else 1
    k = ((b.year - a.year) * 12 + (b.month - a.month)) // per
    k = max(k - 1, 0)  # the estimate is never off by more than one; step forward exactly
    while add_intervals(anchor, k + 1, interval) <= at:
        k += 1
    return k


def period_bounds(anchor: int, at: int, interval: str) -> tuple[int, int]:
    """``[start, end)`` of the period containing ``at``."""
    k = period_index(anchor, at, interval)
    return add_intervals(anchor, k, interval), add_intervals(anchor, k + 1, interval)
