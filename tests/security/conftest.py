"""One real ``meterline up`` (:class:`meterline.shell.runtime.Runtime`) for the security tests (issue #20).

Real Tansu broker (the session's), this process's chDB engine (own database), the faust workers
(pricing + credit agent), the sinks, the HTTP API with the credit routes, the Stripe top-up
webhook (a signing secret is set) and the alert webhook dispatcher (a real receiver on
127.0.0.1). Small SQL limits so a heavy query is stopped quickly. Every test uses its own
customer ids, so the tests share the stack without seeing each other's state.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from meterline.core.config import Settings
from meterline.core.pricing import load_price_book
from meterline.shell.api.keys import KeyStore
from meterline.shell.runtime import Runtime
from meterline.stack.clickhouse import apply_migrations, connect, default_migrations_dir, with_database
from pipeline.publish import publish_records

SEED = Path(__file__).resolve().parents[2] / "infra" / "prices" / "seed.yaml"
STRIPE_SECRET = "whsec_security_test_secret"
ALERT_SECRET = "alert-signing-secret"
SQL_MAX_EXECUTION_TIME_S = 2
SQL_MAX_MEMORY_BYTES = 64 * 1024**2
SQL_MAX_RESULT_ROWS = 1000


class Receiver:
    """An alert webhook receiver on 127.0.0.1 keeping every delivery (headers, JSON body)."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[dict[str, str], dict[str, Any]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.deliveries.append(({k.lower(): v for k, v in self.headers.items()}, json.loads(body)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Stack:
    runtime: Runtime
    settings: Settings
    receiver: Receiver
    http: httpx.Client

    @property
    def url(self) -> str:
        return str(self.runtime.api_server.url)

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.runtime.admin_key}"}

    def customer_key(self, customer_id: str) -> dict[str, str]:
        _, key = KeyStore(self.settings.data_dir / "api_keys.json").create(customer_id)
        return {"Authorization": f"Bearer {key}"}

    def grant(self, customer_id: str, amount: str) -> None:
        """Prepaid policy (block) plus a grant of ``amount``; waits until the balance shows it."""
        r = self.http.put(f"/v1/customers/{customer_id}/policy", json={"overage": "block"}, headers=self.admin)
        assert r.status_code == 202, r.text
        r = self.http.post(
            "/v1/credits/grants",
            headers=self.admin,
            json={"customer_id": customer_id, "grant_id": f"g-{uuid.uuid4().hex[:8]}", "amount": amount},
        )
        assert r.status_code == 202, r.text
        wait_for(
            f"{customer_id}'s grant in the balance",
            lambda: (
                (b := self.http.get(f"/v1/customers/{customer_id}/balance", headers=self.admin)).status_code == 200
                and b.json().get("available") not in (None, "0.00")
            ),
        )


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture(scope="package")
def stack(kafka_bootstrap: str, chdb_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    database = f"test_{uuid.uuid4().hex[:12]}"
    ch = connect(chdb_dsn, database=database)
    apply_migrations(ch, default_migrations_dir())
    receiver = Receiver()
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("security") / "data",
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=f"t{uuid.uuid4().hex[:8]}.",
        partitions=4,
        broker_flavor="tansu",
        clickhouse_dsn=with_database(chdb_dsn, database),
        api_port=0,
        stripe_webhook_secret=STRIPE_SECRET,
        alert_webhook_urls=[receiver.url],
        alert_webhook_secret=ALERT_SECRET,
        sql_max_execution_time_s=SQL_MAX_EXECUTION_TIME_S,
        sql_max_memory_usage_bytes=SQL_MAX_MEMORY_BYTES,
        sql_max_result_rows=SQL_MAX_RESULT_ROWS,
    )
    runtime = Runtime(settings).start()
    http = httpx.Client(base_url=str(runtime.api_server.url), timeout=60)
    try:
        publish_records(kafka_bootstrap, settings.topic("prices"), load_price_book(SEED).to_records())
        yield Stack(runtime, runtime.settings, receiver, http)
    finally:
        http.close()
        for worker in runtime.workers:
            worker.kill()
        runtime.stop()
        receiver.close()
        ch.command(f"DROP DATABASE IF EXISTS `{database}` SYNC")
        ch.close()
