"""Live allowance burn-down in the credit processor (pure: the same processor the faust agent runs,
fed records in order; the real-stack tests are tests/credits/test_plan_enforcement_e2e.py)."""

from __future__ import annotations

from typing import Any

from meterline.core.plans import SubscriptionEvent, load_plan_catalog, parse_instant
from meterline.core.pricing import PricingEngine, load_price_book
from pipeline.credits.plans import PlanBook
from tests.credits.conftest import SEED
from tests.credits.helpers import COMMANDS, PRICED, SUBSCRIPTIONS, Replay, enc, grant_msg, priced_event, priced_record

M = 1_000_000
JAN = parse_instant("2026-01-01T00:00:00Z", where="test")
FEB = parse_instant("2026-02-01T00:00:00Z", where="test")
DAY_MS = 86_400_000


def _plan(pid: str, on_exhausted: str, **over: Any) -> dict[str, Any]:
    d = {
        "id": pid,
        "version": 1,
        "effective_from": "2026-01-01T00:00:00Z",
        "interval": "month",
        "fee": "200.00",
        "allowances": [{"id": "tokens", "tokens": 10 * M}],
        "overage": {"per_million": "30.00"},
        "on_exhausted": on_exhausted,
    }
    d.update(over)
    return d


CATALOG = load_plan_catalog(
    {"currency": "USD", "plans": [_plan("pro", "allow"), _plan("strict", "block"), _plan("capped", "cap", cap="45.00")]}
)


def _replay() -> Replay:
    return Replay(PricingEngine.from_book(load_price_book(SEED)), plans=PlanBook.of(CATALOG))


def _subscribe(r: Replay, customer: str, plan: str, at: int = JAN) -> None:
    key, value = SubscriptionEvent("subscribed", customer, at, plan).to_record()
    r.feed(SUBSCRIPTIONS, 0, key, value, at * 1000)


def _tokens(
    customer: str,
    eid: str,
    n_in: int,
    at_ms: int,
    *,
    n_out: int = 0,
    charge: str = "1.00",
    request_id: str | None = None,
) -> dict[str, Any]:
    ev = priced_event(customer, eid, charge, at_ms, request_id=request_id)
    ev.update(input_tokens=n_in, output_tokens=n_out)
    return ev


def _use(r: Replay, customer: str, events: list[dict[str, Any]]) -> None:
    r.feed(PRICED, 0, customer, priced_record(events), max(e["occurred_at"] for e in events))


def _authorize(r: Replay, customer: str, rid: str, at_ms: int, n_in: int, n_out: int) -> dict[str, Any]:
    msg = {
        "type": "authorize",
        "command_id": f"authorize:{rid}",
        "customer_id": customer,
        "at_ms": at_ms,
        "request_id": rid,
        "provider": "openai",
        "model": "gpt-4o",
        "model_version": None,
        "project": None,
        "api_key_id": None,
        "input_tokens_estimate": n_in,
        "max_output_tokens": n_out,
    }
    r.feed(COMMANDS, 0, customer, enc(msg), at_ms)
    return r.replies[rid]


def _allowance(r: Replay, customer: str) -> dict[str, Any]:
    return r.statuses[customer]["balance"]["allowances"][0]


def test_allowance_burns_down_then_overage_is_invoiced_on_an_allow_plan() -> None:
    r = _replay()
    _subscribe(r, "acme", "pro")
    t = JAN * 1000 + DAY_MS
    _use(r, "acme", [_tokens("acme", f"e{i}", M, t + i) for i in range(7)])
    a = _allowance(r, "acme")
    assert (a["id"], a["included"], a["used"], a["remaining"]) == ("tokens", 10 * M, 7 * M, 3 * M)
    assert r.statuses["acme"]["status"] == "active"
    assert r.entries == {}  # covered by the allowance: nothing debited
    assert sorted(r.alerts) == [f"acme/allowance/pro@1/{JAN}/tokens/50"]
    _use(r, "acme", [_tokens("acme", "e7", 5 * M, t + 10)])  # 12M: 2M over at $30
    a = _allowance(r, "acme")
    assert (a["used"], a["remaining"]) == (10 * M, 0)
    debits = [e for e in r.entries.values() if e["kind"] == "debit"]
    assert [(d["amount"], d["grant_id"]) for d in debits] == [("60.00", None)]
    assert r.statuses["acme"]["status"] == "active"  # allow: invoiced, never blocked
    assert r.statuses["acme"]["balance"]["plan"]["invoiced_overage"] == "60.00"
    assert set(r.alerts) == {f"acme/allowance/pro@1/{JAN}/tokens/{pct}" for pct in (50, 80, 100)}
    # replaying an event burns nothing twice
    _use(r, "acme", [_tokens("acme", "e0", M, t)])
    assert _allowance(r, "acme")["used"] == 10 * M and len(r.entries) == 1


def test_prepaid_pays_overage_after_the_allowance_and_block_plan_blocks_at_exhaustion() -> None:
    r = _replay()
    _subscribe(r, "blk", "strict")
    t = JAN * 1000 + DAY_MS
    r.feed(COMMANDS, 0, "blk", enc(grant_msg("blk", "g1", "30.00", t)), t)
    _use(r, "blk", [_tokens("blk", "a", 9 * M, t + 1)])
    assert r.statuses["blk"]["status"] == "active"
    _use(r, "blk", [_tokens("blk", "b", 2 * M, t + 2)])  # 1M over: $30 paid by the grant
    assert [(e["kind"], e["amount"], e["grant_id"]) for e in r.entries.values() if e["kind"] == "debit"] == [
        ("debit", "30.00", "g1")
    ]
    st = r.statuses["blk"]
    assert (st["status"], st["reason"]) == ("blocked", "allowance_exhausted")
    assert _authorize(r, "blk", "r1", t + 3, 10, 10)["reason"] == "allowance_exhausted"
    # event time decides the period: a February event has a fresh allowance and lifts the block
    feb = FEB * 1000 + DAY_MS
    _use(r, "blk", [_tokens("blk", "c", M, feb)])
    st = r.statuses["blk"]
    assert st["status"] == "active" and _allowance(r, "blk")["used"] == M
    # a late January event still burns January (already exhausted): it is overage of January
    _use(r, "blk", [_tokens("blk", "late", M, t + 5)])
    assert _allowance(r, "blk")["used"] == M  # February untouched
    assert r.ledger("blk").overage_picos == 30 * 10**12


def test_concurrent_authorizations_reserve_the_allowance_within_the_bound() -> None:
    r = _replay()
    _subscribe(r, "par", "strict")
    t = JAN * 1000 + DAY_MS
    # worst case 2M tokens each (1M in + 1M out): five fit in 10M, the sixth does not
    decisions = [_authorize(r, "par", f"q{i}", t + i, M, M) for i in range(6)]
    assert [d["decision"] for d in decisions] == ["allow"] * 5 + ["deny"]
    assert decisions[5]["reason"] == "allowance_exhausted"
    assert _allowance(r, "par")["reserved"] == 10 * M
    # settling one with less than reserved frees the rest of its reservation
    _use(r, "par", [_tokens("par", "u0", M // 2, t + 10, request_id="q0")])
    assert (
        _allowance(r, "par")["reserved"] == 8 * M
        and _authorize(r, "par", "q6", t + 11, M // 2, M)["decision"] == "allow"
    )


def test_cap_plan_blocks_when_the_invoiced_overage_reaches_the_cap() -> None:
    r = _replay()
    _subscribe(r, "cap", "capped")
    t = JAN * 1000 + DAY_MS
    _use(r, "cap", [_tokens("cap", "a", 11 * M, t)])  # $30 invoiced < $45
    assert r.statuses["cap"]["status"] == "active"
    assert _authorize(r, "cap", "r1", t + 1, M, 0)["reason"] == "plan_cap_reached"  # $30 more would pass $45
    assert _authorize(r, "cap", "r2", t + 2, M // 2, 0)["decision"] == "allow"  # $15: exactly the cap
    _use(r, "cap", [_tokens("cap", "b", M, t + 3)])  # $60 invoiced >= $45
    st = r.statuses["cap"]
    assert (st["status"], st["reason"]) == ("blocked", "plan_cap_reached")


def test_customer_without_plan_is_unchanged() -> None:
    r = _replay()
    t = JAN * 1000
    _use(r, "ppt", [_tokens("ppt", "a", M, t, charge="2.00")])
    assert "allowances" not in r.statuses["ppt"]["balance"]
    assert "plan" not in r.table["ppt"] and "plan_gate" not in r.table["ppt"]


def test_rollover_is_live_and_matches_the_bill() -> None:
    from meterline.core.plans import Usage, fold_timeline, rate_periods

    cat = load_plan_catalog(
        {
            "currency": "USD",
            "plans": [
                _plan("roll", "block", allowances=[{"id": "tokens", "tokens": 10 * M, "rollover": {"max": 5 * M}}])
            ],
        }
    )
    r = Replay(PricingEngine.from_book(load_price_book(SEED)), plans=PlanBook.of(cat))
    _subscribe(r, "ro", "roll")
    _use(r, "ro", [_tokens("ro", "j", 7 * M, JAN * 1000 + DAY_MS)])
    _use(r, "ro", [_tokens("ro", "f", 12 * M, FEB * 1000 + DAY_MS)])  # 10M own + 3M rolled from January
    a = _allowance(r, "ro")
    assert (a["included"], a["rolled_in"], a["used"], a["remaining"]) == (13 * M, 3 * M, 12 * M, M)
    assert r.statuses["ro"]["status"] == "active"
    tl = fold_timeline("ro", [SubscriptionEvent("subscribed", "ro", JAN, "roll")], cat)
    usage = {
        JAN: [Usage("openai", "gpt-4o", {"input": 7 * M}, 0)],
        FEB: [Usage("openai", "gpt-4o", {"input": 12 * M}, 0)],
    }
    bills = rate_periods(tl.periods(FEB + 1), lambda p: [usage[p.start]])
    feb = bills[1].allowances[0]
    assert (feb.included + feb.rolled_in, feb.used, feb.remaining) == (a["included"], a["used"], a["remaining"])


def test_plan_state_stays_bounded_and_survives_a_restore() -> None:
    from meterline.core.plans import MAX_FACTS, MAX_SEGMENTS
    from pipeline.credits.processor import DEAD, snapshot_of

    r = _replay()
    day = 86_400
    n = MAX_FACTS // 2 + 10  # subscribe + cancel every other day: more facts than kept, in ended runs
    for i in range(n):
        for typ, at, plan in (("subscribed", JAN + 2 * i * day, "pro"), ("cancelled", JAN + (2 * i + 1) * day, None)):
            key, value = SubscriptionEvent(typ, "big", at, plan).to_record()
            r.feed(SUBSCRIPTIONS, 0, key, value, at * 1000)
    _subscribe(r, "big", "strict", JAN + 2 * n * day)
    for i in range(2 * n + 3):
        _use(r, "big", [_tokens("big", f"u{i}", 1000, (JAN + i * day + 3600) * 1000)])
    plan = r.table["big"]["plan"]
    assert len(plan["facts"]) == MAX_FACTS and len(plan["segs"]) == MAX_SEGMENTS
    assert _allowance(r, "big")["plan"] == "strict@1" and _allowance(r, "big")["used"] == 3000
    # a single run with more facts than kept: the newest fact is refused with a reason, not dropped silently
    for i in range(MAX_FACTS + 1):
        at = JAN + 2 * n * day + (i + 1) * 3600
        key, value = SubscriptionEvent("changed", "big", at, ("pro", "strict")[i % 2]).to_record()
        out = r.feed(SUBSCRIPTIONS, 0, key, value, at * 1000)
    assert out.dead_letters == 1 and any(name == DEAD for name, *_ in out.sends)
    assert len(r.table["big"]["plan"]["facts"]) == MAX_FACTS
    # one-box restore: the snapshot keeps the plan state, a restore command brings it back
    snap = snapshot_of(r.table["big"])
    assert snap["plan"] == r.table["big"]["plan"]
    fresh = _replay()
    from pipeline.restore import rebuild_state

    state = rebuild_state("big", snap, [])  # what pipeline.restore publishes from the stored snapshot
    msg = {"type": "restore", "command_id": "restore:1:big", "customer_id": "big", "at_ms": 0, "state": state}
    fresh.feed(COMMANDS, 0, "big", enc(msg), (JAN + 2 * n * day) * 1000)
    assert fresh.table["big"]["plan"]["facts"] == snap["plan"]["facts"]
    assert fresh.table["big"]["plan"]["segs"] == snap["plan"]["segs"]
