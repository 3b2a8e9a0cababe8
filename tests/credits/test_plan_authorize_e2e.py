"""Plan enforcement on the production wiring (meterline.runtime.Runtime: the real HTTP API, the
faust credit agent, Kafka, chDB, a webhook receiver), the plan loaded and the customer subscribed
with the installed ``meterline plans`` commands:

- concurrent authorizations through ``POST /v1/authorize`` against a ``block`` plan never reserve
  more than its allowance (the published bound), the rest are denied ``allowance_exhausted``;
- ``GET /v1/customers/{id}/status`` and ``/balance`` show the allowance live (included, used,
  remaining, reserved) as the real pricing agent prices usage;
- the 50 % allowance alert arrives, signed, at the webhook receiver.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from meterline.core.config import Settings
from meterline.core.pricing import load_price_book
from meterline.shell.api.keys import KeyStore
from meterline.shell.runtime import Runtime
from meterline.stack.producer import UsageProducer
from pipeline.publish import publish_records
from schemas.models import UsageEvent
from tests.credits.test_enforcement_e2e import SECRET, SEED, Receiver, wait_for

pytestmark = pytest.mark.broker
METERLINE = str(Path(sys.executable).parent / "meterline")
ALLOWANCE = 110_000  # tokens; an authorization's worst case below is 11,000: exactly 10 fit
PLAN_FILE = """
currency: USD
plans:
  - id: starter
    version: 1
    effective_from: "2026-01-01T00:00:00Z"
    interval: month
    fee: "20.00"
    allowances: [{id: tokens, tokens: 110000}]
    overage: {per_million: "30.00"}
    on_exhausted: block
"""


def _cli(env: dict[str, str], *args: str) -> None:
    out = subprocess.run([METERLINE, *args], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_block_plan_concurrent_authorizations_and_live_allowance(
    kafka_bootstrap: str, topics: dict[str, str], topic_prefix: str, clickhouse_dsn: str, tmp_path: Path
) -> None:
    receiver = Receiver()
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        partitions=4,
        broker_flavor="tansu",
        data_dir=tmp_path,
        clickhouse_dsn=clickhouse_dsn,
        api_port=0,
        alert_webhook_urls=[receiver.url],
        alert_webhook_secret=SECRET,
    )
    env = {
        **os.environ,
        "METERLINE_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "METERLINE_TOPIC_PREFIX": topic_prefix,
        "METERLINE_DATA_DIR": str(tmp_path / "cli"),
    }
    plan_file = tmp_path / "plans.yaml"
    plan_file.write_text(PLAN_FILE)
    _cli(env, "plans", "load", str(plan_file))
    start = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    _cli(env, "plans", "subscribe", "plano", "starter", "--from", start)
    publish_records(kafka_bootstrap, settings.topic("prices"), load_price_book(SEED).to_records())
    runtime = Runtime(settings).start()
    producer = UsageProducer(kafka_bootstrap, settings.topic("usage-events"), linger_ms=5)
    http = httpx.Client(base_url=runtime.api_server.url, timeout=30)
    try:
        _, key = KeyStore(tmp_path / "api_keys.json").create("plano")
        plano = {"Authorization": f"Bearer {key}"}

        def status() -> dict[str, Any]:
            r = http.get("/v1/customers/plano/status", headers=plano)
            return r.json() if r.status_code == 200 else {}

        st = wait_for(
            "the subscription in the status",
            lambda: (s := status()).get("allowances") and s,
            show=lambda: ([w.log_tail(1500) for w in runtime.workers]),
        )
        assert st["plan"]["plan"] == "starter@1" and st["allowed"] is True
        assert [(a["id"], a["included"], a["used"], a["remaining"]) for a in st["allowances"]] == [
            ("tokens", ALLOWANCE, 0, ALLOWANCE)
        ]

        def authorize(i: int) -> dict[str, Any]:
            resp = http.post(
                "/v1/authorize",
                headers=plano,
                json={
                    "customer_id": "plano",
                    "provider": "openai",
                    "model": "gpt-4o",
                    "request_id": f"req-{i}",
                    "input_tokens_estimate": 10_000,
                    "max_output_tokens": 1_000,
                },
            )
            assert resp.status_code == 200, resp.text
            return resp.json()

        with ThreadPoolExecutor(max_workers=16) as pool:
            replies = list(pool.map(authorize, range(30)))
        allowed = [r for r in replies if r["decision"] == "allow"]
        assert len(allowed) * 11_000 <= ALLOWANCE, "reservations overran the allowance"
        assert len(allowed) == 10, [(r["decision"], r["reason"]) for r in replies]
        assert {r["reason"] for r in replies if r["decision"] == "deny"} == {"allowance_exhausted"}
        assert status()["allowances"][0]["reserved"] == ALLOWANCE

        # usage settles a reservation to its actual tokens; more usage burns the allowance live
        now = datetime.now(UTC)
        settled = allowed[0]["request_id"]
        producer.send(
            UsageEvent(
                event_id=f"ev-{settled}",
                occurred_at=now,
                customer_id="plano",
                provider="openai",
                model="gpt-4o",
                request_id=settled,
                input_tokens=2_000,
                output_tokens=100,
            )
        )
        for i in range(6):
            producer.send(
                UsageEvent(
                    event_id=f"ev-more-{i}",
                    occurred_at=now,
                    customer_id="plano",
                    provider="openai",
                    model="gpt-4o",
                    input_tokens=10_000,
                )
            )
        producer.flush(30)
        a = wait_for(
            "the allowance used live",
            lambda: (
                (x := (http.get("/v1/customers/plano/balance", headers=plano).json().get("allowances") or [{}])[0]).get(
                    "used"
                )
                == 62_100
                and x
            ),
        )
        assert (a["included"], a["remaining"], a["reserved"]) == (ALLOWANCE, ALLOWANCE - 62_100, 9 * 11_000)
        alert = wait_for(
            "the 50 % allowance alert at the receiver",
            lambda: [d for d in receiver.deliveries if d[0].get("kind") == "allowance_used"],
        )
        assert alert[0][1], "the webhook signature did not verify"
        assert alert[0][0]["threshold"] == "50" and alert[0][0]["allowance_id"] == "tokens"
        time.sleep(1.0)
        assert len([d for d in receiver.deliveries if d[0].get("kind") == "allowance_used"]) == 1
    finally:
        http.close()
        producer.close()
        runtime.stop()
        receiver.close()
        receiver.server.server_close()  # Receiver.close only shuts the loop down
