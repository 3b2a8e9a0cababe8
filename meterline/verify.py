"""``meterline verify``: a bounded chaos session that proves nothing is lost and nothing is double-charged.

The invariant (pricing part; see docs/invariants.md)::

    Σ accepted events produced (distinct ids) + Σ bad inputs  =  rows(usage_priced) + rows(usage_rejected)
    per customer: Σ cost, Σ charge, count in usage_priced     =  an independent exact Decimal expectation
    usage_hourly / usage_daily                                =  the raw sums of usage_priced, exactly

and it must hold after SIGKILLed workers, replayed / duplicated input, hostile records and a
ClickHouse outage. The pieces are public so the test suite (``tests/invariants``) drives the same
harness as the CLI:

* :class:`Expected` — the oracle. It never calls :mod:`meterline.pricing`: cost is
  ``Σ tokens × per-million rate / 10^6`` in plain :class:`~decimal.Decimal`, charge is
  ``cost × (1 + markup_pct / 100)``, from :data:`RATES` / :data:`MARKUP_PCT` (the numbers of
  ``infra/prices/seed.yaml``).
* :data:`PRICING_CHECKS` — functions ``(query, expected) -> list[Delta]``. Credits / Stripe sync add
  their own checks of the same shape (e.g. "Σ grants − Σ debits = balance", "Σ meter events =
  Σ charge") and pass ``checks=PRICING_CHECKS + (...)`` to :func:`check_invariants`.
* :class:`FlakyClickHouse` — the sink's client factory, with a switch that makes ClickHouse
  unreachable (every call and the factory raise) until restored.
* :class:`ChaosStack` — broker topics + faust worker processes + sink thread on one chDB database.

:func:`run_verify` runs the session and returns a :class:`VerifyReport`; :func:`verify_command` is
the typer command the CLI mounts as ``meterline verify`` (exit 1 on any Δ).
"""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import ROUND_DOWN, ROUND_FLOOR, Context, Decimal, Inexact, localcontext
from pathlib import Path
from typing import Any, Optional

from meterline.config import Settings

__all__ = [
    "CUSTOMERS",
    "MARKUP_PCT",
    "PRICING_CHECKS",
    "RATES",
    "ChaosStack",
    "CreditPlan",
    "Delta",
    "Expected",
    "FlakyClickHouse",
    "InvariantCheck",
    "LedgerOutcome",
    "StripeReport",
    "StripeSession",
    "StripeUnits",
    "SyncCrash",
    "VerifyReport",
    "check_invariants",
    "credit_checks",
    "expected_stripe_units",
    "hostile_records",
    "ledger_check",
    "make_events",
    "plan_credits",
    "price_file",
    "run_verify",
    "status_check",
    "stripe_deltas",
    "verify_command",
]

log = logging.getLogger(__name__)

# (provider, model, model_version) -> per-million list prices (seed.yaml's numbers, as text).
RATES: dict[tuple[str, str, str | None], dict[str, str]] = {
    ("openai", "gpt-4o", None): {"input": "5.00", "output": "15.00", "cached_input": "2.50"},
    ("openai", "o1", None): {"input": "15.00", "output": "60.00", "cached_input": "7.50"},
    ("anthropic", "claude-3-5-sonnet", "20241022"): {"input": "3.00", "output": "15.00", "cached_input": "0.30",
                                                      "cache_write": "3.75"},
    ("google", "gemini-1.5-pro", None): {"input": "3.50", "output": "10.50", "cached_input": "0.875"},
    ("meta", "llama-3-70b", None): {"input": "0.59", "output": "0.79"},
    ("mistral", "mixtral-8x22b", None): {"input": "1.20", "output": "1.20"},
}  # fmt: skip
MARKUP_PCT: dict[str, str] = {"acme": "20", "globex": "7.5"}
CUSTOMERS: tuple[str, ...] = ("acme", "globex", "initech", "umbrella", "hooli", "cüstomer-ünïcode-✓")
_MILLION = Decimal(1_000_000)
_EXACT = Context(prec=80, traps=[Inexact])  # the oracle raises rather than round
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
Query = Callable[[str], list[tuple[Any, ...]]]


def price_file() -> dict[str, Any]:
    """:data:`RATES` / :data:`MARKUP_PCT` as a price-file mapping (``load_price_book`` input)."""
    prices = []
    for (provider, model, version), rates in RATES.items():
        entry: dict[str, Any] = {"provider": provider, "model": model, "effective_from": "2024-01-01T00:00:00Z",
                                 "per_million": dict(rates)}  # fmt: skip
        if version is not None:
            entry["model_version"] = version
        prices.append(entry)
    cards = [{"customer_id": "*", "markup_pct": "0"}]
    cards += [{"customer_id": c, "markup_pct": pct} for c, pct in MARKUP_PCT.items()]
    return {"currency": "USD", "prices": prices, "rate_cards": cards}


# --------------------------------------------------------------------------- the oracle


@dataclass(frozen=True, slots=True)
class Delta:
    """One way the stored data differs from the expectation."""

    check: str
    subject: str
    expected: str
    observed: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.subject}: expected {self.expected}, observed {self.observed}"


@dataclass
class Expected:
    """What the stores must hold, computed independently of meterline.pricing.

    ``priced`` maps ``(customer_id, event_id)`` to ``(cost, charge)``; adding the same id twice is a
    no-op (a duplicate must not change any total). ``rejected`` counts hostile records / events that
    must each become exactly one ``usage_rejected`` row.
    """

    priced: dict[tuple[str, str], tuple[Decimal, Decimal]] = field(default_factory=dict)
    rejected: int = 0
    rejected_reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    occurred_ms: dict[tuple[str, str], int] = field(default_factory=dict)  # event time (Stripe windows)
    credit_plans: dict[str, CreditPlan] = field(default_factory=dict)  # customers set up in the ledger

    @staticmethod
    def cost_of(ev: Any) -> Decimal:
        with localcontext(_EXACT):
            return Expected._cost_of(ev)

    @staticmethod
    def _cost_of(ev: Any) -> Decimal:
        rates = {k: Decimal(v) for k, v in RATES[(ev.provider, ev.model, ev.model_version)].items()}
        out_rate = rates["output"]
        total = Decimal(ev.input_tokens) * rates["input"] + Decimal(ev.output_tokens) * out_rate
        total += Decimal(ev.reasoning_tokens) * rates.get("reasoning", out_rate)
        if ev.cached_input_tokens:
            total += Decimal(ev.cached_input_tokens) * rates["cached_input"]
        if ev.cache_write_tokens:
            total += Decimal(ev.cache_write_tokens) * rates["cache_write"]
        return total / _MILLION

    @staticmethod
    def charge_of(customer_id: str, cost: Decimal) -> Decimal:
        with localcontext(_EXACT):
            return cost * (1 + Decimal(MARKUP_PCT.get(customer_id, "0")) / 100)

    def add_priced(self, events: Iterable[Any]) -> None:
        for ev in events:
            key = (ev.customer_id, ev.event_id)
            if key in self.priced:
                continue
            cost = self.cost_of(ev)
            self.priced[key] = (cost, self.charge_of(ev.customer_id, cost))
            self.occurred_ms[key] = (ev.occurred_at - _EPOCH) // timedelta(milliseconds=1)

    def add_rejected(self, reason_code: str, n: int = 1) -> None:
        self.rejected += n
        self.rejected_reasons[reason_code] += n

    def per_customer(self) -> dict[str, tuple[int, Decimal, Decimal]]:
        out: dict[str, list[Any]] = defaultdict(lambda: [0, Decimal(0), Decimal(0)])
        with localcontext(_EXACT):
            for (customer, _), (cost, charge) in self.priced.items():
                t = out[customer]
                t[0] += 1
                t[1] += cost
                t[2] += charge
        return {c: (n, cost, charge) for c, (n, cost, charge) in out.items()}


InvariantCheck = Callable[[Query, Expected], list[Delta]]


def _norm(d: Decimal | int | None) -> Decimal:
    return Decimal(0) if d is None else Decimal(d)


def priced_totals_check(query: Query, expected: Expected) -> list[Delta]:
    """Per customer: row count, Σ cost, Σ charge of usage_priced (raw, no FINAL) = the oracle; no
    duplicate and no missing (customer_id, event_id)."""
    deltas: list[Delta] = []
    rows = query("SELECT customer_id, count(), uniqExact(event_id), sum(cost), sum(charge) FROM usage_priced "
                 "GROUP BY customer_id")  # fmt: skip
    got = {str(c): (int(n), int(u), _norm(cost), _norm(charge)) for c, n, u, cost, charge in rows}
    want = expected.per_customer()
    for customer in sorted(set(got) | set(want)):
        n, u, cost, charge = got.get(customer, (0, 0, Decimal(0), Decimal(0)))
        wn, wcost, wcharge = want.get(customer, (0, Decimal(0), Decimal(0)))
        if n != u:
            deltas.append(Delta("no_double_rows", customer, f"{u} rows (one per event)", f"{n} rows"))
        for what, w, g in (("events", wn, u), ("cost", _norm(wcost), cost), ("charge", _norm(wcharge), charge)):
            if w != g:
                deltas.append(Delta("priced_totals", f"{customer} {what}", str(w), f"{g} (Δ {g - w})"))
    if deltas:  # name a few missing / unexpected ids to make the failure actionable
        stored = {(str(c), str(e)) for c, e in query("SELECT customer_id, event_id FROM usage_priced")}
        missing = sorted(set(expected.priced) - stored)[:5]
        extra = sorted(stored - set(expected.priced))[:5]
        if missing:
            deltas.append(Delta("priced_ids", "missing", "present", repr(missing)))
        if extra:
            deltas.append(Delta("priced_ids", "unexpected", "absent", repr(extra)))
    return deltas


def rejected_count_check(query: Query, expected: Expected) -> list[Delta]:
    """Every hostile record / invalid event is exactly one usage_rejected row with a reason_code."""
    n, empty = query("SELECT count(), countIf(reason_code = '') FROM usage_rejected")[0]
    deltas = []
    if int(n) != expected.rejected:
        deltas.append(Delta("rejected_rows", "usage_rejected", str(expected.rejected), str(n)))
    if int(empty):
        deltas.append(Delta("rejected_rows", "reason_code", "never empty", f"{empty} empty"))
    return deltas


_RAW_BY = ("SELECT customer_id, model, {bucket} AS b, count(), sum(cost), sum(charge), sum(input_tokens), "
           "sum(output_tokens) FROM usage_priced GROUP BY customer_id, model, b ORDER BY customer_id, model, b")
_ROLLUP_BY = ("SELECT customer_id, model, {name} AS b, sum(events), sum(cost), sum(charge), sum(input_tokens), "
              "sum(output_tokens) FROM {table} GROUP BY customer_id, model, b ORDER BY customer_id, model, b")  # fmt: skip


def rollup_check(query: Query, expected: Expected) -> list[Delta]:
    """usage_hourly / usage_daily (materialized views) equal the raw sums of usage_priced, exactly."""
    deltas = []
    for table, name, bucket in (("usage_hourly", "hour", "toStartOfHour(toDateTime(occurred_at, 'UTC'))"),
                                ("usage_daily", "day", "toDate(occurred_at, 'UTC')")):  # fmt: skip
        raw = [tuple(r) for r in query(_RAW_BY.format(bucket=bucket))]
        rolled = [tuple(r) for r in query(_ROLLUP_BY.format(name=name, table=table))]
        if raw != rolled:
            diff = sorted(set(rolled) ^ set(raw), key=repr)[:3]
            deltas.append(Delta("rollups", table, f"{len(raw)} groups equal to raw sums", f"differs: {diff}"))
    return deltas


PRICING_CHECKS: tuple[InvariantCheck, ...] = (priced_totals_check, rejected_count_check, rollup_check)


def check_invariants(query: Query, expected: Expected, checks: Sequence[InvariantCheck] = PRICING_CHECKS) -> list[Delta]:
    """Run every check; an empty list means the invariant holds."""
    return [d for check in checks for d in check(query, expected)]


# --------------------------------------------------------------------------- credits: the ledger part

# Per customer (in CUSTOMERS order, cycling): the policy template of the chaos session. Grant sizes are
# fractions (percent, drawn from the range) of the customer's expected charge; limits are fractions of
# the expected overage. Together they cover: credit runs out under ``block``, ``credit_limit`` reached
# and not reached, ``allow`` with overage, the default policy (block once granted) never running out,
# and a customer with no grant at all (default ``allow``: everything is overage).
_TEMPLATES: tuple[tuple[str | None, tuple[int, int] | None, tuple[int, int] | None], ...] = (
    ("block", (30, 90), None),
    ("credit_limit", (20, 60), (20, 80)),  # limit < overage: blocked
    ("allow", (20, 80), None),
    (None, (120, 200), None),  # the default policy, never runs out
    (None, None, None),  # no grant: default allow
    ("credit_limit", (50, 90), (150, 300)),  # limit > overage: active
)
_CENT = Decimal("0.01")


@dataclass(frozen=True, slots=True)
class LedgerOutcome:
    """What a customer's ledger must end as, from Σ charge and the plan alone."""

    grant_debits: Decimal
    overage: Decimal
    remaining: Decimal
    status: str  # "active" | "blocked"
    reason: str | None


@dataclass(frozen=True, slots=True)
class CreditPlan:
    """One customer's prepaid setup, sent as ledger commands BEFORE any of its usage.

    ``grant``: one grant effective a day before the session, no expiry, no scope (None = no grant).
    ``policy``: the overage policy set explicitly (None = the credit agent's default: ``block`` once
    the customer has a grant, ``allow`` before). ``credit_limit`` only with ``credit_limit``.
    """

    customer_id: str
    grant: Decimal | None
    policy: str | None
    credit_limit: Decimal | None = None

    @property
    def effective_policy(self) -> str:
        return self.policy or ("block" if self.grant else "allow")

    def outcome(self, charge: Decimal) -> LedgerOutcome:
        """Every usage is debited (usage is a fact; the policy only decides the status): grants first,
        the rest is overage. Order-independent because all credit exists before the first event."""
        granted = self.grant or Decimal(0)
        from_grants = min(granted, charge)
        overage, remaining = charge - from_grants, granted - from_grants
        policy, reason = self.effective_policy, None
        if policy == "block" and remaining == 0:
            reason = "credit_exhausted"
        elif policy == "credit_limit" and remaining - overage <= -(self.credit_limit or Decimal(0)):
            reason = "credit_limit_reached"
        return LedgerOutcome(from_grants, overage, remaining, "blocked" if reason else "active", reason)

    def commands(self, at_ms: int) -> list[dict[str, Any]]:
        """``ledger-commands`` messages (policy first, then the grant), deterministic command ids."""
        c, out = self.customer_id, []
        if self.policy is not None:
            out.append({"type": "set_policy", "command_id": f"verify-policy:{c}", "customer_id": c, "at_ms": at_ms,
                        "overage": self.policy,
                        "credit_limit": None if self.credit_limit is None else str(self.credit_limit)})  # fmt: skip
        if self.grant is not None:
            out.append({"type": "grant", "command_id": f"verify-grant:{c}", "customer_id": c, "at_ms": at_ms,
                        "grant_id": f"verify-{c}", "amount": str(self.grant), "currency": "usd",
                        "effective_at_ms": at_ms, "expires_at_ms": None, "priority": 50, "category": "paid",
                        "scope": None})  # fmt: skip
        return out


def plan_credits(rng: random.Random, charges: Mapping[str, Decimal],
                 customers: Sequence[str] = CUSTOMERS) -> list[CreditPlan]:  # fmt: skip
    """A :data:`_TEMPLATES` plan per customer, sized from its expected Σ charge (whole cents, ≥ 0.01)."""

    def part(amount: Decimal, pct: tuple[int, int]) -> Decimal:
        return max(_CENT, (amount * rng.randint(*pct) / 100).quantize(_CENT, rounding=ROUND_DOWN))

    plans = []
    for i, c in enumerate(customers):
        policy, grant_pct, limit_pct = _TEMPLATES[i % len(_TEMPLATES)]
        charge = charges.get(c, Decimal(0))
        grant = part(charge, grant_pct) if grant_pct else None
        limit = part(max(charge - (grant or 0), _CENT), limit_pct) if limit_pct else None
        plans.append(CreditPlan(c, grant, policy, limit))
    return plans


def _entries_by_customer(query: Query) -> dict[str, tuple[Decimal, ...]]:
    rows = query(
        "SELECT customer_id, sumIf(amount, kind = 'debit' AND grant_id != ''), sumIf(amount, kind = 'debit' AND "
        "grant_id = ''), sumIf(amount, kind IN ('grant', 'top_up')), count(), max(seq), uniqExact(seq), "
        "countIf(kind NOT IN ('grant', 'debit')) FROM ledger_entries FINAL GROUP BY customer_id")  # fmt: skip
    return {str(r[0]): tuple(_norm(x) for x in r[1:]) for r in rows}


def ledger_check(query: Query, expected: Expected) -> list[Delta]:
    """The ledger part of the invariant, per customer with a plan (see docs/invariants.md):

    Σ debits against grants + Σ overage debits = Σ charge of usage_priced = the oracle's Σ charge;
    the split (grant debits, overage, credit remaining) = :meth:`CreditPlan.outcome`; Σ grant entries =
    the plan; every priced event debited exactly its charge (per event); entry seqs 1..n with no gap;
    a replayed entry id never carries different content (raw rows, before FINAL)."""
    if not expected.credit_plans:
        return []
    deltas: list[Delta] = []
    got = _entries_by_customer(query)
    priced = {str(c): _norm(x) for c, x in query("SELECT customer_id, sum(charge) FROM usage_priced FINAL "
                                                 "GROUP BY customer_id")}  # fmt: skip
    want = expected.per_customer()
    for c, plan in sorted(expected.credit_plans.items()):
        charge = want.get(c, (0, Decimal(0), Decimal(0)))[2]
        out = plan.outcome(charge)
        g_debit, overage, granted, n, max_seq, n_seq, other = got.get(c, (Decimal(0),) * 7)
        for what, w, g in (
            ("debits + overage vs usage_priced", priced.get(c, Decimal(0)), g_debit + overage),
            ("debits + overage vs oracle", charge, g_debit + overage),
            ("grant debits", out.grant_debits, g_debit),
            ("overage", out.overage, overage),
            ("granted", plan.grant or Decimal(0), granted),
            ("credit remaining", out.remaining, granted - g_debit),
        ):
            if w != g:
                deltas.append(Delta("ledger", f"{c} {what}", format(w, "f"), f"{g:f} (Δ {g - w:f})"))
        if not n == max_seq == n_seq:
            deltas.append(Delta("ledger_seq", c, "seq 1..n without gaps", f"{n} entries, max seq {max_seq}, "
                                f"{n_seq} distinct"))  # fmt: skip
        if other:
            deltas.append(Delta("ledger_kinds", c, "only grant and debit entries", f"{other} others"))
    bad = query(
        "SELECT p.customer_id, p.event_id, l.customer_id, l.event_id, p.charge, l.debited FROM "
        "(SELECT customer_id, event_id, charge FROM usage_priced FINAL) AS p FULL OUTER JOIN "
        "(SELECT customer_id, event_id, sum(amount) AS debited FROM ledger_entries FINAL WHERE kind = 'debit' "
        "GROUP BY customer_id, event_id) AS l ON p.customer_id = l.customer_id AND p.event_id = l.event_id "
        "WHERE p.charge != l.debited LIMIT 5")  # fmt: skip
    for pc, pe, lc, le, charge, debited in bad:
        deltas.append(Delta("ledger_per_event", f"{pc or lc} {pe or le}", f"debited {charge}", f"{debited}"))
    (conflicts,) = query("SELECT count() FROM (SELECT customer_id, entry_id FROM ledger_entries GROUP BY customer_id, "
                         "entry_id HAVING uniqExact(seq, kind, amount, grant_id, event_id) > 1)")[0]  # fmt: skip
    if int(conflicts):
        deltas.append(Delta("ledger_replay", "ledger_entries", "a re-sent entry id repeats its content",
                            f"{conflicts} ids with different contents"))  # fmt: skip
    return deltas


def status_check(statuses: Mapping[str, Mapping[str, Any]]) -> InvariantCheck:
    """A check comparing the credit agent's final ``customer-status`` per planned customer (latest
    record per key) with ``ledger_balances`` (ClickHouse, FINAL) and with the plan's status."""

    def check(query: Query, expected: Expected) -> list[Delta]:
        deltas: list[Delta] = []
        sql = {str(r[0]): (_norm(r[1]), _norm(r[2])) for r in query(
            "SELECT customer_id, credit_remaining, overage FROM ledger_balances")}  # fmt: skip
        want = expected.per_customer()
        for c, plan in sorted(expected.credit_plans.items()):
            out = plan.outcome(want.get(c, (0, Decimal(0), Decimal(0)))[2])
            st = statuses.get(c)
            if st is None:
                deltas.append(Delta("status", c, "a customer-status record", "none"))
                continue
            bal = st.get("balance") or {}
            remaining, overage = sql.get(c, (Decimal(0), Decimal(0)))
            for what, w, g in (("status", out.status, st.get("status")), ("reason", out.reason, st.get("reason")),
                               ("remaining vs ledger_balances", remaining, Decimal(str(bal.get("credit_remaining")))),
                               ("overage vs ledger_balances", overage, Decimal(str(bal.get("overage"))))):  # fmt: skip
                if w != g:
                    deltas.append(Delta("status", f"{c} {what}", str(w), str(g)))
        return deltas

    return check


def credit_checks(statuses: Mapping[str, Mapping[str, Any]]) -> tuple[InvariantCheck, ...]:
    """The credits part: :func:`ledger_check` + :func:`status_check` over these final statuses."""
    return (ledger_check, status_check(statuses))


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


def expected_stripe_units(expected: Expected, *, window: int, until: int, exponent: int = 6) -> dict[str, dict[int, int]]:
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
            deltas.append(Delta("stripe_units", f"{c} total", str(sum(w.values())),
                                f"{sum(g.values())} (Δ {sum(g.values()) - sum(w.values())})"))  # fmt: skip
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
    ``ch`` (a clickhouse-connect-like client) to a :class:`~meterline.stripe_local.LocalStripe`.

    ``ls``: an already running LocalStripe (kept open), else one is started and :meth:`close` stops it.
    Meter summaries are read back per hour (``value_grouping_window=hour``), hence the 1 h window.
    """

    WINDOW = 3600
    PATH = "/v1/billing/meter_events"

    def __init__(self, ch: Any, *, ls: Any = None) -> None:
        from jobs.stripe import StripeTarget, load_billing_config
        from meterline.stripe_local import LocalStripe

        self.ch = ch
        self._own = ls is None
        self.ls = ls if ls is not None else LocalStripe()
        self.target = StripeTarget.local(self.ls.url, max_network_retries=2)
        self.cfg = load_billing_config(None, mode="cost").with_sync(
            settle_seconds=0, backoff_seconds=0.01, window_seconds=self.WINDOW)  # fmt: skip
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
            res = client.v1.billing.meters.event_summaries.list(meter, {
                "customer": links[c].stripe_customer_id, "start_time": since, "end_time": until,
                "value_grouping_window": "hour", "limit": 100})  # fmt: skip
            out[c] = {int(s.start_time): int(Decimal(str(s.aggregated_value))) for s in res.auto_paging_iter()}
        return out

    def run(self, expected: Expected, rng: random.Random, *, faults: bool = True, crash: bool = True,
            now: int | None = None, say: Callable[[str], None] = log.info) -> StripeReport:  # fmt: skip
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
            rep.deltas.append(Delta("stripe_idempotent", "last sync run", "planned 0, sent 0",
                                    f"planned {last.planned}, sent {last.sent}"))  # fmt: skip
        problems = [s for s in summaries if not s.ok]
        for s in problems:
            rep.deltas.append(Delta("stripe_sync", "summary", "ok", f"too_old={len(s.too_old)} failed={s.failed[:2]} "
                                    f"shrunk={s.shrunk[:2]} unmapped={s.unmapped[:2]}"))  # fmt: skip
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
            deltas.append(Delta("stripe_events", "meter events vs acked cursor rows",
                                f"{len(acked)} equal (identifier, value)", f"{len(stored)}, differing: {diff}"))  # fmt: skip
        return deltas


# --------------------------------------------------------------------------- inputs


def make_events(rng: random.Random, n: int, *, now: datetime | None = None, prefix: str = "") -> list[Any]:
    """``n`` valid UsageEvents over :data:`CUSTOMERS` and :data:`RATES`, occurred in the last ~3 hours."""
    from schemas.models import UsageEvent

    now = now or datetime.now(timezone.utc)
    models = list(RATES)
    out = []
    for _ in range(n):
        provider, model, version = rng.choice(models)
        rates = RATES[(provider, model, version)]
        out.append(UsageEvent(
            event_id=f"{prefix}{uuid.UUID(int=rng.getrandbits(128))}",
            occurred_at=now - timedelta(seconds=rng.randint(60, 3 * 3600), milliseconds=rng.randint(0, 999)),
            customer_id=rng.choice(CUSTOMERS), project=rng.choice(["alpha", "beta", None]), feature="chat",
            provider=provider, model=model, model_version=version,
            input_tokens=rng.randint(0, 200_000), output_tokens=rng.randint(1, 8_000),
            reasoning_tokens=rng.randint(0, 4_000) if model == "o1" else 0,
            cached_input_tokens=rng.randint(0, 50_000) if "cached_input" in rates else 0,
            cache_write_tokens=rng.randint(0, 9_999) if "cache_write" in rates else 0,
        ))  # fmt: skip
    return out


def hostile_records(rng: random.Random, now_ms: int, *, tag: str = "") -> list[tuple[bytes | None, bytes, str, int]]:
    """Raw ``usage-events`` records a broken or hostile producer could send.

    Each item is ``(key, value, expected_reason_code, dead_letters)``: the record must end as that
    many ``usage_rejected`` rows carrying that reason (the reason of the first, for mixed records).
    """
    from schemas.codec import MAGIC, encode_usage_batch
    from schemas.registry import default_registry

    def ev(i: int, **over: Any) -> dict[str, Any]:
        d: dict[str, Any] = {"event_id": f"hostile-{tag}{i}", "occurred_at": now_ms - 60_000, "customer_id": "hooli",
                             "provider": "openai", "model": "gpt-4o", "input_tokens": 10, "output_tokens": 5}  # fmt: skip
        d.update(over)
        return d

    good = encode_usage_batch([ev(0)])
    unknown_fp = next(fp for fp in (bytes(rng.getrandbits(8) for _ in range(8)) for _ in range(100))
                      if not _known(default_registry(), fp))  # fmt: skip
    return [
        (b"hooli", good[: len(good) // 2], "undecodable", 1),  # truncated
        (None, b"\x00" + bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64))), "not_single_object", 1),
        (b"hooli", MAGIC + unknown_fp + good[10:], "unknown_schema", 1),  # wrong fingerprint
        (b"hooli", good + b"\x00", "undecodable", 1),  # trailing bytes
        (b"hooli", b"", "not_single_object", 1),  # Kafka hands an empty value over as b""
        (b"hooli", encode_usage_batch([ev(1, input_tokens=-5)]), "negative_count", 1),
        (b"hooli", encode_usage_batch([ev(2, output_tokens=2**62)]), "absurd_count", 1),
        (b"hooli", encode_usage_batch([ev(3, input_tokens=0, output_tokens=0, requests=0)]), "empty_usage", 1),
        (b"hooli", encode_usage_batch([ev(4, occurred_at=0)]), "timestamp_too_old", 1),  # 1970
        (b"hooli", encode_usage_batch([ev(5, occurred_at=32_503_680_000_000)]), "timestamp_in_future", 1),  # 2999
        (b"hooli", encode_usage_batch([ev(6, model="gpt-7-preview")]), "unknown_model", 1),
        (b"hooli", encode_usage_batch([ev(7, labels={f"k{i}": "v" for i in range(5000)})]), "too_many_labels", 1),
        (b"hooli", encode_usage_batch([ev(8, event_id="")]), "missing_event_id", 1),
        (b"hooli", encode_usage_batch([ev(9, customer_id="x" * 4000)]), "id_too_long", 1),
        (b"hooli", encode_usage_batch([ev(10, model="NaN", provider="nan")]), "unknown_model", 1),
    ]


def _known(registry: Any, fp: bytes) -> bool:
    from meterline.errors import SchemaError

    try:
        registry.get(fp)
    except SchemaError:
        return False
    return True


# --------------------------------------------------------------------------- the stack


class _Outage(ConnectionError):
    pass


class FlakyClickHouse:
    """A zero-argument client factory for :class:`~pipeline.sink.ClickHouseSink` with an outage switch.

    Every client it hands out is a view of ONE real client, serialised by one lock (embedded chDB
    must not be driven from two threads at once). While :meth:`go_down` is in force the factory and
    every call on a handed-out view raise :class:`ConnectionError`; :meth:`restore` ends the outage.
    :meth:`down_after_next_insert` lets exactly one insert land and then fails everything (the
    "insert done, crash before commit" path). :meth:`query` is the observer's own path: never down.
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self.lock = threading.RLock()
        self._down = threading.Event()
        self._arm_after_insert = False
        self.refused = 0
        self.outages = 0

    def __call__(self) -> _GuardedClient:
        self._check()
        return _GuardedClient(self)

    @property
    def down(self) -> bool:
        return self._down.is_set()

    def go_down(self) -> None:
        if not self._down.is_set():
            self.outages += 1
        self._down.set()

    def down_after_next_insert(self) -> None:
        self._arm_after_insert = True

    def restore(self) -> None:
        self._arm_after_insert = False
        self._down.clear()

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        with self.lock:
            return list(self.client.query(sql, parameters=parameters).result_rows)

    def _check(self) -> None:
        if self._down.is_set():
            self.refused += 1
            raise _Outage("injected ClickHouse outage")


class _GuardedClient:
    def __init__(self, owner: FlakyClickHouse) -> None:
        self._owner = owner

    def query(self, *args: Any, **kwargs: Any) -> Any:
        with self._owner.lock:
            self._owner._check()
            return self._owner.client.query(*args, **kwargs)

    def insert(self, *args: Any, **kwargs: Any) -> Any:
        with self._owner.lock:
            self._owner._check()
            result = self._owner.client.insert(*args, **kwargs)
            if self._owner._arm_after_insert:
                self._owner._arm_after_insert = False
                self._owner.go_down()
            return result

    def command(self, *args: Any, **kwargs: Any) -> Any:
        with self._owner.lock:
            self._owner._check()
            return self._owner.client.command(*args, **kwargs)

    def close(self) -> None:  # the shared client belongs to the FlakyClickHouse owner
        pass


class ChaosStack:
    """Workers, a sink and a producer around one broker + one migrated ClickHouse database.

    ``settings`` must carry ``kafka_bootstrap`` and a ``topic_prefix`` whose topics exist.
    ``sink_cls`` may be a :class:`~pipeline.sink.ClickHouseSink` subclass (crash hooks).
    """

    def __init__(self, settings: Settings, client: Any, log_dir: Path) -> None:
        from pipeline.publish import control_producer
        from schemas.producer import UsageProducer

        assert settings.kafka_bootstrap, "ChaosStack needs settings.kafka_bootstrap"
        self.settings = settings
        self.bootstrap: str = settings.kafka_bootstrap
        self.ch = FlakyClickHouse(client)
        self.log_dir = log_dir
        self.workers: list[Any] = []
        self.sink: Any = None
        self._sink_stop = threading.Event()
        self._sink_thread: threading.Thread | None = None
        self.ledger_sink: Any = None
        self._ledger_stop = threading.Event()
        self._ledger_thread: threading.Thread | None = None
        self.sink_errors: list[BaseException] = []
        self.producer = UsageProducer(self.bootstrap, settings.topic("usage-events"), linger_ms=5)
        self.raw_producer = control_producer(self.bootstrap)
        self._n = 0
        self.kills = 0

    # -- pieces
    def publish_prices(self, source: Any = None) -> None:
        from meterline.pricing import load_price_book
        from pipeline.publish import publish_records

        book = load_price_book(source if source is not None else price_file())
        publish_records(self.bootstrap, self.settings.topic("prices"), book.to_records())

    def start_sink(self, sink_cls: Any = None, **kwargs: Any) -> Any:
        from pipeline.sink import ClickHouseSink

        cls = sink_cls or ClickHouseSink
        self._sink_stop = threading.Event()
        opts: dict[str, Any] = {"max_interval_ms": 200, "backoff_initial_ms": 50, "backoff_max_ms": 500}
        opts.update(kwargs)
        self.sink = cls(self.bootstrap, f"{self.settings.topic_prefix}sink", self.settings.topic("usage-priced"),
                        self.settings.topic("usage-dead-letter"), self.ch, **opts)  # fmt: skip
        sink, stop = self.sink, self._sink_stop

        def run() -> None:
            try:
                sink.run(stop)
            except BaseException as exc:  # noqa: BLE001 - a crashed sink is a scenario, recorded for the test
                self.sink_errors.append(exc)

        self._sink_thread = threading.Thread(target=run, name="chaos-sink", daemon=True)
        self._sink_thread.start()
        return self.sink

    def start_ledger_sink(self, **kwargs: Any) -> Any:
        """The ``ledger-entries`` → ``ledger_entries`` sink, on the same outage-switchable client."""
        from pipeline.ledger_sink import LedgerEntrySink

        opts: dict[str, Any] = {"max_interval_ms": 200, "backoff_initial_ms": 50, "backoff_max_ms": 500}
        opts.update(kwargs)
        self._ledger_stop = threading.Event()
        self.ledger_sink = LedgerEntrySink(self.bootstrap, f"{self.settings.topic_prefix}ledger-sink",
                                           self.settings.topic("ledger-entries"), self.ch, **opts)  # fmt: skip
        sink, stop = self.ledger_sink, self._ledger_stop

        def run() -> None:
            try:
                sink.run(stop)
            except BaseException as exc:  # noqa: BLE001 - recorded for the test
                self.sink_errors.append(exc)

        self._ledger_thread = threading.Thread(target=run, name="chaos-ledger-sink", daemon=True)
        self._ledger_thread.start()
        return self.ledger_sink

    def send_commands(self, messages: Iterable[Mapping[str, Any]]) -> int:
        """Publish ``ledger-commands`` messages keyed by customer; waits for every acknowledgement."""
        from pipeline.credits.messages import encode_message
        from pipeline.publish import publish_records

        records = [(str(m["customer_id"]), encode_message(m)) for m in messages]
        return publish_records(self.bootstrap, self.settings.topic("ledger-commands"), records,
                               producer=self.raw_producer)  # fmt: skip

    def latest(self, topic: str, timeout: float = 20.0) -> dict[str, dict[str, Any]]:
        """The last JSON value per key of a (customer-keyed) topic, read from offset 0 to its end."""
        import json

        from confluent_kafka import Consumer, TopicPartition

        name = self.settings.topic(topic)
        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"verify-reader-{uuid.uuid4().hex[:6]}",
                      "enable.auto.commit": False, "enable.partition.eof": True})  # fmt: skip
        try:
            parts = sorted(c.list_topics(name, timeout=10).topics[name].partitions)
            c.assign([TopicPartition(name, p, 0) for p in parts])
            out: dict[str, dict[str, Any]] = {}
            eof: set[int] = set()
            deadline = time.monotonic() + timeout
            while len(eof) < len(parts) and time.monotonic() < deadline:
                m = c.poll(0.2)
                if m is None:
                    continue
                if m.error():
                    eof.add(m.partition())
                    continue
                eof.discard(m.partition())
                out[(m.key() or b"").decode("utf-8", "replace")] = json.loads(m.value() or b"null")
            return out
        finally:
            c.close()

    def ledger_counts(self) -> tuple[int, int]:
        """(distinct debited (customer, event) pairs, grant entries) in ledger_entries."""
        debited, grants = self.query("SELECT uniqExactIf((customer_id, event_id), kind = 'debit'), "
                                     "uniqExactIf(entry_id, kind = 'grant') FROM ledger_entries")[0]  # fmt: skip
        return int(debited), int(grants)

    def wait_ledger(self, debited: int, grants: int, timeout: float = 120.0, quiet: float = 1.0) -> bool:
        """Wait until ledger_entries holds ``debited`` debited events and ``grants`` grants, unchanged
        for ``quiet`` s, with the ledger sink drained."""
        deadline, last, since = time.monotonic() + timeout, None, time.monotonic()
        while time.monotonic() < deadline:
            dead = self.dead_workers()
            if dead:
                raise RuntimeError("a worker crashed: " + "\n".join(dead))
            now = self.ledger_counts()
            if now != last:
                last, since = now, time.monotonic()
            elif now[0] >= debited and now[1] >= grants and time.monotonic() - since >= quiet:
                sink = self.ledger_sink
                if sink is None or (sink.buffered == 0 and not sink.degraded):
                    return True
            time.sleep(0.2)
        return False

    def settled_statuses(self, expected: Expected, timeout: float = 30.0) -> dict[str, dict[str, Any]]:
        """The latest ``customer-status`` per customer, re-read until it agrees with the ledger (the
        status is produced with the entries of the same record, so it may trail them briefly)."""
        deadline = time.monotonic() + timeout
        while True:
            statuses = self.latest("customer-status")
            if not status_check(statuses)(self.query, expected) or time.monotonic() > deadline:
                return statuses
            time.sleep(0.5)

    def sink_alive(self) -> bool:
        return self._sink_thread is not None and self._sink_thread.is_alive()

    def stop_sink(self, timeout: float = 20.0) -> None:
        self._sink_stop.set()
        if self._sink_thread is not None:
            self._sink_thread.join(timeout)

    def start_worker(self) -> Any:
        from pipeline.workers import WorkerProcess

        w = WorkerProcess(self.settings, name=f"worker-{self._n}", log_dir=self.log_dir).start()
        self._n += 1
        self.workers.append(w)
        return w

    def kill_worker(self, worker: Any) -> None:
        worker.kill()
        self.kills += 1

    def produce(self, events: Sequence[Any], flush: bool = True) -> None:
        for e in events:
            self.producer.send(e)
        if flush:
            self.producer.flush(30)

    def produce_raw(self, records: Iterable[tuple[bytes | None, bytes]]) -> None:
        topic = self.settings.topic("usage-events")
        failures: list[str] = []

        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None:
                failures.append(str(err))

        for key, value in records:
            self.raw_producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
        if self.raw_producer.flush(30) or failures:
            raise RuntimeError(f"raw produce failed: {failures[:3]}")

    # -- observing
    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        return self.ch.query(sql, parameters)

    def counts(self) -> tuple[int, int]:
        priced = self.query("SELECT count() FROM usage_priced")[0][0]
        rejected = self.query("SELECT count() FROM usage_rejected")[0][0]
        return int(priced), int(rejected)

    def dead_workers(self) -> list[str]:
        """Workers that exited by themselves (not by our SIGKILL), with their log tails."""
        return [f"{w.name} exited {w.proc.returncode}:\n{w.log_tail()}" for w in self.workers
                if w.proc is not None and w.proc.poll() not in (None, -9)]  # fmt: skip

    def wait_settled(self, expected: Expected, timeout: float = 120.0, quiet: float = 1.0) -> bool:
        """Wait until both tables hold at least what ``expected`` says and stayed unchanged ``quiet`` s."""
        deadline = time.monotonic() + timeout
        want = (len(expected.priced), expected.rejected)
        last: tuple[int, int] | None = None
        stable_since = time.monotonic()
        while time.monotonic() < deadline:
            dead = self.dead_workers()
            if dead:
                raise RuntimeError("a worker crashed: " + "\n".join(dead))
            now = self.counts()
            if now != last:
                last, stable_since = now, time.monotonic()
            elif now[0] >= want[0] and now[1] >= want[1] and time.monotonic() - stable_since >= quiet:
                if self.sink is None or (self.sink.buffered == 0 and not self.sink.degraded):
                    return True
            time.sleep(0.2)
        return False

    def wait_progress(self, above: int, timeout: float = 90.0) -> int:
        """Wait until usage_priced holds more than ``above`` rows; return the count."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            n = self.counts()[0]
            if n > above:
                return n
            dead = self.dead_workers()
            if dead:
                raise RuntimeError("a worker crashed: " + "\n".join(dead))
            time.sleep(0.1)
        raise TimeoutError(f"no progress past {above} priced rows in {timeout}s")

    def close(self) -> None:
        for w in self.workers:
            w.stop(timeout=5)
        self.stop_sink()
        self._ledger_stop.set()
        if self._ledger_thread is not None:
            self._ledger_thread.join(20)
        try:
            self.producer.close(10)
        except Exception as exc:  # noqa: BLE001 - closing on the way out
            log.warning("producer close: %s", exc)
        self.raw_producer.flush(5)


# --------------------------------------------------------------------------- the session


@dataclass
class VerifyReport:
    seed: int
    events_produced: int = 0
    distinct_events: int = 0
    duplicates_injected: int = 0
    bad_inputs: int = 0
    kills_survived: int = 0
    outages_injected: int = 0
    priced_rows: int = 0
    rejected_rows: int = 0
    per_customer: dict[str, tuple[Decimal, Decimal]] = field(default_factory=dict)  # expected, observed charge
    # credits: customer -> (policy, expected Σ charge, ledger debits + overage, expected status, observed status)
    ledger: dict[str, tuple[str, Decimal, Decimal, str, str]] = field(default_factory=dict)
    stripe: StripeReport | None = None
    deltas: list[Delta] = field(default_factory=list)
    settled: bool = False

    @property
    def ok(self) -> bool:
        return self.settled and not self.deltas

    def render(self) -> str:
        lines = [
            f"meterline verify (seed {self.seed})",
            f"  events produced      {self.events_produced} ({self.distinct_events} distinct)",
            f"  duplicates injected  {self.duplicates_injected}",
            f"  bad inputs tried     {self.bad_inputs}",
            f"  kills survived       {self.kills_survived}",
            f"  outages injected     {self.outages_injected}",
            f"  usage_priced rows    {self.priced_rows}",
            f"  usage_rejected rows  {self.rejected_rows}",
            "  customer                     expected charge        observed charge        Δ",
        ]
        for c, (want, got) in sorted(self.per_customer.items()):
            lines.append(f"  {c:<28} {want:>22} {got:>22} {format(got - want, 'f')}")
        if self.ledger:
            lines.append("  ledger (debits + overage = Σ charge)  policy        expected charge   ledger Δ  status")
            for c, (policy, want, got, st_want, st_got) in sorted(self.ledger.items()):
                mark = "" if st_want == st_got else f" (expected {st_want})"
                lines.append(f"  {c:<28} {policy:<13} {want:>22} {format(got - want, 'f'):>10}  {st_got}{mark}")
        if self.stripe is not None:
            s = self.stripe
            faults = ", ".join(f"{k}×{v}" for k, v in s.faults.items()) or "none"
            crash = f"after push {s.crashed_after}" if s.crashed_after else "none"
            lines += [
                f"  stripe faults        {faults}",
                f"  stripe sync crash    {crash}; {s.runs} runs, {s.sent} sends, {s.acked} acked by the re-runs, "
                f"{s.retries} own back-offs",
                "  stripe (µ$, closed windows)  expected units         pushed units           Δ",
            ]
            for c, (want_u, got_u) in sorted(s.per_customer.items()):
                lines.append(f"  {c:<28} {want_u:>22} {got_u:>22} {got_u - want_u}")
        if not self.settled:
            lines.append("  NOT SETTLED: the stores did not reach the expected counts in time")
        lines += [f"  Δ {d}" for d in self.deltas]
        lines.append("  RESULT: " + ("OK, every Δ is 0" if self.ok else "FAILED"))
        return "\n".join(lines)


def run_verify(
    settings: Settings,
    *,
    events: int = 3000,
    kills: int = 2,
    duplicates: int = 300,
    outages: int = 1,
    hostile: bool = True,
    credits: bool = True,
    stripe: bool = True,
    seed: int | None = None,
    timeout: float = 180.0,
    echo: Callable[[str], None] | None = None,
) -> VerifyReport:
    """Run a bounded chaos session on its own embedded stack and return the figures.

    Always starts its OWN Tansu broker (memory only) and topics under a fresh prefix. ClickHouse is
    ``settings.clickhouse_dsn`` if set (e.g. a test's database in the process's one chDB engine),
    else a new chDB path under a temporary directory (removed afterwards). Steps: publish prices,
    start the sinks (with :class:`FlakyClickHouse`) and one worker (pricing + credit agents);
    ``credits``: send each customer's :class:`CreditPlan` (grant + policy) and wait until the ledger
    holds the grants; produce ``events`` in ``kills + 1`` chunks with ``duplicates`` resends and the
    hostile records spread over them; SIGKILL + restart the worker after each of the first ``kills``
    chunks while it is working; take ClickHouse down for ``outages`` periods; wait until the stores
    settle and check the invariant (pricing, then the ledger and the final statuses); ``stripe``:
    run the real sync into a LocalStripe with faults and a crash mid-push, re-run, compare.
    """
    from meterline.stack.broker import TansuBroker
    from meterline.stack.clickhouse import apply_migrations, connect
    from meterline.stack.topics import ensure_topics

    say = echo or (lambda s: log.info(s))
    seed = random.randrange(2**32) if seed is None else seed
    rng = random.Random(seed)
    report = VerifyReport(seed=seed)
    tmp = Path(tempfile.mkdtemp(prefix="meterline-verify-"))
    prefix = f"verify{uuid.uuid4().hex[:8]}."
    dsn = settings.clickhouse_dsn or f"chdb://{tmp / 'chdb'}"
    broker = TansuBroker(log_dir=tmp).start()
    stack: ChaosStack | None = None
    client = None
    try:
        run_settings = settings.model_copy(update={
            "kafka_bootstrap": broker.bootstrap, "broker_flavor": "tansu", "topic_prefix": prefix,
            "data_dir": tmp, "clickhouse_dsn": dsn,
        })  # fmt: skip
        ensure_topics(broker.bootstrap, prefix, run_settings.partitions)
        client = connect(dsn)
        apply_migrations(client)
        stack = ChaosStack(run_settings, client, tmp / "logs")
        expected = Expected()
        say(f"seed {seed}: broker {broker.bootstrap}, ClickHouse {dsn}")
        stack.publish_prices()
        stack.start_sink()
        if credits:
            stack.start_ledger_sink()
        worker = stack.start_worker()

        all_events = make_events(rng, events)
        now_ms = time.time_ns() // 1_000_000
        if credits:
            whole = Expected()
            whole.add_priced(all_events)
            plans = plan_credits(rng, {c: t[2] for c, t in whole.per_customer().items()})
            expected.credit_plans = {p.customer_id: p for p in plans}
            n_grants = stack.send_commands(m for p in plans for m in p.commands(now_ms - 86_400_000))
            say(f"credits: {n_grants} policy/grant commands sent; waiting for the ledger to hold the grants")
            if not stack.wait_ledger(0, sum(1 for p in plans if p.grant), timeout=90, quiet=0.2):
                raise RuntimeError("the credit agent did not apply the grants in time")
        bad = hostile_records(rng, now_ms) if hostile else []
        chunks = [all_events[i::kills + 1] for i in range(kills + 1)]
        bad_chunks = [bad[i::kills + 1] for i in range(kills + 1)]
        outage_at = {rng.randrange(kills + 1) for _ in range(outages)} if outages else set()
        produced: list[Any] = []
        for i, chunk in enumerate(chunks):
            if i in outage_at:
                say(f"chunk {i}: ClickHouse outage")
                stack.ch.go_down()
            n_dups = duplicates // (kills + 1) + (1 if i < duplicates % (kills + 1) else 0)
            pool = produced + chunk
            dups = [rng.choice(pool) for _ in range(n_dups)] if pool else []
            stack.produce(chunk + dups)
            stack.produce_raw((k, v) for k, v, _, _ in bad_chunks[i])
            for _, _, reason, n in bad_chunks[i]:
                expected.add_rejected(reason, n)
            produced += chunk
            expected.add_priced(chunk)
            report.events_produced += len(chunk) + len(dups)
            report.duplicates_injected += len(dups)
            report.bad_inputs += len(bad_chunks[i])
            if i in outage_at:  # hold the outage until the sink has really hit it (bounded)
                refused_before, until = stack.ch.refused, time.monotonic() + 30
                while stack.ch.refused < refused_before + 2 and time.monotonic() < until:
                    time.sleep(0.1)
                time.sleep(rng.uniform(0.2, 1.0))
                stack.ch.restore()
                say(f"chunk {i}: ClickHouse restored after {stack.ch.refused - refused_before} refused calls")
            if i < kills:
                before = stack.counts()[0]
                if before < len(expected.priced):  # kill while this chunk is being priced
                    stack.wait_progress(before, timeout=90)
                time.sleep(rng.uniform(0.0, 0.3))
                say(f"chunk {i}: SIGKILL {worker.name} (pid {worker.pid})")
                stack.kill_worker(worker)
                worker = stack.start_worker()
        report.outages_injected = stack.ch.outages
        report.distinct_events = len(expected.priced)
        say("waiting for the stores to settle")
        report.settled = stack.wait_settled(expected, timeout=timeout)
        checks: list[InvariantCheck] = list(PRICING_CHECKS)
        if credits:
            n_grants = sum(1 for p in expected.credit_plans.values() if p.grant)
            report.settled = stack.wait_ledger(len(expected.priced), n_grants, timeout=timeout) and report.settled
            statuses = stack.settled_statuses(expected)
            checks += credit_checks(statuses)
        report.kills_survived = stack.kills if report.settled else 0
        report.deltas = check_invariants(stack.query, expected, checks)
        report.priced_rows, report.rejected_rows = stack.counts()
        observed = {str(c): Decimal(ch) for c, ch in stack.query(
            "SELECT customer_id, sum(charge) FROM usage_priced GROUP BY customer_id")}  # fmt: skip
        want = expected.per_customer()
        for c in sorted(set(observed) | set(want)):
            report.per_customer[c] = (want.get(c, (0, Decimal(0), Decimal(0)))[2], observed.get(c, Decimal(0)))
        if credits:
            entries = _entries_by_customer(stack.query)
            for c, plan in expected.credit_plans.items():
                charge = want.get(c, (0, Decimal(0), Decimal(0)))[2]
                got = entries.get(c, (Decimal(0), Decimal(0)))
                out, st = plan.outcome(charge), statuses.get(c) or {}
                report.ledger[c] = (plan.effective_policy, charge, got[0] + got[1],
                                    f"{out.status}" + (f" ({out.reason})" if out.reason else ""),
                                    f"{st.get('status')}" + (f" ({st['reason']})" if st.get("reason") else ""))  # fmt: skip
        if stripe:
            say("Stripe: provision, sync with injected faults and a crash mid-push, re-run")
            session = StripeSession(stack.ch())
            try:
                report.stripe = session.run(expected, rng, say=say)
            finally:
                session.close()
            report.deltas += report.stripe.deltas
        return report
    finally:
        if stack is not None:
            stack.close()
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing on the way out
                pass
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def verify_command(
    events: int = 3000,
    kills: int = 2,
    duplicates: int = 300,
    outages: int = 1,
    credits: bool = True,
    stripe: bool = True,
    seed: Optional[int] = None,  # noqa: UP007 - typer reads the annotation at runtime
) -> None:
    """Chaos-check this build: kill workers, replay, inject bad input, a ClickHouse outage and Stripe
    faults; every Δ must be 0 (pricing, ledger ``--credits``, Stripe push ``--stripe``).

    Mount with ``app.command("verify")(verify_command)``; typer reads the parameters as options.
    """
    import typer

    settings = Settings().model_copy(update={"clickhouse_dsn": None})  # never write into a configured ClickHouse
    report = run_verify(settings, events=events, kills=kills, duplicates=duplicates, outages=outages, credits=credits,
                        stripe=stripe, seed=seed, echo=lambda s: typer.echo(f"  · {s}"))  # fmt: skip
    typer.echo(report.render())
    if not report.ok:
        raise typer.Exit(1)
