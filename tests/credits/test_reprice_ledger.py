"""Re-rating corrections reach the ledger through the real credit agent (Tansu, a faust worker
process, the ledger-entries sink on chDB): a retroactive price cut and a discount agreed after the
fact are refunded to credit (overage first, then the grants), a later price rise is debited under
the grants and policy, a re-send changes nothing, and the agent never debits a correction twice."""

from __future__ import annotations

import json
import time
from decimal import Decimal
from typing import Any

from jobs.reprice.apply import apply_plan
from jobs.reprice.compute import Filters, open_reprice
from pipeline.credits.client import CommandPublisher
from tests.credits.conftest import CreditPipeline
from tests.credits.helpers import enc, grant_msg, priced_record
from tests.jobs.reprice_helpers import BOOK_AFTER, BOOK_BEFORE, engine, expected_totals, insert_priced, make_events

HOUR = 3600


def _priced(events: list[dict[str, Any]], eng: Any) -> dict[str, list[dict[str, Any]]]:
    by: dict[str, list[dict[str, Any]]] = {}
    for ev in events:
        p = eng.price(ev)
        by.setdefault(ev["customer_id"], []).append(
            {
                **{
                    k: ev.get(k)
                    for k in (
                        "event_id",
                        "occurred_at",
                        "customer_id",
                        "provider",
                        "model",
                        "model_version",
                        "input_tokens",
                        "output_tokens",
                        "cached_input_tokens",
                        "cache_write_tokens",
                        "reasoning_tokens",
                        "requests",
                    )
                },
                "api_key_id": None,
                "project": ev["project"],
                "feature": ev["feature"] or None,
                "user_id": None,
                "session_id": None,
                "gateway": None,
                "request_id": None,
                "labels": {},
                "cost_picos": p.cost_picos,
                "charge_picos": p.charge_picos,
                "currency": "usd",
                "price_version": p.price_version,
                "rate_card": p.rate_card,
                "priced_at": ev["occurred_at"],
                "source_partition": 0,
                "source_offset": 0,
            }
        )
    return by


def _consumed(p: CreditPipeline, granted: dict[str, Decimal]) -> dict[str, Decimal]:
    """What each customer was charged per the ledger's balances (view over ledger_entries FINAL)."""
    rows = p.query("SELECT customer_id, credit_remaining, overage FROM ledger_balances")
    return {str(c): granted.get(str(c), Decimal(0)) - Decimal(rem) + Decimal(ov) for c, rem, ov in rows}


def _apply(p: CreditPipeline, book: dict[str, Any], filters: Filters, pub: CommandPublisher) -> Any:
    with open_reprice(p.ch, engine(book), filters) as rp:
        rp.report()
        return apply_plan(
            p.ch,
            rp,
            ran_by="test",
            reason="late price fix",
            command="test",
            send=pub.send,
            at_ms=int(time.time() * 1000),
        )


def test_corrections_reach_the_ledger_through_the_credit_agent(credit_pipeline: CreditPipeline) -> None:
    p = credit_pipeline
    p.publish_prices()
    p.start_worker()
    t0 = (int(time.time()) // HOUR - 30) * HOUR
    events = make_events(21, 240, t0=t0, seconds=24 * HOUR)
    old = expected_totals(events, engine(BOOK_BEFORE))
    granted = {"acme": Decimal("1000.00"), "globex": (old["globex"][1] / 2).quantize(Decimal("0.01"))}
    for cust, amount in granted.items():
        p.send(
            "ledger-commands",
            cust,
            enc(grant_msg(cust, f"g-{cust}", f"{amount}", (t0 - HOUR) * 1000)),
            (t0 - HOUR) * 1000,
        )
    ts = t0 * 1000
    for cust, items in _priced(events, engine(BOOK_BEFORE)).items():
        for i in range(0, len(items), 40):
            ts += 1
            p.send("usage-priced", cust, priced_record(items[i : i + 40]), ts)
    p.flush()
    insert_priced(p.ch, events, engine(BOOK_BEFORE))  # what the ClickHouse sink stores from the same records
    want_old = {c: v[1] for c, v in old.items()}
    p.wait_for("the original usage in the ledger", lambda: _consumed(p, granted) == want_old, timeout=180)

    filters = Filters(t0, t0 + 24 * HOUR)
    pub = CommandPublisher(p.settings.kafka_bootstrap or "", p.settings.topic("ledger-commands"))
    try:
        # 1. the price cut and globex's discount: refunds
        res = _apply(p, BOOK_AFTER, filters, pub)
        assert res.correction_id and res.commands > 0
        new = {c: v[1] for c, v in expected_totals(events, engine(BOOK_AFTER)).items()}
        assert all(new[c] < want_old[c] for c in new)
        p.wait_for("the refunds in the ledger", lambda: _consumed(p, granted) == new, timeout=120)
        # re-sending the same commands (a crash before the audit said `done`) changes nothing
        for cmd in json.loads(p.query("SELECT ledger_commands FROM reprice_runs FINAL")[0][0]):
            pub.send(cmd)
        # 2. a second apply is a no-op
        assert _apply(p, BOOK_AFTER, filters, pub).noop
        # 3. the old prices were right after all: extra charges, debited under grants and policy
        res2 = _apply(p, BOOK_BEFORE, filters, pub)
        assert res2.correction_id and res2.correction_id != res.correction_id
        p.wait_for("the extra debits in the ledger", lambda: _consumed(p, granted) == want_old, timeout=120)
    finally:
        pub.close()
    time.sleep(3)  # let any (wrong) duplicate application surface before the final check
    assert _consumed(p, granted) == want_old
    # the agent debited every usage event once and each extra charge once, nothing else
    debits = p.query(
        "SELECT sumIf(amount, startsWith(event_id, 'reprice:')), sumIf(amount, NOT startsWith(event_id, "
        "'reprice:')) FROM ledger_entries FINAL WHERE kind = 'debit'"
    )[0]
    extra = p.query(
        "SELECT sum(charge) FROM usage_corrections WHERE correction_id = {c:String}", {"c": res2.correction_id}
    )[0][0]
    assert Decimal(debits[1]) == sum(want_old.values(), Decimal(0))
    assert Decimal(debits[0]) == Decimal(extra) > 0
