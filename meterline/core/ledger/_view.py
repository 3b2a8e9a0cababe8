"""Read-only projections of a ledger state: ``balance_view`` (JSON-ready), ``status_of`` and
``fold_entries`` (the balances recomputed from ledger entries alone, to check the state against)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from meterline.core.ledger._guards import held_by_grant
from meterline.core.ledger._money import format_picos, period_key
from meterline.core.ledger._state import CustomerLedger
from meterline.core.ledger._types import BLOCK_REASONS, LedgerEntry


def status_of(state: CustomerLedger, scope: str = "customer") -> dict[str, Any]:
    """``{"state": "active"}`` or ``{"state": "blocked", "reason": r, "since": ms}`` for a scope
    (reason = highest precedence: manual, credit_limit_reached, credit_exhausted, budget_exceeded,
    runaway_guard)."""
    reasons = state.blocks.get(scope, {})
    reason = next((r for r in BLOCK_REASONS if r in reasons), None)
    if reason is None:
        return {"state": "active"}
    return {"state": "blocked", "reason": reason, "since": reasons[reason]}


def balance_view(state: CustomerLedger, now_ms: int) -> dict[str, Any]:
    """Balances as of ``now_ms`` (grants not yet effective or already past expiry are not usable;
    holds past their TTL are not held). Money as Decimal strings in currency units."""
    held = held_by_grant(_live_holds(state, now_ms))
    grants = []
    usable = held_total = 0
    for g in sorted(state.grants.values(), key=lambda g: g.grant.order_key()):
        gid = g.grant.grant_id
        valid = g.state == "live" and g.grant.valid_at(now_ms)
        h = min(held.get(gid, 0), g.remaining) if valid else 0
        if valid:
            usable += g.remaining
            held_total += h
        state_name = (
            g.state
            if g.state != "live"
            else ("live" if valid else ("pending" if now_ms < g.grant.effective_at_ms else "expiring"))
        )
        grants.append(
            {
                "grant_id": gid,
                "category": g.grant.category,
                "priority": g.grant.priority,
                "granted": format_picos(g.granted),
                "remaining": format_picos(g.remaining),
                "held": format_picos(h),
                "effective_at_ms": g.grant.effective_at_ms,
                "expires_at_ms": g.grant.expires_at_ms,
                "state": state_name,
            }
        )
    pol = state.policy
    holds = _live_holds(state, now_ms).holds
    budgets = []
    for bid in sorted(state.budgets):
        b = state.budgets[bid]
        pk = period_key(now_ms, b.budget.period)
        spent = b.spent_in(pk)
        budgets.append(
            {
                "budget_id": bid,
                "scope": b.budget.block_scope,
                "period": b.budget.period,
                "period_key": pk,
                "limit": format_picos(b.budget.limit_picos),
                "spent": format_picos(spent),
                "mode": "hard" if b.budget.hard else "soft",
                "exceeded": spent >= b.budget.limit_picos,
            }
        )
    return {
        "customer_id": state.customer_id,
        "currency": state.currency,
        "as_of_ms": now_ms,
        "available": format_picos(usable - held_total),
        "credit_remaining": format_picos(usable),
        "held": format_picos(held_total),
        "holds": len(holds),
        "overage": format_picos(state.overage_picos),
        "overage_policy": pol.overage,
        "credit_limit": format_picos(pol.credit_limit_picos) if pol.overage == "credit_limit" else None,
        "net_balance": format_picos(usable - state.overage_picos),
        "status": status_of(state),
        "blocks": [
            {"scope": scope, "reason": r, "since": t}
            for scope in sorted(state.blocks)
            for r, t in sorted(state.blocks[scope].items())
        ],
        "grants": grants,
        "budgets": budgets,
    }


def _live_holds(state: CustomerLedger, now_ms: int) -> CustomerLedger:
    if all(h.expires_ms > now_ms for h in state.holds.values()):
        return state
    s = state.clone()
    s.holds = {r: h for r, h in s.holds.items() if h.expires_ms > now_ms}
    return s


def fold_entries(entries: Iterable[LedgerEntry]) -> dict[str, Any]:
    """Balances from entries alone: ``{"grants": {grant_id: remaining}, "closed": {grant_id: kind},
    "overage": picos}``. Independent of the state code, so tests can check the state against it."""
    remaining: dict[str, int] = {}
    closed: dict[str, str] = {}
    overage = 0
    for e in entries:
        if e.grant_id is None:
            overage += e.amount_picos if e.kind == "debit" else -e.amount_picos
        elif e.kind in ("grant", "top_up", "adjustment"):
            remaining[e.grant_id] = remaining.get(e.grant_id, 0) + e.amount_picos
        else:
            remaining[e.grant_id] -= e.amount_picos
            if e.kind in ("expiry", "void"):
                closed[e.grant_id] = e.kind
    return {"grants": remaining, "closed": closed, "overage": overage}
