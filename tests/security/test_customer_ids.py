"""Low (issue #20): customer ids have ONE allowed form (schemas.models.CUSTOMER_ID_PATTERN), checked
at every entrance: HTTP ingest, the producer SDK, the pricing agent (dead letter with a reason),
credit commands (API and the credit agent), API keys, the Stripe webhook (test_webhook.py)."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime

import pytest

from meterline.core.errors import InputError, InvalidEvent
from meterline.shell.api.keys import KeyStore
from meterline.stack.producer import UsageProducer
from pipeline.publish import publish_records
from schemas.codec import encode_usage_batch
from schemas.models import is_customer_id
from tests.security.conftest import Stack, wait_for

pytestmark = pytest.mark.broker

BAD_IDS = [
    "acme\x00",
    "acme\r\nX-Injected: 1",
    "\u202eemca",
    "ac\u200bme",
    " acme",
    "acme ",
    "../acme",
    "a/b",
    "évènement",
    "",
    "-acme",
    "x" * 129,
]


def _event(event_id: str, customer_id: str) -> dict[str, object]:
    return {
        "event_id": event_id,
        "occurred_at": datetime.now(UTC).isoformat(),
        "customer_id": customer_id,
        "provider": "openai",
        "model": "gpt-4o",
        "input_tokens": 10,
        "output_tokens": 5,
    }


def test_the_contract_form() -> None:
    for good in ("acme", "cust-1", "cus_42", "A.b:c@d+e=f-g_h", "x" * 128):
        assert is_customer_id(good), good
    for bad in BAD_IDS:
        assert not is_customer_id(bad), bad


def test_http_ingest_and_the_sdk_refuse_bad_customer_ids(stack: Stack) -> None:
    tag = uuid.uuid4().hex[:6]
    events = [_event(f"bad-{tag}-{i}", c) for i, c in enumerate(BAD_IDS)] + [_event(f"good-{tag}", f"ok-{tag}")]
    r = stack.http.post("/v1/events", headers=stack.admin, json={"events": events})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert results[-1]["status"] == "accepted"
    for res, bad in zip(results[: len(BAD_IDS)], BAD_IDS, strict=True):
        assert res["status"] == "rejected", (bad, res)
        assert res["reason_code"] in ("invalid_customer_id", "missing_customer_id", "id_too_long"), (bad, res)
    assert {res["reason_code"] for res in results[:6]} == {"invalid_customer_id"}

    with UsageProducer(stack.settings.kafka_bootstrap or "", stack.settings.topic("usage-events")) as producer:
        for bad in ("acme\r\nX", "\u202eacme", "../acme"):
            with pytest.raises(InvalidEvent) as info:
                producer.send(_event(f"sdk-{tag}", bad))
            assert info.value.reason_code == "invalid_customer_id"


def test_the_pricing_agent_dead_letters_a_bad_customer_id_with_its_reason(stack: Stack) -> None:
    """A producer that skips the SDK: the record reaches the pricing agent, which dead-letters it."""
    event_id = f"raw-{uuid.uuid4().hex[:8]}"
    record = {**_event(event_id, "acme\r\nX-Injected: 1"), "occurred_at": time.time_ns() // 1_000_000 - 1000}
    publish_records(
        stack.settings.kafka_bootstrap or "",
        stack.settings.topic("usage-events"),
        [(b"acme", encode_usage_batch([record]))],
    )
    rows = wait_for(
        "the dead letter in usage_rejected",
        lambda: stack.http.post(
            "/v1/sql",
            headers=stack.admin,
            json={
                "query": "SELECT reason_code, field FROM usage_rejected WHERE event_id = {e:String}",
                "parameters": {"e": event_id},
            },
        ).json()["rows"],
    )
    assert rows == [["invalid_customer_id", "customer_id"]]
    priced = stack.http.post(
        "/v1/sql",
        headers=stack.admin,
        json={"query": "SELECT count() FROM usage_priced WHERE event_id = {e:String}", "parameters": {"e": event_id}},
    )
    assert priced.json()["rows"] == [[0]]


def test_credit_commands_and_keys_refuse_bad_customer_ids(stack: Stack) -> None:
    for bad in ("acme\r\nX-Injected: 1", "\u202eacme", " acme"):
        r = stack.http.post("/v1/credits/grants", headers=stack.admin, json={"customer_id": bad, "amount": "5.00"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_customer_id", r.text
        r = stack.http.post(
            "/v1/authorize",
            headers=stack.admin,
            json={
                "customer_id": bad,
                "provider": "openai",
                "model": "gpt-4o",
                "input_tokens_estimate": 1,
                "max_output_tokens": 1,
            },
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_customer_id", r.text
        with pytest.raises(InputError) as info:
            KeyStore(stack.settings.data_dir / "api_keys.json").create(bad)
        assert info.value.reason_code == "invalid_customer_id"

    # A raw command on ledger-commands (skipping the API) is dead-lettered by the credit agent.
    command_id = f"grant:{uuid.uuid4().hex[:8]}"
    bad = "evil\r\nX-Injected: 1"
    publish_records(
        stack.settings.kafka_bootstrap or "",
        stack.settings.topic("ledger-commands"),
        [
            (
                bad,
                json.dumps(
                    {
                        "type": "grant",
                        "command_id": command_id,
                        "customer_id": bad,
                        "at_ms": time.time_ns() // 1_000_000,
                        "grant_id": command_id,
                        "amount": "1000000.00",
                        "currency": "usd",
                        "effective_at_ms": 0,
                        "expires_at_ms": None,
                        "priority": 10,
                        "category": "paid",
                        "scope": None,
                    }
                ).encode(),
            )
        ],
    )
    rows = wait_for(
        "the refused command in usage_rejected",
        lambda: stack.http.post(
            "/v1/sql",
            headers=stack.admin,
            json={
                "query": "SELECT reason_code, field FROM usage_rejected WHERE customer_id = {c:String} "
                "AND source_topic = {t:String}",
                "parameters": {"c": bad, "t": stack.settings.topic("ledger-commands")},
            },
        ).json()["rows"],
    )
    assert rows == [["invalid_ledger_command", "customer_id"]]
