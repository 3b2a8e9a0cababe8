"""Crash exactness during allowance burn-down: ~30 customers (on an allow plan, a block plan, a cap
plan, or pay-per-token; some with prepaid grants), token usage streamed while the worker is
SIGKILLed at random moments (3 times) and restarted. Every allowance (status), balance, ledger
entry and allowance alert must equal a pure replay of the same records. The seed is printed."""

from __future__ import annotations

import json
import os
import random
import time

import pytest

from meterline.core.plans import SubscriptionEvent, load_plan_catalog
from meterline.core.pricing import PricingEngine, load_price_book
from pipeline.credits.plans import PlanBook
from pipeline.publish import publish_records
from tests.credits.conftest import SEED, CreditPipeline
from tests.credits.helpers import Replay, grant_msg, priced_event
from tests.credits.test_credit_agent_e2e import Driver, entries_in_clickhouse, oracle_entries

M = 1_000_000
MIN = 60_000
pytestmark = pytest.mark.slow


def _plan(pid: str, on_exhausted: str, **over: object) -> dict[str, object]:
    d: dict[str, object] = {
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


def test_sigkill_during_allowance_burn_down_equals_pure_replay(credit_pipeline: CreditPipeline) -> None:
    seed = int(os.environ.get("CREDIT_KILL_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    print(f"CREDIT_KILL_SEED={seed}")
    p = credit_pipeline
    p.publish_prices()
    publish_records(p.settings.kafka_bootstrap or "", p.settings.topic("plans"), CATALOG.to_records())
    oracle = Replay(
        PricingEngine.from_book(load_price_book(SEED)),
        priced_topic=p.settings.topic("usage-priced"),
        commands_topic=p.settings.topic("ledger-commands"),
        subscriptions_topic=p.settings.topic("subscriptions"),
        plans=PlanBook.of(CATALOG),
    )
    d = Driver(p, oracle)
    t0 = d.ts
    sub_at = t0 // 1000 - 86_400
    customers = [f"pl{i:02d}" for i in range(30)]
    for i, c in enumerate(customers):
        plan = ("pro", "strict", "capped", None)[i % 4]
        if plan is not None:
            key, value = SubscriptionEvent("subscribed", c, sub_at, plan).to_record()
            p.send("subscriptions", key, value, sub_at * 1000)
            oracle.feed(p.settings.topic("subscriptions"), 0, key, value, sub_at * 1000)
        if rng.random() < 0.5:
            d.command(grant_msg(c, f"{c}-g", f"{rng.randint(1, 60)}.00", t0), t0)
    w = p.start_worker()
    p.flush()
    p.wait_for("statuses equal to the oracle", lambda: p.latest_json("customer-status") == oracle.statuses, 90)

    seq = {c: 0 for c in customers}
    ts = t0 + MIN

    def burst(n_records: int) -> None:
        nonlocal ts
        for _ in range(n_records):
            c = rng.choice(customers)
            events = []
            for _ in range(rng.randint(1, 3)):
                seq[c] += 1
                eid = f"{c}-e{seq[c]}"
                if seq[c] > 3 and rng.random() < 0.05:  # a re-sent earlier event
                    eid = f"{c}-e{rng.randint(1, seq[c] - 1)}"
                ev = priced_event(c, eid, f"0.{rng.randint(1, 999_999):06d}", ts - rng.randint(0, 5 * MIN))
                ev.update(input_tokens=rng.randint(10_000, 900_000), output_tokens=rng.randint(0, 200_000))
                events.append(ev)
            ts += rng.randint(100, 20_000)
            d.usage(c, events, ts)
        p.flush()

    def alerts() -> set[str]:
        return {json.loads(v)["alert_id"] for _k, v, _p, _o in p.read("alerts")}

    for _kill in range(3):
        burst(120)
        before = p.entry_count()
        p.wait_for("progress before the kill", lambda before=before: p.entry_count() > before, 60)
        time.sleep(rng.uniform(0.0, 0.8))
        w.kill()
        w = p.start_worker()
    burst(60)
    d.settle(timeout=120)
    latest = p.latest_json("customer-status")
    assert latest == oracle.statuses  # balances, statuses and every allowance (used, remaining, reserved)
    assert entries_in_clickhouse(p) == oracle_entries(oracle)
    assert alerts() >= set(oracle.alerts) and {a for a in alerts() if "/allowance/" in a} == {
        a for a in oracle.alerts if "/allowance/" in a
    }
    on_plan = [c for c in customers if "allowances" in oracle.statuses[c]["balance"]]
    assert on_plan and any(oracle.statuses[c]["balance"]["allowances"][0]["used"] > 0 for c in on_plan)
    assert any(oracle.statuses[c]["reason"] in ("allowance_exhausted", "plan_cap_reached") for c in on_plan)
