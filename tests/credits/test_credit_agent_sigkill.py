"""Crash exactness: ~50 customers with grants, usage streamed while the worker is SIGKILLed at
random moments (3 times) and restarted; final statuses and ClickHouse ledger entries must equal a
pure replay of the same records. The seed is printed on failure."""

from __future__ import annotations

import os
import random
import time
from decimal import Decimal

import pytest

from tests.credits.conftest import CreditPipeline
from tests.credits.helpers import Replay, priced_event
from tests.credits.test_credit_agent_e2e import Driver, entries_in_clickhouse, oracle_entries

MIN = 60_000
pytestmark = pytest.mark.slow


def test_sigkill_three_times_final_state_exact(credit_pipeline: CreditPipeline) -> None:
    seed = int(os.environ.get("CREDIT_KILL_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    print(f"CREDIT_KILL_SEED={seed}")
    p = credit_pipeline
    oracle = Replay(
        None, priced_topic=p.settings.topic("usage-priced"), commands_topic=p.settings.topic("ledger-commands")
    )
    d = Driver(p, oracle)
    t0 = d.ts
    customers = [f"cus{i:02d}" for i in range(50)]
    for c in customers:  # every customer: 1–3 grants, different priorities, some expiring mid-stream
        for g in range(rng.randint(1, 3)):
            exp = t0 + rng.randint(5, 40) * MIN if rng.random() < 0.4 else None
            amount = f"{rng.randint(1, 40)}.{rng.randint(0, 99):02d}"
            from tests.credits.helpers import grant_msg

            d.command(grant_msg(c, f"{c}-g{g}", amount, t0, expires=exp, priority=rng.randint(0, 100)), t0)
    w = p.start_worker()
    d.settle(timeout=90)

    seq = {c: 0 for c in customers}
    ts = t0 + MIN

    def burst(n_records: int) -> None:
        nonlocal ts
        for _ in range(n_records):
            c = rng.choice(customers)
            events = []
            for _ in range(rng.randint(1, 4)):
                seq[c] += 1
                eid = f"{c}-e{seq[c]}"
                if seq[c] > 3 and rng.random() < 0.05:  # a re-sent earlier event
                    eid = f"{c}-e{rng.randint(1, seq[c] - 1)}"
                events.append(priced_event(c, eid, f"0.{rng.randint(1, 999_999):06d}", ts - rng.randint(0, 5 * MIN)))
            ts += rng.randint(100, 20_000)
            d.usage(c, events, ts)
        p.flush()

    try:
        for _kill in range(3):
            burst(250)
            before = p.entry_count()
            p.wait_for("progress before the kill", lambda before=before: p.entry_count() > before, 60)
            time.sleep(rng.uniform(0.0, 0.8))
            w.kill()
            w = p.start_worker()
        burst(150)
        d.settle(timeout=120)
        assert entries_in_clickhouse(p) == oracle_entries(oracle)
        # per customer: balance, overage and debited total, from the ledger's own view and from SQL
        latest = p.latest_json("customer-status")
        assert latest == oracle.statuses
        sql = {
            r[0]: (r[1], r[2], r[3])
            for r in p.query("SELECT customer_id, credit_remaining, overage, debited FROM ledger_balances")
        }
        for c in customers:
            led = oracle.ledger(c)
            rem = sum(g.remaining for g in led.grants.values())
            debited = sum(
                Decimal(e["amount"]) for e in oracle.entries.values() if e["customer_id"] == c and e["kind"] == "debit"
            )
            assert sql[c] == (Decimal(rem).scaleb(-12), Decimal(led.overage_picos).scaleb(-12), debited), c
        raw = int(p.query("SELECT count() FROM ledger_entries")[0][0])
        print(f"entries={len(oracle.entries)} raw_rows={raw} sink_dups_dropped={p.sink.duplicates_dropped}")
        assert raw >= len(oracle.entries)
    except BaseException:
        print(f"CREDIT_KILL_SEED={seed}")
        raise
