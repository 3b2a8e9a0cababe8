"""Low (issue #20): a lone surrogate in an event_id is a clear rejection, never a 500 after the
valid events of the same request were published — on the real `up` stack."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest

from tests.security.conftest import Stack

pytestmark = pytest.mark.broker


def test_lone_surrogates_are_rejected_and_the_answer_encodes(stack: Stack) -> None:
    tag = uuid.uuid4().hex[:8]
    now = datetime.now(UTC).isoformat()

    def ev(event_id: str, **over: str) -> str:
        doc = {
            "event_id": event_id,
            "occurred_at": now,
            "customer_id": f"enc-{tag}",
            "provider": "openai",
            "model": "gpt-4o",
            "input_tokens": 10,
            "output_tokens": 5,
            **over,
        }
        return json.dumps(doc)

    # json.dumps keeps "\ud800" as an escape: the server's JSON parser turns it into a lone surrogate.
    body = (
        '{"events": ['
        + ",".join([ev(f"ok-{tag}"), ev(f"bad-{tag}-\ud800"), ev(f"bad2-{tag}", project="p\udfff"), ev(f"ok2-{tag}")])
        + "]}"
    )
    r = stack.http.post(
        "/v1/events", headers={**stack.admin, "Content-Type": "application/json"}, content=body.encode("ascii")
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["status"] for x in results] == ["accepted", "rejected", "rejected", "accepted"], results
    assert results[1]["reason_code"] == "invalid_encoding" and results[1]["field"] == "event_id"
    assert results[2]["reason_code"] == "invalid_encoding" and results[2]["field"] == "project"
    assert results[1]["event_id"].startswith(f"bad-{tag}-")  # shown escaped, not dropped

    # The SDK refuses the same input with the same reason instead of failing inside Avro encoding.
    from meterline.core.errors import InvalidEvent
    from meterline.stack.producer import UsageProducer

    with UsageProducer(stack.settings.kafka_bootstrap or "", stack.settings.topic("usage-events")) as producer:
        with pytest.raises(InvalidEvent) as info:
            producer.send(json.loads(ev(f"sdk-{tag}-\ud800")) | {"occurred_at": datetime.now(UTC)})
        assert info.value.reason_code == "invalid_encoding"
