"""The credit routes over real Kafka (Tansu) and real HTTP, with a stand-in for the credit agent."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from pipeline.credits.client import StatusView
from tests.credits_api.conftest import CreditsApi, Keys, producer, publish_json


def _auth_body(customer: str = "cust-a", **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "customer_id": customer,
        "provider": "openai",
        "model": "gpt-4o",
        "input_tokens_estimate": 1000,
        "max_output_tokens": 1000,
    }
    body.update(over)
    return body


def test_authorize_allow_then_deny(credits_api: CreditsApi, keys: Keys) -> None:
    r = credits_api.call("POST", "/v1/authorize", keys.cust_a, json=_auth_body(request_id="r-allow"))
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["decision"] == "allow" and doc["request_id"] == "r-allow" and doc["hold_id"] == "r-allow"
    assert doc["estimate"] == "0.002" and doc["available"] == "0.998" and isinstance(doc["expires_at_ms"], int)
    key, _, cmd = credits_api.agent.wait_for(lambda c: c.get("request_id") == "r-allow")
    assert key == b"cust-a" and cmd["command_id"] == "authorize:r-allow" and cmd["type"] == "authorize"
    assert cmd["model_version"] is None and cmd["project"] is None

    r = credits_api.call("POST", "/v1/authorize", keys.cust_a, json=_auth_body(max_output_tokens=2_000_000))
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["decision"] == "deny" and doc["reason"] == "credit_exhausted" and doc["hold_id"] is None
    assert doc["request_id"].startswith("req_")  # generated


def test_authorize_timeout_is_503_never_allow(credits_api: CreditsApi, keys: Keys) -> None:
    r = credits_api.call("POST", "/v1/authorize", keys.admin, json=_auth_body("cust-silent", request_id="r-slow"))
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["code"] == "authorize_timeout" and "NOT authorized" in err["message"]
    assert r.headers["retry-after"] == "1"


def test_retry_with_same_request_id_gets_earlier_reply(credits_api: CreditsApi, keys: Keys) -> None:
    first = credits_api.call("POST", "/v1/authorize", keys.cust_a, json=_auth_body(request_id="r-same"))
    again = credits_api.call("POST", "/v1/authorize", keys.cust_a, json=_auth_body(request_id="r-same"))
    assert first.status_code == again.status_code == 200
    assert first.json()["decision"] == "allow" and again.json()["request_id"] == "r-same"


def test_keys_act_only_for_their_customer(credits_api: CreditsApi, keys: Keys) -> None:
    credits_api.agent.publish_status("cust-b")
    assert credits_api.status.wait_ready(15)
    r = credits_api.call("POST", "/v1/authorize", keys.cust_a, json=_auth_body("cust-b"))
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    for what in ("balance", "status"):
        r = credits_api.call("GET", f"/v1/customers/cust-b/{what}", keys.cust_a)
        assert r.status_code == 403
    r = credits_api.call("POST", "/v1/credits/grants", keys.cust_a, json={"customer_id": "cust-a", "amount": "5"})
    assert r.status_code == 403  # customer keys never grant, not even to themselves
    r = credits_api.call("PUT", "/v1/customers/cust-a/policy", keys.cust_a, json={"overage": "allow"})
    assert r.status_code == 403
    assert credits_api.call("POST", "/v1/authorize", None, json=_auth_body()).status_code == 401
    time.sleep(0.3)
    assert not any(c["customer_id"] == "cust-b" and c["type"] == "authorize" for c in credits_api.agent.commands())


def test_admin_grant_publishes_the_exact_command(credits_api: CreditsApi, keys: Keys) -> None:
    body = {
        "customer_id": "cust-a",
        "grant_id": "g-42",
        "amount": "10.5",
        "priority": 10,
        "category": "promotional",
        "expires_at": "2027-01-01T00:00:00Z",
        "scope": {"providers": ["openai"]},
    }
    r = credits_api.call("POST", "/v1/credits/grants", keys.admin, json=body)
    assert r.status_code == 202, r.text
    assert r.json() == {"command_id": "grant:g-42", "type": "grant", "customer_id": "cust-a"}
    key, _, cmd = credits_api.agent.wait_for(lambda c: c["command_id"] == "grant:g-42")
    assert key == b"cust-a"
    assert cmd == {
        "type": "grant",
        "command_id": "grant:g-42",
        "customer_id": "cust-a",
        "at_ms": cmd["at_ms"],
        "grant_id": "g-42",
        "amount": "10.50",
        "currency": "usd",
        "effective_at_ms": cmd["at_ms"],
        "expires_at_ms": 1798761600000,
        "priority": 10,
        "category": "promotional",
        "scope": {"providers": ["openai"], "models": None, "projects": None},
    }
    r = credits_api.call(
        "POST",
        "/v1/credits/grants",
        keys.admin,
        json={"type": "top_up", "customer_id": "cust-a", "grant_id": "pay-1", "amount": "20"},
    )
    assert r.status_code == 202 and r.json()["command_id"] == "top_up:pay-1"
    _, _, cmd = credits_api.agent.wait_for(lambda c: c["command_id"] == "top_up:pay-1")
    assert cmd["type"] == "top_up" and cmd["amount"] == "20.00" and cmd["category"] == "paid"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"customer_id": "cust-a", "amount": 10.5}, "amount"),  # float: never
        ({"customer_id": "cust-a", "amount": "1.0000000000001"}, "amount"),  # finer than picos
        ({"customer_id": "cust-a", "amount": "-1"}, "amount"),
        ({"customer_id": "cust-a", "amount": "1", "priority": 101}, "priority"),
        ({"customer_id": "cust-a", "amount": "1", "expires_at": "2027-01-01"}, "expires_at_ms"),  # no timezone
        ({"amount": "1"}, "customer_id"),
    ],
)
def test_admin_grant_bad_input_is_400_with_field(
    credits_api: CreditsApi, keys: Keys, body: dict[str, Any], field: str
) -> None:
    r = credits_api.call("POST", "/v1/credits/grants", keys.admin, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == field


def test_other_admin_commands(credits_api: CreditsApi, keys: Keys) -> None:
    calls = [
        ("POST", "/v1/credits/void", {"customer_id": "cust-a", "grant_id": "g-1", "reason": "refund"}),
        (
            "POST",
            "/v1/credits/adjust",
            {"customer_id": "cust-a", "adjustment_id": "a-1", "amount": "-2.5", "reason": "correction"},
        ),
        ("PUT", "/v1/customers/cust-a/policy", {"overage": "credit_limit", "credit_limit": "25"}),
        (
            "PUT",
            "/v1/customers/cust-a/budgets",
            {
                "budget": {
                    "budget_id": "b-1",
                    "scope": "project",
                    "scope_value": "p1",
                    "period": "month",
                    "limit": "100",
                    "hard": True,
                }
            },
        ),
        ("POST", "/v1/customers/cust-a/block", {}),
        ("POST", "/v1/customers/cust-a/unblock", {"scope": "api_key:k1", "reason": "runaway_guard"}),
    ]
    ids = []
    for method, path, body in calls:
        r = credits_api.call(method, path, keys.admin, json=body)
        assert r.status_code == 202, (path, r.text)
        ids.append(r.json()["command_id"])
    got = {
        c["command_id"]: c for c in (credits_api.agent.wait_for(lambda c, i=i: c["command_id"] == i)[2] for i in ids)
    }
    void, adjust, pol, bud, block, unblock = (got[i] for i in ids)
    assert void["type"] == "void" and void["command_id"] == "void:g-1" and void["reason"] == "refund"
    assert adjust["type"] == "adjust" and adjust["amount"] == "-2.50" and adjust["grant_id"] is None
    assert pol["type"] == "set_policy" and pol["overage"] == "credit_limit" and pol["credit_limit"] == "25.00"
    assert bud["type"] == "set_budget" and bud["remove"] is False
    assert bud["budget"] == {
        "budget_id": "b-1",
        "scope": "project",
        "scope_value": "p1",
        "period": "month",
        "limit": "100.00",
        "hard": True,
        "alert_pcts": [80, 100],
    }
    assert block == {**block, "type": "set_block", "scope": "customer", "blocked": True, "reason": "manual"}
    assert unblock["blocked"] is False and unblock["scope"] == "api_key:k1" and unblock["reason"] == "runaway_guard"

    bad = [
        ("PUT", "/v1/customers/cust-a/policy", {"overage": "credit_limit"}, "credit_limit"),
        ("PUT", "/v1/customers/cust-a/policy", {"overage": "sometimes"}, "overage"),
        (
            "PUT",
            "/v1/customers/cust-a/budgets",
            {"budget": {"budget_id": "b", "scope": "customer", "scope_value": "x", "period": "month", "limit": "1"}},
            "budget",
        ),
        ("POST", "/v1/credits/adjust", {"customer_id": "cust-a", "amount": "0", "reason": "x"}, "amount"),
        ("POST", "/v1/customers/cust-a/block", {"scope": "everything"}, "scope"),
    ]
    for method, path, body, field in bad:
        r = credits_api.call(method, path, keys.admin, json=body)
        assert r.status_code == 400 and r.json()["error"]["field"] == field, (path, r.text)


def test_status_view_catches_up_and_serves_balance(credits_api: CreditsApi, keys: Keys, kafka_bootstrap: str) -> None:
    topic = credits_api.topics["customer-status"]
    p = producer(kafka_bootstrap)
    last: dict[str, dict[str, Any]] = {}
    for round_ in range(5):  # several values per customer, each flush a separate batch
        for i in range(20):
            cust = f"c{i}"
            value = {
                "customer_id": cust,
                "status": "blocked" if i % 3 == 0 else "active",
                "reason": None,
                "since_ms": None,
                "balance": {"available": f"{round_}.{i:02d}", "grants": []},
                "updated_at_ms": round_,
            }
            p.produce(topic, key=cust.encode(), value=__import__("json").dumps(value).encode())
            last[cust] = value
        p.flush(10)
    publish_json(p, topic, "c19", None)  # tombstone: deleted
    last.pop("c19")
    view = StatusView(kafka_bootstrap, topic, quiet_s=0.3).start()
    try:
        assert view.wait_ready(20)
        for cust, value in last.items():
            assert view.get(cust) == value
        assert view.get("c19") is None
    finally:
        view.close()

    # the API's own view sees the same, through the HTTP routes
    credits_api.agent.publish_status("cust-a")
    deadline = time.monotonic() + 10
    while credits_api.status.get("c5") is None or credits_api.status.get("cust-a") is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = credits_api.call("GET", "/v1/customers/c5/balance", keys.admin)
    assert r.status_code == 200 and r.json()["available"] == "4.05" and r.json()["status"] == "active"
    r = credits_api.call("GET", "/v1/customers/c3/status", keys.admin)
    assert r.json()["allowed"] is False and r.json()["status"] == "blocked"
    r = credits_api.call("GET", "/v1/customers/cust-a/status", keys.cust_a)
    assert r.status_code == 200 and r.json()["allowed"] is True and r.json()["available"] == "1.00"
    r = credits_api.call("GET", "/v1/customers/nobody/balance", keys.admin)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_customer"


def test_fifty_concurrent_authorizations_all_answered(credits_api: CreditsApi, keys: Keys) -> None:
    credits_api.agent.balances["cust-a"] = 10**15  # plenty

    def one(i: int) -> tuple[int, dict[str, Any]]:
        r = credits_api.call("POST", "/v1/authorize", keys.cust_a, json=_auth_body(request_id=f"par-{i}"))
        return r.status_code, r.json()

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    assert [s for s, _ in results] == [200] * 50
    assert sorted(d["request_id"] for _, d in results) == sorted(f"par-{i}" for i in range(50))
    assert all(d["decision"] == "allow" for _, d in results)


def test_logs_never_contain_api_keys(credits_api: CreditsApi, keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    credits_api.call("POST", "/v1/authorize", keys.cust_a, json=_auth_body(request_id="r-log"))
    credits_api.call("POST", "/v1/authorize", keys.admin, json=_auth_body("cust-silent"))
    credits_api.call("POST", "/v1/credits/grants", keys.admin, json={"customer_id": "cust-a", "amount": "1"})
    credits_api.call("POST", "/v1/authorize", keys.cust_b, json=_auth_body("cust-a"))
    assert caplog.records  # something was logged
    text = "\n".join(r.getMessage() for r in caplog.records)
    for secret in (keys.admin, keys.cust_a, keys.cust_b):
        assert secret not in text
