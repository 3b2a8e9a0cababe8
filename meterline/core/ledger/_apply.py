"""The reducer: ``apply(state, command) -> (new_state, effects)``. Pure and deterministic: no wall
clock, no I/O; time comes only from commands. Order inside one ``apply``:

1. a command whose source offset is at or below the applied offset of its source partition is
   skipped (state returned unchanged, ``effects.skipped == "offset"``);
2. a duplicate by id (event_id, adjustment_id, an existing grant_id, an already closed grant) is
   skipped, only its offset is recorded (``skipped == "duplicate"``);
3. the command is validated and handled on a clone (an error leaves the input state untouched);
   every balance change is a ledger entry folded by ``_post`` (the only writer of balances);
4. statuses, threshold alerts, budgets and the runaway guard are re-evaluated (``_guards``);
5. the dedupe id and source offset are recorded in the same new state value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meterline.core.ledger._guards import Ctx, add_budget_spend, add_velocity, blocked_reason, held_by_grant, reevaluate
from meterline.core.ledger._money import LedgerCommandError, period_key
from meterline.core.ledger._state import CustomerLedger, dedupe_digest
from meterline.core.ledger._types import (
    MAX_OPEN_HOLDS,
    Adjust,
    ApplyPricedUsage,
    Authorize,
    BudgetState,
    Command,
    Decision,
    Effects,
    EntryKind,
    ExpireDue,
    Grant,
    GrantState,
    Hold,
    LedgerEntry,
    SetBlock,
    SetBudget,
    SetPlanGate,
    SetPolicy,
    SourcePos,
    TopUp,
    Void,
)


def apply(state: CustomerLedger, cmd: Command) -> tuple[CustomerLedger, Effects]:
    """Apply one command; see the module docstring for the exact order. Raises LedgerCommandError
    (an InputError) for an invalid command: dead-letter it and call ``mark_applied``."""
    src = cmd.source
    if src is not None and state.applied_offsets.get(src.key, -1) >= src.offset:
        return state, Effects(skipped="offset")
    if _is_duplicate(state, cmd):
        return mark_applied(state, src), Effects(skipped="duplicate")
    s = state.clone()
    return s, _apply_in_place(s, cmd)


def _apply_in_place(s: CustomerLedger, cmd: Command) -> Effects:
    """Steps 1–5 on a state this call may mutate (callers pass a clone). On LedgerCommandError the
    state may be half-changed: callers discard it (``apply``) or rebuild it (``apply_many``)."""
    src = cmd.source
    if src is not None and s.applied_offsets.get(src.key, -1) >= src.offset:
        return Effects(skipped="offset")
    if _is_duplicate(s, cmd):
        if src is not None:
            s.applied_offsets[src.key] = src.offset
        return Effects(skipped="duplicate")
    s.clock_ms = max(s.clock_ms, cmd.time_ms)
    ctx = Ctx(s)
    _HANDLERS[type(cmd)](ctx, cmd)
    reevaluate(ctx)
    key = dedupe_key(cmd)
    if key is not None:
        _remember(s, key)
    if src is not None:
        s.applied_offsets[src.key] = src.offset
    return ctx.effects()


def apply_many(state: CustomerLedger, cmds: list[Command]) -> tuple[CustomerLedger, list[Effects | LedgerCommandError]]:
    """``apply`` each command in order, with ONE clone for the whole list (a 500-event record would
    otherwise copy the state 500 times). Returns the final state and, per command, its Effects or
    the LedgerCommandError it raised (that command changes nothing; the others apply as if it were
    absent — exactly what applying them one by one with ``apply`` gives)."""
    s = state.clone()
    results: list[Effects | LedgerCommandError] = []
    for i, cmd in enumerate(cmds):
        try:
            results.append(_apply_in_place(s, cmd))
        except LedgerCommandError as exc:
            # Rare: the failed command may have half-changed ``s``; rebuild it from the commands
            # that succeeded (deterministic, so their effects come out identical and are dropped).
            s = state.clone()
            for prev, res in zip(cmds[:i], results):
                if not isinstance(res, LedgerCommandError):
                    _apply_in_place(s, prev)
            results.append(exc)
    return s, results


def authorize(
    state: CustomerLedger,
    request_id: str,
    estimate_picos: int,
    now_ms: int,
    *,
    provider: str,
    model: str,
    project: str | None = None,
    api_key_id: str | None = None,
    ttl_ms: int | None = None,
) -> tuple[CustomerLedger, Decision]:
    """Reserve ``estimate_picos`` (the caller's worst-case charge) for one request: ``apply`` of an
    ``Authorize`` command, returning the new state (holding the hold) and the decision."""
    cmd = Authorize(
        request_id=request_id,
        estimate_picos=estimate_picos,
        now_ms=now_ms,
        provider=provider,
        model=model,
        project=project,
        api_key_id=api_key_id,
        ttl_ms=ttl_ms,
    )
    new, eff = apply(state, cmd)
    assert eff.decision is not None
    return new, eff.decision


def mark_applied(state: CustomerLedger, source: SourcePos | None) -> CustomerLedger:
    """Record a source offset as applied without changing anything else (for rejected records)."""
    if source is None or state.applied_offsets.get(source.key, -1) >= source.offset:
        return state
    s = state.clone()
    s.applied_offsets[source.key] = source.offset
    return s


def resume_offsets(states: list[CustomerLedger] | tuple[CustomerLedger, ...]) -> dict[str, int]:
    """Per ``"topic:partition"``: max applied offset + 1 over the given customers' states — where
    the agent seeks after a partition assignment (see the package docstring)."""
    out: dict[str, int] = {}
    for st in states:
        for k, off in st.applied_offsets.items():
            out[k] = max(out.get(k, 0), off + 1)
    return out


# -------------------------------------------------------------------------------------- internals


def dedupe_key(cmd: Command) -> bytes | None:
    """The key a usage event / adjustment is remembered by: a fixed-size digest of its id."""
    if isinstance(cmd, ApplyPricedUsage):
        return dedupe_digest(f"e:{cmd.event_id}")
    if isinstance(cmd, Adjust):
        return dedupe_digest(f"a:{cmd.adjustment_id}")
    return None


def _is_duplicate(s: CustomerLedger, cmd: Command) -> bool:
    key = dedupe_key(cmd)
    if key is not None:
        return key in s.recent_ids
    if isinstance(cmd, (Grant, TopUp)):
        return cmd.grant.grant_id in s.grants
    if isinstance(cmd, Void):
        g = s.grants.get(cmd.grant_id)
        return g is not None and g.state != "live"
    return False


def _remember(s: CustomerLedger, key: bytes) -> None:
    s.recent_ids[key] = s.clock_ms
    horizon = s.clock_ms - s.policy.dedupe_window_ms
    excess = len(s.recent_ids) - s.policy.dedupe_max_ids
    ids = s.recent_ids
    while ids:  # insertion order == clock order (clock never goes back): trim from the front
        k = next(iter(ids))
        if excess <= 0 and ids[k] >= horizon:
            break
        del ids[k]
        excess -= 1


def _post(
    ctx: Ctx,
    kind: EntryKind,
    amount: int,
    at_ms: int,
    *,
    grant_id: str | None = None,
    event_id: str | None = None,
    reason: str | None = None,
) -> None:
    """Write one ledger entry and fold it into the balances: the only place balances change."""
    s = ctx.s
    s.seq += 1
    entry = LedgerEntry(
        entry_id=f"{s.customer_id}:{s.seq}",
        customer_id=s.customer_id,
        seq=s.seq,
        kind=kind,
        amount_picos=amount,
        currency=s.currency,
        at_ms=at_ms,
        grant_id=grant_id,
        event_id=event_id,
        reason=reason,
    )
    if grant_id is None:
        if kind == "debit":
            s.overage_picos += amount
        elif kind == "adjustment":
            s.overage_picos -= amount
        else:  # pragma: no cover - guarded by the handlers
            raise LedgerCommandError(f"{kind} entry needs a grant", reason_code="bad_entry")
    else:
        g = s.grants[grant_id]
        if kind in ("grant", "top_up"):
            g = GrantState(g.grant, g.granted + amount, g.remaining + amount, g.state)
        elif kind == "debit":
            g = GrantState(g.grant, g.granted, g.remaining - amount, g.state)
        elif kind in ("expiry", "void"):
            g = GrantState(g.grant, g.granted, g.remaining - amount, "expired" if kind == "expiry" else "voided")
        else:  # adjustment
            g = GrantState(g.grant, g.granted + amount, g.remaining + amount, g.state)
        s.grants[grant_id] = g
    ctx.entries.append(entry)


def _check_currency(s: CustomerLedger, currency: str) -> None:
    if currency.lower() != s.currency:
        raise LedgerCommandError(
            f"currency {currency!r} differs from the customer's {s.currency!r}", reason_code="currency_mismatch"
        )


def _grant(ctx: Ctx, cmd: Grant | TopUp) -> None:
    s, g = ctx.s, cmd.grant
    if g.customer_id != s.customer_id:
        raise LedgerCommandError("grant for another customer", reason_code="wrong_customer")
    _check_currency(s, g.currency)
    if isinstance(cmd, TopUp) and g.category != "paid":
        raise LedgerCommandError("a top-up is a paid grant", reason_code="invalid_ledger_command")
    s.grants[g.grant_id] = GrantState(grant=g, granted=0, remaining=0)
    _post(ctx, "top_up" if isinstance(cmd, TopUp) else "grant", g.amount_picos, cmd.at_ms, grant_id=g.grant_id)


def _usage(ctx: Ctx, c: ApplyPricedUsage) -> None:
    s = ctx.s
    _check_currency(s, c.currency)
    if c.charge_picos < 0:
        raise LedgerCommandError("charge_picos must be ≥ 0", reason_code="invalid_amount")
    if c.request_id is not None:
        s.holds.pop(c.request_id, None)  # settle: release the reservation, then debit the actual
    need = c.charge_picos
    if need:
        eligible = sorted(
            (
                g
                for g in s.grants.values()
                if g.state == "live"
                and g.remaining > 0
                and g.grant.valid_at(c.occurred_at_ms)
                and (g.grant.scope is None or g.grant.scope.covers(c.provider, c.model, c.project))
            ),
            key=lambda g: g.grant.order_key(),
        )
        held = held_by_grant(s)
        take: dict[str, int] = {}
        for g in eligible:  # pass 1: credit nobody has reserved
            t = min(max(0, g.remaining - held.get(g.grant.grant_id, 0)), need)
            if t:
                take[g.grant.grant_id] = t
                need -= t
        for g in eligible:  # pass 2: credit reserved by other requests' holds (usage is a fact)
            t = min(g.remaining - take.get(g.grant.grant_id, 0), need)
            if t:
                take[g.grant.grant_id] = take.get(g.grant.grant_id, 0) + t
                need -= t
        for g in eligible:
            if take.get(g.grant.grant_id):
                _post(
                    ctx,
                    "debit",
                    take[g.grant.grant_id],
                    c.occurred_at_ms,
                    grant_id=g.grant.grant_id,
                    event_id=c.event_id,
                )
        if need:
            _post(ctx, "debit", need, c.occurred_at_ms, event_id=c.event_id, reason="overage")
    add_budget_spend(s, c)
    add_velocity(s, c)


def _expire(ctx: Ctx, c: ExpireDue) -> None:
    s = ctx.s
    due = sorted(
        (
            g
            for g in s.grants.values()
            if g.state == "live" and g.grant.expires_at_ms is not None and g.grant.expires_at_ms <= c.now_ms
        ),
        key=lambda g: (g.grant.expires_at_ms, g.grant.grant_id),
    )
    for g in due:
        assert g.grant.expires_at_ms is not None
        _post(ctx, "expiry", g.remaining, g.grant.expires_at_ms, grant_id=g.grant.grant_id, reason="expired")
    _drop_expired_holds(s, c.now_ms)


def _drop_expired_holds(s: CustomerLedger, now_ms: int) -> None:
    for rid in [r for r, h in s.holds.items() if h.expires_ms <= now_ms]:
        del s.holds[rid]


def _void(ctx: Ctx, c: Void) -> None:
    g = ctx.s.grants.get(c.grant_id)
    if g is None:
        raise LedgerCommandError(f"unknown grant {c.grant_id!r}", reason_code="unknown_grant")
    _post(ctx, "void", g.remaining, c.at_ms, grant_id=c.grant_id, reason=c.reason)


def _adjust(ctx: Ctx, c: Adjust) -> None:
    s = ctx.s
    if c.amount_picos == 0:
        raise LedgerCommandError("an adjustment must not be zero", reason_code="invalid_amount")
    if c.grant_id is not None:
        g = s.grants.get(c.grant_id)
        if g is None or g.state != "live":
            raise LedgerCommandError(f"no live grant {c.grant_id!r}", reason_code="unknown_grant")
        if g.remaining + c.amount_picos < 0:
            raise LedgerCommandError("adjustment below zero remaining", reason_code="invalid_amount")
    elif s.overage_picos - c.amount_picos < 0:
        raise LedgerCommandError("adjustment would make overage negative", reason_code="invalid_amount")
    _post(ctx, "adjustment", c.amount_picos, c.at_ms, grant_id=c.grant_id, reason=c.reason)


def _set_policy(ctx: Ctx, c: SetPolicy) -> None:
    ctx.s.policy = c.policy


def _set_budget(ctx: Ctx, c: SetBudget) -> None:
    s, b = ctx.s, c.budget
    old = s.budgets.get(b.budget_id)
    if c.remove:
        s.budgets.pop(b.budget_id, None)
        return
    same = old is not None and (old.budget.scope, old.budget.scope_value, old.budget.period) == (
        b.scope,
        b.scope_value,
        b.period,
    )
    s.budgets[b.budget_id] = BudgetState(b, old.spent, old.fired) if same and old else BudgetState(b)


def _set_block(ctx: Ctx, c: SetBlock) -> None:
    s = ctx.s
    if not (c.scope == "customer" or c.scope.startswith(("project:", "api_key:"))):
        raise LedgerCommandError(f"bad scope {c.scope!r}", reason_code="invalid_ledger_command")
    reasons = s.blocks.get(c.scope, {})
    if c.blocked and c.reason not in reasons:
        s.blocks[c.scope] = {**reasons, c.reason: s.clock_ms}
        ctx.status(c.scope, c.reason, True)
    elif not c.blocked and c.reason in reasons:
        rest = {r: t for r, t in reasons.items() if r != c.reason}
        if rest:
            s.blocks[c.scope] = rest
        else:
            del s.blocks[c.scope]
        ctx.status(c.scope, c.reason, False)


def _set_plan_gate(ctx: Ctx, c: SetPlanGate) -> None:
    ctx.s.plan_governs = c.governs
    ctx.s.plan_block = c.block if c.governs else None


def _authorize(ctx: Ctx, c: Authorize) -> None:
    s, now = ctx.s, c.now_ms
    if c.estimate_picos < 0:
        raise LedgerCommandError("estimate_picos must be ≥ 0", reason_code="invalid_amount")
    _drop_expired_holds(s, now)
    reevaluate(ctx)  # statuses as of now (a budget period may have rolled over)
    eligible = sorted(
        (
            g
            for g in s.grants.values()
            if g.state == "live"
            and g.grant.valid_at(now)
            and (g.grant.scope is None or g.grant.scope.covers(c.provider, c.model, c.project))
        ),
        key=lambda g: g.grant.order_key(),
    )
    held = held_by_grant(s)
    free = [(g.grant.grant_id, max(0, g.remaining - held.get(g.grant.grant_id, 0))) for g in eligible]
    available = sum(f for _, f in free)

    def decide(allowed: bool, reason: str | None, hold: Hold | None) -> None:
        ctx.decision = Decision(allowed, reason, c.request_id, hold, available)

    existing = s.holds.get(c.request_id)
    if existing is not None:
        return decide(True, "existing_hold", existing)
    reason = blocked_reason(s, c.project, c.api_key_id)
    if reason is not None:
        return decide(False, reason, None)
    if len(s.holds) >= MAX_OPEN_HOLDS:  # the state value must stay bounded (one Kafka message)
        return decide(False, "too_many_holds", None)
    for b in s.budgets.values():
        bd = b.budget
        if bd.hard and bd.matches(c.project, c.api_key_id):
            in_holds = sum(h.amount_picos for h in s.holds.values() if bd.matches(h.project, h.api_key_id))
            if b.spent_in(period_key(now, bd.period)) + in_holds + c.estimate_picos > bd.limit_picos:
                return decide(False, "budget_exceeded", None)
    need, alloc = c.estimate_picos, []
    for gid, f in free:
        t = min(f, need)
        if t:
            alloc.append((gid, t))
            need -= t
    pol = s.policy
    if need and pol.overage == "block" and not s.plan_governs:
        return decide(False, "insufficient_credit", None)
    if need and pol.overage == "credit_limit" and not s.plan_governs:
        headroom = pol.credit_limit_picos - s.overage_picos - sum(h.overage_picos for h in s.holds.values())
        if need > headroom:
            return decide(False, "credit_limit_reached", None)
    ttl = pol.hold_ttl_ms if c.ttl_ms is None else c.ttl_ms
    hold = Hold(
        request_id=c.request_id,
        amount_picos=c.estimate_picos,
        allocations=tuple(alloc),
        overage_picos=need,
        created_ms=now,
        expires_ms=now + ttl,
        project=c.project,
        api_key_id=c.api_key_id,
    )
    s.holds[c.request_id] = hold
    decide(True, None, hold)


_HANDLERS: dict[type, Callable[[Ctx, Any], None]] = {
    ApplyPricedUsage: _usage,
    Grant: _grant,
    TopUp: _grant,
    Void: _void,
    Adjust: _adjust,
    ExpireDue: _expire,
    SetPolicy: _set_policy,
    SetBudget: _set_budget,
    SetBlock: _set_block,
    SetPlanGate: _set_plan_gate,
    Authorize: _authorize,
}
