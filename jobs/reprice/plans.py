"""Re-rating subscription-plan customers: their plan bills, old and new (docs/corrections.md).

A plan customer does not pay its events' pay-per-token charges: it pays, per billing period, the
plan's bill (fee, allowances, overage, write-offs, minimum commitment; docs/plans.md). The catalog
reaches that bill only through the usage's ``charge`` (amount allowances, ``rate_card`` overage,
``unit: amount`` tiers, and through them caps and the commitment); tokens do not change. So for an
event that occurred inside a plan run, re-rating corrects its **cost** (what meterline pays the
provider) but not its charge; instead each billing period of such a customer that overlaps the
re-rated window is rated twice with the pure :func:`meterline.core.plans.rate_periods` (the code
``meterline bill preview`` and the credit agent use), from usage aggregated in ClickHouse:

- **old** = the bill of the period's usage as stored (``usage_priced``), plus every earlier plan
  correction of that customer × period (``usage_corrections`` rows with ``kind = 'plan'``):
  "as billed so far";
- **new** = the bill of the same usage with the window's events re-rated (old charge + the
  re-rated delta of each event, per segment and model).

``delta = new − old`` (exact picos, before the one rounding of the invoice) is written as one
``kind = 'plan'`` correction row per customer × period, with ``ledger_charge`` = the change of the
part the ledger carries (overage minus cap / block write-offs: the fee and the true-up are
invoiced, never debited). Prepaid credit is a way to pay, not a price: both bills are rated with
``prepaid = 0``.

Buckets: every customer's period and segment boundaries (epoch ms) are sent as one
``Array(Array(Int64))`` and an event's bucket is ``arrayCount(b -> b <= t, bounds)`` (as the
plan simulator does); a per-bucket flag array says whether the bucket lies inside a plan run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from meterline.core.errors import MeterlineError
from meterline.core.money import decimal_to_picos
from meterline.core.plans import (
    Bill,
    Period,
    SegmentChange,
    Timeline,
    Usage,
    fold_timeline,
    rate_periods,
    segment_consumptions,
)
from schemas.credits import segment_changes

__all__ = ["PlanBill", "PlanContext", "load_plan_context"]

_CLASSES = ("input", "output", "cached_input", "cache_write", "reasoning")


def _picos(d: Any) -> int:
    p = decimal_to_picos(d if isinstance(d, Decimal) else Decimal(d))
    if p is None:
        raise MeterlineError(f"{d!r} is not an exact amount in picos")
    return p


def ledger_part(bill: Bill) -> int:
    """What of a plan bill the ledger carries: the overage net of cap / block write-offs (the live
    agent debits overage; the fee and the commitment true-up are invoiced, never debited)."""
    return bill.amount_of("overage") + bill.amount_of("cap") + bill.amount_of("blocked")


@dataclass(frozen=True, slots=True)
class PlanBill:
    """One billing period of a plan customer, re-rated: picos, exact."""

    customer_id: str
    currency: str  # lower case, as usage_priced stores it
    start: int  # period start, epoch seconds
    end: int
    stop: int
    plans: tuple[str, ...]  # the plan versions of its segments (pro@1, ...)
    old_usage_charge: int  # the pay-per-token charge of its usage as stored
    new_usage_charge: int  # ... with the window's events re-rated
    billed: int  # the bill of the stored usage (prepaid 0)
    prior: int  # earlier plan corrections of this period
    new: int  # the re-rated bill
    billed_ledger: int
    prior_ledger: int
    new_ledger: int
    lines_old: tuple[dict[str, Any], ...] = ()
    lines_new: tuple[dict[str, Any], ...] = ()
    # What the re-rating changes in each segment's consumption (new − stored − earlier plan
    # corrections' changes), with the plan's unit and each allowance's unit: the live plan gate
    # follows them (``plan_correction`` commands, docs/corrections.md).
    segments: tuple[tuple[SegmentChange, str, dict[str, str]], ...] = ()

    @property
    def segments_change(self) -> bool:
        return any(not c.is_zero() for c, _, _ in self.segments)

    @property
    def old(self) -> int:
        """As billed so far: the stored usage's bill + earlier plan corrections."""
        return self.billed + self.prior

    @property
    def delta(self) -> int:
        return self.new - self.old

    @property
    def ledger_delta(self) -> int:
        return self.new_ledger - self.billed_ledger - self.prior_ledger


@dataclass
class PlanContext:
    """The plan customers of a re-rating: timelines, bucket boundaries and in-plan flags."""

    timelines: dict[str, Timeline] = field(default_factory=dict)
    chains: dict[str, list[Period]] = field(default_factory=dict)  # periods to rate (rollover chains)
    wanted: dict[str, list[Period]] = field(default_factory=dict)  # periods overlapping the window
    bounds: dict[str, list[int]] = field(default_factory=dict)  # epoch ms, sorted
    flags: dict[str, list[int]] = field(default_factory=dict)  # per bucket (len(bounds) + 1): 1 = in a run

    def params(self) -> dict[str, Any]:
        """Query parameters of :meth:`bucket_sql` / :meth:`in_plan_sql`."""
        cids = sorted(self.bounds)
        return {
            "rp_pcids": cids,
            "rp_pbounds": [[]] + [self.bounds[c] for c in cids],
            "rp_pflags": [[0]] + [self.flags[c] for c in cids],
        }

    @staticmethod
    def _index(col: str) -> str:
        return f"transform({col}, {{rp_pcids:Array(String)}}, range(2, length({{rp_pcids:Array(String)}}) + 2), 1)"

    @classmethod
    def bucket_sql(cls, customer_col: str, ms_col: str) -> str:
        """The bucket of an event (0 = before the customer's first boundary)."""
        return f"arrayCount(b -> b <= {ms_col}, {{rp_pbounds:Array(Array(Int64))}}[{cls._index(customer_col)}])"

    @classmethod
    def in_plan_sql(cls, customer_col: str, ms_col: str) -> str:
        """1 when the event occurred inside one of the customer's plan runs."""
        return (
            f"{{rp_pflags:Array(Array(UInt8))}}[{cls._index(customer_col)}]"
            f"[{cls.bucket_sql(customer_col, ms_col)} + 1] = 1"
        )

    def locate(self, customer: str, bucket: int) -> tuple[Period, int] | None:
        """(period, segment index) of a bucket of ``customer`` (None: not in a plan run)."""
        b = self.bounds[customer]
        if bucket <= 0 or bucket > len(b) - 1:
            return None
        lo = b[bucket - 1] // 1000
        for p in self.chains[customer]:
            if p.start <= lo < p.stop:
                seg = p.segment_at(lo)
                return None if seg is None else (p, seg)
        return None


def load_plan_context(ch: Any, customers: set[str], start: int, end: int) -> PlanContext:
    """Timelines (catalog and facts from ClickHouse, folded now) of the ``customers`` with a plan
    period overlapping ``[start, end)``."""
    from jobs.plans.billing import load_catalog, load_events

    ctx = PlanContext()
    if not customers:
        return ctx
    try:
        events = load_events(ch)
    except Exception as exc:  # no subscription_events table yet: nobody is on a plan
        if "subscription_events" in str(exc):
            return ctx
        raise
    by: dict[str, list[Any]] = {}
    for ev in events:
        if ev.customer_id in customers:
            by.setdefault(ev.customer_id, []).append(ev)
    if not by:
        return ctx
    catalog = load_catalog(ch)
    for cid in sorted(by):
        tl = fold_timeline(cid, by[cid], catalog)
        periods = tl.periods(end)
        wanted = [p for p in periods if p.start < end and p.stop > start]
        if not wanted:
            continue
        rolls = any(a.rollover_max is not None for p in periods for s in p.segments for a in s.plan.allowances)
        anchors = {p.anchor for p in wanted}
        chain = [p for p in periods if (rolls and p.anchor in anchors and p.start < end) or p in wanted]
        edges = sorted({x * 1000 for p in periods for x in (p.start, p.stop, *(s.start for s in p.segments))})
        flags = [0]
        for i in range(1, len(edges)):
            lo = edges[i - 1] // 1000
            flags.append(1 if any(p.start <= lo < p.stop and p.segment_at(lo) is not None for p in periods) else 0)
        flags.append(0)  # after the last boundary
        ctx.timelines[cid] = tl
        ctx.chains[cid] = chain
        ctx.wanted[cid] = wanted
        ctx.bounds[cid] = edges
        ctx.flags[cid] = flags
    return ctx


def _usage_rows(
    ctx: PlanContext, rows: list[tuple[Any, ...]]
) -> dict[tuple[str, int, int], dict[tuple[str, str], tuple[dict[str, int], int]]]:
    out: dict[tuple[str, int, int], dict[tuple[str, str], tuple[dict[str, int], int]]] = {}
    for cid, bucket, provider, model, *rest in rows:
        where = ctx.locate(str(cid), int(bucket))
        if where is None:
            continue
        period, seg = where
        counts, charge = rest[:5], rest[5]
        key = (str(cid), period.start, seg)
        per = out.setdefault(key, {})
        tokens, picos = per.get((str(provider), str(model)), ({}, 0))
        tokens = dict(tokens)
        for c, n in zip(_CLASSES, counts, strict=True):
            if int(n):
                tokens[c] = tokens.get(c, 0) + int(n)
        per[(str(provider), str(model))] = (tokens, picos + _picos(charge))
    return out


def rate_plan_bills(ch: Any, ctx: PlanContext, deltas: list[tuple[Any, ...]]) -> list[PlanBill]:
    """The old and new bills of every wanted period. ``deltas``: rows ``(customer, bucket,
    provider, model, charge delta)`` of the window's re-rated events (ClickHouse aggregates)."""
    if not ctx.bounds:
        return []
    cids = sorted(ctx.bounds)
    lo = min(p.start for c in cids for p in ctx.chains[c]) * 1000
    hi = max(p.stop for c in cids for p in ctx.chains[c]) * 1000
    params = {**ctx.params(), "lo": lo, "hi": hi}
    bucket = PlanContext.bucket_sql("customer_id", "toUnixTimestamp64Milli(occurred_at)")
    rows = ch.query(
        f"SELECT customer_id, {bucket} AS bk, provider, model, sum(input_tokens), sum(output_tokens), "
        "sum(cached_input_tokens), sum(cache_write_tokens), sum(reasoning_tokens), sum(charge), "
        "groupUniqArray(lower(currency)) FROM usage_priced FINAL WHERE has({rp_pcids:Array(String)}, customer_id) "
        "AND occurred_at >= fromUnixTimestamp64Milli({lo:Int64}, 'UTC') "
        "AND occurred_at < fromUnixTimestamp64Milli({hi:Int64}, 'UTC') "
        "GROUP BY customer_id, bk, provider, model ORDER BY customer_id, bk, provider, model",
        parameters=params,
    ).result_rows
    currencies: dict[str, set[str]] = {}
    for r in rows:
        currencies.setdefault(str(r[0]), set()).update(str(c) for c in r[10])
    old = _usage_rows(ctx, [r[:10] for r in rows])
    moved: dict[tuple[str, int, int], dict[tuple[str, str], int]] = {}
    for cid, bk, provider, model, d in deltas:
        where = ctx.locate(str(cid), int(bk))
        if where is None:
            continue
        key = (str(cid), where[0].start, where[1])
        per = moved.setdefault(key, {})
        per[(str(provider), str(model))] = per.get((str(provider), str(model)), 0) + _picos(d)
    prior: dict[tuple[str, int], tuple[int, int]] = {}
    for cid, at, charge, ledger in ch.query(
        "SELECT customer_id, toUnixTimestamp(occurred_at), sum(charge), sum(ledger_charge) FROM usage_corrections FINAL "
        "WHERE kind = 'plan' AND has({rp_pcids:Array(String)}, customer_id) GROUP BY customer_id, occurred_at",
        parameters=params,
    ).result_rows:
        prior[(str(cid), int(at))] = (_picos(charge), _picos(ledger))

    prior_segs = _prior_segment_changes(ch, cids)
    out: list[PlanBill] = []
    for cid in cids:
        chain = ctx.chains[cid]
        currency = next(s.plan.currency for p in chain for s in p.segments).lower()
        foreign = sorted(c for c in currencies.get(cid, set()) if c and c != currency)
        if foreign:
            raise MeterlineError(
                f"{cid}: usage priced in {', '.join(foreign)} cannot be re-rated on a plan billed in {currency}"
            )

        def usage_of(p: Period, *, new: bool, cid: str = cid) -> list[list[Usage]]:
            segs: list[list[Usage]] = []
            for i in range(len(p.segments)):
                per = old.get((cid, p.start, i), {})
                add = moved.get((cid, p.start, i), {}) if new else {}
                segs.append(
                    [
                        Usage(pm[0], pm[1], per.get(pm, ({}, 0))[0], per.get(pm, ({}, 0))[1] + add.get(pm, 0))
                        for pm in sorted(set(per) | set(add))
                    ]
                )
            return segs

        def charge_of(p: Period, *, new: bool, cid: str = cid) -> int:
            return sum(u.charge for seg in usage_of(p, new=new, cid=cid) for u in seg)

        bills_old = rate_periods(chain, lambda p: usage_of(p, new=False))
        bills_new = rate_periods(chain, lambda p: usage_of(p, new=True))
        carry_old, carry_new = _carries(chain, bills_old), _carries(chain, bills_new)
        for k, (p, bo, bn) in enumerate(zip(chain, bills_old, bills_new, strict=True)):
            if p not in ctx.wanted[cid]:
                continue
            segs = _segment_changes(
                p,
                segment_consumptions(p, usage_of(p, new=False), carry_old[k]),
                segment_consumptions(p, usage_of(p, new=True), carry_new[k]),
                bo,
                bn,
                {key[2:]: v for key, v in prior_segs.items() if key[:2] == (cid, p.start)},
            )
            pr, pl = prior.get((cid, p.start), (0, 0))
            out.append(
                PlanBill(
                    cid,
                    bo.currency.lower(),
                    p.start,
                    p.end,
                    p.stop,
                    tuple(dict.fromkeys(s.plan.key for s in p.segments)),
                    charge_of(p, new=False),
                    charge_of(p, new=True),
                    bo.subtotal,
                    pr,
                    bn.subtotal,
                    ledger_part(bo),
                    pl,
                    ledger_part(bn),
                    tuple(line.to_json() for line in bo.lines),
                    tuple(line.to_json() for line in bn.lines),
                    segs,
                )
            )
    return out


def _carries(chain: list[Period], bills: list[Bill]) -> list[dict[str, int]]:
    """The rollover each chain period starts with, as :func:`rate_periods` passes it."""
    out: list[dict[str, int]] = []
    carry: dict[str, int] = {}
    prev: Period | None = None
    for p, b in zip(chain, bills, strict=True):
        if prev is None or prev.anchor != p.anchor or prev.index + 1 != p.index:
            carry = {}
        out.append(carry)
        carry, prev = dict(b.rollover_out), p
    return out


def _ledger_share(bill: Bill, start: int, plan: str) -> int:
    """The part of ``bill`` the ledger carries (``ledger_part``) that belongs to one segment."""
    return sum(
        line.amount
        for line in bill.lines
        if line.kind in ("overage", "cap", "blocked") and line.start == start and line.plan == plan
    )


def _segment_changes(
    p: Period,
    old: list[tuple[Any, Any]],
    new: list[tuple[Any, Any]],
    bill_old: Bill,
    bill_new: Bill,
    prior: dict[tuple[int, str], SegmentChange],
) -> tuple[tuple[SegmentChange, str, dict[str, str]], ...]:
    """Per segment of ``p``: new consumption − stored consumption − what earlier plan corrections
    already moved (only segments whose change is not zero)."""
    out = []
    for (t, co), (_tn, cn) in zip(old, new, strict=True):
        key = t.plan.key
        before = prior.get((t.start, key), SegmentChange(t.start, key))
        used = {a.id: cn.used.get(a.id, 0) - co.used.get(a.id, 0) - before.used.get(a.id, 0) for a in t.plan.allowances}
        change = SegmentChange(
            t.start,
            key,
            {k: v for k, v in used.items() if v},
            cn.overage - co.overage - before.overage,
            _ledger_share(bill_new, t.start, key) - _ledger_share(bill_old, t.start, key) - before.invoiced,
        )
        if not change.is_zero():
            out.append((change, t.plan.unit, {a.id: a.unit for a in t.plan.allowances}))
    return tuple(out)


def _prior_segment_changes(ch: Any, customers: list[str]) -> dict[tuple[str, int, int, str], SegmentChange]:
    """The segment changes of earlier runs that wrote plan rows (any status but ``abandoned``: a
    run's ``plan_correction`` commands are recorded in its audit row from ``planned`` on, with the
    same segments as sent), summed per customer × period × segment × plan. Runs from before these
    commands existed changed no live segment and count nothing."""
    rows = ch.query(
        "SELECT ledger_commands FROM reprice_runs FINAL WHERE status != 'abandoned' "
        "AND position(ledger_commands, 'plan_correction') > 0 AND correction_id IN "
        "(SELECT DISTINCT correction_id FROM usage_corrections WHERE kind = 'plan' "
        "AND has({cs:Array(String)}, customer_id))",
        parameters={"cs": customers},
    ).result_rows
    want = set(customers)
    out: dict[tuple[str, int, int, str], SegmentChange] = {}
    for (commands,) in rows:
        for cmd in json.loads(commands):
            if cmd.get("type") != "plan_correction" or cmd.get("customer_id") not in want:
                continue
            for c in segment_changes(cmd):
                k = (str(cmd["customer_id"]), int(cmd["period_start"]), c.start, c.plan)
                b = out.get(k, SegmentChange(c.start, c.plan))
                used = dict(b.used)
                for a, v in c.used.items():
                    used[a] = used.get(a, 0) + v
                out[k] = SegmentChange(c.start, c.plan, used, b.overage + c.overage, b.invoiced + c.invoiced)
    return out
