"""Duplicates, replays, serialisation, and crash/restore/replay equivalence (hypothesis)."""

from __future__ import annotations

import json
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterline.core.ledger import (
    Adjust,
    Authorize,
    Budget,
    Command,
    CustomerLedger,
    Effects,
    ExpireDue,
    GrantScope,
    LedgerCommandError,
    Policy,
    SetBlock,
    SetBudget,
    SetPolicy,
    SourcePos,
    VelocityRule,
    Void,
    apply,
    dedupe_digest,
    fold_entries,
    mark_applied,
    new_ledger,
    resume_offsets,
)

from .helpers import CUST, DAY, MIN, grant, p, remaining, run, usage


def _roundtrip(s: CustomerLedger) -> CustomerLedger:
    return CustomerLedger.from_dict(json.loads(json.dumps(s.to_dict())))


def test_duplicates_and_replays_leave_balances_unchanged() -> None:
    s, _ = run(new_ledger(CUST, "usd"), grant("g", "10"))
    s, (eff,) = run(s, usage("e1", "1", 1000, offset=5))
    assert eff.entries
    after = s.to_dict()
    for dup, why in [
        (usage("e1", "1", 1000, offset=5), "offset"),  # same record again
        (usage("e0", "1", 900, offset=3), "offset"),  # an older record (replay)
        (usage("e1", "1", 1000, offset=9), "duplicate"),  # same event at a new offset
        (usage("e1", "1", 1000, offset=2, partition=1), "duplicate"),  # ... or another partition
    ]:
        s2, eff = apply(s, dup)
        assert eff.skipped == why and eff.entries == ()
        assert remaining(s2) == remaining(s) and s2.overage_picos == s.overage_picos
        s = s2
    assert s.applied_offsets == {"priced:0": 9, "priced:1": 2}
    assert {k: v for k, v in s.to_dict().items() if k != "offsets"} == {
        k: v for k, v in after.items() if k != "offsets"
    }
    s, (eff,) = run(s, usage("e2", "1", 1100, offset=10))
    assert eff.entries and s.grants["g"].remaining == p("8")


def test_dedupe_window_is_bounded_and_offsets_still_protect() -> None:
    s = new_ledger(CUST, "usd", Policy(overage="allow", dedupe_max_ids=3, dedupe_window_ms=DAY))
    for i in range(5):
        s, _ = apply(s, usage(f"e{i}", "1", 1000 + i, offset=i))
    assert list(s.recent_ids) == [dedupe_digest(f"e:e{i}") for i in (2, 3, 4)]
    s, _ = apply(s, usage("e5", "1", 2 * DAY, offset=5))
    assert list(s.recent_ids) == [dedupe_digest("e:e5")]  # the older ones fell out of the time window
    s2, eff = apply(s, usage("e0", "1", 1000, offset=0))
    assert eff.skipped == "offset" and s2 is s


def test_rejected_record_is_marked_applied() -> None:
    s = new_ledger(CUST, "usd")
    bad = Void(grant_id="nope", at_ms=1, source=SourcePos("cmds", 0, 7))
    try:
        apply(s, bad)
    except LedgerCommandError:
        s = mark_applied(s, bad.source)
    assert s.applied_offsets == {"cmds:0": 7}
    assert apply(s, bad)[1].skipped == "offset"


def test_resume_offsets() -> None:
    a = new_ledger("a", "usd")
    b = new_ledger("b", "usd")
    a = mark_applied(a, SourcePos("priced", 0, 100))
    b = mark_applied(mark_applied(b, SourcePos("priced", 0, 90)), SourcePos("priced", 2, 4))
    assert resume_offsets([a, b]) == {"priced:0": 101, "priced:2": 5}


# ------------------------------------------------------------------------- crash / replay property

RULE = VelocityRule(
    window_ms=MIN,
    bucket_ms=10_000,
    baseline_ms=10 * MIN,
    abs_cap_picos=p("3"),
    baseline_multiple=5,
    min_picos=p("0.5"),
    block=True,
)


@st.composite
def command_logs(draw: st.DrawFn) -> list[Command]:
    n = draw(st.integers(5, 60))
    t = 0
    cmds: list[Command] = []
    grants: list[str] = []
    reqs: list[str] = []
    for i in range(n):
        t += draw(st.integers(0, 3 * MIN))
        kind = draw(
            st.sampled_from(
                ["usage"] * 6
                + ["grant", "topup", "expire", "auth", "auth", "void", "adjust", "policy", "budget", "unblock"]
            )
        )
        cmd: Command
        if kind == "usage":
            eid = f"e{draw(st.integers(0, 40))}"  # repeats -> duplicate event ids at new offsets
            late = draw(st.integers(0, 2 * MIN))
            rid = draw(st.sampled_from(reqs)) if reqs and draw(st.booleans()) else None
            cmd = usage(
                eid,
                f"{draw(st.integers(0, 300))}e-2",
                max(0, t - late),
                key=draw(st.sampled_from([None, "k1", "k2"])),
                project=draw(st.sampled_from([None, "a", "b"])),
                provider=draw(st.sampled_from(["openai", "anthropic"])),
                request_id=rid,
            )
        elif kind in ("grant", "topup"):
            gid = f"g{i}"
            grants.append(gid)
            exp = draw(st.one_of(st.none(), st.integers(1, 15).map(lambda m, t=t: t + m * MIN)))
            scope = draw(
                st.sampled_from(
                    [None, GrantScope(providers=frozenset({"anthropic"})), GrantScope(projects=frozenset({"a"}))]
                )
            )
            cmd = grant(
                gid,
                f"{draw(st.integers(1, 20))}",
                eff=max(0, t - draw(st.integers(0, 5 * MIN))),
                exp=exp,
                prio=draw(st.integers(0, 100)),
                scope=scope,
                at=t,
                topup=kind == "topup",
                cat="paid" if kind == "topup" else draw(st.sampled_from(["paid", "promotional"])),
            )
        elif kind == "expire":
            cmd = ExpireDue(now_ms=t)
        elif kind == "auth":
            rid = f"r{i}"
            reqs.append(rid)
            cmd = Authorize(
                request_id=rid,
                estimate_picos=p(f"{draw(st.integers(0, 400))}e-2"),
                now_ms=t,
                provider="openai",
                model="m",
                project=draw(st.sampled_from([None, "a"])),
                api_key_id=draw(st.sampled_from([None, "k1"])),
                ttl_ms=draw(st.integers(1, 5)) * MIN,
            )
        elif kind == "void":
            cmd = Void(grant_id=draw(st.sampled_from(grants + ["missing"])), at_ms=t)
        elif kind == "adjust":
            cmd = Adjust(
                adjustment_id=f"a{draw(st.integers(0, 5))}",
                amount_picos=p(f"{draw(st.integers(-200, 200))}e-2"),
                reason="r",
                at_ms=t,
                grant_id=draw(st.sampled_from([None, *grants[-2:]])),
            )
        elif kind == "policy":
            cmd = SetPolicy(
                policy=Policy(
                    overage=draw(st.sampled_from(["block", "allow", "credit_limit"])),
                    credit_limit_picos=p(f"{draw(st.integers(0, 5))}"),
                    low_balance_picos=(p("2"),),
                    runaway_customer=draw(st.sampled_from([None, RULE])),
                    runaway_api_key=RULE,
                    dedupe_max_ids=draw(st.sampled_from([10_000, 8])),
                ),
                at_ms=t,
            )
        elif kind == "budget":
            cmd = SetBudget(
                budget=draw(
                    st.sampled_from(
                        [
                            Budget("day", "customer", None, "day", p("10"), hard=True),
                            Budget("k1m", "api_key", "k1", "month", p("5"), hard=False, alert_pcts=(50, 100)),
                            Budget("pa", "project", "a", "day", p("3"), hard=True),
                        ]
                    )
                ),
                remove=draw(st.booleans()),
                at_ms=t,
            )
        else:
            cmd = SetBlock(
                scope=draw(st.sampled_from(["customer", "api_key:k1"])),
                blocked=draw(st.booleans()),
                reason=draw(st.sampled_from(["manual", "runaway_guard"])),
                at_ms=t,
            )
        cmds.append(replace(cmd, source=SourcePos("ledger_in", 0, i)))  # type: ignore[call-arg]
    return cmds


def _step(s: CustomerLedger, cmd: Command) -> tuple[CustomerLedger, Effects | None]:
    """What the agent does per record: apply, or dead-letter + mark applied."""
    try:
        return apply(s, cmd)
    except LedgerCommandError:
        return mark_applied(s, cmd.source), None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(log=command_logs(), data=st.data())
def test_crash_restore_replay_equals_uninterrupted(log: list[Command], data: st.DataObject) -> None:
    ref = new_ledger(CUST, "usd")
    ref_entries: dict[str, object] = {}
    ref_alerts: dict[str, object] = {}
    all_entries = []
    for cmd in log:
        ref, eff = _step(ref, cmd)
        if eff is not None:
            all_entries.extend(eff.entries)
            ref_entries.update({e.entry_id: e for e in eff.entries})
            ref_alerts.update({a.alert_id: a for a in eff.alerts})
    # the state's balances are exactly the fold of the entries it wrote
    folded = fold_entries(all_entries)
    assert folded["grants"] == remaining(ref) and folded["overage"] == ref.overage_picos
    assert all(g.remaining >= 0 for g in ref.grants.values()) and ref.overage_picos >= 0

    # crashy run: after each crash the state comes back as an older serialised snapshot (the
    # changelog lost a tail) and the source is re-read from an even older position
    state = new_ledger(CUST, "usd")
    changelog = [state.to_dict()]  # every state value written, in order
    i = 0
    crashes = data.draw(st.integers(0, 4))
    seen_entries: dict[str, object] = {}
    seen_alerts: dict[str, object] = {}
    while i < len(log):
        state, eff = _step(state, log[i])
        i += 1
        changelog.append(state.to_dict())
        if eff is not None:
            for e in eff.entries:
                assert seen_entries.setdefault(e.entry_id, e) == e  # same id -> same entry
            for a in eff.alerts:
                assert seen_alerts.setdefault(a.alert_id, a) == a
        if crashes and data.draw(st.booleans()):
            crashes -= 1
            j = data.draw(st.integers(0, len(changelog) - 1))  # the changelog lost its tail after j
            changelog = changelog[: j + 1]
            state = CustomerLedger.from_dict(json.loads(json.dumps(changelog[j])))
            resume = resume_offsets([state]).get("ledger_in:0", 0)
            i = data.draw(st.integers(0, resume))  # seek to resume, or anywhere earlier (committed offset)
    assert state.to_dict() == ref.to_dict()
    assert _roundtrip(state) == ref
    assert seen_entries == ref_entries
    assert seen_alerts == ref_alerts
