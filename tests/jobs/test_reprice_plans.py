"""Re-rating subscription-plan customers (jobs/reprice/plans.py) on the real ClickHouse engine (chDB).

The expected bills are computed here from the plan definitions by hand (fee + rate-card overage
above an amount allowance; fee + per-million overage above included tokens), from the events priced
one by one by the Python pricing engine: never by the code under test. The ledger is the pure ledger
the credit agent runs, reached through the real ``ledger-commands`` codec.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from jobs.reprice.apply import apply_plan
from jobs.reprice.compute import Filters, open_reprice
from meterline.core.ledger import Policy, apply, new_ledger
from meterline.core.ledger._types import ApplyPricedUsage
from meterline.core.money import to_decimal
from meterline.core.plans import SubscriptionEvent, load_plan_catalog
from pipeline.plans_sink import PLAN_COLUMNS, SUBSCRIPTION_COLUMNS, plan_row, subscription_row
from schemas.credits import decode_command
from tests.jobs.reprice_helpers import BOOK_AFTER, BOOK_BEFORE, T0, engine, insert_priced, make_events

FILTERS = Filters(T0, T0 + 31 * 86400)
AT_MS = (T0 + 40 * 86400) * 1000
MONTH_END = T0 + 31 * 86400  # 2026-01-01: the month plan's first period ends here
ACME_FROM = T0 + 4 * 86400 + 12 * 3600 + 30 * 60  # 2025-12-05T12:30:00Z: mid-hour, mid-window

PLANS = """
currency: USD
plans:
  - {id: tok, version: 1, effective_from: "2025-01-01T00:00:00Z", interval: month, fee: "20.00",
     allowances: [{id: tokens, tokens: 1000000}], overage: {per_million: "30.00"}, on_exhausted: allow}
  - {id: amt, version: 1, effective_from: "2025-01-01T00:00:00Z", interval: month, fee: "10.00",
     allowances: [{id: credit, amount: "2.00"}], overage: {rate_card: {multiplier: "1.5"}}, on_exhausted: allow}
"""
# globex: included tokens + per-million overage from before the first event (price-independent bill);
# acme: an amount allowance + rate-card overage from mid-window (pay-per-token before, plan after);
# initech: pay-per-token.
TOK_FEE, TOK_INCLUDED, TOK_PER_MILLION = Decimal("20.00"), 1_000_000, Decimal("30.00")
AMT_FEE, AMT_INCLUDED, AMT_MULTIPLIER = Decimal("10.00"), Decimal("2.00"), Decimal("1.5")


def setup_plan_usage(ch: Any, tmp_path: Any, book: dict[str, Any] = BOOK_BEFORE) -> list[dict[str, Any]]:
    """The plans, the subscription facts and the month's usage priced with ``book``, in ClickHouse."""
    f = tmp_path / "plans.yaml"
    f.write_text(PLANS)
    catalog = load_plan_catalog(f)
    ch.insert("plans", [plan_row(v) for v in catalog.versions], column_names=list(PLAN_COLUMNS))
    facts = [
        SubscriptionEvent("subscribed", "globex", T0, "tok", 1),
        SubscriptionEvent("subscribed", "acme", ACME_FROM, "amt", 1),
    ]
    ch.insert("subscription_events", [subscription_row(e) for e in facts], column_names=list(SUBSCRIPTION_COLUMNS))
    events = make_events(21, 900)
    insert_priced(ch, events, engine(book))
    return events


def _in_plan(ev: dict[str, Any]) -> bool:
    t = ev["occurred_at"] // 1000
    return ev["customer_id"] == "globex" or (ev["customer_id"] == "acme" and t >= ACME_FROM)


def _tokens(ev: dict[str, Any]) -> int:
    return sum(ev[f"{c}_tokens"] for c in ("input", "output", "cached_input", "cache_write", "reasoning"))


def expected(events: list[dict[str, Any]], book: dict[str, Any]) -> dict[str, dict[str, Decimal]]:
    """By hand, from the plan definitions: per customer, the pay-per-token charge of the events
    outside a plan, and the bill of the plan period (prepaid credit aside)."""
    eng = engine(book)
    payg: dict[str, int] = {"acme": 0, "globex": 0, "initech": 0}
    plan_charge = {"acme": 0}
    tokens = 0
    for ev in events:
        p = eng.price(ev)
        if not _in_plan(ev):
            payg[ev["customer_id"]] += p.charge_picos
        elif ev["customer_id"] == "acme":
            plan_charge["acme"] += p.charge_picos
        else:
            tokens += _tokens(ev)
    acme_usage = to_decimal(plan_charge["acme"])
    acme_overage = max(Decimal(0), acme_usage - AMT_INCLUDED) * AMT_MULTIPLIER
    globex_overage = Decimal(max(0, tokens - TOK_INCLUDED)) * TOK_PER_MILLION / Decimal(1_000_000)
    return {
        "acme": {
            "payg": to_decimal(payg["acme"]),
            "bill": AMT_FEE + acme_overage,
            "overage": acme_overage,
            "usage": acme_usage,
        },
        "globex": {"payg": Decimal(0), "bill": TOK_FEE + globex_overage, "overage": globex_overage},
        "initech": {"payg": to_decimal(payg["initech"]), "bill": Decimal(0), "overage": Decimal(0)},
    }


def _agent_ledgers(old: dict[str, dict[str, Decimal]]) -> dict[str, Any]:
    """The ledgers as the credit agent left them before the correction (no grants: all overage):
    the pay-per-token usage outside plans, and the plan overage (the agent's per-event overage
    amounts add up to the bill's overage line, docs/plans.md)."""
    states = {c: new_ledger(c, "usd", Policy(overage="allow")) for c in ("acme", "globex", "initech")}
    for cust in states:
        for eid, amount in ((f"payg-{cust}", old[cust]["payg"]), (f"plan-{cust}", old[cust]["overage"])):
            states[cust], _ = apply(
                states[cust],
                ApplyPricedUsage(
                    event_id=eid,
                    occurred_at_ms=T0 * 1000,
                    charge_picos=int(amount.scaleb(12)),
                    currency="usd",
                    provider="openai",
                    model="gpt-4o",
                ),
            )
    return states


def test_plan_customers_are_rerated_as_plan_bills(clickhouse: Any, tmp_path: Any) -> None:
    events = setup_plan_usage(clickhouse, tmp_path)
    old, new = expected(events, BOOK_BEFORE), expected(events, BOOK_AFTER)
    assert new["acme"]["bill"] != old["acme"]["bill"]  # the correction reaches acme's rate-card overage
    assert new["globex"]["overage"] > 0  # globex's overage is per million tokens: the price does not matter

    # -- dry run: exact old / new / delta per customer and per plan period ---------------------------
    with open_reprice(clickhouse, engine(BOOK_AFTER), FILTERS) as rp:
        plan = rp.report()
    got = {c["customer_id"]: c for c in plan.customers()}
    for cust in ("acme", "globex", "initech"):
        o, n = old[cust]["payg"] + old[cust]["bill"], new[cust]["payg"] + new[cust]["bill"]
        assert (got[cust]["old_charge"], got[cust]["new_charge"], got[cust]["delta"]) == (o, n, n - o), cust
    assert got["globex"]["delta"] == 0  # yet its events' pay-per-token charge changed (a discount card)
    bills = {b.customer_id: b for b in plan.plan_bills}
    assert set(bills) == {"acme", "globex"}
    a = bills["acme"]
    assert (a.start, a.stop, a.plans) == (ACME_FROM, ACME_FROM + (MONTH_END - T0), ("amt@1",))
    assert to_decimal(a.old) == old["acme"]["bill"] and to_decimal(a.new) == new["acme"]["bill"]
    assert (
        to_decimal(a.old_usage_charge) == old["acme"]["usage"]
        and to_decimal(a.new_usage_charge) == new["acme"]["usage"]
    )
    assert to_decimal(a.ledger_delta) == new["acme"]["overage"] - old["acme"]["overage"]
    g = bills["globex"]
    assert (g.start, g.stop) == (T0, MONTH_END) and g.old == g.new and to_decimal(g.new) == new["globex"]["bill"]
    # cost is still re-rated for in-plan events (what meterline pays the provider does not depend on plans)
    assert got["globex"]["cost_delta"] != 0

    # -- apply: rows, ledger, rollups ---------------------------------------------------------------
    # The ledger as the credit agent left it: acme's pay-per-token usage before its plan and the plan
    # overage (what the agent debits per event, summed), globex's plan overage, initech's usage.
    states = _agent_ledgers(old)
    sent: list[dict[str, Any]] = []
    with open_reprice(clickhouse, engine(BOOK_AFTER), FILTERS) as rp:
        rp.report()
        res = apply_plan(
            clickhouse, rp, ran_by="test", reason="late price", command="test", send=sent.append, at_ms=AT_MS
        )
    assert res.correction_id and res.commands == len(sent)
    # the plan row: exactly what the tests' arithmetic says
    rows = clickhouse.query(
        "SELECT customer_id, toUnixTimestamp(occurred_at), toUnixTimestamp(period_end), provider, model, currency, "
        "cost, charge, ledger_charge, price_version FROM usage_corrections WHERE kind = 'plan'"
    ).result_rows
    assert rows == [
        (
            "acme",
            ACME_FROM,
            ACME_FROM + (MONTH_END - T0),
            "",
            "",
            "usd",
            Decimal(0),
            new["acme"]["bill"] - old["acme"]["bill"],
            new["acme"]["overage"] - old["acme"]["overage"],
            "amt@1",
        )
    ]
    # globex (all usage on a per-million plan) gets no ledger command and no charge correction at all
    assert not [c for c in sent if c["customer_id"] == "globex"]
    assert clickhouse.query("SELECT sum(charge) FROM usage_corrections WHERE customer_id = 'globex'").result_rows[0][
        0
    ] == Decimal(0)
    for cmd in sent:
        req = decode_command(json.dumps(cmd).encode())
        assert req.ledger_commands
        for c in req.ledger_commands:
            states[req.customer_id], eff = apply(states[req.customer_id], c)
            assert eff.skipped is None
    for cust in states:  # the ledger now carries the re-rated pay-per-token usage + the re-rated plan overage
        assert to_decimal(states[cust].overage_picos) == new[cust]["payg"] + new[cust]["overage"], cust
    # rollups: cost re-rated for every event; charge = as stored + pay-per-token deltas + the plan delta
    eng_old, eng_new = engine(BOOK_BEFORE), engine(BOOK_AFTER)
    for cust in states:
        mine = [e for e in events if e["customer_id"] == cust]
        cost = to_decimal(sum(eng_new.price(e).cost_picos for e in mine))
        stored = to_decimal(sum(eng_old.price(e).charge_picos for e in mine))
        charge = stored + (new[cust]["payg"] - old[cust]["payg"]) + (new[cust]["bill"] - old[cust]["bill"])
        for table in ("usage_hourly", "usage_daily"):
            r = clickhouse.query(
                f"SELECT sum(cost), sum(charge) FROM {table} WHERE customer_id = {{c:String}}", parameters={"c": cust}
            ).result_rows[0]
            assert (Decimal(r[0]), Decimal(r[1])) == (cost, charge), (cust, table)

    # -- second apply: old = new now, nothing written, nothing sent -------------------------------
    again: list[dict[str, Any]] = []
    with open_reprice(clickhouse, engine(BOOK_AFTER), FILTERS) as rp:
        plan2 = rp.report()
        assert rp.delta_summary() == (0, 0)
        res2 = apply_plan(clickhouse, rp, ran_by="test", reason="again", command="test", send=again.append, at_ms=AT_MS)
    assert res2.noop and again == []
    got2 = {c["customer_id"]: c for c in plan2.customers()}
    for cust in states:
        assert got2[cust]["delta"] == 0 and got2[cust]["old_charge"] == new[cust]["payg"] + new[cust]["bill"], cust
    b2 = {b.customer_id: b for b in plan2.plan_bills}
    assert to_decimal(b2["acme"].old) == to_decimal(b2["acme"].new) == new["acme"]["bill"]
    assert to_decimal(b2["acme"].prior) == new["acme"]["bill"] - old["acme"]["bill"]

    # -- and back: the price restored after the fact corrects the plan row again, exactly ----------
    back: list[dict[str, Any]] = []
    with open_reprice(clickhouse, engine(BOOK_BEFORE), FILTERS) as rp:
        plan3 = rp.report()
        apply_plan(clickhouse, rp, ran_by="test", reason="undo", command="test", send=back.append, at_ms=AT_MS + 1)
    got3 = {c["customer_id"]: c for c in plan3.customers()}
    assert got3["acme"]["delta"] == -got["acme"]["delta"]
    for cmd in back:
        req = decode_command(json.dumps(cmd).encode())
        assert req.ledger_commands
        for c in req.ledger_commands:
            states[req.customer_id], _ = apply(states[req.customer_id], c)
    for cust in states:
        assert to_decimal(states[cust].overage_picos) == old[cust]["payg"] + old[cust]["overage"], cust
    assert clickhouse.query("SELECT sum(charge) FROM usage_corrections WHERE kind = 'plan'").result_rows[0][
        0
    ] == Decimal(0)


class Crash(Exception):
    pass


def test_a_crash_at_every_step_then_a_resume_is_exact_for_plan_rows(clickhouse: Any, tmp_path: Any) -> None:
    events = setup_plan_usage(clickhouse, tmp_path)
    old, new = expected(events, BOOK_BEFORE), expected(events, BOOK_AFTER)
    # each run crashes at the first step of its kind: before the insert, right after it (then the
    # resume finds rows stored under a 'planned' run), in the middle of the ledger sends, then resumes
    targets = ["planned", "inserted", "command", None]
    sent: list[dict[str, Any]] = []
    crashes = 0
    for target in targets:

        def on_step(name: str, target: str | None = target) -> None:
            if name == target:
                raise Crash(name)

        try:
            with open_reprice(clickhouse, engine(BOOK_AFTER), FILTERS) as rp:
                rp.report()
                apply_plan(
                    clickhouse,
                    rp,
                    ran_by="t",
                    reason="crash",
                    command="t",
                    send=sent.append,
                    at_ms=AT_MS,
                    on_step=on_step,
                )
        except Crash:
            crashes += 1
    assert crashes == 3
    with open_reprice(clickhouse, engine(BOOK_AFTER), FILTERS) as rp:
        rp.report()
        assert apply_plan(clickhouse, rp, ran_by="t", reason="crash", command="t", send=sent.append, at_ms=AT_MS).noop
    rows = clickhouse.query(
        "SELECT count(), sum(charge), sum(ledger_charge) FROM usage_corrections WHERE kind = 'plan'"
    ).result_rows[0]
    assert rows == (1, new["acme"]["bill"] - old["acme"]["bill"], new["acme"]["overage"] - old["acme"]["overage"])
    assert clickhouse.query("SELECT uniqExact(correction_id) FROM usage_corrections").result_rows[0][0] == 1
    # re-sent commands keep their ids and content; applied once each, the ledger is exact
    by_id: dict[str, str] = {}
    for cmd in sent:
        assert by_id.setdefault(cmd["command_id"], json.dumps(cmd, sort_keys=True)) == json.dumps(cmd, sort_keys=True)
    states = _agent_ledgers(old)
    for cmd in sent:  # re-sent commands are duplicates to the ledger (same ids): applied once
        req = decode_command(json.dumps(cmd).encode())
        assert req.ledger_commands
        for c in req.ledger_commands:
            states[req.customer_id], _ = apply(states[req.customer_id], c)
    for cust in states:
        assert to_decimal(states[cust].overage_picos) == new[cust]["payg"] + new[cust]["overage"], cust


def test_a_minimum_commitment_absorbs_the_bill_change_but_not_the_ledgers(clickhouse: Any, tmp_path: Any) -> None:
    """initech on a commitment far above its usage (rate-card overage, nothing included): the price
    cut does not move the bill (the true-up grows by as much), but the ledger carries the overage,
    which the cut lowers: a plan row with charge 0 and the overage change as ledger_charge, and a
    refund to initech's ledger."""
    events = setup_plan_usage(clickhouse, tmp_path)
    f = tmp_path / "commit.yaml"
    f.write_text(
        "currency: USD\nplans:\n"
        '  - {id: com, version: 1, effective_from: "2025-01-01T00:00:00Z", interval: month, fee: "0",\n'
        '     overage: {rate_card: {multiplier: "1"}}, on_exhausted: allow, minimum_commitment: "100000.00"}\n'
    )
    catalog = load_plan_catalog(f)
    clickhouse.insert("plans", [plan_row(v) for v in catalog.versions], column_names=list(PLAN_COLUMNS))
    fact = SubscriptionEvent("subscribed", "initech", T0, "com", 1)
    clickhouse.insert("subscription_events", [subscription_row(fact)], column_names=list(SUBSCRIPTION_COLUMNS))
    usage = {
        name: to_decimal(sum(engine(b).price(e).charge_picos for e in events if e["customer_id"] == "initech"))
        for name, b in (("old", BOOK_BEFORE), ("new", BOOK_AFTER))
    }
    assert usage["new"] < usage["old"] < Decimal("100000")
    sent: list[dict[str, Any]] = []
    with open_reprice(clickhouse, engine(BOOK_AFTER), FILTERS) as rp:
        plan = rp.report()
        apply_plan(clickhouse, rp, ran_by="t", reason="cut", command="t", send=sent.append, at_ms=AT_MS)
    initech = next(c for c in plan.customers() if c["customer_id"] == "initech")
    assert initech["old_charge"] == initech["new_charge"] == Decimal("100000.00") and initech["delta"] == 0
    [b] = initech["plan_bills"]
    assert to_decimal(b.ledger_delta) == usage["new"] - usage["old"] and b.delta == 0
    assert clickhouse.query(
        "SELECT charge, ledger_charge FROM usage_corrections WHERE kind = 'plan' AND customer_id = 'initech'"
    ).result_rows == [(Decimal(0), usage["new"] - usage["old"])]
    ledger = new_ledger("initech", "usd", Policy(overage="allow"))
    ledger, _ = apply(
        ledger,
        ApplyPricedUsage(
            event_id="plan-overage",
            occurred_at_ms=T0 * 1000,
            charge_picos=int(usage["old"].scaleb(12)),
            currency="usd",
            provider="openai",
            model="gpt-4o",
        ),
    )
    mine = [c for c in sent if c["customer_id"] == "initech"]
    assert [c["type"] for c in mine] == ["plan_correction"]
    for cmd in mine:
        req = decode_command(json.dumps(cmd).encode())
        assert req.ledger_commands
        for c in req.ledger_commands:
            ledger, eff = apply(ledger, c)
            assert eff.skipped is None
    assert to_decimal(ledger.overage_picos) == usage["new"]
