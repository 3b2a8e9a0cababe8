"""Grant order, splits, scope, expiry, void, adjustments, overage policies, credit status."""

from __future__ import annotations

import pytest

from meterline.core.ledger import (
    Adjust,
    ExpireDue,
    GrantScope,
    LedgerCommandError,
    Policy,
    SetPolicy,
    Void,
    apply,
    balance_view,
    fold_entries,
    new_ledger,
    status_of,
)

from .helpers import CUST, DAY, grant, p, remaining, run, usage


def _entries(effs):  # type: ignore[no-untyped-def]
    return [e for eff in effs for e in eff.entries]


def test_order_priority_then_expiry_then_effective_then_id_with_splits() -> None:
    s = new_ledger(CUST, "usd")
    s, _ = run(
        s,
        grant("z_noexp", "5", prio=10),  # priority 10, no expiry -> after g_soon
        grant("g_soon", "1", prio=10, exp=10 * DAY),  # priority 10, expires soonest -> first
        grant("g_late", "2", prio=10, exp=20 * DAY),
        grant("a_same", "1", prio=10, exp=20 * DAY, eff=5),  # same expiry, effective later -> after g_late
        grant("b_tie", "1", prio=10, exp=20 * DAY, eff=5),  # full tie -> grant_id order
        grant("low_prio", "100", prio=60),  # higher number = later
    )
    s, effs = run(s, usage("e1", "7.5", DAY))
    debits = [(e.grant_id, e.amount_picos) for e in _entries(effs)]
    assert debits == [
        ("g_soon", p("1")),
        ("g_late", p("2")),
        ("a_same", p("1")),
        ("b_tie", p("1")),
        ("z_noexp", p("2.5")),
    ]
    assert all(e.event_id == "e1" and e.kind == "debit" for e in _entries(effs))
    s, effs = run(s, usage("e2", "3", DAY))
    assert [(e.grant_id, e.amount_picos) for e in _entries(effs)] == [("z_noexp", p("2.5")), ("low_prio", p("0.5"))]
    assert remaining(s)["low_prio"] == p("99.5")


def test_grant_validity_is_checked_at_event_time_and_scope() -> None:
    s = new_ledger(CUST, "usd", Policy(overage="allow"))
    s, _ = run(
        s,
        grant("future", "5", eff=10 * DAY, prio=0),
        grant("anthropic_only", "5", prio=1, scope=GrantScope(providers=frozenset({"anthropic"}))),
        grant("proj_a", "5", prio=2, scope=GrantScope(projects=frozenset({"a"}))),
        grant("all", "5", prio=3),
    )
    s, effs = run(s, usage("e1", "1", DAY, provider="openai"))
    assert [e.grant_id for e in _entries(effs)] == ["all"]
    s, effs = run(s, usage("e2", "1", DAY, provider="anthropic", project="a"))
    assert [e.grant_id for e in _entries(effs)] == ["anthropic_only"]
    s, effs = run(s, usage("e3", "1", DAY, provider="openai", project="a"))
    assert [e.grant_id for e in _entries(effs)] == ["proj_a"]
    s, effs = run(s, usage("e4", "1", 11 * DAY))
    assert [e.grant_id for e in _entries(effs)] == ["future"]


def test_expiry_releases_remainder_at_expires_at_and_late_events() -> None:
    """Validity is checked at occurred_at; the expiry entry is written when processing time
    (ExpireDue) passes expires_at; after that, a late event cannot use the grant any more."""
    s = new_ledger(CUST, "usd", Policy(overage="allow"))
    exp = 10 * DAY
    s, _ = run(s, grant("promo", "5", exp=exp, prio=0, cat="promotional"), grant("paid", "20"))
    s, effs = run(s, usage("e1", "1", exp - 5))
    assert _entries(effs)[0].grant_id == "promo"
    s, effs = run(s, ExpireDue(now_ms=exp - 1))
    assert effs[0].entries == ()  # not yet
    # processed after expires_at but before ExpireDue ran: an event from before expiry still uses it
    s, effs = run(s, usage("late_before_expiry", "1", exp - 2))
    assert _entries(effs)[0].grant_id == "promo"
    # an event at/after expires_at does not
    s, effs = run(s, usage("after", "1", exp))
    assert _entries(effs)[0].grant_id == "paid"
    s, effs = run(s, ExpireDue(now_ms=exp))
    (e,) = effs[0].entries
    assert (e.kind, e.grant_id, e.amount_picos, e.at_ms) == ("expiry", "promo", p("3"), exp)
    assert s.grants["promo"].state == "expired" and s.grants["promo"].remaining == 0
    # a late event from before expiry, processed after the expiry entry: remainder already released
    s, effs = run(s, usage("late_after_expiry", "1", exp - 3))
    assert _entries(effs)[0].grant_id == "paid"
    s, effs = run(s, ExpireDue(now_ms=exp + DAY))
    assert effs[0].entries == ()  # expiry written once


def test_ten_dollars_blocks_exactly_at_exhausting_event_and_top_up_unblocks() -> None:
    s = new_ledger(CUST, "usd")  # default overage policy: block
    s, effs = run(s, grant("g1", "10.00"))
    assert status_of(s) == {"state": "active"}
    t = 1000
    blocked_at = None
    for i in range(40):
        t += 1000
        s, (eff,) = run(s, usage(f"e{i}", "0.30", t))
        if eff.status_changes:
            assert blocked_at is None
            (ch,) = eff.status_changes
            assert (ch.scope, ch.reason, ch.blocked, ch.at_ms) == ("customer", "credit_exhausted", True, t)
            blocked_at = i
    # 33 × 0.30 = 9.90, the 34th (index 33) exhausts the $10 (0.10 from credit, 0.20 overage)
    assert blocked_at == 33
    assert status_of(s) == {"state": "blocked", "reason": "credit_exhausted", "since": 2000 + 33 * 1000}
    # usage while blocked is still recorded (as overage)
    assert s.overage_picos == p("0.20") + 6 * p("0.30")
    s, (eff,) = run(s, grant("top", "5", topup=True, at=t))
    assert eff.entries[0].kind == "top_up"
    assert [(c.reason, c.blocked) for c in eff.status_changes] == [("credit_exhausted", False)]
    assert status_of(s) == {"state": "active"}
    v = balance_view(s, t)
    assert v["available"] == "5.00" and v["overage"] == "2.00" and v["net_balance"] == "3.00"


def test_credit_limit_and_allow_policies() -> None:
    s = new_ledger(CUST, "usd", Policy(overage="credit_limit", credit_limit_picos=p("2")))
    s, _ = run(s, grant("g", "1"))
    s, (eff,) = run(s, usage("e1", "2", 1))
    assert not eff.status_changes and s.overage_picos == p("1")
    s, (eff,) = run(s, usage("e2", "1", 2))
    assert [(c.reason, c.blocked) for c in eff.status_changes] == [("credit_limit_reached", True)]
    s, (eff,) = run(s, Adjust(adjustment_id="inv1", amount_picos=p("2"), reason="overage_invoiced", at_ms=3))
    assert s.overage_picos == 0 and status_of(s) == {"state": "active"}
    a = new_ledger(CUST, "usd", Policy(overage="allow"))
    a, effs = run(a, usage("e1", "50", 1))
    assert a.overage_picos == p("50") and status_of(a) == {"state": "active"}
    assert not any(eff.status_changes for eff in effs)


def test_void_adjust_and_entries_fold_to_state() -> None:
    s = new_ledger(CUST, "usd", Policy(overage="allow"))
    all_effs = []
    for cmd in [
        grant("a", "5", prio=1),
        grant("b", "5", prio=2),
        usage("e1", "6", 1),
        Adjust(adjustment_id="x1", amount_picos=p("1.5"), reason="goodwill", at_ms=2, grant_id="b"),
        Void(grant_id="b", at_ms=3, reason="refund"),
        usage("e2", "2", 4),
        Adjust(adjustment_id="x2", amount_picos=-p("0.5"), reason="correction", at_ms=5),
    ]:
        s, eff = apply(s, cmd)
        all_effs.append(eff)
    entries = _entries(all_effs)
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    assert len({e.entry_id for e in entries}) == len(entries)
    void = next(e for e in entries if e.kind == "void")
    assert void.amount_picos == p("5.5") and void.reason == "refund"
    folded = fold_entries(entries)
    assert folded["grants"] == remaining(s) == {"a": 0, "b": 0}
    assert folded["overage"] == s.overage_picos == p("2.5")
    assert folded["closed"] == {"b": "void"}
    s2, eff = apply(s, Void(grant_id="b", at_ms=6))
    assert eff.skipped == "duplicate" and s2 == s


@pytest.mark.parametrize(
    "cmd,code",
    [
        (
            usage("e", "1", 1).__class__(
                event_id="e", occurred_at_ms=1, charge_picos=1, currency="eur", provider="x", model="y"
            ),
            "currency_mismatch",
        ),
        (Void(grant_id="nope", at_ms=1), "unknown_grant"),
        (Adjust(adjustment_id="a", amount_picos=p("1"), reason="r", at_ms=1), "invalid_amount"),
        (Adjust(adjustment_id="a", amount_picos=-p("99"), reason="r", at_ms=1, grant_id="g"), "invalid_amount"),
    ],
)
def test_invalid_commands_raise_and_leave_state(cmd, code) -> None:  # type: ignore[no-untyped-def]
    s, _ = run(new_ledger(CUST, "usd"), grant("g", "1"))
    before = s.to_dict()
    with pytest.raises(LedgerCommandError) as ei:
        apply(s, cmd)
    assert ei.value.reason_code == code
    assert s.to_dict() == before


def test_set_policy_switch_changes_status() -> None:
    s, effs = run(new_ledger(CUST, "usd"), SetPolicy(policy=Policy(), at_ms=1))
    assert [(c.reason, c.blocked) for c in effs[0].status_changes] == [("credit_exhausted", True)]
    s, effs = run(s, SetPolicy(policy=Policy(overage="allow"), at_ms=2))
    assert [(c.reason, c.blocked) for c in effs[0].status_changes] == [("credit_exhausted", False)]
