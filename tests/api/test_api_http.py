"""The HTTP API over real HTTP on 127.0.0.1: auth, ingest into the real broker, SQL on real chDB."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Any

import httpx
import pytest

from meterline.core.errors import ConfigError, InputError, TransientError
from meterline.shell.api.app import MAX_BODY_BYTES, MAX_EVENTS
from meterline.shell.api.client import ApiClient
from meterline.shell.api.server import ApiServer
from meterline.shell.discovery import (
    RuntimeInfo,
    read_runtime_info,
    remove_runtime_info,
    running_api,
    write_runtime_info,
)
from meterline.stack.broker import free_port
from meterline.stack.producer import UsageProducer

MakeEvent = Callable[..., dict[str, Any]]


class _NoProducer:
    """For routes that must never reach the producer."""

    def send(self, ev: Any) -> None:
        raise AssertionError("no event should be sent")

    def flush(self, timeout: float) -> None:
        return None


def _err(resp: httpx.Response) -> dict[str, Any]:
    body = resp.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"]["code"], str) and isinstance(body["error"]["message"], str)
    return body["error"]


# ------------------------------------------------------------------------------- auth


def test_healthz_needs_no_key(api_factory: Any) -> None:
    api = api_factory(producer=_NoProducer())
    resp = httpx.get(api.url + "/healthz")
    assert resp.status_code == 200 and resp.json()["status"] == "ok"


def test_missing_bad_and_revoked_keys_are_401(api_factory: Any, keys: Any, make_event: MakeEvent) -> None:
    api = api_factory(producer=_NoProducer())
    body = {"events": [make_event("e1")]}
    for headers in (
        {},
        {"Authorization": "Bearer ml_live_" + "x" * 32},
        {"Authorization": f"Basic {keys.cust_a}"},
        {"Authorization": "Bearer"},
    ):
        resp = httpx.post(api.url + "/v1/events", json=body, headers=headers)
        assert resp.status_code == 401, headers
        assert _err(resp)["code"] == "unauthorized"
        assert resp.headers["www-authenticate"].startswith("Bearer")
    # a valid key works (here on SQL: no producer needed), then stops working once revoked
    assert api.post("/v1/sql", keys.cust_a, json={"query": "SELECT 1"}).status_code == 403
    keys.store.revoke(keys.cust_a_id)
    resp = api.post("/v1/sql", keys.cust_a, json={"query": "SELECT 1"})
    assert resp.status_code == 401 and _err(resp)["code"] == "unauthorized"


def test_unknown_route_and_method_are_json_errors(api_factory: Any, keys: Any) -> None:
    api = api_factory(producer=_NoProducer())
    assert _err(httpx.get(api.url + "/nope"))["code"] == "not_found"
    resp = httpx.get(api.url + "/v1/events")
    assert resp.status_code == 405 and _err(resp)["code"] == "method_not_allowed"


# ------------------------------------------------------------------------------- ingest


def test_mixed_batch_reports_per_event_and_only_good_events_reach_kafka(
    api_factory: Any,
    keys: Any,
    usage_producer: UsageProducer,
    topics: dict[str, str],
    make_event: MakeEvent,
    consume_usage: Any,
) -> None:
    api = api_factory(producer=usage_producer)
    batch = [
        make_event("good-1"),
        make_event("bad-neg", input_tokens=-5),
        make_event("good-2", occurred_at=1740830400123, labels={"team": "x"}),
        make_event("good-1", output_tokens=999),  # same id again
        make_event("other", customer_id="cust-b"),  # not this key's customer
        make_event("no-zone", occurred_at="2025-03-01T12:00:00"),
        make_event("empty", input_tokens=0, output_tokens=0, requests=0),
        "not an object",
        make_event("good-3", customer_id="cust-a", model="claude-sonnet-4"),
    ]
    resp = api.post("/v1/events", keys.cust_a, json={"events": batch})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    by_index = {r["index"]: r for r in body["results"]}
    assert [r["index"] for r in body["results"]] == list(range(len(batch)))
    assert [by_index[i]["status"] for i in range(len(batch))] == [
        "accepted",
        "rejected",
        "accepted",
        "duplicate_id_in_batch",
        "rejected",
        "rejected",
        "rejected",
        "rejected",
        "accepted",
    ]
    assert by_index[1]["reason_code"] == "negative_count" and by_index[1]["field"] == "input_tokens"
    assert by_index[4]["reason_code"] == "customer_mismatch" and by_index[4]["event_id"] == "other"
    assert by_index[5]["reason_code"] == "invalid_timestamp"
    assert by_index[6]["reason_code"] == "empty_usage"
    assert by_index[7]["reason_code"] == "invalid_json_type" and by_index[7]["event_id"] is None
    assert (body["accepted"], body["rejected"], body["duplicates"]) == (3, 5, 1)

    # "accepted" means acknowledged: the records are already in the topic
    got = consume_usage(topics["usage-events"], expect=3)
    assert sorted(e["event_id"] for e in got) == ["good-1", "good-2", "good-3"]
    g1 = next(e for e in got if e["event_id"] == "good-1")
    assert (g1["customer_id"], g1["input_tokens"], g1["output_tokens"]) == ("cust-a", 100, 20)  # the first copy
    g2 = next(e for e in got if e["event_id"] == "good-2")
    assert g2["occurred_at"] == 1740830400123 and g2["labels"] == {"team": "x"}


def test_admin_key_may_send_for_any_customer_and_bare_list_body(
    api_factory: Any,
    keys: Any,
    usage_producer: UsageProducer,
    topics: dict[str, str],
    make_event: MakeEvent,
    consume_usage: Any,
) -> None:
    api = api_factory(producer=usage_producer)
    resp = api.post("/v1/events", keys.admin, json=[make_event("a1", "cust-a"), make_event("b1", "cust-b")])
    assert resp.status_code == 200 and resp.json()["accepted"] == 2
    # a customer key for cust-b cannot send cust-a's
    resp = api.post("/v1/events", keys.cust_b, json=[make_event("a2", "cust-a")])
    assert resp.json()["results"][0]["reason_code"] == "customer_mismatch"
    got = consume_usage(topics["usage-events"], expect=2)
    assert sorted((e["customer_id"], e["event_id"]) for e in got) == [("cust-a", "a1"), ("cust-b", "b1")]


def test_body_and_event_count_limits_are_413(api_factory: Any, keys: Any, make_event: MakeEvent) -> None:
    api = api_factory(producer=_NoProducer())
    # declared Content-Length over the limit: refused before reading
    big = b"[" + b" " * (MAX_BODY_BYTES + 10) + b"]"
    resp = api.post("/v1/events", keys.cust_a, content=big, headers={"Content-Type": "application/json"})
    assert resp.status_code == 413 and _err(resp)["code"] == "body_too_large"

    # chunked body (no Content-Length): counted while reading
    def chunks() -> Iterator[bytes]:
        yield b"["
        for _ in range(20):
            yield b" " * 65536
        yield b"]"

    resp = api.post("/v1/events", keys.cust_a, content=chunks())
    assert resp.status_code == 413 and _err(resp)["code"] == "body_too_large"

    too_many = [make_event(f"e{i}") for i in range(MAX_EVENTS + 1)]
    assert len(json.dumps(too_many)) < MAX_BODY_BYTES
    resp = api.post("/v1/events", keys.cust_a, json={"events": too_many})
    assert resp.status_code == 413 and _err(resp) == {
        "code": "too_many_events",
        "message": f"{MAX_EVENTS + 1} events in one request, at most {MAX_EVENTS}",
        "field": "events",
    }


@pytest.mark.parametrize(
    "content, code",
    [
        (b"{not json", "invalid_json"),
        (b'{"events": 5}', "invalid_body"),
        (b'"a string"', "invalid_body"),
    ],
)
def test_malformed_bodies_are_400(api_factory: Any, keys: Any, content: bytes, code: str) -> None:
    api = api_factory(producer=_NoProducer())
    resp = api.post("/v1/events", keys.cust_a, content=content)
    assert resp.status_code == 400 and _err(resp)["code"] == code


def test_broker_down_is_503_and_nothing_accepted(api_factory: Any, keys: Any, make_event: MakeEvent) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    producer = UsageProducer(dead, "nowhere", linger_ms=5, extra_config={"message.timeout.ms": 1000})
    try:
        api = api_factory(producer=producer, flush_timeout=10.0)
        resp = api.post("/v1/events", keys.cust_a, json=[make_event("e1"), make_event("e2")])
        assert resp.status_code == 503
        err = _err(resp)
        assert err["code"] == "broker_unavailable" and "none accepted" in err["message"]
        assert "accepted" not in resp.json()
    finally:
        try:
            producer.close(0)
        except TransientError:
            pass


# ------------------------------------------------------------------------------- SQL


def _insert_priced(client: Any, rows: list[tuple[str, str, Decimal]]) -> None:
    now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    client.insert(
        "usage_priced",
        [[eid, now, cust, "openai", "gpt-4o", cost, cost, "USD", now] for eid, cust, cost in rows],
        column_names=[
            "event_id",
            "occurred_at",
            "customer_id",
            "provider",
            "model",
            "cost",
            "charge",
            "currency",
            "priced_at",
        ],
    )


def test_sql_is_admin_only_and_exact(api_factory: Any, keys: Any, clickhouse: Any) -> None:
    _insert_priced(
        clickhouse,
        [
            ("e1", "cust-a", Decimal("0.000000000001")),
            ("e2", "cust-a", Decimal("12345678901234567890.123456789012")),
            ("e3", "cust-b", Decimal("0.1")),
        ],
    )
    api = api_factory(producer=_NoProducer(), clickhouse=clickhouse)
    q = {
        "query": "SELECT customer_id, sum(cost) AS total, max(occurred_at) AS last FROM usage_priced "
        "WHERE customer_id = {c:String} GROUP BY customer_id",
        "parameters": {"c": "cust-a"},
    }
    resp = api.post("/v1/sql", keys.cust_a, json=q)
    assert resp.status_code == 403 and _err(resp)["code"] == "forbidden"
    resp = api.post("/v1/sql", keys.admin, json=q)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {
        "columns": ["customer_id", "total", "last"],
        "rows": [["cust-a", "12345678901234567890.123456789013", "2025-03-01T12:00:00+00:00"]],
    }
    with localcontext() as ctx:  # 32 significant digits: beyond float and the default context
        ctx.prec = 60
        assert Decimal(resp.json()["rows"][0][1]) == Decimal("12345678901234567890.123456789012") + Decimal("1e-12")

    csv_resp = api.post("/v1/sql", keys.admin, json={**q, "format": "csv"})
    assert csv_resp.status_code == 200 and csv_resp.headers["content-type"].startswith("text/csv")
    assert csv_resp.text.splitlines()[1].startswith("cust-a,12345678901234567890.123456789013,")
    table = api.post("/v1/sql", keys.admin, json={**q, "format": "table"})
    assert table.status_code == 200 and "12345678901234567890.123456789013" in table.text


@pytest.mark.parametrize(
    "query",
    [
        "INSERT INTO usage_priced (event_id) VALUES ('x')",
        "DROP TABLE usage_priced",
        "SELECT 1; DROP TABLE usage_priced",
        "SELECT 1; SELECT 2",
        "ALTER TABLE usage_priced DELETE WHERE 1",
    ],
)
def test_sql_refuses_writes_and_multi_statements(api_factory: Any, keys: Any, clickhouse: Any, query: str) -> None:
    api = api_factory(producer=_NoProducer(), clickhouse=clickhouse)
    resp = api.post("/v1/sql", keys.admin, json={"query": query})
    assert resp.status_code == 400
    assert _err(resp)["code"] == "sql_not_readonly"
    # the table is still there and empty
    assert api.post("/v1/sql", keys.admin, json={"query": "SELECT count() FROM usage_priced"}).json()["rows"] == [[0]]


def test_sql_errors_and_bad_requests_are_400(api_factory: Any, keys: Any, clickhouse: Any) -> None:
    api = api_factory(producer=_NoProducer(), clickhouse=clickhouse)
    resp = api.post("/v1/sql", keys.admin, json={"query": "SELECT nope FROM missing_table"})
    assert resp.status_code == 400 and _err(resp)["code"] == "sql_error"
    resp = api.post("/v1/sql", keys.admin, json={"query": "SELECT 1", "format": "xml"})
    assert resp.status_code == 400 and _err(resp)["field"] == "format"
    resp = api.post("/v1/sql", keys.admin, json={"query": ""})
    assert resp.status_code == 400 and _err(resp)["field"] == "query"


def test_sql_through_a_context_manager_factory(api_factory: Any, keys: Any, clickhouse: Any) -> None:
    from contextlib import contextmanager

    used: list[int] = []

    @contextmanager
    def access() -> Iterator[Any]:
        used.append(1)
        yield clickhouse

    api = api_factory(producer=_NoProducer(), clickhouse=access)
    resp = api.post("/v1/sql", keys.admin, json={"query": "SELECT toDecimal64('1.50', 2) AS x"})
    assert resp.json() == {"columns": ["x"], "rows": [["1.50"]]} and used == [1]


# ------------------------------------------------------------------------------- secrets never logged


def test_secrets_never_logged(
    api_factory: Any,
    keys: Any,
    clickhouse: Any,
    caplog: pytest.LogCaptureFixture,
    make_event: MakeEvent,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.DEBUG)
    _, fresh = keys.store.create("cust-c")
    api = api_factory(producer=_NoProducer(), clickhouse=clickhouse)
    api.post("/v1/sql", keys.admin, json={"query": "SELECT 1"})
    api.post("/v1/sql", keys.cust_a, json={"query": "SELECT 1"})
    api.post("/v1/sql", fresh, json={"query": "SELECT 1"})
    api.post("/v1/sql", keys.admin, json={"query": "DROP TABLE usage_priced"})
    api.post("/v1/events", keys.cust_b + "x", json=[make_event("e")])
    secrets = [keys.admin, keys.cust_a, keys.cust_b, fresh]
    assert caplog.records  # something was logged (key creation, access log, ...)
    for s in secrets:
        assert s not in caplog.text
        assert s[len("ml_live_") :] not in caplog.text
    keyfile = (tmp_path / "api_keys.json").read_text()
    for s in secrets:
        assert s not in keyfile and s[len("ml_live_") :] not in keyfile


# ------------------------------------------------------------------------------- client + discovery


def test_client_and_discovery(
    api_factory: Any,
    keys: Any,
    clickhouse: Any,
    usage_producer: UsageProducer,
    make_event: MakeEvent,
    tmp_path: Path,
) -> None:
    api = api_factory(producer=usage_producer, clickhouse=clickhouse)
    write_runtime_info(tmp_path, RuntimeInfo(os.getpid(), None, "meterline.", api.url))
    (tmp_path / "admin.key").write_text(keys.admin + "\n")
    found = running_api(tmp_path)
    assert found == (api.url, keys.admin)

    with ApiClient(*found) as client:
        assert client.sql("SELECT toDecimal128('2.000000000001', 12) AS x") == {
            "columns": ["x"],
            "rows": [["2.000000000001"]],
        }
        assert client.sql("SELECT 1 AS x", fmt="csv") == "x\n1\n"
        report = client.send_events([make_event("c1", "cust-b")])
        assert report["accepted"] == 1
        with pytest.raises(InputError) as ei:
            client.sql("DROP TABLE usage_priced")
        assert ei.value.reason_code == "sql_not_readonly"
    with ApiClient(api.url, keys.cust_a) as client, pytest.raises(ConfigError):
        client.sql("SELECT 1")
    with ApiClient(f"http://127.0.0.1:{free_port()}", keys.admin) as client, pytest.raises(TransientError):
        client.sql("SELECT 1")


def test_server_port_zero_and_stop(api_factory: Any, keys: Any) -> None:
    api = api_factory(producer=_NoProducer())
    server = ApiServer(api.server.app, "127.0.0.1", 0).start()
    assert server.port != 0
    assert httpx.get(server.url + "/healthz").status_code == 200
    server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/healthz")
    server.stop()  # idempotent


def test_runtime_info_is_private_and_removed_only_by_its_writer(tmp_path: Path) -> None:
    path = write_runtime_info(tmp_path, RuntimeInfo(os.getpid(), "127.0.0.1:9092", "p.", "http://127.0.0.1:1"))
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_runtime_info(tmp_path) == RuntimeInfo(os.getpid(), "127.0.0.1:9092", "p.", "http://127.0.0.1:1")
    assert running_api(tmp_path) is None  # no admin.key beside it
    remove_runtime_info(tmp_path, only_if_pid=os.getpid() + 1)
    assert read_runtime_info(tmp_path) is not None
    remove_runtime_info(tmp_path, only_if_pid=os.getpid())
    assert read_runtime_info(tmp_path) is None and not path.exists()


def test_read_runtime_info_ignores_dead_pid(tmp_path: Path) -> None:
    (tmp_path / "runtime.json").write_text(json.dumps({"api_url": "http://127.0.0.1:1", "pid": 2**22 + 12345}))
    assert read_runtime_info(tmp_path) is None
    assert read_runtime_info(tmp_path / "missing") is None


def test_extra_routes_use_the_same_auth_and_error_shape(api_factory: Any, keys: Any) -> None:
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from meterline.shell.api.auth import ApiError, require_customer, require_key

    async def balance(request: Request) -> JSONResponse:
        record = require_key(request)
        customer = request.path_params["customer_id"]
        require_customer(record, customer)
        if customer == "ghost":
            raise ApiError(404, "unknown_customer", "no such customer", field="customer_id")
        return JSONResponse({"customer_id": customer, "balance": "10.000000000000"})

    api = api_factory(producer=_NoProducer(), extra_routes=[Route("/v1/customers/{customer_id}/balance", balance)])

    def get(cust, key):
        return httpx.get(
            f"{api.url}/v1/customers/{cust}/balance",
            headers={"Authorization": f"Bearer {key}"} if key else {},
        )

    assert get("cust-a", keys.cust_a).json() == {"customer_id": "cust-a", "balance": "10.000000000000"}
    assert get("cust-b", keys.cust_a).status_code == 403
    assert get("cust-b", keys.admin).status_code == 200
    assert get("cust-a", None).status_code == 401
    resp = get("ghost", keys.admin)
    assert resp.status_code == 404 and _err(resp) == {
        "code": "unknown_customer",
        "message": "no such customer",
        "field": "customer_id",
    }
