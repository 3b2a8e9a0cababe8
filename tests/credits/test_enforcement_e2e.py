"""Enforcement in the request path, on the production wiring (meterline.shell.runtime.Runtime): the real
HTTP API, the real faust credit agent, real Kafka, real chDB, a real webhook receiver.

- 50 concurrent authorizations against a small balance never reserve more than it holds;
- the usage event carrying a request_id settles its hold to the actual charge;
- a spend spike raises exactly one runaway alert, delivered signed to a webhook receiver, and
  blocks the customer.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from meterline.core.config import Settings
from meterline.core.pricing import load_price_book
from meterline.shell.api.keys import KeyStore
from meterline.shell.runtime import Runtime
from meterline.stack.producer import UsageProducer
from pipeline.alerts import verify_signature
from pipeline.publish import publish_records
from schemas.models import UsageEvent

pytestmark = pytest.mark.broker

SEED = Path(__file__).resolve().parents[2] / "infra" / "prices" / "seed.yaml"
SECRET = "whsec-test-secret"
# gpt-4o list: $5 / $15 per million, and acme's rate card adds 20 %: the worst case of 10,000
# input + 1,000 output tokens is $0.065 × 1.2 = $0.078 of charge.
WORST_CASE = Decimal("0.078")


class Receiver:
    """A webhook receiver on 127.0.0.1 that keeps every delivery and checks its signature."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[dict[str, Any], bool]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ok = verify_signature(SECRET, self.headers.get("Meterline-Signature", ""), body)
                outer.deliveries.append((json.loads(body), ok))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()


def wait_for(what: str, predicate: Any, timeout: float = 60.0, show: Any = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}" + (f": last seen {show()}" if show else ""))


def test_authorize_bound_settlement_and_runaway_alert(
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
    runtime = Runtime(settings).start()
    producer = UsageProducer(kafka_bootstrap, settings.topic("usage-events"), linger_ms=5)
    try:
        publish_records(kafka_bootstrap, settings.topic("prices"), load_price_book(SEED).to_records())
        api = runtime.api_server.url
        admin = {"Authorization": f"Bearer {runtime.admin_key}"}
        _, acme_key = KeyStore(tmp_path / "api_keys.json").create("acme")
        acme = {"Authorization": f"Bearer {acme_key}"}
        http = httpx.Client(base_url=api, timeout=30)

        # $1.00 of prepaid credit, blocked when it runs out.
        r = http.put("/v1/customers/acme/policy", json={"overage": "block"}, headers=admin)
        assert r.status_code == 202, r.text
        r = http.post(
            "/v1/credits/grants",
            headers=admin,
            json={"customer_id": "acme", "grant_id": "g1", "amount": "1.00", "currency": "usd"},
        )
        assert r.status_code == 202, r.text
        wait_for(
            "the grant to show in the balance",
            lambda: (
                (b := http.get("/v1/customers/acme/balance", headers=acme)).status_code == 200
                and b.json()["available"] in ("1", "1.00", "1.000000000000")
            ),
            show=lambda: (
                http.get("/v1/customers/acme/balance", headers=acme).text,
                [w.log_tail(1500) for w in runtime.workers],
            ),
        )

        # 50 concurrent authorizations of $0.078 worst case each against $1.00: at most 12 fit.
        def authorize(i: int) -> dict[str, Any]:
            resp = http.post(
                "/v1/authorize",
                headers=acme,
                json={
                    "customer_id": "acme",
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
            replies = list(pool.map(authorize, range(50)))
        allowed = [r for r in replies if r["decision"] == "allow"]
        assert len(allowed) * WORST_CASE <= Decimal("1.00"), "holds reserved more than the balance"
        assert len(allowed) == 12, [(r["decision"], r["reason"], r["estimate"], r["available"]) for r in replies]
        assert {r["reason"] for r in replies if r["decision"] == "deny"} == {"insufficient_credit"}
        assert all(Decimal(r["estimate"]) == WORST_CASE for r in allowed)

        # The usage of an allowed request settles its hold to the actual charge.
        now = datetime.now(UTC)
        settled = allowed[0]["request_id"]
        producer.send(
            UsageEvent(
                event_id=f"ev-{settled}",
                occurred_at=now,
                customer_id="acme",
                provider="openai",
                model="gpt-4o",
                request_id=settled,
                input_tokens=2_000,
                output_tokens=100,
            )
        )
        producer.flush(30)
        actual = Decimal(2_000 * 5 + 100 * 15) / 1_000_000 * Decimal("1.2")  # $0.0138 with acme's card
        expected_available = Decimal("1.00") - actual - WORST_CASE * (len(allowed) - 1)
        wait_for(
            "the settled balance",
            lambda: (
                Decimal(http.get("/v1/customers/acme/balance", headers=acme).json()["available"]) == expected_available
            ),
        )

        # A runaway loop: $0.50/minute cap with block; one spike over it -> one alert, blocked.
        r = http.put(
            "/v1/customers/hooli/policy",
            headers=admin,
            json={
                "overage": "allow",
                "runaway_customer": {
                    "window_ms": 60_000,
                    "bucket_ms": 10_000,
                    "baseline_ms": 600_000,
                    "abs_cap": "0.50",
                    "block": True,
                },
            },
        )
        assert r.status_code == 202, r.text
        time.sleep(1.0)  # the policy command is ahead of the usage on the same partition anyway
        for _ in range(40):  # 40 × $0.065 (list price: hooli has no card) = $2.60 within seconds
            producer.send(
                UsageEvent(
                    event_id=str(uuid.uuid4()),
                    occurred_at=datetime.now(UTC),
                    customer_id="hooli",
                    provider="openai",
                    model="gpt-4o",
                    input_tokens=10_000,
                    output_tokens=1_000,
                )
            )
        producer.flush(30)
        status = wait_for(
            "hooli blocked",
            lambda: (
                (s := http.get("/v1/customers/hooli/status", headers=admin).json()).get("status") == "blocked" and s
            ),
        )
        assert status["reason"] == "runaway_guard" and status["allowed"] is False
        runaway = wait_for(
            "the runaway alert at the receiver",
            lambda: [
                d
                for d in receiver.deliveries
                if d[0].get("customer_id") == "hooli" and "runaway" in d[0].get("kind", "")
            ],
        )
        time.sleep(2.0)  # anything duplicated would have arrived by now
        runaway = [
            d for d in receiver.deliveries if d[0].get("customer_id") == "hooli" and "runaway" in d[0].get("kind", "")
        ]
        assert len(runaway) == 1, receiver.deliveries
        assert runaway[0][1], "the webhook signature did not verify"
    finally:
        producer.close()
        runtime.stop()
        receiver.close()
