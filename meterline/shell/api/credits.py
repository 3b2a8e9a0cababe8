"""Prepaid-credit routes of the HTTP API, added with ``create_api(..., extra_routes=credit_routes(...))``.

Routes (bearer keys; a customer key acts only for its own customer, an admin key for any)
----------------------------------------------------------------------------------------
``POST /v1/authorize``                   customer/admin. Publishes an ``authorize`` command
    (``command_id = "authorize:<request_id>"``, request_id generated when absent) and waits up to
    ``authorize_timeout_s`` for the credit agent's reply to THIS customer (replies are matched on
    ``(customer_id, request_id)``: another customer's request with the same id is never this
    request's answer, docs/security.md). 200 with the reply
    ``{request_id, customer_id, decision: allow|deny, reason, hold_id, estimate, available,
    expires_at_ms}`` (a deny is a 200 too: the decision is the answer). No reply in time → 503
    ``authorize_timeout``: the request is NOT authorized (never "allow" by default); retrying with
    the same request_id is safe and returns the agent's answer if it arrived meanwhile.
``GET /v1/customers/{id}/balance``       customer/admin. The ``balance`` of the latest
    customer-status value, plus ``status``/``updated_at_ms``; for a customer on a plan also ``plan``
    and ``allowances`` (each ``id, plan, unit, included, used, remaining, reserved``). 404 ``unknown_customer``.
``GET /v1/customers/{id}/status``        customer/admin. ``{customer_id, allowed, status, reason,
    since_ms, available, updated_at_ms}`` (+ ``plan``, ``allowances`` on a plan): may this customer
    make requests now?
    Both GETs answer 503 ``status_catching_up`` until the status view has read its topic to the end.
Admin only, each answered 202 ``{command_id, type, customer_id}`` once Kafka acknowledged the command:
``POST /v1/credits/grants``  (``type`` grant|top_up), ``POST /v1/credits/void``,
``POST /v1/credits/adjust``, ``PUT /v1/customers/{id}/policy``, ``PUT /v1/customers/{id}/budgets``,
``POST /v1/customers/{id}/block``, ``POST /v1/customers/{id}/unblock``.
Bad input → 400 with ``field``; Kafka not acknowledging → 503 ``broker_unavailable``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from meterline.core.errors import InputError, TransientError
from meterline.shell.api.auth import ApiError, require_admin, require_customer, require_key
from meterline.shell.api.body import json_object
from meterline.stack.metrics import AUTHORIZE_SECONDS
from pipeline.credits.client import (
    adjust_command,
    authorize_command,
    balance_summary,
    block_command,
    budget_command,
    grant_command,
    policy_command,
    status_summary,
    void_command,
)

__all__ = ["AUTHORIZE_TIMEOUT_S", "MAX_BODY_BYTES", "credit_routes"]

log = logging.getLogger(__name__)

AUTHORIZE_TIMEOUT_S = 5.0
MAX_BODY_BYTES = 64 * 1024
_REPLY_FIELDS = ("request_id", "customer_id", "decision", "reason", "hold_id", "estimate", "available", "expires_at_ms")


class _Sender(Protocol):
    def send(self, command: dict[str, Any]) -> None: ...


class _Replies(Protocol):
    def register(self, customer_id: str, request_id: str) -> Any: ...  # concurrent.futures.Future[dict]
    def discard(self, customer_id: str, request_id: str, fut: Any) -> None: ...


class _Status(Protocol):
    @property
    def ready(self) -> bool: ...
    def get(self, customer_id: str) -> dict[str, Any] | None: ...


async def _json_body(request: Request) -> dict[str, Any]:
    return await json_object(request, MAX_BODY_BYTES)


def _build(fn: Callable[..., dict[str, Any]], *args: Any, **kw: Any) -> dict[str, Any]:
    try:
        return fn(*args, **kw)
    except InputError as exc:
        raise ApiError(400, exc.reason_code, exc.message, field=exc.field) from None


def credit_routes(
    commands: _Sender,
    replies: _Replies,
    status: _Status,
    *,
    authorize_timeout_s: float = AUTHORIZE_TIMEOUT_S,
) -> list[BaseRoute]:
    """The credit routes over a :class:`~pipeline.credits.client.CommandPublisher`, a started
    :class:`~pipeline.credits.client.ReplyWaiter` and a started
    :class:`~pipeline.credits.client.StatusView` (the caller owns and closes all three)."""

    async def publish(command: dict[str, Any]) -> None:
        try:
            await run_in_threadpool(commands.send, command)
        except TransientError as exc:
            log.warning("credits: command %s (%s) not acknowledged: %s", command["command_id"], command["type"], exc)
            raise ApiError(
                503,
                "broker_unavailable",
                f"the command was not acknowledged by Kafka; retry ({exc})",
                headers={"Retry-After": "1"},
            ) from None

    async def authorize(request: Request) -> Response:
        key = require_key(request)
        doc = await _json_body(request)
        command = _build(authorize_command, doc)
        require_customer(key, command["customer_id"])
        rid = command["request_id"]
        customer_id = command["customer_id"]
        started = time.monotonic()
        fut = replies.register(customer_id, rid)  # before publishing: the reply may come back fast
        try:
            await publish(command)
            try:
                reply = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), authorize_timeout_s)
            except TimeoutError:
                AUTHORIZE_SECONDS.labels("timeout").observe(time.monotonic() - started)
                log.warning(
                    "authorize: no reply for request_id=%s customer_id=%s within %gs",
                    rid,
                    command["customer_id"],
                    authorize_timeout_s,
                )
                raise ApiError(
                    503,
                    "authorize_timeout",
                    f"no decision from the credit service within {authorize_timeout_s:g}s; the request is NOT "
                    f"authorized. Retry with the same request_id ({rid}).",
                    headers={"Retry-After": "1"},
                ) from None
        finally:
            replies.discard(customer_id, rid, fut)
        out = {k: reply.get(k) for k in _REPLY_FIELDS}
        if out["customer_id"] != customer_id or out["request_id"] != rid:  # the waiter matches both; never trust less
            log.error(
                "authorize: reply for customer_id=%r request_id=%r handed to customer_id=%r request_id=%r",
                out["customer_id"],
                out["request_id"],
                customer_id,
                rid,
            )
            raise ApiError(
                502, "bad_reply", "the credit service sent a reply for another request; the request is NOT authorized"
            )
        if out["decision"] not in ("allow", "deny"):
            log.error("authorize: malformed reply for request_id=%s: decision=%r", rid, out["decision"])
            raise ApiError(502, "bad_reply", "the credit service sent a malformed reply; the request is NOT authorized")
        AUTHORIZE_SECONDS.labels(out["decision"]).observe(time.monotonic() - started)
        log.info(
            "authorize key_id=%s customer_id=%s request_id=%s decision=%s reason=%s",
            key.key_id,
            command["customer_id"],
            rid,
            out["decision"],
            out["reason"],
        )
        return JSONResponse(out)

    def status_value(request: Request) -> tuple[str, dict[str, Any]]:
        key = require_key(request)
        customer_id = request.path_params["customer_id"]
        require_customer(key, customer_id)
        if not status.ready:
            raise ApiError(
                503,
                "status_catching_up",
                "customer status is still being loaded; retry shortly",
                headers={"Retry-After": "1"},
            )
        value = status.get(customer_id)
        if value is None:
            raise ApiError(
                404, "unknown_customer", f"no credit status for customer {customer_id!r}", field="customer_id"
            )
        return customer_id, value

    async def get_balance(request: Request) -> Response:
        return JSONResponse(balance_summary(*status_value(request)))

    async def get_status(request: Request) -> Response:
        customer_id, value = status_value(request)
        out = status_summary(customer_id, value)
        bal = value.get("balance") if isinstance(value.get("balance"), dict) else {}
        if "allowances" in bal:  # a customer on a plan: each allowance of the current segment
            out["plan"], out["allowances"] = bal.get("plan"), bal["allowances"]
        return JSONResponse(out)

    def admin_command(build: Callable[[Request, dict[str, Any]], dict[str, Any]]) -> Callable[[Request], Any]:
        async def handler(request: Request) -> Response:
            key = require_key(request)
            require_admin(key)
            doc = await _json_body(request)
            command = build(request, doc)
            await publish(command)
            log.info(
                "credits: %s command_id=%s customer_id=%s by key_id=%s",
                command["type"],
                command["command_id"],
                command["customer_id"],
                key.key_id,
            )
            return JSONResponse(
                {"command_id": command["command_id"], "type": command["type"], "customer_id": command["customer_id"]},
                status_code=202,
            )

        return handler

    def path_customer(request: Request) -> str:
        return str(request.path_params["customer_id"])

    return [
        Route("/v1/authorize", authorize, methods=["POST"]),
        Route("/v1/customers/{customer_id}/balance", get_balance, methods=["GET"]),
        Route("/v1/customers/{customer_id}/status", get_status, methods=["GET"]),
        Route("/v1/credits/grants", admin_command(lambda r, d: _build(grant_command, d)), methods=["POST"]),
        Route("/v1/credits/void", admin_command(lambda r, d: _build(void_command, d)), methods=["POST"]),
        Route("/v1/credits/adjust", admin_command(lambda r, d: _build(adjust_command, d)), methods=["POST"]),
        Route(
            "/v1/customers/{customer_id}/policy",
            admin_command(lambda r, d: _build(policy_command, path_customer(r), d)),
            methods=["PUT"],
        ),
        Route(
            "/v1/customers/{customer_id}/budgets",
            admin_command(lambda r, d: _build(budget_command, path_customer(r), d)),
            methods=["PUT"],
        ),
        Route(
            "/v1/customers/{customer_id}/block",
            admin_command(lambda r, d: _build(block_command, path_customer(r), d, blocked=True)),
            methods=["POST"],
        ),
        Route(
            "/v1/customers/{customer_id}/unblock",
            admin_command(lambda r, d: _build(block_command, path_customer(r), d, blocked=False)),
            methods=["POST"],
        ),
    ]
