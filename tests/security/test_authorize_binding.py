"""Critical (issue #20): an authorize reply belongs to (customer_id, request_id), never to the
client-chosen request_id alone. Two customer keys on the real stack (API + credit agent)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.security.conftest import Stack

pytestmark = pytest.mark.broker

TINY = {"provider": "openai", "model": "gpt-4o", "input_tokens_estimate": 10, "max_output_tokens": 10}
HUGE = {"provider": "openai", "model": "gpt-4o", "input_tokens_estimate": 10**9, "max_output_tokens": 10**9}


def _authorize(
    stack: Stack, key: dict[str, str], customer: str, request_id: str, size: dict[str, Any]
) -> dict[str, Any]:
    r = stack.http.post("/v1/authorize", headers=key, json={"customer_id": customer, "request_id": request_id, **size})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_reused_request_id_never_returns_or_dedupes_another_customers_decision(stack: Stack) -> None:
    a, b = f"sec-a-{uuid.uuid4().hex[:6]}", f"sec-b-{uuid.uuid4().hex[:6]}"
    key_a, key_b = stack.customer_key(a), stack.customer_key(b)
    stack.grant(a, "100.00")
    stack.grant(b, "1.00")

    # A's tiny request is allowed; B then asks for 2e9 tokens with the SAME request id.
    first = _authorize(stack, key_a, a, "r-7", TINY)
    assert (first["customer_id"], first["decision"]) == (a, "allow")
    stolen = _authorize(stack, key_b, b, "r-7", HUGE)
    # B gets its own answer from the credit agent: not A's allow, and not a "duplicate_request"
    # (the agent's command dedupe key authorize:<request_id> is per customer).
    assert stolen["customer_id"] == b and stolen["request_id"] == "r-7"
    assert (stolen["decision"], stolen["reason"]) == ("deny", "insufficient_credit"), stolen

    # The reverse: B's deny must not become A's answer for a request id B used first.
    denied = _authorize(stack, key_b, b, "r-8", HUGE)
    assert (denied["customer_id"], denied["decision"]) == (b, "deny")
    mine = _authorize(stack, key_a, a, "r-8", TINY)
    assert (mine["customer_id"], mine["decision"]) == (a, "allow"), mine

    # A retry by the same customer still finds that customer's own answer.
    again = _authorize(stack, key_a, a, "r-7", TINY)
    assert again["customer_id"] == a and again["request_id"] == "r-7"
    assert again["hold_id"] in (first["hold_id"], None)

    # A customer key still cannot authorize for another customer.
    r = stack.http.post("/v1/authorize", headers=key_b, json={"customer_id": a, "request_id": "r-9", **TINY})
    assert r.status_code == 403
