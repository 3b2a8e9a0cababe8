"""The ledger part of the invariant: per-customer credit plans and the checks of ledger entries
and final statuses."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from decimal import ROUND_DOWN, Decimal
from typing import Any

from devtools.verify.credit_plan import CreditPlan, LedgerOutcome
from devtools.verify.oracle import CUSTOMERS, Delta, Expected, InvariantCheck, Query, _norm

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

__all__ = ["CreditPlan", "LedgerOutcome", "credit_checks", "ledger_check", "plan_credits", "status_check"]


def plan_credits(
    rng: random.Random, charges: Mapping[str, Decimal], customers: Sequence[str] = CUSTOMERS
) -> list[CreditPlan]:
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
        "countIf(kind NOT IN ('grant', 'debit')) FROM ledger_entries FINAL GROUP BY customer_id"
    )
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
    priced = {
        str(c): _norm(x)
        for c, x in query("SELECT customer_id, sum(charge) FROM usage_priced FINAL GROUP BY customer_id")
    }
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
            deltas.append(
                Delta("ledger_seq", c, "seq 1..n without gaps", f"{n} entries, max seq {max_seq}, {n_seq} distinct")
            )
        if other:
            deltas.append(Delta("ledger_kinds", c, "only grant and debit entries", f"{other} others"))
    bad = query(
        "SELECT p.customer_id, p.event_id, l.customer_id, l.event_id, p.charge, l.debited FROM "
        "(SELECT customer_id, event_id, charge FROM usage_priced FINAL) AS p FULL OUTER JOIN "
        "(SELECT customer_id, event_id, sum(amount) AS debited FROM ledger_entries FINAL WHERE kind = 'debit' "
        "GROUP BY customer_id, event_id) AS l ON p.customer_id = l.customer_id AND p.event_id = l.event_id "
        "WHERE p.charge != l.debited LIMIT 5"
    )
    for pc, pe, lc, le, charge, debited in bad:
        deltas.append(Delta("ledger_per_event", f"{pc or lc} {pe or le}", f"debited {charge}", f"{debited}"))
    (conflicts,) = query(
        "SELECT count() FROM (SELECT customer_id, entry_id FROM ledger_entries GROUP BY customer_id, "
        "entry_id HAVING uniqExact(seq, kind, amount, grant_id, event_id) > 1)"
    )[0]
    if int(conflicts):
        deltas.append(
            Delta(
                "ledger_replay",
                "ledger_entries",
                "a re-sent entry id repeats its content",
                f"{conflicts} ids with different contents",
            )
        )
    return deltas


def status_check(statuses: Mapping[str, Mapping[str, Any]]) -> InvariantCheck:
    """A check comparing the credit agent's final ``customer-status`` per planned customer (latest
    record per key) with ``ledger_balances`` (ClickHouse, FINAL) and with the plan's status."""

    def check(query: Query, expected: Expected) -> list[Delta]:
        deltas: list[Delta] = []
        sql = {
            str(r[0]): (_norm(r[1]), _norm(r[2]))
            for r in query("SELECT customer_id, credit_remaining, overage FROM ledger_balances")
        }
        want = expected.per_customer()
        for c, plan in sorted(expected.credit_plans.items()):
            out = plan.outcome(want.get(c, (0, Decimal(0), Decimal(0)))[2])
            st = statuses.get(c)
            if st is None:
                deltas.append(Delta("status", c, "a customer-status record", "none"))
                continue
            bal = st.get("balance") or {}
            remaining, overage = sql.get(c, (Decimal(0), Decimal(0)))
            for what, w, g in (
                ("status", out.status, st.get("status")),
                ("reason", out.reason, st.get("reason")),
                ("remaining vs ledger_balances", remaining, Decimal(str(bal.get("credit_remaining")))),
                ("overage vs ledger_balances", overage, Decimal(str(bal.get("overage")))),
            ):
                if w != g:
                    deltas.append(Delta("status", f"{c} {what}", str(w), str(g)))
        return deltas

    return check


def credit_checks(statuses: Mapping[str, Mapping[str, Any]]) -> tuple[InvariantCheck, ...]:
    """The credits part: :func:`ledger_check` + :func:`status_check` over these final statuses."""
    return (ledger_check, status_check(statuses))
