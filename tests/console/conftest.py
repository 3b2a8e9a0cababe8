"""A real `meterline up` (Tansu broker, chDB, faust worker, sinks, API) for the console, metrics and
dashboard tests, plus a produced workload whose counts are known, and a headless Debian chromium.

The stack is started once for the package (tests that change it record what they did in
:class:`Workload`) through the installed `meterline` console script, exactly as
an operator runs it; ClickHouse figures are read through its admin `POST /v1/sql` (the embedded
engine belongs to `up`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
METERLINE = str(Path(sys.executable).parent / "meterline")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class Workload:
    """What was sent, so the tests know every count."""

    priced: int = 0  # distinct priceable events (usage_priced rows)
    unpriced: int = 0  # events of a model with no price (dead-lettered: unknown_model)
    duplicates: int = 0  # events re-sent in a later request (dropped by the pricing agent)
    accepted: int = 0  # events the API reported accepted (all of the above)
    redriven: int = 0  # dead letters re-sent by the console's re-drive (each priced or dead-lettered again)
    customers: set[str] = field(default_factory=set)


@dataclass
class Stack:
    url: str
    data_dir: Path
    admin: str
    keys: dict[str, str]
    env: dict[str, str]
    workload: Workload
    period: str

    def call(self, method: str, path: str, key: str | None, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.request(method, self.url + path, headers=headers, timeout=60, **kw)

    def sql(self, query: str, **params: Any) -> list[list[Any]]:
        r = self.call("POST", "/v1/sql", self.admin, json={"query": query, "parameters": params})
        assert r.status_code == 200, r.text
        return r.json()["rows"]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([METERLINE, *args], env=self.env, capture_output=True, text=True, timeout=120, cwd=REPO)
        assert proc.returncode == 0, f"meterline {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
        return proc


def _wait(pred: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def _events(now: datetime) -> tuple[list[dict[str, Any]], Workload]:
    """acme: 3 days x 2 projects x 3 models; globex: 2 events; plus 2 events of an unpriced model."""
    w = Workload()
    events: list[dict[str, Any]] = []
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    days = [d for d in (today - timedelta(days=2), today - timedelta(days=1), today) if d.month == now.month] or [today]
    models = [("openai", "gpt-4o"), ("mistral", "mistral-large-2"), ("meta", "llama-3-70b")]
    n = 0
    for d_i, day in enumerate(days):
        for p_i, project in enumerate(("search", "chat")):
            for m_i, (provider, model) in enumerate(models):
                n += 1
                at = min(day + timedelta(hours=1 + m_i, minutes=p_i), now - timedelta(minutes=1))
                events.append(
                    {
                        "event_id": f"con-{n}",
                        "occurred_at": at.isoformat(),
                        "customer_id": "acme",
                        "provider": provider,
                        "model": model,
                        "project": project,
                        "input_tokens": 10_000 * (1 + d_i) + 1_234 * m_i,
                        "output_tokens": 3_333 * (1 + p_i),
                    }
                )
    for i in range(2):
        events.append(
            {
                "event_id": f"glx-{i}",
                "occurred_at": (now - timedelta(minutes=5)).isoformat(),
                "customer_id": "globex",
                "provider": "openai",
                "model": "gpt-4o",
                "project": "bot",
                "input_tokens": 50_000 + i,
                "output_tokens": 7_000,
            }
        )
    w.priced = len(events)
    for i in range(2):
        events.append(
            {
                "event_id": f"nop-{i}",
                "occurred_at": (now - timedelta(minutes=3)).isoformat(),
                "customer_id": "acme",
                "provider": "meta",
                "model": "console-unpriced-model",
                "input_tokens": 1000,
                "output_tokens": 10,
            }
        )
    w.unpriced = 2
    w.customers = {"acme", "globex"}
    return events, w


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("console")
    data = tmp / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env.update({"METERLINE_DATA_DIR": str(data), "METERLINE_API_PORT": "0", "METERLINE_TOPIC_PREFIX": "console."})
    log = (tmp / "up.log").open("w")
    up = subprocess.Popen([METERLINE, "up"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        runtime = data / "runtime.json"
        _wait(lambda: runtime.exists() or up.poll() is not None, 120, "meterline up")
        assert up.poll() is None, (tmp / "up.log").read_text()
        info = json.loads(runtime.read_text())
        admin = (data / "admin.key").read_text().strip()
        stack = Stack(info["api_url"], data, admin, {}, env, Workload(), datetime.now(UTC).strftime("%Y-%m"))
        for customer in ("acme", "globex"):
            stack.keys[customer] = json.loads(stack.run("keys", "create", customer).stdout)["secret"]
        stack.run("prices", "load", "infra/prices/seed.yaml")
        # effective before the oldest event, so the back-dated usage debits it
        effective_ms = int((datetime.now(UTC) - timedelta(days=4)).timestamp() * 1000)
        r = stack.call(
            "POST",
            "/v1/credits/grants",
            admin,
            json={
                "customer_id": "acme",
                "grant_id": "console-g1",
                "amount": "1.00",
                "currency": "usd",
                "effective_at_ms": effective_ms,
            },
        )
        assert r.status_code == 202, r.text
        # The grant first, so the usage debits it and crosses the credit alerts (50/80/100 % used).
        _wait(lambda: stack.call("GET", "/v1/customers/acme/balance", admin).status_code == 200, 60, "the grant")
        now = datetime.now(UTC)
        events, w = _events(now)
        for customer in ("acme", "globex"):
            mine = [e for e in events if e["customer_id"] == customer]
            r = stack.call("POST", "/v1/events", stack.keys[customer], json={"events": mine})
            assert r.status_code == 200 and r.json()["accepted"] == len(mine), r.text
            w.accepted += len(mine)
        # The same acme events again, in a later request: a different record, so the pricing agent
        # drops every one of them as a duplicate.
        again = [e for e in events if e["customer_id"] == "acme" and e["model"] == "gpt-4o"]
        r = stack.call("POST", "/v1/events", stack.keys["acme"], json={"events": again})
        assert r.status_code == 200 and r.json()["accepted"] == len(again), r.text
        w.duplicates = len(again)
        w.accepted += len(again)
        stack.workload = w

        def counts():
            return (
                stack.sql("SELECT count() FROM usage_priced")[0][0],
                stack.sql("SELECT count() FROM usage_rejected")[0][0],
            )

        try:
            _wait(lambda: counts() == (w.priced, w.unpriced), 240, "the workload in ClickHouse")
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}: (priced, rejected) = {counts()}, expected {(w.priced, w.unpriced)}; "
                f"worker log: {(data / 'logs' / 'worker-0.log').read_text()[-3000:]}"
            ) from None
        # ... and the credit agent has debited all of acme's usage from its $1.00 grant.
        spent = Decimal(stack.sql("SELECT sum(charge) FROM usage_priced WHERE customer_id = 'acme'")[0][0])
        assert spent > Decimal("1.00"), "the workload must use the whole grant (credit alerts)"
        _wait(
            lambda: Decimal(stack.call("GET", "/v1/customers/acme/balance", admin).json()["available"]) == 0,
            120,
            "the credit agent's debits",
        )
        yield stack
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait(10)
        log.close()


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def cents(exact: str | Decimal) -> str:
    from meterline.core.allocation import round_total

    return f"{round_total(Decimal(exact)):,}"
