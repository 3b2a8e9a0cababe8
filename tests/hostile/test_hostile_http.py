"""Hostile HTTP: the real API on 127.0.0.1 (uvicorn), a real producer on the Tansu broker, chDB.

Every hostile request ends in a clear answer — 4xx with ``{"error": {"code", "message"}}``, or 200
with a per-event ``rejected`` result carrying a ``reason_code`` — never a 5xx. Security: every
endpoint but /healthz needs a key; a customer key acts only for its customer and cannot use SQL;
SQL is read-only and parameterised; size and batch limits hold; no key appears in the logs.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterline.shell.api.app import MAX_BODY_BYTES, MAX_EVENTS

ROUTES = [("POST", "/v1/events"), ("POST", "/v1/sql")]


@pytest.fixture
def api(api_factory: Any, usage_producer: Any, clickhouse: Any, topics: dict[str, str]) -> Any:
    clickhouse.command(
        "INSERT INTO usage_rejected (reason_code, customer_id, source_topic) VALUES ('x', 'cust-b', 't')"
    )
    return api_factory(producer=usage_producer, clickhouse=clickhouse, topic=topics["usage-events"])


def ev(event_id: str, customer_id: str = "cust-a", **over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "event_id": event_id,
        "occurred_at": "2025-03-01T12:00:00Z",
        "customer_id": customer_id,
        "provider": "openai",
        "model": "gpt-4o",
        "input_tokens": 100,
        "output_tokens": 20,
    }
    d.update(over)
    return d


def clear_error(r: httpx.Response, status: int | None = None) -> str:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    if status is not None:
        assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["code"] and err["message"]
    return str(err["code"])


HOSTILE_EVENTS = [
    (ev("neg", input_tokens=-1), "negative_count"),
    (ev("big", output_tokens=2**63), None),
    (ev("missing", input_tokens=None, output_tokens=None, requests=0), "empty_usage"),
    (ev("nan", input_tokens="NaN"), "invalid_type"),
    (ev("inf", input_tokens=float("inf")), None),
    (ev("str", output_tokens="12"), "invalid_type"),
    (ev("1970", occurred_at="1970-01-01T00:00:00Z"), "timestamp_too_old"),
    (ev("2999", occurred_at="2999-01-01T00:00:00Z"), "timestamp_in_future"),
    (ev("naive", occurred_at="2025-03-01T12:00:00"), "invalid_timestamp"),
    (ev("labels", labels={f"k{i}": "v" for i in range(1000)}), "too_many_labels"),
    (ev("x" * 300), "id_too_long"),
    (ev("other", customer_id="cust-zzz-unknown"), "customer_mismatch"),
    ("not an object", "invalid_json_type"),
    (None, "invalid_json_type"),
]


def test_hostile_events_are_each_rejected_with_a_reason(api: Any, keys: Any) -> None:
    body = [e for e, _ in HOSTILE_EVENTS] + [ev("good-ünïcode-✓-😀")]
    r = api.post("/v1/events", keys.cust_a, content=json.dumps(body, allow_nan=True))
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["status"] for x in results] == ["rejected"] * len(HOSTILE_EVENTS) + ["accepted"]
    for (_, reason), res in zip(HOSTILE_EVENTS, results):
        assert res["reason_code"] and res["message"]
        if reason is not None:
            assert res["reason_code"] == reason, res
    assert results[-1]["event_id"] == "good-ünïcode-✓-😀"


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"", "invalid_json"),
        (b"{", "invalid_json"),
        (b"\xff\xfe\xfd", "invalid_json"),
        (b"42", "invalid_body"),
        (b'{"events": 5}', "invalid_body"),
        (b"[" * 200_000 + b"]" * 200_000, "invalid_json"),  # nesting bomb under the size limit
    ],
)
def test_malformed_bodies(api: Any, keys: Any, content: bytes, code: str) -> None:
    assert clear_error(api.post("/v1/events", keys.cust_a, content=content), 400) == code


def test_size_and_batch_limits(api: Any, keys: Any) -> None:
    assert (
        clear_error(api.post("/v1/events", keys.cust_a, content=b" " * (MAX_BODY_BYTES + 1)), 413) == "body_too_large"
    )
    many = [ev(f"e{i}") for i in range(MAX_EVENTS + 1)]
    assert clear_error(api.post("/v1/events", keys.cust_a, json=many), 413) == "too_many_events"

    def chunks():  # chunked upload without Content-Length must be cut off too
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b" " * 65536

    r = httpx.post(
        api.url + "/v1/events", headers={"Authorization": f"Bearer {keys.cust_a}"}, content=chunks(), timeout=30
    )
    assert clear_error(r, 413) == "body_too_large"
    big_sql = {"query": "SELECT 1 -- " + "x" * 300_000}
    assert clear_error(api.post("/v1/sql", keys.admin, json=big_sql), 413) == "body_too_large"


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize(
    "header", [None, "Bearer", "Bearer ml_live_wrong", "Basic dXNlcjpwYXNz", "Bearer " + "A" * 5000]
)
def test_every_endpoint_but_healthz_needs_a_key(api: Any, method: str, path: str, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    r = httpx.request(method, api.url + path, headers=headers, json={"query": "SELECT 1", "events": []}, timeout=10)
    assert clear_error(r, 401)
    assert httpx.get(api.url + "/healthz", timeout=10).status_code == 200


def test_revoked_key_is_refused(api: Any, keys: Any) -> None:
    kid, secret = keys.store.create("cust-c")
    assert api.post("/v1/events", secret, json=[ev("r1", "cust-c")]).status_code == 200
    keys.store.revoke(kid)
    assert clear_error(api.post("/v1/events", secret, json=[ev("r2", "cust-c")]), 401)


def test_customer_key_acts_only_for_its_customer(api: Any, keys: Any, consume_usage: Any) -> None:
    r = api.post("/v1/events", keys.cust_b, json=[ev("mine", "cust-b"), ev("theirs", "cust-a")])
    assert [x["status"] for x in r.json()["results"]] == ["accepted", "rejected"]
    assert r.json()["results"][1]["reason_code"] == "customer_mismatch"
    # a customer key cannot read through SQL at all (no row-level filter to get wrong)
    assert clear_error(api.post("/v1/sql", keys.cust_a, json={"query": "SELECT * FROM usage_rejected"}), 403)
    sent = consume_usage(api.topic, 1)
    assert [(e["event_id"], e["customer_id"]) for e in sent] == [("mine", "cust-b")]


WRITES = [
    "INSERT INTO usage_priced (event_id) VALUES ('x')",
    "DROP TABLE usage_rejected",
    "ALTER TABLE usage_rejected DELETE WHERE 1",
    "TRUNCATE TABLE usage_rejected",
    "CREATE TABLE pwn (a Int8) ENGINE = Memory",
    "SELECT 1; DROP TABLE usage_rejected",
    "SELECT 1 SETTINGS readonly = 0",
    "INSERT INTO FUNCTION file('/tmp/meterline-pwn.csv', 'CSV', 'a String') SELECT 'x'",
    "SYSTEM SHUTDOWN",
    "OPTIMIZE TABLE usage_rejected FINAL",
    "SET readonly = 0",
    "WITH 1 AS x DELETE FROM usage_rejected WHERE 1",
]


@pytest.mark.parametrize("sql", WRITES)
def test_sql_is_read_only(api: Any, keys: Any, clickhouse: Any, sql: str) -> None:
    clear_error(api.post("/v1/sql", keys.admin, json={"query": sql}), 400)
    assert clickhouse.query("SELECT count() FROM usage_rejected").result_rows[0][0] == 1
    assert not clickhouse.query("EXISTS TABLE pwn").result_rows[0][0]


def test_sql_parameters_are_bound_not_spliced(api: Any, keys: Any, clickhouse: Any) -> None:
    q = {"query": "SELECT count() AS n FROM usage_rejected WHERE customer_id = {c:String}"}
    for hostile in ["x' OR '1'='1", "'; DROP TABLE usage_rejected; --", "cust-b\\' OR 1=1 --"]:
        r = api.post("/v1/sql", keys.admin, json={**q, "parameters": {"c": hostile}})
        assert r.status_code == 200 and r.json()["rows"] == [[0]], r.text
    r = api.post("/v1/sql", keys.admin, json={**q, "parameters": {"c": "cust-b"}})
    assert r.json()["rows"] == [[1]]
    assert clickhouse.query("SELECT count() FROM usage_rejected").result_rows[0][0] == 1
    assert clear_error(api.post("/v1/sql", keys.admin, json={**q, "parameters": ["c"]}), 400)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
        lambda kids: (
            st.lists(kids, max_size=5)
            | st.dictionaries(
                st.sampled_from(
                    ["events", "event_id", "customer_id", "occurred_at", "input_tokens", "labels", "model"]
                ),
                kids,
                max_size=6,
            )
        ),
        max_leaves=30,
    )
)
def test_fuzzed_json_bodies_never_5xx(api: Any, keys: Any, body: Any) -> None:
    r = api.post("/v1/events", keys.cust_a, content=json.dumps(body, allow_nan=True))
    if r.status_code == 200:
        for res in r.json()["results"]:
            assert res["status"] == "accepted" or (res["reason_code"] and res["message"])
    else:
        clear_error(r)


def test_no_secret_in_logs(
    api: Any, keys: Any, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "ml_live_" + "Z" * 32
    api.post("/v1/events", keys.cust_a, json=[ev("log-1")])
    api.post("/v1/events", keys.cust_a, content=b"{")
    api.post("/v1/events", wrong, json=[ev("log-2")])
    api.post("/v1/sql", keys.admin, json={"query": "SELECT 1"})
    api.post("/v1/sql", keys.cust_a, json={"query": "SELECT 1"})
    out, errs = capfd.readouterr()
    server_logs = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]  # not our client
    text = "\n".join(f"{r.name} {r.getMessage()}" for r in server_logs) + out + errs
    assert "ingest" in caplog.text  # the logs were captured at all
    for secret in (keys.cust_a, keys.cust_b, keys.admin, wrong):
        assert secret not in text
        assert secret[8:] not in text  # not even the random part
