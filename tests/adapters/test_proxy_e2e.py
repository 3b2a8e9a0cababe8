"""``meterline proxy`` end to end on the real stack (meterline.shell.runtime.Runtime: the HTTP API, the
faust credit agent and pricing workers, Tansu, chDB), with the real ``openai`` SDK as the client and
a local fake upstream speaking the OpenAI wire format.

- a customer with credit gets the upstream's answer, plain and streamed; each request is metered
  from the upstream's usage and settles its hold to the exact charge;
- a customer without credit gets 402 with the reason, a blocked-by-runaway-guard one 429, and the
  upstream is never called for them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from meterline.core.config import Settings
from meterline.core.pricing import load_price_book
from meterline.shell.api.keys import KeyStore
from meterline.shell.runtime import Runtime
from pipeline.publish import publish_records

pytestmark = pytest.mark.broker

SEED = Path(__file__).resolve().parents[2] / "infra" / "prices" / "seed.yaml"
METERLINE = Path(sys.executable).with_name("meterline")
UPSTREAM_KEY = "sk-upstream-secret"


class FakeOpenAI:
    """``POST /v1/chat/completions`` in the OpenAI wire format; usage fixed per call kind."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, Any], str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.calls.append((body, self.headers.get("Authorization", "")))
                base = {"id": f"chatcmpl-{len(outer.calls)}", "created": int(time.time()), "model": "gpt-4o-2024-05-13"}
                if not body.get("stream"):
                    doc = {
                        **base,
                        "object": "chat.completion",
                        "choices": [
                            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hello"}}
                        ],
                        "usage": {
                            "prompt_tokens": 2000,
                            "completion_tokens": 100,
                            "total_tokens": 2100,
                            "prompt_tokens_details": {"cached_tokens": 500},
                        },
                    }
                    data = json.dumps(doc).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                chunk = {**base, "object": "chat.completion.chunk"}
                events = [
                    {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "str"}}]},
                    {**chunk, "choices": [{"index": 0, "delta": {"content": "eamed"}, "finish_reason": "stop"}]},
                ]
                if (body.get("stream_options") or {}).get("include_usage"):
                    events.append(
                        {
                            **chunk,
                            "choices": [],
                            "usage": {"prompt_tokens": 1000, "completion_tokens": 50, "total_tokens": 1050},
                        }
                    )
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for e in [*(f"data: {json.dumps(x)}\n\n" for x in events), "data: [DONE]\n\n"]:
                    raw = e.encode()
                    self.wfile.write(f"{len(raw):x}\r\n".encode() + raw + b"\r\n")
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()


def wait_for(what: str, predicate: Any, timeout: float = 90.0, show: Any = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}" + (f": last seen {show()}" if show else ""))


def start_proxy(upstream: str, api_url: str, data_dir: Path, log: Path) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "METERLINE_DATA_DIR": str(data_dir), "OPENAI_API_KEY": UPSTREAM_KEY}
    with log.open("w") as stderr:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [str(METERLINE), "proxy", "--upstream", upstream, "--api-url", api_url, "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
        )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "listening on" in line, (line, log.read_text())
    return proc, line.split("listening on ", 1)[1].split(" ", 1)[0].removesuffix("/v1")


def test_proxy_authorizes_forwards_meters_and_settles(
    kafka_bootstrap: str, topics: dict[str, str], topic_prefix: str, clickhouse_dsn: str, tmp_path: Path
) -> None:
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        partitions=4,
        broker_flavor="tansu",
        data_dir=tmp_path,
        clickhouse_dsn=clickhouse_dsn,
        api_port=0,
    )
    upstream = FakeOpenAI()
    runtime = Runtime(settings).start()
    proxy = None
    try:
        publish_records(kafka_bootstrap, settings.topic("prices"), load_price_book(SEED).to_records())
        api = runtime.api_server.url
        admin = {"Authorization": f"Bearer {runtime.admin_key}"}
        store = KeyStore(tmp_path / "api_keys.json")
        _, acme_key = store.create("acme")
        _, hooli_key = store.create("hooli")
        _, initech_key = store.create("initech")
        http = httpx.Client(base_url=api, timeout=30)
        for customer in ("acme", "hooli", "initech"):
            assert (
                http.put(f"/v1/customers/{customer}/policy", json={"overage": "block"}, headers=admin).status_code
                == 202
            )
        assert (
            http.post(
                "/v1/credits/grants",
                headers=admin,
                json={"customer_id": "acme", "grant_id": "g1", "amount": "1.00", "currency": "usd"},
            ).status_code
            == 202
        )
        assert (
            http.post(
                "/v1/credits/grants",
                headers=admin,
                json={"customer_id": "initech", "grant_id": "g1", "amount": "1.00", "currency": "usd"},
            ).status_code
            == 202
        )
        assert (
            http.post("/v1/customers/initech/block", headers=admin, json={"reason": "runaway_guard"}).status_code == 202
        )

        def available(key: str, customer: str) -> Decimal | None:
            r = http.get(f"/v1/customers/{customer}/balance", headers={"Authorization": f"Bearer {key}"})
            return Decimal(r.json()["available"]) if r.status_code == 200 else None

        wait_for(
            "acme's grant",
            lambda: available(acme_key, "acme") == Decimal("1.00"),
            show=lambda: [w.log_tail(1500) for w in runtime.workers],
        )
        wait_for(
            "initech blocked",
            lambda: http.get("/v1/customers/initech/status", headers=admin).json().get("reason") == "runaway_guard",
        )

        proxy, proxy_url = start_proxy(upstream.url, api, tmp_path, tmp_path / "proxy.log")
        client = openai.OpenAI(base_url=f"{proxy_url}/v1", api_key=acme_key, max_retries=0)

        reply = client.chat.completions.create(
            model="gpt-4o-2024-05-13", max_tokens=200, messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content == "hello"
        assert reply.usage is not None and reply.usage.prompt_tokens == 2000
        stream = client.chat.completions.create(
            model="gpt-4o-2024-05-13", max_tokens=200, stream=True, messages=[{"role": "user", "content": "hi"}]
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == "streamed"
        # the upstream saw the upstream key, never the customer's meterline key, and the proxy asked
        # the stream for its usage
        assert [auth for _, auth in upstream.calls] == [f"Bearer {UPSTREAM_KEY}"] * 2
        assert upstream.calls[1][0]["stream_options"] == {"include_usage": True}

        # gpt-4o list $5 in / $2.50 cached / $15 out per million, acme pays +20 %:
        # plain: 1500 in + 500 cached + 100 out; streamed: 1000 in + 50 out
        plain = Decimal(1500 * 6 + 500 * 3 + 100 * 18) / 1_000_000
        streamed = Decimal(1000 * 6 + 50 * 18) / 1_000_000
        wait_for(
            "both requests settled",
            lambda: available(acme_key, "acme") == Decimal("1.00") - plain - streamed,
            show=lambda: (
                available(acme_key, "acme"),
                (tmp_path / "proxy.log").read_text()[-2000:],
                http.post(
                    "/v1/sql", headers=admin, json={"query": "SELECT reason_code, reason FROM usage_rejected"}
                ).text,
                http.post(
                    "/v1/sql",
                    headers=admin,
                    json={"query": "SELECT event_id, request_id, model, model_version, charge FROM usage_priced"},
                ).text,
                http.get("/v1/customers/acme/balance", headers=admin).text,
            ),
        )
        rows = wait_for(
            "the priced rows",
            lambda: (
                (
                    r := http.post(
                        "/v1/sql",
                        headers=admin,
                        json={
                            "query": "SELECT request_id, input_tokens, cached_input_tokens, output_tokens FROM usage_priced "
                            "WHERE gateway = 'meterline-proxy' ORDER BY input_tokens"
                        },
                    )
                    .json()
                    .get("rows")
                )
                and len(r) == 2
                and r
            ),
        )
        assert [tuple(int(n) for n in r[1:]) for r in rows] == [(1000, 0, 50), (1500, 500, 100)]
        assert all(r[0].startswith("proxy_") for r in rows)

        # no credit: 402 with the reason; runaway guard: 429; the upstream is not called for either
        calls = len(upstream.calls)
        broke = openai.OpenAI(base_url=f"{proxy_url}/v1", api_key=hooli_key, max_retries=0)
        with pytest.raises(openai.APIStatusError) as denied:
            broke.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert denied.value.status_code == 402
        # a prepaid customer with nothing left is blocked: the credit agent's reason is the error code
        assert denied.value.code == "credit_exhausted" and "credit_exhausted" in denied.value.message
        guarded = openai.OpenAI(base_url=f"{proxy_url}/v1", api_key=initech_key, max_retries=0)
        with pytest.raises(openai.RateLimitError) as limited:
            guarded.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert limited.value.status_code == 429 and limited.value.code == "runaway_guard"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{proxy_url}/v1", api_key="ml_live_unknown", max_retries=0).chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
            )
        assert len(upstream.calls) == calls
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(10)
        runtime.stop()
        upstream.close()
