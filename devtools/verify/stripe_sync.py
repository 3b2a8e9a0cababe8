"""The Stripe part of the invariant: expected meter units per window, and a sync session against
the local Stripe server with faults injected."""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal, localcontext
from typing import Any

from devtools.verify.oracle import _EXACT, Delta, Expected

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- Stripe: the push part


class StripeUnits:
    """The sync's unit rule (cost mode) replayed from the oracle's charges, independently of the job.

    Per customer, at each sync session (:meth:`plan`, with the data the sync saw): every closed window
    (start + window ≤ ``until``) whose Σ charge grew since the last plan gets
    ``exact = growth × 10^exponent + carry``, ``value = floor(exact)``, ``carry = exact − value``, in
    window order, the carry running across windows AND sessions (late usage = a new revision).
    ``units[customer][window_start]`` is the Σ of values Stripe must hold per window."""

    def __init__(self, window: int, exponent: int = 6) -> None:
        self.window = window
        self.scale = Decimal(10) ** exponent
        self.planned: dict[str, dict[int, Decimal]] = defaultdict(dict)
        self.carry: dict[str, Decimal] = defaultdict(Decimal)
        self.units: dict[str, dict[int, int]] = defaultdict(dict)

    def plan(self, expected: Expected, until: int) -> int:
        """Account one sync session; returns how many non-zero values it must send."""
        per: dict[str, dict[int, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
        sends = 0
        with localcontext(_EXACT):
            for key, (_cost, charge) in expected.priced.items():
                ws = expected.occurred_ms[key] // 1000 // self.window * self.window
                if ws + self.window <= until:
                    per[key[0]][ws] += charge
            for c in sorted(per):
                for ws in sorted(per[c]):
                    growth = per[c][ws] - self.planned[c].get(ws, Decimal(0))
                    if growth <= 0:
                        continue
                    exact = growth * self.scale + self.carry[c]
                    value = int(exact.to_integral_value(rounding=ROUND_FLOOR))
                    self.carry[c] = exact - value
                    self.units[c][ws] = self.units[c].get(ws, 0) + value
                    self.planned[c][ws] = per[c][ws]
                    sends += 1 if value else 0
        return sends


def expected_stripe_units(
    expected: Expected, *, window: int, until: int, exponent: int = 6
) -> dict[str, dict[int, int]]:
    """Per customer, per closed window: the units one sync session must push (:class:`StripeUnits`)."""
    units = StripeUnits(window, exponent)
    units.plan(expected, until)
    return dict(units.units)


def stripe_deltas(want: Mapping[str, Mapping[int, int]], got: Mapping[str, Mapping[int, int]]) -> list[Delta]:
    """Per customer total and per window (only non-zero windows are compared: a 0-unit window is
    carried, never sent)."""
    deltas = []
    for c in sorted(set(want) | set(got)):
        w, g = want.get(c, {}), got.get(c, {})
        if sum(w.values()) != sum(g.values()):
            deltas.append(
                Delta(
                    "stripe_units",
                    f"{c} total",
                    str(sum(w.values())),
                    f"{sum(g.values())} (Δ {sum(g.values()) - sum(w.values())})",
                )
            )
        for ws in sorted({k for k, v in w.items() if v} | {k for k, v in g.items() if v}):
            if w.get(ws, 0) != g.get(ws, 0):
                deltas.append(Delta("stripe_units", f"{c} window {ws}", str(w.get(ws, 0)), str(g.get(ws, 0))))
    return deltas


class SyncCrash(Exception):
    """Raised by the ``on_sent`` hook: the sync dies after Stripe answered, before the cursor heard."""


@dataclass
class StripeReport:
    """Figures of one :meth:`StripeSession.run`: faults injected by kind, where the first sync run
    crashed, the sync runs' counters, and per customer (expected units, observed units)."""

    until: int = 0
    runs: int = 0
    crashed_after: int | None = None
    faults: dict[str, int] = field(default_factory=dict)
    planned: int = 0
    sent: int = 0
    acked: int = 0
    retries: int = 0
    per_customer: dict[str, tuple[int, int]] = field(default_factory=dict)
    deltas: list[Delta] = field(default_factory=list)


class StripeSession:
    """The real sync job (``jobs.stripe.sync``, cost mode, 1 h windows, no settle time) pushing from
    ``ch`` (a clickhouse-connect-like client) to a :class:`~devtools.stripe_local.LocalStripe`.

    ``ls``: an already running LocalStripe (kept open), else one is started and :meth:`close` stops it.
    Meter summaries are read back per hour (``value_grouping_window=hour``), hence the 1 h window.
    """

    WINDOW = 3600
    PATH = "/v1/billing/meter_events"

    def __init__(self, ch: Any, *, ls: Any = None) -> None:
        from devtools.stripe_local import LocalStripe
        from jobs.stripe import StripeTarget, load_billing_config

        self.ch = ch
        self._own = ls is None
        self.ls = ls if ls is not None else LocalStripe()
        self.target = StripeTarget.local(self.ls.url, max_network_retries=2)
        self.cfg = load_billing_config(None, mode="cost").with_sync(
            settle_seconds=0, backoff_seconds=0.01, window_seconds=self.WINDOW
        )
        self.meter_ids: dict[str, str] = {}
        self.units = StripeUnits(self.WINDOW, self.cfg.cost.unit_exponent)  # the oracle, across runs
        self.slept: list[float] = []  # our own back-off delays (not slept: no wall clock in the checks)

    def close(self) -> None:
        if self._own:
            self.ls.stop()

    @property
    def event_name(self) -> str:
        return self.cfg.cost.event_name

    def provision(self, customers: Iterable[str]) -> None:
        from jobs.stripe import provision

        report = provision(self.target.client(), self.ch, self.cfg, customers=sorted(customers))
        self.meter_ids.update(report.meters)

    def arm_faults(self, rng: random.Random) -> dict[str, int]:
        """Dropped responses (committed, answer lost), 5xx and plain 429s on the next meter-event calls."""
        n = {"dropped": rng.randint(1, 2), "5xx": rng.randint(1, 2), "429": rng.randint(1, 2)}
        self.ls.faults.drop_response(n["dropped"], path_prefix=self.PATH)
        self.ls.faults.server_error(n["5xx"], status=rng.choice([500, 502, 503]), path_prefix=self.PATH)
        self.ls.faults.rate_limit(n["429"], path_prefix=self.PATH, should_retry=False)
        return n

    def sync(self, now: int, on_sent: Callable[[Any], None] | None = None) -> Any:
        from jobs.stripe import sync

        return sync(self.target, self.ch, self.cfg, now=now, on_sent=on_sent, sleep=self.slept.append)

    def observed(self, customers: Iterable[str], since: int, until: int) -> dict[str, dict[int, int]]:
        """Per customer, per hour: Stripe's meter event summary over [since, until)."""
        from jobs.stripe._store import load_customers

        links, client, out = load_customers(self.ch), self.target.client(), {}
        meter = self.meter_ids[self.event_name]
        for c in customers:
            if c not in links:
                continue
            res = client.v1.billing.meters.event_summaries.list(
                meter,
                {
                    "customer": links[c].stripe_customer_id,
                    "start_time": since,
                    "end_time": until,
                    "value_grouping_window": "hour",
                    "limit": 100,
                },
            )
            out[c] = {int(s.start_time): int(Decimal(str(s.aggregated_value))) for s in res.auto_paging_iter()}
        return out

    def run(
        self,
        expected: Expected,
        rng: random.Random,
        *,
        faults: bool = True,
        crash: bool = True,
        now: int | None = None,
        say: Callable[[str], None] = log.info,
    ) -> StripeReport:
        """Provision (once), arm faults, sync with a crash after a random push, re-run, run once more
        (must plan and send nothing), then compare Stripe with :class:`StripeUnits` (all the data the
        sync sees must be in ``expected``; call again after more usage: late usage, replays)."""
        now = self.ls.now() if now is None else now
        w = self.WINDOW
        rep = StripeReport(until=(now - self.cfg.sync.settle_seconds) // w * w)
        customers = sorted({c for c, _ in expected.priced})
        if self.event_name not in self.meter_ids:
            self.provision(customers)
        to_send = self.units.plan(expected, rep.until)
        want = self.units.units
        rep.faults = self.arm_faults(rng) if faults else {}
        crash_at = rng.randint(1, max(1, to_send - 1)) if crash and to_send > 1 else None
        seen: list[str] = []

        def crasher(push: Any) -> None:
            seen.append(push.identifier)
            if len(seen) == crash_at:
                raise SyncCrash(f"sync killed after push {crash_at} ({push.identifier}), before its cursor write")

        summaries, slept_before = [], len(self.slept)
        try:
            summaries.append(self.sync(now, crasher if crash_at else None))
        except SyncCrash:
            rep.crashed_after = crash_at
            say(f"Stripe sync crashed after push {crash_at} of ~{to_send}; re-running")
        rep.runs = 1
        for _ in range(2):  # the re-run, then one that must find nothing to do
            summaries.append(self.sync(now))
            rep.runs += 1
        left = self.ls.faults.armed()
        self.ls.faults.clear()
        if left:  # not every armed fault was hit: report only what was injected
            for kind, name in (("drop", "dropped"), ("status", "5xx"), ("rate_limit", "429")):
                rep.faults[name] -= sum(int(f.get("remaining", 0)) for f in left if f.get("kind") == kind)
        rep.planned = sum(s.planned for s in summaries)
        rep.sent = sum(s.sent for s in summaries) + len(seen)
        rep.acked = sum(s.acked for s in summaries)
        rep.retries = len(self.slept) - slept_before  # our own back-offs (the crashed run's summary is lost)
        last = summaries[-1]
        if (last.planned, last.sent) != (0, 0):
            rep.deltas.append(
                Delta(
                    "stripe_idempotent",
                    "last sync run",
                    "planned 0, sent 0",
                    f"planned {last.planned}, sent {last.sent}",
                )
            )
        problems = [s for s in summaries if not s.ok]
        for s in problems:
            rep.deltas.append(
                Delta(
                    "stripe_sync",
                    "summary",
                    "ok",
                    f"too_old={len(s.too_old)} failed={s.failed[:2]} shrunk={s.shrunk[:2]} unmapped={s.unmapped[:2]}",
                )
            )
        got = self.observed(customers, rep.until - 7 * 86400, rep.until)
        rep.deltas += stripe_deltas(want, got)
        rep.deltas += self._raw_event_checks()
        for c in sorted(set(want) | set(got)):
            rep.per_customer[c] = (sum(want.get(c, {}).values()), sum(got.get(c, {}).values()))
        return rep

    def _raw_event_checks(self) -> list[Delta]:
        """Every stored meter event is one acknowledged push: identifiers unique, count and Σ equal."""
        from jobs.stripe._store import load_pushes

        events = [e for e in self.ls.meter_events(self.event_name) if e.get("status", "valid") == "valid"]
        idents = [e["identifier"] for e in events]
        acked = {p.identifier: p.value for p in load_pushes(self.ch) if p.status == "acked" and p.value}
        deltas = []
        if len(idents) != len(set(idents)):
            deltas.append(Delta("stripe_events", "identifiers", "unique", f"{len(idents) - len(set(idents))} repeated"))
        stored = {e["identifier"]: int(Decimal(str(e["value"]))) for e in events}
        if stored != acked:
            diff = sorted(set(stored.items()) ^ set(acked.items()))[:3]
            deltas.append(
                Delta(
                    "stripe_events",
                    "meter events vs acked cursor rows",
                    f"{len(acked)} equal (identifier, value)",
                    f"{len(stored)}, differing: {diff}",
                )
            )
        return deltas
