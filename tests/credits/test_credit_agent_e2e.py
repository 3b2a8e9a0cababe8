"""The credit agent end to end on real parts (Tansu, faust worker process, chDB), checked against a
pure replay of the same records through the same processor and meterline.core.ledger."""

from __future__ import annotations

import json
import time
from decimal import Decimal
from typing import Any

from meterline.core.pricing import PricingEngine, load_price_book
from tests.credits.conftest import SEED, CreditPipeline
from tests.credits.helpers import Replay, enc, grant_msg, priced_event, priced_record

MIN = 60_000


class Driver:
    """Produce records with explicit timestamps and feed the oracle the same records."""

    def __init__(self, p: CreditPipeline, oracle: Replay) -> None:
        self.p, self.oracle = p, oracle
        self.ts = int(time.time() * 1000) - 3_600_000

    def command(self, msg: dict[str, Any], ts: int) -> None:
        v = enc(msg)
        self.p.send("ledger-commands", msg["customer_id"], v, ts)
        self.oracle.feed(self.p.settings.topic("ledger-commands"), 0, msg["customer_id"], v, ts)

    def usage(self, customer: str, events: list[dict[str, Any]], ts: int) -> None:
        v = priced_record(events)
        self.p.send("usage-priced", customer, v, ts)
        self.oracle.feed(self.p.settings.topic("usage-priced"), 0, customer, v, ts)

    def settle(self, timeout: float = 60.0) -> None:
        """Wait until the pipeline's latest statuses and ClickHouse entries equal the oracle's."""
        self.p.flush()
        want_n = len(self.oracle.entries)
        self.p.wait_for(f"{want_n} ledger entries", lambda: self.p.entry_count() >= want_n, timeout)
        self.p.wait_for("statuses equal to the oracle", lambda: self._statuses() == self.oracle.statuses, timeout)

    def _statuses(self) -> dict[str, dict[str, Any]]:
        return self.p.latest_json("customer-status")


def entries_in_clickhouse(p: CreditPipeline) -> dict[str, tuple[str, Decimal, str]]:
    rows = p.query("SELECT entry_id, kind, amount, grant_id FROM ledger_entries FINAL")
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def oracle_entries(o: Replay) -> dict[str, tuple[str, Decimal, str]]:
    return {k: (e["kind"], Decimal(e["amount"]), e["grant_id"] or "") for k, e in o.entries.items()}


def test_grants_expiry_block_topup_duplicates_and_authorize(credit_pipeline: CreditPipeline) -> None:
    p = credit_pipeline
    p.publish_prices()
    oracle = Replay(
        PricingEngine.from_book(load_price_book(SEED)),
        priced_topic=p.settings.topic("usage-priced"),
        commands_topic=p.settings.topic("ledger-commands"),
    )
    d = Driver(p, oracle)
    t0 = d.ts
    p.start_worker()

    # Phase 1: grants. "exp": gA $10 prio 10 expiring at t0+10m, gC $3 prio 10 no expiry, gB $5 prio 20.
    d.command(grant_msg("exp", "gA", "10.00", t0, expires=t0 + 10 * MIN, priority=10), t0)
    d.command(grant_msg("exp", "gB", "5.00", t0, priority=20), t0)
    d.command(grant_msg("exp", "gC", "3.00", t0, priority=10), t0)
    d.command(grant_msg("ten", "g10", "10.00", t0), t0)
    d.command(grant_msg("auth", "gauth", "50.00", t0), t0)
    d.command(grant_msg("poor", "gpoor", "0.000001", t0), t0)
    d.settle()

    # Phase 2: usage. gA is consumed first (same priority as gC, sooner expiry).
    d.usage("exp", [priced_event("exp", "e1", "2.00", t0 + MIN)], t0 + MIN)
    d.usage("exp", [priced_event("exp", "e2", "4.00", t0 + 2 * MIN)], t0 + 2 * MIN)
    # processed after gA's expiry (broker time t0+11m), occurred before it: the expiry is written
    # first (remainder 4.00 at expires_at), so the late event goes to gC.
    d.usage("exp", [priced_event("exp", "e3", "1.00", t0 + 5 * MIN)], t0 + 11 * MIN)
    for i in range(4):  # $3 each against $10: the 4th exhausts it
        d.usage("ten", [priced_event("ten", f"t{i}", "3.00", t0 + (i + 1) * MIN)], t0 + (i + 1) * MIN)
    d.settle()

    exp = [e for e in oracle.entries.values() if e["customer_id"] == "exp"]
    assert [(e["kind"], e["grant_id"], e["amount"]) for e in sorted(exp, key=lambda e: e["seq"])][3:] == [
        ("debit", "gA", "2.00"),
        ("debit", "gA", "4.00"),
        ("expiry", "gA", "4.00"),
        ("debit", "gC", "1.00"),
    ]
    assert next(e for e in exp if e["kind"] == "expiry")["at_ms"] == t0 + 10 * MIN
    statuses = [json.loads(v) for k, v, _p, _o in p.read("customer-status") if k == "ten"]
    assert [s["status"] for s in statuses] == ["active"] * 4 + ["blocked"]  # blocked AT the 4th event
    assert statuses[-1]["reason"] == "credit_exhausted" and statuses[-1]["balance"]["overage"] == "2.00"

    # Phase 3: top-up unblocks; authorize allow (hold) and deny; duplicates and a replayed record.
    d.command(grant_msg("ten", "topup1", "20.00", t0 + 6 * MIN, kind="top_up"), t0 + 6 * MIN)
    auth = {
        "type": "authorize",
        "command_id": "authorize:r1",
        "customer_id": "auth",
        "at_ms": t0 + 7 * MIN,
        "request_id": "r1",
        "provider": "openai",
        "model": "gpt-4o",
        "model_version": None,
        "project": None,
        "api_key_id": None,
        "input_tokens_estimate": 10_000,
        "max_output_tokens": 2_000,
    }
    d.command(auth, t0 + 7 * MIN)
    d.command({**auth, "customer_id": "poor", "command_id": "authorize:r2", "request_id": "r2"}, t0 + 7 * MIN)
    d.command(grant_msg("exp", "gA", "10.00", t0, priority=10), t0 + 7 * MIN)  # same grant again
    d.usage("exp", [priced_event("exp", "e2", "4.00", t0 + 2 * MIN)], t0 + 12 * MIN)  # replayed event
    d.settle()
    replies = {k: json.loads(v) for k, v, _p, _o in p.read("ledger-replies")}
    assert replies == oracle.replies
    r1 = replies["r1"]
    assert (r1["decision"], r1["hold_id"], r1["estimate"]) == ("allow", "r1", "0.08")  # 10k in @5 + 2k out @15 per M
    assert (replies["r2"]["decision"], replies["r2"]["reason"]) == ("deny", "insufficient_credit")
    latest = p.latest_json("customer-status")
    assert latest["ten"]["status"] == "active" and latest["auth"]["balance"]["held"] == "0.08"

    # Phase 4: the usage carrying request_id r1 settles the hold.
    d.usage("auth", [priced_event("auth", "u-r1", "0.05", t0 + 8 * MIN, request_id="r1")], t0 + 8 * MIN)
    d.settle()
    latest = p.latest_json("customer-status")
    assert (latest["auth"]["balance"]["held"], latest["auth"]["balance"]["available"]) == ("0.00", "49.95")
    assert entries_in_clickhouse(p) == oracle_entries(oracle)
    assert latest["exp"]["balance"]["credit_remaining"] == "7.00"  # gB 5 + gC 2: duplicates changed nothing
