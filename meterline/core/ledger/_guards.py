"""Derived enforcement: credit status, budgets, threshold alerts and the runaway-loop guard.

Everything here reads and writes only the state value and the time in it (``clock_ms``, the max
time of any command applied), so it is exactly reproducible from the same command sequence.

- Derived blocks (credit_exhausted, credit_limit_reached, budget_exceeded) are recomputed after
  every command and come and go by themselves; ``since`` is the clock when they began.
- Persistent blocks (manual, runaway_guard) stay until a ``SetBlock(blocked=False)``.
- A threshold alert fires once per crossing: a track per alert key remembers (crossings, active);
  it re-arms when the condition is false again (e.g. a top-up moves usage back below 80 %).
  ``alert_id = {customer}/{key}/{crossing number}``.
"""

from __future__ import annotations

from meterline.core.ledger._money import period_key
from meterline.core.ledger._state import CustomerLedger
from meterline.core.ledger._types import (
    BLOCK_REASONS,
    DERIVED_REASONS,
    Alert,
    AlertKind,
    ApplyPricedUsage,
    BudgetState,
    Decision,
    Effects,
    LedgerEntry,
    StatusChange,
    VelocityRule,
)


class Ctx:
    """The working clone plus the effects gathered while one command is applied."""

    def __init__(self, s: CustomerLedger) -> None:
        self.s = s
        self.entries: list[LedgerEntry] = []
        self.status_changes: list[StatusChange] = []
        self.alerts: list[Alert] = []
        self.decision: Decision | None = None

    def status(self, scope: str, reason: str, blocked: bool) -> None:
        self.status_changes.append(StatusChange(self.s.customer_id, scope, reason, blocked, self.s.clock_ms))

    def effects(self) -> Effects:
        return Effects(tuple(self.entries), tuple(self.status_changes), tuple(self.alerts), self.decision)


def held_by_grant(s: CustomerLedger) -> dict[str, int]:
    out: dict[str, int] = {}
    for h in s.holds.values():
        for gid, p in h.allocations:
            out[gid] = out.get(gid, 0) + p
    return out


def usable_credit(s: CustomerLedger, at_ms: int) -> tuple[int, int]:
    """(remaining, granted) over live grants valid at ``at_ms`` (any scope)."""
    rem = granted = 0
    for g in s.grants.values():
        if g.state == "live" and g.grant.valid_at(at_ms):
            rem += g.remaining
            granted += g.granted
    return rem, granted


def blocked_reason(s: CustomerLedger, project: str | None, api_key_id: str | None) -> str | None:
    """The highest-precedence block reason applying to a request in these scopes, or None."""
    reasons: set[str] = set(s.blocks.get("customer", {}))
    if project is not None:
        reasons |= set(s.blocks.get(f"project:{project}", {}))
    if api_key_id is not None:
        reasons |= set(s.blocks.get(f"api_key:{api_key_id}", {}))
    return next((r for r in BLOCK_REASONS if r in reasons), None)


def add_budget_spend(s: CustomerLedger, c: ApplyPricedUsage) -> None:
    """Attribute the charge to matching budgets by the event's UTC period (two periods kept)."""
    if not c.charge_picos:
        return
    for bid, b in list(s.budgets.items()):
        if not b.budget.matches(c.project, c.api_key_id):
            continue
        pk = period_key(c.occurred_at_ms, b.budget.period)
        spent = dict(b.spent)
        spent[pk] = spent.get(pk, 0) + c.charge_picos
        keep = sorted(spent, reverse=True)[:2]
        s.budgets[bid] = BudgetState(b.budget, tuple((k, spent[k]) for k in sorted(keep)), b.fired)


def _velocity_keys(s: CustomerLedger, c: ApplyPricedUsage) -> list[tuple[str, VelocityRule]]:
    out = []
    if s.policy.runaway_customer is not None:
        out.append(("customer", s.policy.runaway_customer))
    if s.policy.runaway_api_key is not None and c.api_key_id is not None:
        out.append((f"api_key:{c.api_key_id}", s.policy.runaway_api_key))
    return out


def add_velocity(s: CustomerLedger, c: ApplyPricedUsage) -> None:
    """Add the charge to the event-time bucket of each guarded key (too-old events are ignored)."""
    if not c.charge_picos:
        return
    for key, rule in _velocity_keys(s, c):
        b = c.occurred_at_ms // rule.bucket_ms
        if b <= s.clock_ms // rule.bucket_ms - rule.baseline_ms // rule.bucket_ms:
            continue
        buckets = s.velocity.setdefault(key, {})
        buckets[b] = buckets.get(b, 0) + c.charge_picos


def _rule_for(s: CustomerLedger, key: str) -> VelocityRule | None:
    return s.policy.runaway_customer if key == "customer" else s.policy.runaway_api_key


def _track(
    ctx: Ctx, seen: set[str], key: str, over: bool, kind: AlertKind, scope: str, threshold: int, value: int
) -> bool:
    """Fire an alert once per crossing; returns True when it fired now."""
    s = ctx.s
    seen.add(key)
    n, active = s.alert_tracks.get(key, (0, False))
    if over and not active:
        n += 1
        s.alert_tracks[key] = (n, True)
        ctx.alerts.append(
            Alert(
                f"{s.customer_id}/{key}/{n}",
                s.customer_id,
                kind,
                scope,
                threshold,
                value,
                s.clock_ms,
            )
        )
        return True
    if not over and active:
        s.alert_tracks[key] = (n, False)
    return False


def reevaluate(ctx: Ctx) -> None:
    s, now, pol = ctx.s, ctx.s.clock_ms, ctx.s.policy
    seen: set[str] = set()
    desired: set[tuple[str, str]] = set()
    usable, granted = usable_credit(s, now)
    if s.plan_governs:  # the plan's on_exhausted decides (SetPlanGate), not the prepaid policy
        if s.plan_block is not None:
            desired.add(("customer", s.plan_block))
    elif pol.overage == "block" and usable == 0:
        desired.add(("customer", "credit_exhausted"))
    elif pol.overage == "credit_limit" and usable - s.overage_picos <= -pol.credit_limit_picos:
        desired.add(("customer", "credit_limit_reached"))

    for bid in sorted(s.budgets):
        b = s.budgets[bid]
        bd = b.budget
        if bd.hard and b.spent_in(period_key(now, bd.period)) >= bd.limit_picos:
            desired.add((bd.block_scope, "budget_exceeded"))
        fired = set(b.fired)
        for pk, spent in b.spent:
            for pct in sorted(bd.alert_pcts):
                if spent * 100 >= pct * bd.limit_picos and (pk, pct) not in fired:
                    fired.add((pk, pct))
                    ctx.alerts.append(
                        Alert(
                            f"{s.customer_id}/budget:{bid}:{pk}:{pct}",
                            s.customer_id,
                            "budget",
                            bd.block_scope,
                            pct,
                            spent,
                            now,
                        )
                    )
        periods = {pk for pk, _ in b.spent}
        s.budgets[bid] = BudgetState(bd, b.spent, tuple(sorted(x for x in fired if x[0] in periods)))

    current = {(scope, r) for scope, rs in s.blocks.items() for r in rs if r in DERIVED_REASONS}
    for scope, r in sorted(desired - current):
        s.blocks.setdefault(scope, {})[r] = now
        ctx.status(scope, r, True)
    for scope, r in sorted(current - desired):
        del s.blocks[scope][r]
        if not s.blocks[scope]:
            del s.blocks[scope]
        ctx.status(scope, r, False)

    for pct in pol.used_alert_pcts:
        used = granted - usable
        _track(
            ctx,
            seen,
            f"credit_used:{pct}",
            granted > 0 and used * 100 >= pct * granted,
            "credit_used",
            "customer",
            pct,
            used,
        )
    for amount in pol.low_balance_picos:
        _track(
            ctx,
            seen,
            f"low_balance:{amount}",
            granted > 0 and usable < amount,
            "low_balance",
            "customer",
            amount,
            usable,
        )

    for key in sorted(s.velocity):
        rule = _rule_for(s, key)
        if rule is None:
            del s.velocity[key]
            continue
        nb = now // rule.bucket_ms
        w, base_n = rule.window_ms // rule.bucket_ms, rule.baseline_ms // rule.bucket_ms
        buckets = {b: p for b, p in s.velocity[key].items() if b > nb - base_n}
        short = sum(p for b, p in buckets.items() if b > nb - w)
        base = sum(p for b, p in buckets.items() if b <= nb - w)
        over_cap = (rule.abs_cap_picos is not None and short > rule.abs_cap_picos) or (
            rule.baseline_multiple is not None
            and base > 0
            and short >= rule.min_picos
            and short * (rule.baseline_ms - rule.window_ms) > rule.baseline_multiple * base * rule.window_ms
        )
        tripped = _track(ctx, seen, f"runaway:{key}", over_cap, "runaway", key, rule.abs_cap_picos or 0, short)
        if tripped and rule.block and "runaway_guard" not in s.blocks.get(key, {}):
            s.blocks.setdefault(key, {})["runaway_guard"] = now
            ctx.status(key, "runaway_guard", True)
        if buckets:
            s.velocity[key] = buckets
        else:
            del s.velocity[key]

    # Tracks are never deleted (a crossing counter restarting would reuse alert ids).
    for key in [k for k in s.alert_tracks if k.startswith("runaway:") and k not in seen]:
        n, active = s.alert_tracks[key]
        if active:
            s.alert_tracks[key] = (n, False)  # window emptied: re-arm
