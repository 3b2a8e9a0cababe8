"""Rating: a period's bill as a pure function of its priced usage and the subscription timeline,
and the burn-down step the credit agent applies per event. Both are the SAME code: a bill is
:func:`consume` folded over the period's aggregated usage.

Why aggregates and events agree: allowance scopes are disjoint and share the overage's unit
(enforced by the catalog), so how much an allowance absorbs is ``min(available, usage in scope)``
whatever the order; and the overage amount is a function of the cumulative overage quantity, so
an event's overage charge is ``price(after) - price(before)``, which telescopes to
``price(total)``. (Under volume tiers that difference can be negative: crossing into a cheaper
tier re-prices the whole quantity, as Stripe's volume pricing does at the period end.)

Per period (``docs/plans.md`` has the worked rules):

1. Each segment (a stretch of the period on one plan version) gets its terms: the fee, each
   allowance's included usage, the cap and the minimum commitment, prorated by seconds
   ``s / S`` (segment seconds over period seconds), defined to the nearest pico / token, ties to
   even. A full period is exactly the plan's numbers. Unused rollover from the previous period is
   added to the first segment's allowance and used first.
2. Usage in a segment draws on the matching allowance; what is left, and usage no allowance
   matches, is overage, priced by the segment's overage rule (tiers restart per segment).
3. Prepaid credit (what the ledger debited for this period's usage) pays overage first.
4. What overage is left to invoice meets ``on_exhausted``: ``allow`` invoices it, ``cap`` invoices
   at most the cap and writes off the rest, ``block`` writes it all off (live enforcement stops
   the customer at exhaustion; only usage already in flight, within the published bound, gets here).
5. ``minimum_commitment`` trues up: if fee + usage charges are below it, a line bills the gap.
6. The total is the exact sum of the lines, rounded once to the currency's minor unit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from meterline.core.money import format_picos
from meterline.core.plans._catalog import TOKEN_CLASSES, Allowance, Overage, PlanVersion
from meterline.core.plans._timeline import Period, Timeline
from meterline.core.plans._values import (
    define_share,
    format_instant,
    fraction_text,
    per_million_text,
    round_total,
)

# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class Usage:
    """Priced usage of one model: one event, or an aggregate of many (the same thing to rating).

    ``tokens`` maps token class -> count (classes are disjoint, as in ``usage_priced``);
    ``charge`` is the customer's pay-per-token charge in picos (``usage_priced.charge``)."""

    provider: str
    model: str
    tokens: Mapping[str, int] = field(default_factory=dict)
    charge: int = 0

    def total_tokens(self) -> int:
        return sum(self.tokens.get(c, 0) for c in TOKEN_CLASSES)


# --------------------------------------------------------------------------- segment terms


@dataclass(frozen=True, slots=True)
class Terms:
    """What one segment of a period offers, prorated: the numbers the bill and the live
    burn-down both use. ``included`` is the segment's own allowance, ``rolled_in`` the carry-over."""

    plan: PlanVersion
    start: int
    end: int
    period_start: int
    period_end: int
    fee: int
    included: Mapping[str, int]
    rolled_in: Mapping[str, int]
    cap: int | None
    commitment: int | None

    @property
    def seconds(self) -> int:
        return self.end - self.start

    @property
    def full(self) -> bool:
        return self.start == self.period_start and self.end == self.period_end

    def available(self, allowance_id: str) -> int:
        return self.included.get(allowance_id, 0) + self.rolled_in.get(allowance_id, 0)


def terms_for(period: Period, segment: int, rollover_in: Mapping[str, int] | None = None) -> Terms:
    """The prorated terms of ``period.segments[segment]``. ``rollover_in`` (allowance id ->
    tokens or picos carried from the previous period) counts only for a segment starting at the
    period's start, and only for an allowance of the same id in that plan version."""
    seg = period.segments[segment]
    end = seg.end if seg.end is not None else period.stop
    s, S = end - seg.start, period.seconds
    plan = seg.plan

    def share(x: int) -> int:
        return x if s == S else define_share(x, s, S)

    rolled: dict[str, int] = {}
    if rollover_in and seg.start == period.start:
        ids = {a.id for a in plan.allowances}
        rolled = {k: v for k, v in rollover_in.items() if k in ids and v > 0}
    return Terms(
        plan=plan,
        start=seg.start,
        end=end,
        period_start=period.start,
        period_end=period.end,
        fee=share(plan.fee),
        included={a.id: share(a.included) for a in plan.allowances},
        rolled_in=rolled,
        cap=None if plan.cap is None else share(plan.cap),
        commitment=None if plan.minimum_commitment is None else share(plan.minimum_commitment),
    )


def terms_at(timeline: Timeline, at: int, rollover_in: Mapping[str, int] | None = None) -> Terms | None:
    """The terms in force at instant ``at`` (epoch seconds of the event time), or None when the
    customer has no plan then (pay-per-token). What the credit agent looks up per priced event;
    consumption restarts at zero whenever the returned terms' ``(start, plan)`` change."""
    period = timeline.period_at(at)
    if period is None:
        return None
    i = period.segment_at(at)
    return None if i is None else terms_for(period, i, rollover_in)


# --------------------------------------------------------------------------- burn-down


@dataclass(frozen=True, slots=True)
class Consumption:
    """A segment's consumption so far: drawn per allowance, and the overage quantity (in the
    plan's unit: tokens, or picos of charge). Zero at the segment's start."""

    used: Mapping[str, int] = field(default_factory=dict)
    overage: int = 0


@dataclass(frozen=True, slots=True)
class Split:
    """How one usage item splits: allowance draw per allowance id, overage quantity, and the
    overage amount it adds in picos (``price(after) - price(before)``; negative is possible
    under volume tiers)."""

    allowance: Mapping[str, int]
    overage_quantity: int
    overage_amount: int


def consume(terms: Terms, before: Consumption, usage: Usage) -> tuple[Consumption, Split]:
    """Burn ``usage`` down against ``terms``: matching allowance first, the rest is overage.

    The credit agent calls this per priced event (then debits prepaid grants with
    ``split.overage_amount`` and applies ``on_exhausted``); :func:`rate_period` calls it per
    aggregate. Pure and total: any non-negative usage is accepted."""
    plan = terms.plan
    used = dict(before.used)
    draw: dict[str, int] = {}
    over = 0

    def take(a: Allowance | None, n: int) -> int:
        if a is None or n <= 0:
            return n
        room = max(terms.available(a.id) - used.get(a.id, 0), 0)
        got = min(n, room)
        if got:
            used[a.id] = used.get(a.id, 0) + got
            draw[a.id] = draw.get(a.id, 0) + got
        return n - got

    if plan.unit == "tokens":
        for cls in TOKEN_CLASSES:
            n = usage.tokens.get(cls, 0)
            if n > 0:
                over += take(plan.allowance_for(usage.provider, usage.model, cls), n)
    else:
        over += take(plan.allowance_for(usage.provider, usage.model, None), usage.charge)
    after = Consumption(used, before.overage + over)
    delta = overage_price(plan.overage, after.overage)[0] - overage_price(plan.overage, before.overage)[0]
    return after, Split(draw, over, delta)


def allowance_remaining(terms: Terms, consumption: Consumption) -> dict[str, int]:
    """What is left of each allowance of the segment (tokens or picos), never negative: the
    "remaining" a customer status shows, and what an authorization may reserve against."""
    return {a.id: max(terms.available(a.id) - consumption.used.get(a.id, 0), 0) for a in terms.plan.allowances}


def policy_room(terms: Terms, invoiced_overage: int) -> int | None:
    """How much more overage (picos) the plan lets the customer incur beyond its prepaid credit,
    given the overage already left to invoice this segment (overage amount minus what prepaid
    credit paid): None = unlimited (``allow``), 0 = none (``block``: stop at exhaustion of the
    allowances and the prepaid grants), ``cap - invoiced`` (``cap``, never negative)."""
    if terms.plan.on_exhausted == "allow":
        return None
    if terms.plan.on_exhausted == "block":
        return 0
    return max((terms.cap or 0) - invoiced_overage, 0)


@dataclass(frozen=True, slots=True)
class Band:
    """One priced band of overage: tier index (1-based; 0 = untiered), quantity, rate text, amount."""

    tier: int
    quantity: int
    rate: str  # per million tokens, or a multiplier of the charge
    amount: int
    up_to: int | None = None


def _band_amount(ov: Overage, qty: int, rate_picos: int, mult_num: int, mult_den: int) -> int:
    if ov.unit == "tokens":
        return qty * rate_picos
    return define_share(qty, mult_num, mult_den)


def overage_price(ov: Overage, qty: int) -> tuple[int, list[Band]]:
    """The amount (picos) of ``qty`` overage under ``ov``, with its bands.

    Tiers are computed as Stripe does: ``up_to`` is inclusive; ``graduated`` prices each band at
    its own rate; ``volume`` prices the whole quantity at the rate of the tier it falls in."""
    if qty <= 0:
        return 0, []
    if ov.kind == "per_million":
        amt = qty * ov.rate_picos
        return amt, [Band(0, qty, per_million_text(ov.rate_picos), amt)]
    if ov.kind == "rate_card":
        amt = define_share(qty, ov.multiplier.numerator, ov.multiplier.denominator)
        return amt, [Band(0, qty, fraction_text(ov.multiplier), amt)]

    def rate_text(step: Any) -> str:
        return per_million_text(step.rate_picos) if ov.unit == "tokens" else fraction_text(step.multiplier)

    if ov.mode == "volume":
        for i, step in enumerate(ov.steps, 1):
            if step.up_to is None or qty <= step.up_to:
                amt = _band_amount(ov, qty, step.rate_picos, step.multiplier.numerator, step.multiplier.denominator)
                return amt, [Band(i, qty, rate_text(step), amt, step.up_to)]
        raise AssertionError("the last tier is unbounded")  # guaranteed by the catalog
    total, bands, lower = 0, [], 0
    for i, step in enumerate(ov.steps, 1):
        upper = step.up_to
        q = qty - lower if upper is None else min(qty, upper) - lower
        if q <= 0:
            break
        amt = _band_amount(ov, q, step.rate_picos, step.multiplier.numerator, step.multiplier.denominator)
        bands.append(Band(i, q, rate_text(step), amt, upper))
        total += amt
        if upper is None:
            break
        lower = upper
    return total, bands


# --------------------------------------------------------------------------- the bill


@dataclass(frozen=True, slots=True)
class BillLine:
    """One line of a bill. ``amount`` is exact picos (negative for credits and write-offs)."""

    kind: str  # fee | allowance | overage | cap | blocked | minimum_commitment | prepaid_credit | usage
    description: str
    plan: str | None  # "pro@1"
    ref: str | None  # allowance id, "tier 2", ...
    quantity: str
    unit: str  # period | seconds | tokens | amount
    unit_price: str | None
    amount: int
    start: int | None = None
    end: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "description": self.description,
            "plan": self.plan,
            "ref": self.ref,
            "quantity": self.quantity,
            "unit": self.unit,
            "unit_price": self.unit_price,
            "amount": format_picos(self.amount),
            "start": None if self.start is None else format_instant(self.start),
            "end": None if self.end is None else format_instant(self.end),
        }


@dataclass(frozen=True, slots=True)
class AllowanceUse:
    """An allowance in one segment: included (prorated), rolled in, used, remaining, carried out."""

    id: str
    plan: str
    unit: str
    included: int
    rolled_in: int
    used: int
    remaining: int
    rollover_out: int = 0
    segment: int = 0

    def to_json(self) -> dict[str, Any]:
        fmt: Callable[[int], Any] = (lambda n: n) if self.unit == "tokens" else format_picos
        return {
            "id": self.id,
            "plan": self.plan,
            "unit": self.unit,
            "included": fmt(self.included),
            "rolled_in": fmt(self.rolled_in),
            "used": fmt(self.used),
            "remaining": fmt(self.remaining),
            "rollover_out": fmt(self.rollover_out),
        }


@dataclass(frozen=True, slots=True)
class Bill:
    customer_id: str
    currency: str
    start: int
    end: int
    stop: int
    lines: tuple[BillLine, ...]
    allowances: tuple[AllowanceUse, ...]
    rollover_out: Mapping[str, int] = field(default_factory=dict)

    @property
    def subtotal(self) -> int:
        """The exact sum of the lines, in picos."""
        return sum(line.amount for line in self.lines)

    @property
    def total(self) -> Decimal:
        """THE rounded total (currency minor unit, once)."""
        return round_total(self.subtotal, self.currency)

    def amount_of(self, kind: str) -> int:
        return sum(line.amount for line in self.lines if line.kind == kind)

    def to_json(self) -> dict[str, Any]:
        return {
            "customer_id": self.customer_id,
            "currency": self.currency,
            "period": {
                "start": format_instant(self.start),
                "end": format_instant(self.end),
                "stop": format_instant(self.stop),
            },
            "total": str(self.total),
            "subtotal": format_picos(self.subtotal),
            "lines": [line.to_json() for line in self.lines],
            "allowances": [a.to_json() for a in self.allowances],
        }


def _qty_text(unit: str, n: int) -> str:
    return str(n) if unit == "tokens" else format_picos(n)


def _plan_label(plan: PlanVersion) -> str:
    return f"{plan.name or plan.plan_id} ({plan.key})"


def rate_period(
    period: Period,
    usage_by_segment: Sequence[Iterable[Usage]],
    *,
    rollover_in: Mapping[str, int] | None = None,
    prepaid: int = 0,
    currency: str | None = None,
) -> Bill:
    """The bill of one period. ``usage_by_segment[i]`` is the priced usage that occurred in
    ``period.segments[i]`` (aggregated any way: per model is enough). ``prepaid`` is the prepaid
    credit (picos) the ledger debited for this period's usage; it pays overage only."""
    if len(usage_by_segment) != len(period.segments):
        raise ValueError("usage_by_segment needs one entry per segment of the period")
    lines: list[BillLine] = []
    uses: list[AllowanceUse] = []
    prepaid_left = max(prepaid, 0)
    charged = 0  # fee + usage charges, what a minimum commitment is measured against
    commitment = 0
    has_commitment = False
    prepaid_used = 0
    last_terms: Terms | None = None
    last_cons: Consumption | None = None
    cur = currency or (period.segments[0].plan.currency if period.segments else "USD")
    for i, items in enumerate(usage_by_segment):
        t = terms_for(period, i, rollover_in)
        plan, key = t.plan, t.plan.key
        cons = Consumption()
        for u in items:
            cons, _ = consume(t, cons, u)
        last_terms, last_cons = t, cons
        # fee, billed in advance for the period (prorated for a segment)
        if plan.fee or t.full:
            if t.full:
                lines.append(
                    BillLine(
                        "fee",
                        f"{_plan_label(plan)} fee, {plan.interval}",
                        key,
                        None,
                        "1",
                        "period",
                        format_picos(plan.fee),
                        t.fee,
                        t.start,
                        t.end,
                    )
                )
            else:
                lines.append(
                    BillLine(
                        "fee",
                        f"{_plan_label(plan)} fee, prorated {t.seconds} of {period.seconds} seconds",
                        key,
                        None,
                        str(t.seconds),
                        "seconds",
                        None,
                        t.fee,
                        t.start,
                        t.end,
                    )
                )
        charged += t.fee
        # allowances
        for a in plan.allowances:
            used = cons.used.get(a.id, 0)
            avail = t.available(a.id)
            uses.append(
                AllowanceUse(
                    a.id, key, a.unit, t.included.get(a.id, 0), t.rolled_in.get(a.id, 0), used, avail - used, 0, i
                )
            )
            what = "tokens" if a.unit == "tokens" else f"{cur} of usage"
            lines.append(
                BillLine(
                    "allowance",
                    f"{a.id}: {_qty_text(a.unit, avail)} {what} included, {_qty_text(a.unit, used)} used, "
                    f"{_qty_text(a.unit, avail - used)} unused",
                    key,
                    a.id,
                    _qty_text(a.unit, used),
                    a.unit,
                    "0",
                    0,
                    t.start,
                    t.end,
                )
            )
        # overage, per band
        amount, bands = overage_price(plan.overage, cons.overage)
        for b in bands:
            ref = None if b.tier == 0 else f"tier {b.tier}"
            per = "per million tokens" if plan.unit == "tokens" else "x charge"
            lines.append(
                BillLine(
                    "overage",
                    f"overage{'' if ref is None else ' ' + ref + (' (' + plan.overage.mode + ')' if plan.overage.mode else '')}: "
                    f"{_qty_text(plan.unit, b.quantity)} {'tokens' if plan.unit == 'tokens' else cur} at {b.rate} {per}",
                    key,
                    ref,
                    _qty_text(plan.unit, b.quantity),
                    plan.unit,
                    b.rate,
                    b.amount,
                    t.start,
                    t.end,
                )
            )
        paid = min(amount, prepaid_left)
        prepaid_left -= paid
        prepaid_used += paid
        invoiced = amount - paid
        written = 0
        if plan.on_exhausted == "cap" and t.cap is not None and invoiced > t.cap:
            written = invoiced - t.cap
            lines.append(
                BillLine(
                    "cap",
                    f"overage above the cap of {format_picos(t.cap)} written off",
                    key,
                    None,
                    "1",
                    "period",
                    None,
                    -written,
                    t.start,
                    t.end,
                )
            )
        elif plan.on_exhausted == "block" and invoiced > 0:
            written = invoiced
            lines.append(
                BillLine(
                    "blocked",
                    "overage beyond allowance and prepaid credit on a block plan written off",
                    key,
                    None,
                    "1",
                    "period",
                    None,
                    -written,
                    t.start,
                    t.end,
                )
            )
        charged += amount - written
        if t.commitment is not None:
            has_commitment = True
            commitment += t.commitment
    if has_commitment and charged < commitment:
        lines.append(
            BillLine(
                "minimum_commitment",
                f"minimum commitment true-up: {format_picos(commitment)} committed, {format_picos(charged)} charged",
                None,
                None,
                "1",
                "period",
                None,
                commitment - charged,
                period.start,
                period.stop,
            )
        )
    if prepaid_used:
        lines.append(
            BillLine(
                "prepaid_credit",
                "prepaid credit applied to overage",
                None,
                None,
                format_picos(prepaid_used),
                "amount",
                None,
                -prepaid_used,
                period.start,
                period.stop,
            )
        )
    rollover_out: dict[str, int] = {}
    if last_terms is not None and last_cons is not None and period.stop == period.end:
        for a in last_terms.plan.allowances:
            if a.rollover_max is None:
                continue
            used = last_cons.used.get(a.id, 0)
            own_used = max(used - last_terms.rolled_in.get(a.id, 0), 0)
            unused_own = max(last_terms.included.get(a.id, 0) - own_used, 0)
            rollover_out[a.id] = min(a.rollover_max, unused_own)
        uses = [
            AllowanceUse(
                u.id, u.plan, u.unit, u.included, u.rolled_in, u.used, u.remaining, rollover_out.get(u.id, 0), u.segment
            )
            if j >= len(uses) - len(last_terms.plan.allowances)
            else u
            for j, u in enumerate(uses)
        ]
    return Bill(period.customer_id, cur, period.start, period.end, period.stop, tuple(lines), tuple(uses), rollover_out)


def rate_periods(
    periods: Sequence[Period],
    usage_of: Callable[[Period], Sequence[Iterable[Usage]]],
    prepaid_of: Callable[[Period], int] = lambda p: 0,
) -> list[Bill]:
    """Bills of consecutive periods, carrying rollover from each period to the next (a period
    of a different run, i.e. after a gap or an interval change, starts without carry-over)."""
    bills: list[Bill] = []
    carry: Mapping[str, int] = {}
    prev: Period | None = None
    for p in periods:
        if prev is None or prev.anchor != p.anchor or prev.index + 1 != p.index:
            carry = {}
        bill = rate_period(p, usage_of(p), rollover_in=carry, prepaid=prepaid_of(p))
        bills.append(bill)
        carry, prev = bill.rollover_out, p
    return bills
