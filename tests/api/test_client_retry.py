"""The CLI's API client waits out a 503 that says when to retry (the API catching up after a restart)
for idempotent reads, and gives up with the API's answer when its time is over."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from meterline.shell.api.client import call_json


class _Loading(BaseHTTPRequestHandler):
    """503 + Retry-After for the first ``server.unavailable`` requests, then 200."""

    def do_GET(self) -> None:
        server = self.server
        server.seen += 1  # type: ignore[attr-defined]
        if server.seen <= server.unavailable:  # type: ignore[attr-defined]
            body, code = {"error": {"code": "status_catching_up", "message": "loading"}}, 503
        else:
            body, code = {"available": "1.5"}, 200
        raw = json.dumps(body).encode()
        self.send_response(code)
        if code == 503 and server.retry_after is not None:  # type: ignore[attr-defined]
            self.send_header("Retry-After", server.retry_after)  # type: ignore[attr-defined]
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Loading)
    srv.seen, srv.unavailable, srv.retry_after = 0, 2, "0"  # type: ignore[attr-defined]
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _url(srv: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}"


def test_a_read_waits_out_catching_up(server: ThreadingHTTPServer) -> None:
    status, doc = call_json(_url(server), "k", "GET", "/v1/customers/c/balance", wait_unavailable_s=10)
    assert (status, doc, server.seen) == (200, {"available": "1.5"}, 3)  # type: ignore[attr-defined]


def test_without_a_wait_the_first_answer_is_returned(server: ThreadingHTTPServer) -> None:
    status, doc = call_json(_url(server), "k", "GET", "/v1/customers/c/balance")
    assert status == 503 and doc["error"]["code"] == "status_catching_up"
    assert server.seen == 1  # type: ignore[attr-defined]


def test_a_503_without_retry_after_is_not_retried(server: ThreadingHTTPServer) -> None:
    server.retry_after = None  # type: ignore[attr-defined]
    status, _ = call_json(_url(server), "k", "GET", "/x", wait_unavailable_s=10)
    assert status == 503 and server.seen == 1  # type: ignore[attr-defined]


def test_the_wait_is_bounded(server: ThreadingHTTPServer) -> None:
    server.unavailable, server.retry_after = 10**6, "1"  # type: ignore[attr-defined]
    status, _ = call_json(_url(server), "k", "GET", "/x", wait_unavailable_s=1.5)
    assert status == 503 and 1 <= server.seen <= 3  # type: ignore[attr-defined]
