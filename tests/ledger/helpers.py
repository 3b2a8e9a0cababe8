"""Small builders for ledger tests (amounts in currency units, times in ms)."""

from __future__ import annotations

from meterline.core.ledger import (
    ApplyPricedUsage,
    Command,
    CreditGrant,
    CustomerLedger,
    Effects,
    Grant,
    GrantScope,
    SourcePos,
    TopUp,
    apply,
    parse_amount,
)

CUST = "cus_1"
MIN = 60_000
HOUR = 3_600_000
DAY = 86_400_000


def p(units: str) -> int:
    return parse_amount(units)


def grant(
    gid: str,
    amount: str,
    *,
    eff: int = 0,
    exp: int | None = None,
    prio: int = 50,
    cat: str = "paid",
    scope: GrantScope | None = None,
    at: int = 0,
    topup: bool = False,
) -> Command:
    g = CreditGrant(gid, CUST, p(amount), "usd", eff, exp, prio, cat, scope)  # type: ignore[arg-type]
    return TopUp(grant=g, at_ms=at) if topup else Grant(grant=g, at_ms=at)


def usage(
    eid: str,
    charge: str,
    t: int,
    *,
    offset: int | None = None,
    partition: int = 0,
    provider: str = "openai",
    model: str = "gpt-x",
    project: str | None = None,
    key: str | None = None,
    request_id: str | None = None,
) -> ApplyPricedUsage:
    return ApplyPricedUsage(
        event_id=eid,
        occurred_at_ms=t,
        charge_picos=p(charge),
        currency="usd",
        provider=provider,
        model=model,
        project=project,
        api_key_id=key,
        request_id=request_id,
        source=None if offset is None else SourcePos("priced", partition, offset),
    )


def run(state: CustomerLedger, *cmds: Command) -> tuple[CustomerLedger, list[Effects]]:
    out = []
    for c in cmds:
        state, eff = apply(state, c)
        out.append(eff)
    return state, out


def remaining(state: CustomerLedger) -> dict[str, int]:
    return {gid: g.remaining for gid, g in state.grants.items()}
