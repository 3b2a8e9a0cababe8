"""An OpenAI-compatible metering proxy: ``meterline proxy --upstream URL``.

Clients keep their OpenAI SDK and point it at the proxy, with their **meterline customer key** as
the API key (``OpenAI(base_url="http://127.0.0.1:8788/v1", api_key="ml_live_...")``). Per
``POST /v1/chat/completions``:

1. **Identify** the customer from the key (the meterline key file, ``<data_dir>/api_keys.json``;
   only customer keys are accepted). No/unknown/revoked key → 401.
2. **Authorize** through the meterline API's ``POST /v1/authorize`` (with the customer's key): a
   worst-case estimate (prompt size / 3 tokens, plus ``max_tokens`` / ``max_completion_tokens`` or
   the proxy's default) reserves credit. A deny is answered before the upstream is called:
   **402** ``insufficient_quota`` (insufficient credit, credit limit, budget, blocked) or **429**
   ``rate_limit_exceeded`` (the runaway guard), in the OpenAI error format with meterline's
   reason as ``error.code``. No decision in time → 503 (never "allow" by default).
3. **Forward** the body to ``<upstream>/chat/completions`` with the upstream key, streaming
   included. For a stream the proxy sets ``stream_options.include_usage`` (the usage chunk is how
   it meters; clients ignore a chunk with no choices).
4. **Meter** from the upstream's own ``usage`` with the OpenAI adapter (same normalisation as
   everywhere) and **settle**: the event carries the authorize ``request_id`` and is sent to the
   API's ``POST /v1/events`` with the customer's key; the credit agent releases the hold and debits
   the actual charge. The post is retried; an event that still cannot be recorded is logged whole
   (a JSON line ``meterline produce`` replays). An upstream error or a stream without usage
   produces no event: the hold expires after its TTL (logged).

The proxy holds no state of its own; it is safe to run several behind a load balancer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from meterline.core.errors import InvalidEvent
from meterline.core.naming import normalize_model
from meterline.integrations.decisions import deny_status
from meterline.shell.api.keys import KeyRecord, KeyStore
from schemas.adapters import OpenAIChatStream, usage_event_from_openai_chat
from schemas.jsonio import event_to_json
from schemas.models import UsageEvent

__all__ = ["DEFAULT_MAX_OUTPUT_TOKENS", "create_proxy_app", "deny_status"]

log = logging.getLogger(__name__)

DEFAULT_MAX_OUTPUT_TOKENS = 4096
SETTLE_ATTEMPTS = 5
GATEWAY = "meterline-proxy"
_HOP_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "content-encoding", "keep-alive"})


def _error(
    status: int, kind: str, message: str, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An error in the OpenAI wire format, so SDK clients raise the matching exception."""
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status, headers=headers
    )


def _estimate_input_tokens(body: dict[str, Any]) -> int:
    """A generous prompt-size estimate (no tokenizer): one token per 3 bytes of the messages JSON."""
    text = json.dumps(body.get("messages", ""), ensure_ascii=False)
    return len(text.encode("utf-8")) // 3 + 1


def create_proxy_app(
    *,
    upstream: str,
    api_url: str,
    keys: KeyStore,
    upstream_key: str | None = None,
    provider: str = "openai",
    default_max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS,
    timeout_s: float = 600.0,
) -> Starlette:
    """The proxy's ASGI app (serve it with :class:`meterline.shell.api.server.ApiServer` or uvicorn)."""
    upstream = upstream.rstrip("/")
    http = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10.0))
    api = httpx.AsyncClient(base_url=api_url.rstrip("/"), timeout=httpx.Timeout(30.0, connect=10.0))

    def customer(request: Request) -> tuple[KeyRecord | None, str | None]:
        header = request.headers.get("authorization", "")
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            return None, None
        record = keys.verify(secret.strip())
        if record is None or record.is_admin or not record.customer_id:
            return None, None
        return record, secret.strip()

    async def authorize(secret: str, record: KeyRecord, body: dict[str, Any], rid: str) -> Response | None:
        p, m, v = normalize_model(provider, str(body.get("model") or ""))
        max_out = body.get("max_completion_tokens") or body.get("max_tokens") or default_max_output_tokens
        doc = {
            "customer_id": record.customer_id,
            "request_id": rid,
            "provider": p,
            "model": m,
            "model_version": v,
            "api_key_id": record.key_id,
            "input_tokens_estimate": _estimate_input_tokens(body),
            "max_output_tokens": int(max_out) if isinstance(max_out, int) else default_max_output_tokens,
        }
        try:
            r = await api.post("/v1/authorize", json=doc, headers={"Authorization": f"Bearer {secret}"})
        except httpx.HTTPError as exc:
            log.warning("proxy: authorize failed for %s: %s", record.customer_id, exc)
            return _error(
                503,
                "service_unavailable",
                "meterline is unreachable; the request was not authorized",
                "authorize_unavailable",
                {"Retry-After": "1"},
            )
        if r.status_code != 200:
            try:
                err = r.json().get("error", {})
            except ValueError:
                err = {}
            status = r.status_code if r.status_code in (400, 401, 403) else 503
            return _error(
                status,
                "invalid_request_error" if status == 400 else "service_unavailable",
                f"meterline did not authorize the request: {err.get('message') or r.text[:200]}",
                err.get("code") or "authorize_failed",
            )
        reply = r.json()
        if reply.get("decision") == "allow":
            return None
        reason = reply.get("reason") or "denied"
        status, kind = deny_status(reason)
        log.info("proxy: deny customer_id=%s request_id=%s reason=%s", record.customer_id, rid, reason)
        return _error(
            status,
            kind,
            f"meterline refused the request for customer {record.customer_id}: {reason} "
            f"(available {reply.get('available')}, this request may cost up to {reply.get('estimate')})",
            reason,
        )

    async def settle(secret: str, event: UsageEvent) -> None:
        """Post the event; retried (the event id makes a re-send harmless). If it still fails, the
        event is logged whole, as a canonical JSON line for ``meterline produce``: never dropped silently."""
        doc = event_to_json(event)
        problem: object = None
        for attempt in range(SETTLE_ATTEMPTS):
            try:
                r = await api.post("/v1/events", json={"events": [doc]}, headers={"Authorization": f"Bearer {secret}"})
                if r.status_code == 200:
                    return
                problem = (r.status_code, r.text[:300])
                if r.status_code < 500:
                    break  # refused: retrying cannot help
            except httpx.HTTPError as exc:
                problem = exc
            await asyncio.sleep(0.5 * (attempt + 1))
        log.error(
            "proxy: usage event %s NOT recorded (%s); replay it with `meterline produce`: %s",
            event.event_id,
            problem,
            json.dumps(doc, default=str),
        )

    def meter(record: KeyRecord, rid: str, source: Any, stream: OpenAIChatStream | None = None) -> UsageEvent | None:
        ctx: dict[str, Any] = {
            "customer_id": record.customer_id,
            "request_id": rid,
            "api_key_id": record.key_id,
            "gateway": GATEWAY,
        }
        try:
            if stream is not None:
                return stream.event(**ctx)
            return usage_event_from_openai_chat(source, provider=provider, **ctx)
        except InvalidEvent as exc:
            log.error(
                "proxy: cannot meter request %s of %s (%s: %s); its hold will expire",
                rid,
                record.customer_id,
                exc.reason_code,
                exc.message,
            )
            return None

    def upstream_headers() -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if upstream_key:
            h["Authorization"] = f"Bearer {upstream_key}"
        return h

    async def chat_completions(request: Request) -> Response:
        record, secret = customer(request)
        if record is None or secret is None:
            return _error(401, "invalid_request_error", "a meterline customer API key is required", "invalid_api_key")
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _error(400, "invalid_request_error", "the body is not JSON", "invalid_json")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return _error(400, "invalid_request_error", "the body must be a JSON object with a model", "invalid_body")
        rid = f"proxy_{uuid.uuid4().hex}"
        denied = await authorize(secret, record, body, rid)
        if denied is not None:
            return denied
        if body.get("stream"):
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
            return await forward_stream(record, secret, rid, body)
        try:
            r = await http.post(f"{upstream}/chat/completions", json=body, headers=upstream_headers())
        except httpx.HTTPError as exc:
            return _error(502, "api_error", f"upstream unreachable: {exc}", "upstream_unreachable")
        headers = {k: v for k, v in r.headers.items() if k.lower() not in _HOP_HEADERS}
        if r.status_code == 200:
            try:
                payload = r.json()
            except ValueError:
                payload = None
            event = meter(record, rid, payload) if payload is not None else None
            if event is not None:
                await settle(secret, event)
        return Response(r.content, status_code=r.status_code, headers=headers)

    async def forward_stream(record: KeyRecord, secret: str, rid: str, body: dict[str, Any]) -> Response:
        req = http.build_request("POST", f"{upstream}/chat/completions", json=body, headers=upstream_headers())
        try:
            r = await http.send(req, stream=True)
        except httpx.HTTPError as exc:
            return _error(502, "api_error", f"upstream unreachable: {exc}", "upstream_unreachable")
        if r.status_code != 200:
            content = await r.aread()
            await r.aclose()
            headers = {k: v for k, v in r.headers.items() if k.lower() not in _HOP_HEADERS}
            return Response(content, status_code=r.status_code, headers=headers)
        acc = OpenAIChatStream(provider=provider)

        async def relay() -> AsyncIterator[bytes]:
            buf = b""
            try:
                async for chunk in r.aiter_raw():
                    yield chunk
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        line = line.strip()
                        if line.startswith(b"data:"):
                            data = line[5:].strip()
                            if data and data != b"[DONE]":
                                try:
                                    acc.add(data)
                                except InvalidEvent:
                                    log.warning("proxy: unreadable stream chunk for request %s", rid)
            finally:
                await r.aclose()
                event = meter(record, rid, None, stream=acc)
                if event is not None:
                    await settle(secret, event)

        return StreamingResponse(
            relay(), status_code=200, media_type=r.headers.get("content-type", "text/event-stream")
        )

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "ok", "service": "meterline-proxy", "upstream": upstream})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )
