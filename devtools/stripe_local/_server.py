"""The HTTP layer: auth, body parsing, idempotency keys, fault injection, routing.

Request pipeline for Stripe paths (``/v1/...``, ``/v2/...``):
1. fault injection: the first armed fault whose path prefix matches is consumed
   (429 / 5xx answer, a hang, or "drop": process then close the socket without a response);
2. auth: ``Authorization: Bearer sk_test_*`` (the meter event stream takes a session token);
3. parse: query string for GET/DELETE, bracket form for v1 POST, JSON for v2;
4. idempotency: a known ``Idempotency-Key`` with the same method+path+params replays the stored
   status and body with ``Idempotent-Replayed: true``; with other params -> 400 idempotency_error;
5. the handler runs under the server lock inside one sqlite transaction; its response (also a
   4xx) is stored under the key in the same transaction, then committed. 5xx are not stored.
``/_test/...`` paths skip 1, 2 and 4 and take JSON bodies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import traceback
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from devtools.stripe_local import _core, _invoicing, _meters, _subscriptions  # noqa: F401  (register routes)
from devtools.stripe_local._params import ApiError, canonical, parse_form
from devtools.stripe_local._routes import Ctx, match
from devtools.stripe_local._spec import check_params
from devtools.stripe_local._store import Store

log = logging.getLogger("devtools.stripe_local")

STREAM_PATH = "/v2/billing/meter_event_stream"
FAULT_KINDS = ("rate_limit", "status", "hang", "drop")


@dataclass
class Fault:
    """One armed fault: applies to the next ``remaining`` requests whose path starts with ``path_prefix``
    (and whose method is ``method``, when set)."""

    kind: str
    remaining: int = 1
    path_prefix: str = "/v"
    method: str | None = None
    status: int = 500
    retry_after: int = 1
    seconds: float = 5.0
    should_retry: bool = True


class App:
    """Shared server state: the store, its lock and the armed faults."""

    def __init__(self, state_path: Path | None) -> None:
        self.store = Store(state_path)
        self.lock = threading.RLock()
        self.faults: list[Fault] = []
        self.stopping = threading.Event()

    def take_fault(self, path: str, method: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.method not in (None, method):
                    continue
                if path.startswith(fault.path_prefix) and fault.remaining > 0:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self.faults.remove(fault)
                    return fault
        return None

    def test_control(self, method: str, path: str, params: dict[str, Any]) -> dict[str, Any] | None:
        """Fault and reset endpoints (they act on server state, not on the store's objects)."""
        if path == "/_test/faults":
            with self.lock:
                if method == "POST":
                    kind = str(params.get("kind"))
                    if kind not in FAULT_KINDS:
                        raise ApiError(400, f"kind must be one of {', '.join(FAULT_KINDS)}", param="kind")
                    fields = {
                        k: params[k]
                        for k in ("path_prefix", "method", "status", "retry_after", "seconds", "should_retry")
                        if params.get(k) is not None
                    }
                    self.faults.append(Fault(kind=kind, remaining=int(params.get("count", 1)), **fields))
                elif method == "DELETE":
                    self.faults.clear()
                return {"faults": [asdict(f) for f in self.faults]}
        if path == "/_test/reset" and method == "POST":
            with self.lock:
                self.faults.clear()
                self.store.reset()
            return {"reset": True}
        return None


def _fingerprint(method: str, path: str, api_key: str, params: Any) -> str:
    raw = json.dumps([method, path, api_key, canonical(params)], sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # ------------------------------------------------------------------ plumbing
    def _send(self, status: int, body: dict[str, Any] | str, headers: dict[str, str] | None = None) -> None:
        data = (body if isinstance(body, str) else json.dumps(body, default=str)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Request-Id", "req_" + secrets.token_hex(8))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> str:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length).decode() if length else ""

    def _dispatch(self, method: str) -> None:
        app = self.server.app
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        try:
            if path.startswith("/_test/"):
                self._test_request(app, method, path, url.query)
            else:
                self._api_request(app, method, path, url.query)
        except ApiError as exc:
            self._send(exc.status, exc.body(), exc.headers)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _test_request(self, app: App, method: str, path: str, query: str) -> None:
        body = self._body()
        try:
            params = json.loads(body) if body else parse_form(query)
        except json.JSONDecodeError:
            raise ApiError(400, "Test endpoints take JSON bodies.") from None
        handled = app.test_control(method, path, params)
        if handled is not None:
            self._send(200, handled)
            return
        status, out = self._run(app, method, path, params, token="")
        self._send(status, out)

    def _api_request(self, app: App, method: str, path: str, query: str) -> None:
        body = self._body()
        fault = app.take_fault(path, method)
        if fault is not None and fault.kind != "drop":
            self._apply_fault(app, fault)
            return
        auth = self.headers.get("Authorization", "")
        token = auth[7:].strip() if auth.startswith("Bearer ") else ""
        if path != STREAM_PATH and not token.startswith("sk_test_"):
            raise ApiError(
                401,
                f"Invalid API Key provided: {token[:12] or '(none)'}",
                type="authentication_error",
                code="invalid_api_key",
            )
        v2 = path.startswith("/v2/")
        if method == "POST" and v2:
            try:
                params = json.loads(body) if body else {}
            except json.JSONDecodeError:
                raise ApiError(400, "Request body must be JSON.") from None
            if not isinstance(params, dict):
                raise ApiError(400, "Request body must be a JSON object.")
        else:
            params = parse_form(body if method == "POST" else query)
        key = self.headers.get("Idempotency-Key") if method == "POST" or (v2 and method == "DELETE") else None
        status, out, replayed = self._idempotent(app, method, path, params, token, key)
        headers = {"Idempotent-Replayed": "true"} if replayed else {}
        if key:
            headers["Idempotency-Key"] = key
        if self.headers.get("Stripe-Version"):
            headers["Stripe-Version"] = self.headers["Stripe-Version"]
        if fault is not None:  # "drop": committed, now lose the response
            self.close_connection = True
            return
        self._send(status, out, headers)

    def _idempotent(
        self, app: App, method: str, path: str, params: dict[str, Any], token: str, key: str | None
    ) -> tuple[int, Any, bool]:
        with app.lock:
            if key:
                fp = _fingerprint(method, path, token, params)
                stored = app.store.idem_get(key)
                if stored is not None:
                    if stored[0] != fp:
                        raise ApiError(
                            400,
                            "Keys for idempotent requests can only be used with the same parameters"
                            f" they were first used with. Try using a key other than '{key}' if you"
                            " meant to execute a different request.",
                            type="idempotency_error",
                        )
                    return stored[1], stored[2], True
            status, out = self._run(app, method, path, params, token, commit=False)
            if key and status < 500:
                app.store.idem_put(key, _fingerprint(method, path, token, params), status, json.dumps(out, default=str))
            app.store.commit()
            return status, out, False

    def _run(
        self, app: App, method: str, path: str, params: dict[str, Any], token: str, commit: bool = True
    ) -> tuple[int, dict[str, Any]]:
        """Run the routed handler under the lock; on error roll back its writes."""
        fn, args, route_key = match(method, path)
        with app.lock:
            ctx = Ctx(store=app.store, now=app.store.now(), path=path, token=token)
            try:
                check_params(route_key, params)
                out = fn(ctx, params, **args)
                status = 200
            except ApiError as exc:
                app.store.rollback()
                out, status = exc.body(), exc.status
            except Exception:  # a bug in a handler: Stripe-shaped 500, state untouched
                app.store.rollback()
                log.error("local stripe handler failed: %s", traceback.format_exc())
                out = {"error": {"type": "api_error", "message": "Internal error in the local Stripe server."}}
                status = 500
            if commit:
                app.store.commit()
            return status, out

    def _apply_fault(self, app: App, fault: Fault) -> None:
        if fault.kind == "rate_limit":
            headers = {"Retry-After": str(fault.retry_after)}
            if fault.should_retry:
                headers["Stripe-Should-Retry"] = "true"
            self._send(
                429,
                {
                    "error": {
                        "type": "invalid_request_error",
                        "code": "rate_limit",
                        "message": "Too many requests hit the API too quickly (injected fault).",
                    }
                },
                headers,
            )
        elif fault.kind == "status":
            self._send(
                fault.status, {"error": {"type": "api_error", "message": f"Injected HTTP {fault.status} fault."}}
            )
        else:  # hang: hold the connection, then close it without processing or answering
            app.stopping.wait(fault.seconds)
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, app: App, host: str, port: int) -> None:
        self.app = app
        super().__init__((host, port), _Handler)


class StripeServer:
    """The local Stripe server; ``start()`` serves in a daemon thread, ``serve_forever()`` in this one."""

    def __init__(self, state_path: Path | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = App(state_path)
        self._httpd = _Server(self.app, host, port)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> StripeServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="local-stripe", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        try:
            self._httpd.serve_forever()
        finally:
            self.stop()

    def stop(self) -> None:
        self.app.stopping.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()
        with self.app.lock:
            try:
                self.app.store.close()
            except Exception:  # already closed
                pass
