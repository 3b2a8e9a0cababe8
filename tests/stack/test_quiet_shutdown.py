"""Clients closed before the broker stops stay quiet: a flushed but still-alive librdkafka client
reconnects to a stopped broker and prints ``Connect ... failed: Connection refused`` on stderr
(seen at the end of ``meterline up --demo``), so ``close()`` must destroy the client, not only flush."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from meterline.core.config import Settings
from meterline.stack.broker import TansuBroker
from meterline.stack.producer import UsageProducer
from meterline.stack.topics import ensure_topics
from pipeline.credits.client import CommandPublisher, grant_command
from schemas.models import UsageEvent

pytestmark = pytest.mark.broker


def _event(event_id: str) -> UsageEvent:
    now = datetime.now(UTC)
    return UsageEvent(
        event_id=event_id,
        occurred_at=now,
        customer_id="acme",
        provider="openai",
        model="gpt-4o",
        input_tokens=10,
        output_tokens=5,
    )


def test_closed_producers_do_not_reconnect_after_the_broker_stops(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # Its own broker: this test stops it (the session's broker serves every other test).
    broker = TansuBroker(log_dir=tmp_path).start()
    try:
        ensure_topics(broker.bootstrap, "quiet.", 2)
        publisher = CommandPublisher(broker.bootstrap, "quiet.ledger-commands")
        publisher.send(grant_command({"customer_id": "acme", "grant_id": "g1", "amount": "1.00", "currency": "usd"}))
        producer = UsageProducer(broker.bootstrap, "quiet.usage-events")
        producer.send(_event("e1"))
        producer.close()
        publisher.close()
        publisher.close()  # idempotent
        with pytest.raises(RuntimeError):
            producer.send(_event("e2"))
    finally:
        broker.stop()
    # librdkafka retries a lost connection within about a second (reconnect.backoff.ms): watch a
    # few of its retry rounds. The window is for observation only; nothing here asserts time.
    time.sleep(4)
    err = capfd.readouterr().err
    assert "Connection refused" not in err, err
    assert "|FAIL|" not in err, err


def test_up_closes_every_kafka_client_before_its_broker_stops(
    settings_factory: Callable[..., Settings], capfd: pytest.CaptureFixture[str]
) -> None:
    # `meterline up` with its own embedded broker and every API route that publishes (usage
    # ingest, credits, the Stripe webhook): after stop, nothing of this process talks to the broker.
    from meterline.shell.runtime import Runtime

    settings = settings_factory(kafka_bootstrap=None, api_port=0, stripe_webhook_secret="whsec_quiet_shutdown")
    runtime = Runtime(settings).start()
    assert runtime.broker is not None and runtime.api_server is not None
    for worker in runtime.workers:  # not under test here: killing it first is quicker
        worker.kill()
    runtime.stop()
    time.sleep(4)  # a few of librdkafka's reconnect rounds (observation window only)
    err = capfd.readouterr().err
    assert "Connection refused" not in err, err
    assert "|FAIL|" not in err, err
