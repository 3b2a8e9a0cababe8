"""Alert webhooks: real alerts topic (Tansu), real HTTP receiver on 127.0.0.1, real signatures."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from meterline.stack.broker import free_port
from pipeline.alerts import DeliveredStore, WebhookDispatcher, sign, verify_signature
from tests.credits_api.conftest import producer, publish_json

SECRET = "whsec_" + "s3cr3t-signing-key-do-not-log"


class Receiver:
    """A webhook receiver: records every POST (headers, raw body)."""

    def __init__(self, port: int = 0) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        received = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/meterline"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def ids(self) -> list[str]:
        return [h["meterline-alert-id"] for h, _ in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _alert(alert_id: str, **over: Any) -> dict[str, Any]:
    a = {
        "alert_id": alert_id,
        "customer_id": "cust-a",
        "kind": "credit_used",
        "message": "80% of credit used",
        "at_ms": int(time.time() * 1000),
        "threshold": 80,
    }
    a.update(over)
    return a


def _until(pred: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.fixture
def dispatcher_factory(
    kafka_bootstrap: str, topics: dict[str, str], tmp_path: Path
) -> Iterator[Callable[..., WebhookDispatcher]]:
    started: list[WebhookDispatcher] = []

    def make(urls: list[str], *, group: str | None = None, **kw: Any) -> WebhookDispatcher:
        d = WebhookDispatcher(
            kafka_bootstrap,
            topics["alerts"],
            group or f"hooks-{uuid.uuid4().hex[:8]}",
            urls=urls,
            secret=SECRET,
            store_path=tmp_path / "webhooks.sqlite3",
            backoff_base_s=0.05,
            backoff_cap_s=0.2,
            **kw,
        )
        started.append(d.start())
        return d

    yield make
    for d in started:
        d.stop()


def test_delivered_signed_and_verifiable(
    dispatcher_factory: Callable[..., WebhookDispatcher],
    topics: dict[str, str],
    kafka_bootstrap: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    rx = Receiver()
    try:
        dispatcher_factory([rx.url])
        alert = _alert("al-1")
        publish_json(producer(kafka_bootstrap), topics["alerts"], "cust-a", alert)
        _until(lambda: len(rx.requests) == 1)
        headers, body = rx.requests[0]
        assert headers["meterline-alert-id"] == "al-1" and headers["content-type"] == "application/json"
        assert json.loads(body) == alert
        assert verify_signature(SECRET, headers["meterline-signature"], body)
        assert not verify_signature("another-secret", headers["meterline-signature"], body)
    finally:
        rx.close()
    assert SECRET not in "\n".join(r.getMessage() for r in caplog.records)


def test_receiver_down_retried_then_delivered_once(
    dispatcher_factory: Callable[..., WebhookDispatcher],
    topics: dict[str, str],
    kafka_bootstrap: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="pipeline.alerts")
    port = free_port()
    d = dispatcher_factory([f"http://127.0.0.1:{port}/hooks/meterline"])
    p = producer(kafka_bootstrap)
    publish_json(p, topics["alerts"], "cust-a", _alert("al-down"))
    publish_json(p, topics["alerts"], "cust-a", _alert("al-after"))
    _until(lambda: sum("al-down" in r.getMessage() and "retrying" in r.getMessage() for r in caplog.records) >= 3)
    assert d.delivered == 0
    rx = Receiver(port)  # the receiver comes back
    try:
        _until(lambda: d.delivered == 2)
        time.sleep(0.3)
        assert rx.ids() == ["al-down", "al-after"]  # in order, each once
        assert all(verify_signature(SECRET, h["meterline-signature"], b) for h, b in rx.requests)
    finally:
        rx.close()
    assert SECRET not in "\n".join(r.getMessage() for r in caplog.records)


def test_replayed_alert_delivered_once(
    dispatcher_factory: Callable[..., WebhookDispatcher], topics: dict[str, str], kafka_bootstrap: str
) -> None:
    rx = Receiver()
    try:
        p = producer(kafka_bootstrap)
        alert = _alert("al-replay")
        publish_json(p, topics["alerts"], "cust-a", alert)
        publish_json(p, topics["alerts"], "cust-a", alert)  # the agent replayed it after a crash
        publish_json(p, topics["alerts"], "cust-a", _alert("al-next"))
        first = dispatcher_factory([rx.url])
        _until(lambda: "al-next" in rx.ids())
        first.stop()
        # a new consumer group reads the whole topic again; the delivered-store remembers
        second = dispatcher_factory([rx.url])
        publish_json(p, topics["alerts"], "cust-a", _alert("al-sentinel"))
        _until(lambda: "al-sentinel" in rx.ids())
        time.sleep(0.2)
        assert rx.ids() == ["al-replay", "al-next", "al-sentinel"]
        assert second.delivered == 1
    finally:
        rx.close()


def test_too_old_alert_is_dead_and_skipped(
    dispatcher_factory: Callable[..., WebhookDispatcher], topics: dict[str, str], kafka_bootstrap: str, tmp_path: Path
) -> None:
    down = f"http://127.0.0.1:{free_port()}/down"
    d = dispatcher_factory([down], max_age_s=60)
    p = producer(kafka_bootstrap)
    publish_json(p, topics["alerts"], "cust-a", _alert("al-old", at_ms=int(time.time() * 1000) - 120_000))
    _until(lambda: d.dead == 1)
    assert DeliveredStore(tmp_path / "webhooks.sqlite3").outcome("al-old", down) == "dead"


def test_verify_signature_rejects_tampering_and_old_timestamps() -> None:
    body = json.dumps(_alert("al-x")).encode()
    now = 1_800_000_000
    header = sign(SECRET, body, t=now)
    assert verify_signature(SECRET, header, body, now=now)
    assert verify_signature(SECRET, header, body, now=now + 300)
    assert not verify_signature(SECRET, header, body.replace(b"80", b"81"), now=now)  # tampered body
    assert not verify_signature(SECRET, header, body, now=now + 301)  # too old
    assert not verify_signature(SECRET, header, body, now=now - 301)  # from the future
    assert not verify_signature(SECRET, header.replace(f"t={now}", f"t={now + 1}"), body, now=now)  # t swapped
    assert not verify_signature(SECRET, sign("wrong", body, t=now), body, now=now)
    for bad in ("", "garbage", f"t={now}", "v1=abc", f"t=x,v1={'0' * 64}", None):
        assert not verify_signature(SECRET, bad, body, now=now)
    rotated = f"{header},v1={'0' * 64}"  # several v1 values (secret rotation): any match counts
    assert verify_signature(SECRET, rotated, body, now=now)


def test_dispatcher_prunes_outcomes_older_than_it_keeps(tmp_path: Path) -> None:
    """The deliveries file does not grow forever: outcomes past ``keep_outcomes_s`` are forgotten
    when the dispatcher runs, newer ones are kept (the alert could still be re-read)."""
    import sqlite3

    store_path = tmp_path / "deliveries.sqlite"
    seed = DeliveredStore(store_path)
    seed.record("old-alert", "http://127.0.0.1:9/hook", "delivered", 1)
    seed.record("new-alert", "http://127.0.0.1:9/hook", "delivered", 1)
    seed.close()
    db = sqlite3.connect(str(store_path))
    db.execute("UPDATE deliveries SET at_s = ? WHERE alert_id = 'old-alert'", (int(time.time()) - 40 * 86_400,))
    db.commit()
    db.close()

    dispatcher = WebhookDispatcher(
        "127.0.0.1:9", "no-topic", "g", urls=["http://127.0.0.1:9/hook"], secret="s", store_path=store_path
    )
    dispatcher._maybe_prune()
    assert dispatcher.store.outcome("old-alert", "http://127.0.0.1:9/hook") is None
    assert dispatcher.store.outcome("new-alert", "http://127.0.0.1:9/hook") == "delivered"
    dispatcher.stop()
