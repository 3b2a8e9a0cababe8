"""The live plan gate follows re-rating (docs/corrections.md, "Subscription plans"), on real parts:
Tansu, a faust worker process (the credit agent), the ledger sink on chDB, the real ``reprice``
job (jobs/reprice) re-rating the open billing period in ClickHouse and sending its
``plan_correction`` commands to ``ledger-commands``.

Two customers on ``cap`` plans with an amount allowance and rate-card overage, in their open
period:

- ``capco`` is near its cap. A retroactive price raise pushes its re-rated overage to the cap: the
  agent's segment follows (``invoiced_overage`` = the cap), the customer is blocked and an
  authorization is denied ``plan_cap_reached`` where the same request was allowed before. The
  raise undone (a cut): the refund lowers ``invoiced`` again and the next authorization is allowed.
- ``bigco`` is inside its allowance: no ledger money moves, but the status' allowance ``used`` /
  ``remaining`` follow both corrections and the 50 % allowance alert fires after the raise.
- Re-sent commands change nothing.
"""

from __future__ import annotations

import json
import time
from decimal import Decimal
from typing import Any

from jobs.reprice.apply import apply_plan
from jobs.reprice.compute import Filters, open_reprice
from meterline.core.plans import SubscriptionEvent, load_plan_catalog
from pipeline.credits.client import CommandPublisher
from pipeline.plans_sink import PLAN_COLUMNS, SUBSCRIPTION_COLUMNS, plan_row, subscription_row
from pipeline.publish import publish_records
from tests.credits.conftest import CreditPipeline
from tests.credits.helpers import enc, priced_record
from tests.credits.test_reprice_ledger import _priced
from tests.jobs.reprice_helpers import BOOK_AFTER, BOOK_BEFORE, engine, insert_priced

HOUR = 3600
# Stored at BOOK_AFTER's gpt-4o price (2.50 / 10.00 per million): each event below is $0.35;
# re-rated at BOOK_BEFORE's (5.00 / 15.00) it is $0.65 (a raise); back at BOOK_AFTER (a cut).
N_EVENTS = 10
CATALOG = load_plan_catalog(
    {
        "currency": "USD",
        "plans": [
            {
                "id": "capamt",
                "version": 1,
                "effective_from": "2025-01-01T00:00:00Z",
                "interval": "month",
                "fee": "10.00",
                "allowances": [{"id": "credit", "amount": "1.00"}],
                "overage": {"rate_card": {"multiplier": "1"}},
                "on_exhausted": "cap",
                "cap": "4.00",
            },
            {
                "id": "capbig",
                "version": 1,
                "effective_from": "2025-01-01T00:00:00Z",
                "interval": "month",
                "fee": "10.00",
                "allowances": [{"id": "credit", "amount": "10.00"}],
                "overage": {"rate_card": {"multiplier": "1"}},
                "on_exhausted": "cap",
                "cap": "4.00",
            },
        ],
    }
)


def _events(customer: str, t0: int) -> list[dict[str, Any]]:
    return [
        {
            "event_id": f"{customer}-{i}",
            "customer_id": customer,
            "occurred_at": (t0 + i * 60) * 1000,
            "provider": "openai",
            "model": "gpt-4o",
            "model_version": None,
            "project": "chat",
            "feature": "",
            "input_tokens": 100_000,
            "output_tokens": 10_000,
            "cached_input_tokens": 0,
            "cache_write_tokens": 0,
            "reasoning_tokens": 0,
            "requests": 1,
            "labels": {},
        }
        for i in range(N_EVENTS)
    ]


def _authorize(p: CreditPipeline, customer: str, rid: str) -> None:
    at = int(time.time() * 1000)
    msg = {
        "type": "authorize",
        "command_id": f"authorize:{rid}",
        "customer_id": customer,
        "at_ms": at,
        "request_id": rid,
        "provider": "openai",
        "model": "gpt-4o",
        "model_version": None,
        "project": None,
        "api_key_id": None,
        "input_tokens_estimate": 1000,
        "max_output_tokens": 1000,
    }
    p.send("ledger-commands", customer, enc(msg), at)
    p.flush()


def _reply(p: CreditPipeline, rid: str) -> dict[str, Any]:
    got: dict[str, Any] = {}

    def seen() -> bool:
        for k, v, _p, _o in p.read("ledger-replies"):
            if k == rid:
                got.update(json.loads(v))
        return bool(got)

    p.wait_for(f"the reply to {rid}", seen, timeout=90)
    return got


def _plan_view(p: CreditPipeline, customer: str) -> tuple[str, str, str, str, str | None]:
    """(invoiced overage, allowance used, allowance remaining, status, reason) of the status."""
    st = p.latest_json("customer-status").get(customer)
    if st is None or "plan" not in st["balance"]:
        return ("", "", "", "", None)
    a = st["balance"]["allowances"][0]
    return (st["balance"]["plan"]["invoiced_overage"], a["used"], a["remaining"], st["status"], st["reason"])


def _apply(p: CreditPipeline, book: dict[str, Any], filters: Filters, pub: CommandPublisher) -> Any:
    with open_reprice(p.ch, engine(book), filters) as rp:
        rp.report()
        return apply_plan(
            p.ch, rp, ran_by="test", reason="price fix", command="test", send=pub.send, at_ms=int(time.time() * 1000)
        )


def test_the_live_cap_gate_and_allowances_follow_a_raise_and_a_cut(credit_pipeline: CreditPipeline) -> None:
    p = credit_pipeline
    p.publish_prices()  # the agent prices authorizations' worst case with the seed book
    publish_records(p.settings.kafka_bootstrap or "", p.settings.topic("plans"), CATALOG.to_records())
    p.ch.insert("plans", [plan_row(v) for v in CATALOG.versions], column_names=list(PLAN_COLUMNS))
    t0 = (int(time.time()) // HOUR - 5) * HOUR
    sub_at = t0 - HOUR  # a monthly period open now
    facts = [
        SubscriptionEvent("subscribed", "capco", sub_at, "capamt"),
        SubscriptionEvent("subscribed", "bigco", sub_at, "capbig"),
    ]
    p.ch.insert("subscription_events", [subscription_row(e) for e in facts], column_names=list(SUBSCRIPTION_COLUMNS))
    p.start_worker()
    for ev in facts:
        key, value = ev.to_record()
        p.send("subscriptions", key, value, sub_at * 1000)
    p.flush()
    # the facts first (another topic: the agent would not order them before the usage otherwise)
    p.wait_for(
        "the subscriptions", lambda: _plan_view(p, "capco")[2] == "1.00" and _plan_view(p, "bigco")[2] == "10.00"
    )
    events = _events("capco", t0) + _events("bigco", t0)
    stored = engine(BOOK_AFTER)
    assert {stored.price(e).charge_picos for e in events} == {350_000_000_000}  # $0.35 each
    ts = t0 * 1000
    for cust, items in _priced(events, stored).items():
        ts += 1
        p.send("usage-priced", cust, priced_record(items), ts)
    p.flush()
    insert_priced(p.ch, events, stored)  # what the ClickHouse sink stores from the same records

    # as priced: capco $3.50 = $1 allowance + $2.50 overage (cap $4: $1.50 of room); bigco $3.50 of $10
    p.wait_for(
        "the usage burned down", lambda: _plan_view(p, "capco")[0] == "2.50" and _plan_view(p, "bigco")[1] == "3.50"
    )
    assert _plan_view(p, "capco") == ("2.50", "1.00", "0.00", "active", None)
    assert _plan_view(p, "bigco") == ("0.00", "3.50", "6.50", "active", None)
    _authorize(p, "capco", "before-raise")
    assert _reply(p, "before-raise")["decision"] == "allow"

    filters = Filters(t0, t0 + 2 * HOUR)
    pub = CommandPublisher(p.settings.kafka_bootstrap or "", p.settings.topic("ledger-commands"))
    try:
        # 1. a retroactive raise: capco's re-rated usage is $6.50 -> overage $5.50, capped at $4
        raised = _apply(p, BOOK_BEFORE, filters, pub)
        assert raised.correction_id
        sent = json.loads(
            p.query(
                "SELECT ledger_commands FROM reprice_runs FINAL WHERE correction_id = {c:String}",
                {"c": raised.correction_id},
            )[0][0]
        )
        by = {c["customer_id"]: c for c in sent if c["type"] == "plan_correction"}
        assert by["capco"]["amount"] == "1.50" and by["capco"]["refunds"] == []
        assert by["capco"]["segments"] == [
            {"start": sub_at, "plan": "capamt@1", "used": {}, "overage": "3.00", "invoiced": "1.50"}
        ]
        assert by["bigco"]["amount"] == "0.00"  # inside the allowance: no money, the allowance moves
        assert by["bigco"]["segments"][0]["used"] == {"credit": "3.00"}
        p.wait_for(
            "the raise in the live segments",
            lambda: _plan_view(p, "capco")[0] == "4.00" and _plan_view(p, "bigco")[1] == "6.50",
        )
        assert _plan_view(p, "capco") == ("4.00", "1.00", "0.00", "blocked", "plan_cap_reached")
        assert _plan_view(p, "bigco") == ("0.00", "6.50", "3.50", "active", None)
        bal = p.latest_json("customer-status")["capco"]["balance"]
        assert Decimal(bal["overage"]) == Decimal("4.00")  # the ledger: $2.50 + the $1.50 correction
        _authorize(p, "capco", "after-raise")
        denied = _reply(p, "after-raise")
        assert (denied["decision"], denied["reason"]) == ("deny", "plan_cap_reached")
        alerts = {json.loads(v)["alert_id"] for k, v, _p, _o in p.read("alerts") if k == "bigco"}
        assert f"bigco/allowance/capbig@1/{sub_at}/credit/50" in alerts

        # 2. the raise undone (a cut): refunded to the overage; the gate opens, the allowance follows
        cut = _apply(p, BOOK_AFTER, filters, pub)
        assert cut.correction_id and cut.correction_id != raised.correction_id
        p.wait_for(
            "the cut in the live segments",
            lambda: _plan_view(p, "capco")[0] == "2.50" and _plan_view(p, "bigco")[1] == "3.50",
        )
        assert _plan_view(p, "capco") == ("2.50", "1.00", "0.00", "active", None)
        assert _plan_view(p, "bigco") == ("0.00", "3.50", "6.50", "active", None)
        assert Decimal(p.latest_json("customer-status")["capco"]["balance"]["overage"]) == Decimal("2.50")
        _authorize(p, "capco", "after-cut")
        assert _reply(p, "after-cut")["decision"] == "allow"

        # 3. every command of both runs sent again (a crash before the audit said `done`): nothing moves
        for row in p.query("SELECT ledger_commands FROM reprice_runs FINAL ORDER BY created_at"):
            for cmd in json.loads(row[0]):
                pub.send(cmd)
        # and a second apply of the cut is a no-op
        assert _apply(p, BOOK_AFTER, filters, pub).noop
    finally:
        pub.close()
    _authorize(p, "capco", "after-resend")  # a marker: the agent has applied everything sent before it
    assert _reply(p, "after-resend")["decision"] == "allow"
    assert _plan_view(p, "capco") == ("2.50", "1.00", "0.00", "active", None)
    assert _plan_view(p, "bigco") == ("0.00", "3.50", "6.50", "active", None)
    p.wait_for(
        "the ledger sink",
        lambda: p.query("SELECT overage FROM ledger_balances WHERE customer_id = 'capco'") == [(Decimal("2.50"),)],
    )
