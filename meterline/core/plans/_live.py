"""Live burn-down state of one customer (pure): what the credit agent keeps beside the ledger.

The credit agent is the single writer; this module only folds. A customer's :class:`LivePlan` is
bounded: the subscription *facts* it has seen (at most ``MAX_FACTS``, the timeline is folded from
them with the plan catalog), and per recent segment the consumption so far (at most
``MAX_SEGMENTS``), never the usage itself. Rating code is shared with the bill: ``terms_at`` and
``consume`` (see docs/plans.md, "Consumption order and live burn-down").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from meterline.core.plans._rating import (
    Consumption,
    Split,
    Terms,
    Usage,
    allowance_remaining,
    consume,
    policy_room,
    terms_for,
)
from meterline.core.plans._timeline import Period, SubscriptionEvent, Timeline, parse_event
from meterline.core.plans._values import parse_instant

#: Subscription facts kept per customer: facts of ended runs are dropped first (they only shape
#: periods already billed); a run with more facts than this refuses further facts (dead letter).
MAX_FACTS = 256
#: Segments whose consumption is kept (the newest by start). An event that occurred in an older
#: segment (more than three periods or plan changes late) is charged as overage of that segment
#: starting from zero: documented limit, docs/plans.md.
MAX_SEGMENTS = 4
#: Allowance-used alert thresholds (percent of the segment's allowance).
ALERT_PCTS: tuple[int, ...] = (50, 80, 100)
#: Plan corrections remembered per segment (their ids: a re-sent correction changes nothing even
#: after the agent's command-id memory forgot it). A segment lives one billing period at most and
#: a ``reprice`` run sends one correction per customer × period, so this is never reached in
#: practice; beyond it the oldest ids are dropped.
MAX_SEGMENT_CORRECTIONS = 64

_TOKEN_FIELDS = (
    ("input", "input_tokens"),
    ("output", "output_tokens"),
    ("cached_input", "cached_input_tokens"),
    ("cache_write", "cache_write_tokens"),
    ("reasoning", "reasoning_tokens"),
)


def usage_of_priced(ev: Mapping[str, Any]) -> Usage:
    """The plan ``Usage`` of one priced event (token classes as the bill reads them from ClickHouse)."""
    tokens = {cls: int(ev.get(f) or 0) for cls, f in _TOKEN_FIELDS if int(ev.get(f) or 0) > 0}
    return Usage(str(ev["provider"]), str(ev["model"]), tokens, int(ev["charge_picos"]))


@dataclass(slots=True)
class SegmentUse:
    """Consumption of one segment so far: ``used`` per allowance, ``overage`` quantity (plan
    unit), ``invoiced`` overage picos prepaid credit did not pay (what a ``cap`` counts), and the
    allowance alerts already fired (``"allowance_id:pct"``)."""

    start: int
    plan: str  # plan key "pro@1"
    used: dict[str, int] = field(default_factory=dict)
    overage: int = 0
    invoiced: int = 0
    fired: list[str] = field(default_factory=list)
    rolled: dict[str, int] = field(default_factory=dict)  # rollover the segment's terms added (own use = used - this)
    corrections: list[str] = field(default_factory=list)  # ids of the plan corrections applied (correct_segment)

    def consumption(self) -> Consumption:
        return Consumption(dict(self.used), self.overage)


@dataclass(slots=True)
class LivePlan:
    facts: dict[str, dict[str, Any]] = field(default_factory=dict)  # event_id -> fact JSON (arrival order)
    segs: list[SegmentUse] = field(default_factory=list)  # ordered by start
    holds: dict[str, tuple[dict[str, int], int]] = field(default_factory=dict)  # request_id -> (draws, overage qty)

    # -------------------------------------------------------------------------- serialisation

    def to_dict(self) -> dict[str, Any]:
        return {
            "facts": list(self.facts.values()),
            "segs": [
                [s.start, s.plan, dict(s.used), s.overage, s.invoiced, list(s.fired), dict(s.rolled)]
                + ([list(s.corrections)] if s.corrections else [])
                for s in self.segs
            ],
            "holds": {rid: [dict(d), q] for rid, (d, q) in self.holds.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> LivePlan:
        if not d:
            return cls()
        facts = {str(f["event_id"]): dict(f) for f in d.get("facts") or []}
        segs = [
            SegmentUse(
                int(s[0]),
                str(s[1]),
                {k: int(v) for k, v in s[2].items()},
                int(s[3]),
                int(s[4]),
                list(s[5]),
                {k: int(v) for k, v in (s[6] if len(s) > 6 else {}).items()},
                [str(c) for c in (s[7] if len(s) > 7 else [])],
            )
            for s in d.get("segs") or []
        ]
        holds = {str(r): ({k: int(v) for k, v in h[0].items()}, int(h[1])) for r, h in (d.get("holds") or {}).items()}
        return cls(facts, segs, holds)

    def clone(self) -> LivePlan:
        return LivePlan.from_dict(self.to_dict())

    # -------------------------------------------------------------------------- facts

    def add_fact(self, ev: SubscriptionEvent) -> bool:
        """Remember a subscription fact (False: already known, by its content-hash id). The caller
        bounds the facts with :meth:`compact`."""
        if ev.event_id in self.facts:
            return False
        self.facts[ev.event_id] = ev.to_json()
        return True

    def compact(self, current_run_start: int | None) -> bool:
        """Keep at most ``MAX_FACTS`` facts by dropping, oldest first, facts of runs that ended
        (instant before ``current_run_start``, the anchor of the timeline's last run): they only
        shape periods long billed. False: still over the bound (the current run alone has more
        facts): the caller refuses the newest fact."""
        if len(self.facts) <= MAX_FACTS:
            return True
        if current_run_start is not None:
            old = sorted((parse_instant(f["at"], where="at"), eid) for eid, f in self.facts.items())
            for at, eid in old:
                if len(self.facts) <= MAX_FACTS or at >= current_run_start:
                    break
                del self.facts[eid]
        return len(self.facts) <= MAX_FACTS

    def events(self) -> list[SubscriptionEvent]:
        return [parse_event(f) for f in self.facts.values()]

    def facts_key(self) -> tuple[str, ...]:
        return tuple(self.facts)

    # -------------------------------------------------------------------------- segments

    def seg(self, terms: Terms) -> SegmentUse:
        """The consumption of ``terms``' segment (a fresh one at zero when unknown)."""
        for s in self.segs:
            if s.start == terms.start and s.plan == terms.plan.key:
                return s
        return SegmentUse(terms.start, terms.plan.key, rolled={k: v for k, v in terms.rolled_in.items() if v})

    def put(self, seg: SegmentUse) -> None:
        rest = [s for s in self.segs if not (s.start == seg.start and s.plan == seg.plan)]
        self.segs = sorted([*rest, seg], key=lambda s: (s.start, s.plan))[-MAX_SEGMENTS:]

    # -------------------------------------------------------------------------- reservations

    def held(self, terms: Terms, open_holds: Sequence[str]) -> Consumption:
        """The segment's consumption plus what open authorizations reserved (``open_holds``:
        the request ids the ledger still holds; reservations of closed holds are dropped)."""
        for rid in [r for r in self.holds if r not in open_holds]:
            del self.holds[rid]
        seg = self.seg(terms)
        used = dict(seg.used)
        over = seg.overage
        for draws, q in self.holds.values():
            for k, v in draws.items():
                used[k] = used.get(k, 0) + v
            over += q
        return Consumption(used, over)


def live_terms(timeline: Timeline, live: LivePlan, at: int) -> Terms | None:
    """``terms_at`` with the rollover the bill gives (``rate_periods``): the unused own allowance
    of the previous consecutive period's last segment (its consumption as the agent knows it
    now), up to ``rollover_max``, added to the first segment of the period containing ``at``."""
    period = timeline.period_at(at)
    if period is None:
        return None
    i = period.segment_at(at)
    if i is None:
        return None
    carry: dict[str, int] = {}
    if i == 0 and period.index > 0:
        prev = timeline.period_at(period.start - 1)
        if (
            prev is not None
            and prev.anchor == period.anchor
            and prev.index + 1 == period.index
            and prev.stop == prev.end
        ):
            last = terms_for(prev, len(prev.segments) - 1)
            seg = live.seg(last)
            for a in last.plan.allowances:
                if a.rollover_max is None:
                    continue
                own_used = max(seg.used.get(a.id, 0) - seg.rolled.get(a.id, 0), 0)
                carry[a.id] = min(a.rollover_max, max(last.included.get(a.id, 0) - own_used, 0))
    return terms_for(period, i, carry)


def burn(terms: Terms, seg: SegmentUse, usage: Usage) -> tuple[SegmentUse, Split]:
    """One event's burn-down on its segment (allowances first; the rest is overage)."""
    after, split = consume(terms, seg.consumption(), usage)
    rolled = {k: v for k, v in terms.rolled_in.items() if v}  # as of this event (late usage may change it)
    return SegmentUse(
        seg.start,
        seg.plan,
        dict(after.used),
        after.overage,
        seg.invoiced,
        list(seg.fired),
        rolled,
        list(seg.corrections),
    ), split


@dataclass(frozen=True, slots=True)
class SegmentChange:
    """What a re-rating changes in one segment's consumption (``reprice``, docs/corrections.md):
    the signed change of ``used`` per allowance and of the ``overage`` quantity (the plan's unit:
    tokens, or picos of charge), and ``invoiced``: the signed change of the part of the period's
    bill the ledger carries that belongs to this segment (overage minus cap / block write-offs),
    the most the segment's ``invoiced`` overage may move."""

    start: int  # segment start, epoch seconds (``SegmentUse.start``)
    plan: str  # plan key "pro@1"
    used: Mapping[str, int] = field(default_factory=dict)
    overage: int = 0
    invoiced: int = 0

    def is_zero(self) -> bool:
        return not any(self.used.values()) and not self.overage and not self.invoiced


def correct_segment(
    terms: Terms, seg: SegmentUse, change: SegmentChange, correction_id: str, not_prepaid: int
) -> SegmentUse | None:
    """The live segment after a plan correction (None: ``change`` names another segment, or this
    correction was already applied to it: a re-send changes nothing).

    - ``used`` moves by the change on both signs, within ``[0, available]``: never below zero
      (a cut larger than what the agent counted, e.g. usage the agent has not burned yet, stops at
      zero) nor above the allowance (the rest of a raise is overage, which the ledger amount
      already carries). ``overage`` likewise never below zero.
    - ``invoiced`` (what a ``cap`` counts) moves by ``not_prepaid``: the part of the correction's
      ledger effect prepaid credit did not carry (a raise: its debits without a grant; a cut: its
      refund to the overage, as a negative number), bounded by the segment's share
      (``change.invoiced``, same sign) and never below zero: a refund of overage counted in an
      earlier segment never makes this one's negative.
    """
    if change.start != seg.start or change.plan != seg.plan or correction_id in seg.corrections:
        return None
    used = dict(seg.used)
    for aid, d in change.used.items():
        if aid not in {a.id for a in terms.plan.allowances}:
            continue
        used[aid] = min(max(used.get(aid, 0) + d, 0), max(terms.available(aid), 0))
    if change.invoiced >= 0:
        moved = min(max(not_prepaid, 0), change.invoiced)
    else:
        moved = max(min(not_prepaid, 0), change.invoiced)
    return SegmentUse(
        seg.start,
        seg.plan,
        used,
        max(seg.overage + change.overage, 0),
        max(seg.invoiced + moved, 0),
        list(seg.fired),
        dict(seg.rolled),
        [*seg.corrections, correction_id][-MAX_SEGMENT_CORRECTIONS:],
    )


def segment_consumptions(
    period: Period, usage_by_segment: Sequence[Iterable[Usage]], rollover_in: Mapping[str, int] | None = None
) -> list[tuple[Terms, Consumption]]:
    """Each segment's terms and consumption in a period, folded exactly as :func:`rate_period`
    does (``consume`` over the segment's usage): what the live agent's segment holds once it has
    burned that usage."""
    out = []
    for i, items in enumerate(usage_by_segment):
        t = terms_for(period, i, rollover_in)
        cons = Consumption()
        for u in items:
            cons, _ = consume(t, cons, u)
        out.append((t, cons))
    return out


def gate(terms: Terms, seg: SegmentUse, usable_prepaid: int) -> str | None:
    """The plan's block reason now, or None. ``allow``: never. ``block``: once the allowances and
    the prepaid credit are exhausted, or overage was left to invoice (``allowance_exhausted``).
    ``cap``: once the invoiced overage reaches the (prorated) cap (``plan_cap_reached``)."""
    room = policy_room(terms, seg.invoiced)
    if room is None:
        return None
    rem = allowance_remaining(terms, seg.consumption())
    exhausted = all(v == 0 for v in rem.values()) and usable_prepaid <= 0
    if terms.plan.on_exhausted == "block":
        return "allowance_exhausted" if seg.invoiced > 0 or exhausted else None
    return "plan_cap_reached" if room == 0 and (seg.invoiced > 0 or exhausted) else None


def alerts_due(terms: Terms, seg: SegmentUse) -> list[tuple[str, int, int, int]]:
    """Allowance thresholds newly crossed: ``(allowance_id, pct, used, available)``; marks them
    fired on ``seg`` (each fires once per segment: the alert id names the segment)."""
    out = []
    for a in terms.plan.allowances:
        avail = terms.available(a.id)
        used = seg.used.get(a.id, 0)
        for pct in ALERT_PCTS:
            tag = f"{a.id}:{pct}"
            if avail > 0 and used * 100 >= pct * avail and tag not in seg.fired:
                seg.fired.append(tag)
                out.append((a.id, pct, used, avail))
    return out


def allowance_view(terms: Terms, seg: SegmentUse, reserved: Consumption | None = None) -> list[dict[str, Any]]:
    """Each allowance of the segment for status / balance: id, included, used, remaining (tokens as
    integers, amount allowances in picos: the caller formats), and what open holds reserve."""
    rem = allowance_remaining(terms, seg.consumption())
    out = []
    for a in terms.plan.allowances:
        used = seg.used.get(a.id, 0)
        d: dict[str, Any] = {
            "id": a.id,
            "plan": terms.plan.key,
            "unit": a.unit,
            "included": terms.available(a.id),
            "rolled_in": terms.rolled_in.get(a.id, 0),
            "used": used,
            "remaining": rem[a.id],
        }
        if reserved is not None:
            d["reserved"] = max(reserved.used.get(a.id, 0) - used, 0)
        out.append(d)
    return out
