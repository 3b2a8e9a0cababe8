"""Subscription timelines: facts (events) folded into runs, segments and billing periods.

A subscription is never a mutable row. Its history is a list of facts, each with a
deterministic ``event_id``:

- ``subscribed`` (customer, plan, version?, at): starts a *run*; the run's **anchor** is ``at``,
  which may lie in the past. Without a version, the latest version in force at ``at``.
- ``changed`` (customer, plan, version?, at): from ``at`` the customer is on the new plan version.
  Same interval: the anchor stays and the period containing ``at`` is split into two *segments*
  (prorated, see ``_rating``). Different interval: the run ends at ``at`` and a new run anchored
  at ``at`` begins (the old period is cut short and prorated).
- ``cancelled`` (customer, at, at_period_end?): the run stops at ``at``, or at the end of the
  period containing ``at``.
- ``migrated`` (customer, plan, to version, at): the customer moves to the new version of the
  *same* plan at the start of its first period that begins at or after ``at``, so a migration never
  prorates. It is a no-op if the customer is no longer on that plan by then.

The fold is a pure function of the *set* of facts: events are ordered by ``at``, then (for equal
instants) subscribed, changed, migrated, cancelled, then ``event_id`` -- never by the order they
were recorded, so a topic and a ClickHouse table give the same timeline. Duplicates (same
``event_id``) collapse, and a fact that
breaks a rule (a change with no subscription, an unknown plan version...) is reported in
``rejected`` and otherwise ignored, never raised: no fact a producer may send can crash a reader.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meterline.core.ids import CUSTOMER_ID_RULE, is_customer_id
from meterline.core.plans._calendar import add_intervals, period_bounds, period_index
from meterline.core.plans._catalog import PLAN_ID_RE, PlanCatalog, PlanVersion
from meterline.core.plans._values import SubscriptionError, format_instant, parse_instant, short_hash

EVENT_TYPES: tuple[str, ...] = ("subscribed", "changed", "cancelled", "migrated")
_TIE_ORDER = {"subscribed": 0, "changed": 1, "migrated": 2, "cancelled": 3}


@dataclass(frozen=True, slots=True)
class SubscriptionEvent:
    """One subscription fact. ``at`` is epoch seconds (UTC). ``event_id`` is a content hash, so
    publishing the same fact twice is idempotent."""

    type: str
    customer_id: str
    at: int
    plan_id: str | None = None
    version: int | None = None
    at_period_end: bool = False
    event_id: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.event_id:
            object.__setattr__(self, "event_id", f"{self.type}:{short_hash(self._content())}")

    def _content(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.type, "customer_id": self.customer_id, "at": format_instant(self.at)}
        if self.plan_id is not None:
            d["plan_id"] = self.plan_id
        if self.version is not None:
            d["version"] = self.version
        if self.at_period_end:
            d["at_period_end"] = True
        return d

    def to_json(self) -> dict[str, Any]:
        return {"event_id": self.event_id, **self._content()}

    def to_record(self) -> tuple[str, bytes]:
        """(key, value) for the ``subscriptions`` topic: keyed by customer, so one customer's
        facts stay in order on one partition."""
        return self.customer_id, json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()


def parse_event(data: Any) -> SubscriptionEvent:
    """Validate a subscription fact from its JSON form (SubscriptionError on any defect)."""
    if isinstance(data, (bytes, bytearray)):
        try:
            data = json.loads(bytes(data).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise SubscriptionError(f"subscription event is not JSON: {exc}") from None
    if not isinstance(data, Mapping):
        raise SubscriptionError("subscription event: expected a JSON object")
    allowed = {"event_id", "type", "customer_id", "at", "plan_id", "version", "at_period_end"}
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise SubscriptionError(f"subscription event: unknown key(s) {', '.join(unknown)}")
    typ = data.get("type")
    if typ not in EVENT_TYPES:
        raise SubscriptionError(
            f"subscription event: type must be one of {', '.join(EVENT_TYPES)}, got {typ!r}", field="type"
        )
    cid = data.get("customer_id")
    if not is_customer_id(cid):
        raise SubscriptionError(f"subscription event: bad customer_id {cid!r}: {CUSTOMER_ID_RULE}", field="customer_id")
    assert isinstance(cid, str)
    at = parse_instant(data.get("at"), where="at", error=SubscriptionError)
    plan_id = data.get("plan_id")
    version = data.get("version")
    if typ in ("subscribed", "changed", "migrated"):
        if not isinstance(plan_id, str) or not PLAN_ID_RE.fullmatch(plan_id):
            raise SubscriptionError(f"subscription event: {typ} needs a plan_id", field="plan_id")
    elif plan_id is not None or version is not None:
        raise SubscriptionError("subscription event: cancelled takes no plan_id or version", field="plan_id")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise SubscriptionError(
            f"subscription event: version must be a whole number from 1, got {version!r}", field="version"
        )
    if typ == "migrated" and version is None:
        raise SubscriptionError("subscription event: migrated needs the target version", field="version")
    ape = data.get("at_period_end", False)
    if not isinstance(ape, bool) or (ape and typ != "cancelled"):
        raise SubscriptionError(
            "subscription event: at_period_end is a boolean, for cancelled only", field="at_period_end"
        )
    ev = SubscriptionEvent(typ, cid, at, plan_id, version, ape)
    given = data.get("event_id")
    if given is not None and given != ev.event_id:
        raise SubscriptionError(
            f"subscription event: event_id {given!r} does not match its content ({ev.event_id})", field="event_id"
        )
    return ev


# --------------------------------------------------------------------------- folded shapes


@dataclass(frozen=True, slots=True)
class Segment:
    """A stretch ``[start, end)`` of time on one plan version (``end`` None = open)."""

    start: int
    end: int | None
    plan: PlanVersion


@dataclass(frozen=True, slots=True)
class Run:
    """One continuous subscription with one anchor and one interval: ``[anchor, end)``."""

    anchor: int
    interval: str
    segments: tuple[Segment, ...]
    end: int | None  # None = still running
    cancelled: bool  # ended by a cancellation (vs. an interval change)


@dataclass(frozen=True, slots=True)
class Period:
    """One billing period ``[start, end)`` of a run (``end`` is the natural end: anchor + k + 1
    intervals), with the segments that fall in it clipped to ``[start, stop)``. ``stop`` < ``end``
    when the run stopped mid-period (a cancellation, or an interval change)."""

    customer_id: str
    index: int
    anchor: int
    start: int
    end: int
    stop: int
    segments: tuple[Segment, ...]

    @property
    def seconds(self) -> int:
        return self.end - self.start

    def segment_at(self, at: int) -> int | None:
        """Index of the segment containing instant ``at`` (None outside ``[start, stop)``)."""
        for i, s in enumerate(self.segments):
            if s.start <= at < (s.end if s.end is not None else self.stop):
                return i
        return None


@dataclass(frozen=True, slots=True)
class Rejected:
    event: SubscriptionEvent
    reason: str


@dataclass(frozen=True, slots=True)
class Timeline:
    customer_id: str
    runs: tuple[Run, ...]
    rejected: tuple[Rejected, ...] = ()

    def plan_at(self, at: int) -> PlanVersion | None:
        """The plan version in force at ``at`` (None when not subscribed then)."""
        for r in self.runs:
            for s in r.segments:
                if s.start <= at and (s.end is None or at < s.end) and (r.end is None or at < r.end):
                    return s.plan
        return None

    def periods(self, until: int) -> list[Period]:
        """Every period that starts before ``until``, in order."""
        out: list[Period] = []
        for r in self.runs:
            k = 0
            while True:
                start = add_intervals(r.anchor, k, r.interval)
                if start >= until or (r.end is not None and start >= r.end):
                    break
                end = add_intervals(r.anchor, k + 1, r.interval)
                stop = end if r.end is None else min(end, r.end)
                segs = []
                for s in r.segments:
                    s_end = stop if s.end is None else min(s.end, stop)
                    s_start = max(s.start, start)
                    if s_start < s_end:
                        segs.append(Segment(s_start, s_end, s.plan))
                out.append(Period(self.customer_id, k, r.anchor, start, end, stop, tuple(segs)))
                k += 1
        return out

    def period_at(self, at: int) -> Period | None:
        """The period containing instant ``at`` (None when not subscribed then)."""
        for r in self.runs:
            if r.anchor <= at and (r.end is None or at < r.end):
                k = period_index(r.anchor, at, r.interval)
                start = add_intervals(r.anchor, k, r.interval)
                for p in self.periods(start + 1):
                    if p.anchor == r.anchor and p.index == k:
                        return p
        return None


# --------------------------------------------------------------------------- the fold


class _Open:
    """A run being built by the fold."""

    def __init__(self, anchor: int, plan: PlanVersion) -> None:
        self.anchor = anchor
        self.interval = plan.interval
        self.segs: list[tuple[int, PlanVersion]] = [(anchor, plan)]
        self.end: int | None = None
        self.cancelled = False

    def active(self, at: int) -> bool:
        return self.anchor <= at and (self.end is None or at < self.end)

    def plan_at(self, at: int) -> PlanVersion:
        cur = self.segs[0][1]
        for s, p in self.segs:
            if s <= at:
                cur = p
        return cur

    def switch(self, at: int, plan: PlanVersion) -> None:
        """From ``at`` on ``plan`` (drops any scheduled switch after ``at``)."""
        self.segs = [(s, p) for s, p in self.segs if s < at]
        if self.segs and self.segs[-1][1] == plan:
            return
        self.segs.append((at, plan))

    def close(self) -> Run:
        segs = []
        for i, (s, p) in enumerate(self.segs):
            nxt = self.segs[i + 1][0] if i + 1 < len(self.segs) else None
            segs.append(Segment(s, nxt, p))
        return Run(self.anchor, self.interval, tuple(segs), self.end, self.cancelled)


def fold_timeline(customer_id: str, events: Iterable[SubscriptionEvent], catalog: PlanCatalog) -> Timeline:
    """Fold one customer's subscription facts into runs (pure; never raises on a bad fact)."""
    seen: set[str] = set()
    ordered: list[tuple[int, int, SubscriptionEvent]] = []
    for ev in events:
        if ev.customer_id != customer_id or ev.event_id in seen:
            continue
        seen.add(ev.event_id)
        ordered.append((ev.at, _TIE_ORDER[ev.type], ev))
    ordered.sort(key=lambda t: (t[0], t[1], t[2].event_id))
    runs: list[Run] = []
    rejected: list[Rejected] = []
    cur: _Open | None = None

    def resolve(ev: SubscriptionEvent) -> PlanVersion:
        assert ev.plan_id is not None
        if ev.version is not None:
            pv = catalog.get(ev.plan_id, ev.version)
            if pv is None:
                raise SubscriptionError(f"unknown plan version {ev.plan_id}@{ev.version}")
            return pv
        pv = catalog.current(ev.plan_id, ev.at)
        if pv is None:
            raise SubscriptionError(f"no version of plan {ev.plan_id!r} is in force at {format_instant(ev.at)}")
        return pv

    for at, _, ev in ordered:
        try:
            if cur is not None and cur.end is not None and cur.end <= at:
                runs.append(cur.close())
                cur = None
            if ev.type == "subscribed":
                if cur is not None:
                    raise SubscriptionError("already subscribed (change or cancel the running subscription)")
                cur = _Open(at, resolve(ev))
            elif ev.type == "changed":
                if cur is None or not cur.active(at):
                    raise SubscriptionError("no subscription is running at that time")
                pv = resolve(ev)
                if pv.interval != cur.interval:
                    cur.end, cur.cancelled = at, False
                    if at == cur.anchor:  # changed at the very start: just replace it
                        cur = _Open(at, pv)
                    else:
                        runs.append(cur.close())
                        cur = _Open(at, pv)
                else:
                    cur.switch(at, pv)
            elif ev.type == "cancelled":
                if cur is None or not cur.active(at):
                    raise SubscriptionError("no subscription is running at that time")
                end = period_bounds(cur.anchor, at, cur.interval)[1] if ev.at_period_end else at
                if cur.end is None or end < cur.end:
                    cur.end, cur.cancelled = end, True
                    cur.segs = [(s, p) for s, p in cur.segs if s < end]
            else:  # migrated
                if cur is None or not cur.active(at):
                    raise SubscriptionError("no subscription is running at that time")
                pv = resolve(ev)
                if pv.interval != cur.interval:
                    raise SubscriptionError("a migration cannot change the interval; use change")
                k = period_index(cur.anchor, at, cur.interval)
                eff = (
                    at
                    if add_intervals(cur.anchor, k, cur.interval) == at
                    else add_intervals(cur.anchor, k + 1, cur.interval)
                )
                on = cur.plan_at(eff)
                if on.plan_id != pv.plan_id:
                    raise SubscriptionError(f"the customer is not on plan {pv.plan_id!r} at {format_instant(eff)}")
                if cur.end is None or eff < cur.end:
                    cur.switch(eff, pv)
        except SubscriptionError as exc:
            rejected.append(Rejected(ev, exc.message))
    if cur is not None:
        runs.append(cur.close())
    return Timeline(customer_id, tuple(runs), tuple(rejected))
