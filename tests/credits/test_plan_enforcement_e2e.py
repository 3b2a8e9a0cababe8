"""Live plan enforcement on real parts (Tansu, a faust worker process, chDB): the plan catalog from
the ``plans`` topic, subscription facts on ``subscriptions``, priced usage and authorizations,
checked against a pure replay of the same records through the same processor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from meterline.core.plans import SubscriptionEvent, load_plan_catalog
from meterline.core.pricing import PricingEngine, load_price_book
from pipeline.credits.plans import PlanBook
from pipeline.publish import publish_records
from tests.credits.conftest import SEED, CreditPipeline
from tests.credits.helpers import Replay, enc, priced_event, priced_record

M = 1_000_000
MIN = 60_000
METERLINE = str(Path(sys.executable).parent / "meterline")
CATALOG = load_plan_catalog(
    {
        "currency": "USD",
        "plans": [
            {
                "id": "pro",
                "version": 1,
                "effective_from": "2026-01-01T00:00:00Z",
                "interval": "month",
                "fee": "200.00",
                "allowances": [{"id": "tokens", "tokens": 10 * M}],
                "overage": {"per_million": "30.00"},
                "on_exhausted": "allow",
            },
            {
                "id": "strict",
                "version": 1,
                "effective_from": "2026-01-01T00:00:00Z",
                "interval": "month",
                "fee": "200.00",
                "allowances": [{"id": "tokens", "tokens": 10 * M}],
                "overage": {"per_million": "30.00"},
                "on_exhausted": "block",
            },
        ],
    }
)


class PlanDriver:
    """Produce records with explicit timestamps and feed the oracle the same records."""

    def __init__(self, p: CreditPipeline, oracle: Replay) -> None:
        self.p, self.oracle = p, oracle

    def _send(self, topic: str, key: str, value: bytes, ts: int) -> None:
        self.p.send(topic, key, value, ts)
        self.oracle.feed(self.p.settings.topic(topic), 0, key, value, ts)

    def subscribe(self, customer: str, plan: str, at_s: int) -> None:
        key, value = SubscriptionEvent("subscribed", customer, at_s, plan).to_record()
        self._send("subscriptions", key, value, at_s * 1000)

    def usage(self, customer: str, eid: str, n_in: int, at_ms: int, *, request_id: str | None = None) -> None:
        ev = priced_event(customer, eid, "1.00", at_ms, request_id=request_id)
        ev.update(input_tokens=n_in, output_tokens=0)
        self._send("usage-priced", customer, priced_record([ev]), at_ms)

    def authorize(self, customer: str, rid: str, at_ms: int, n_in: int, n_out: int) -> None:
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
        self._send("ledger-commands", customer, enc(msg), at_ms)

    def settle(self, timeout: float = 90.0) -> None:
        self.p.flush()
        self.p.wait_for(
            "statuses equal to the oracle",
            lambda: self.p.latest_json("customer-status") == self.oracle.statuses,
            timeout,
        )

    def replies(self) -> dict[str, dict[str, Any]]:
        return {k: json.loads(v) for k, v, _p, _o in self.p.read("ledger-replies")}


def test_plan_allowances_burn_down_live_and_a_block_plan_blocks(credit_pipeline: CreditPipeline) -> None:
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
    d = PlanDriver(p, oracle)
    p.start_worker()
    t0 = int(time.time() * 1000) - 3_600_000
    sub_at = t0 // 1000 - 86_400
    for customer, plan in (("acme", "pro"), ("blk", "strict"), ("par", "strict")):
        d.subscribe(customer, plan, sub_at)
    d.settle()

    # $200 / 10M / $30: 7M used, 3M remaining, live; then 12M: 2M overage invoiced ($60), never blocked
    for i in range(7):
        d.usage("acme", f"a{i}", M, t0 + i * MIN)
    d.settle()
    bal = p.latest_json("customer-status")["acme"]["balance"]
    assert [(a["id"], a["included"], a["used"], a["remaining"]) for a in bal["allowances"]] == [
        ("tokens", 10 * M, 7 * M, 3 * M)
    ]
    # the installed CLI shows the same (Kafka mode: no API running)
    env = {
        **os.environ,
        "METERLINE_KAFKA_BOOTSTRAP": p.settings.kafka_bootstrap or "",
        "METERLINE_TOPIC_PREFIX": p.settings.topic_prefix,
        "METERLINE_DATA_DIR": str(p.log_dir.parent / "cli"),
    }
    out = subprocess.run(
        [METERLINE, "credits", "balance", "acme"], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [(a["id"], a["included"], a["used"], a["remaining"]) for a in doc["allowances"]] == [
        ("tokens", 10 * M, 7 * M, 3 * M)
    ]
    assert doc["plan"]["plan"] == "pro@1" and doc["status"] == "active"
    d.usage("acme", "a7", 5 * M, t0 + 8 * MIN)
    d.settle()
    st = p.latest_json("customer-status")["acme"]
    assert st["status"] == "active" and st["balance"]["allowances"][0]["remaining"] == 0
    assert st["balance"]["overage"] == "60.00" and st["balance"]["plan"]["invoiced_overage"] == "60.00"
    alerts = {json.loads(v)["alert_id"] for k, v, _p, _o in p.read("alerts") if k == "acme"}
    assert {a for a in alerts if "/allowance/" in a} == {
        f"acme/allowance/pro@1/{sub_at}/tokens/{pct}" for pct in (50, 80, 100)
    }

    # block plan: blocked at its allowance, further authorizations denied
    d.usage("blk", "b0", 10 * M, t0 + MIN)
    d.settle()
    st = p.latest_json("customer-status")["blk"]
    assert (st["status"], st["reason"]) == ("blocked", "allowance_exhausted")
    d.authorize("blk", "blk-r1", t0 + 2 * MIN, 1000, 0)

    # concurrent authorizations (in flight together): each reserves its worst case (2M) against what
    # the allowance has left after the others' reservations: 5 fit in 10M, the rest are denied
    for i in range(8):
        d.authorize("par", f"par-r{i}", t0 + 3 * MIN, M, M)
    d.settle()
    replies = d.replies()
    assert {k: v for k, v in replies.items() if k in oracle.replies} == oracle.replies
    assert (replies["blk-r1"]["decision"], replies["blk-r1"]["reason"]) == ("deny", "allowance_exhausted")
    par = [replies[f"par-r{i}"] for i in range(8)]
    assert [r["decision"] for r in par] == ["allow"] * 5 + ["deny"] * 3
    assert {r["reason"] for r in par[5:]} == {"allowance_exhausted"}
    a = p.latest_json("customer-status")["par"]["balance"]["allowances"][0]
    assert (a["reserved"], a["remaining"]) == (10 * M, 10 * M)

    # the reserved requests settle with their real usage (less than reserved): the allowance is
    # used, never overrun, and the customer is blocked only once it is exhausted
    for i in range(5):
        d.usage("par", f"pu{i}", 2 * M, t0 + 4 * MIN + i, request_id=f"par-r{i}")
    d.settle()
    st = p.latest_json("customer-status")["par"]
    assert st["balance"]["allowances"][0]["used"] == 10 * M and st["balance"]["overage"] == "0.00"
    assert (st["status"], st["reason"]) == ("blocked", "allowance_exhausted")
