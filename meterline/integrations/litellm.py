"""A LiteLLM callback that meters every successful call into meterline, with an optional pre-call
authorization.

SDK::

    import litellm
    from meterline.integrations.litellm import MeterlineCallback

    litellm.callbacks = [MeterlineCallback(api_url="http://127.0.0.1:8787", api_key=ADMIN_KEY)]
    litellm.completion(model="openai/gpt-4o", messages=msgs, metadata={"meterline_customer_id": "acme"})

Proxy (``config.yaml``; the module must be importable by the proxy, the key and URL come from the
environment: ``METERLINE_API_URL``, ``METERLINE_API_KEY``)::

    litellm_settings:
      callbacks: meterline.integrations.litellm.proxy_handler_instance

What it does:

- **Usage**: on every success (sync and async, streaming included: LiteLLM calls it once with the
  complete stream's usage) it turns the ``StandardLoggingPayload`` into a usage event with
  :func:`schemas.adapters.usage_event_from_litellm` (same normalisation as every adapter) and
  posts it to the meterline API's ``POST /v1/events``. The event id is ``litellm:<call id>``, so a
  callback that fires twice for one call is billed once.
- **Customer**: the first of ``metadata.meterline_customer_id`` (request metadata), the proxy key's
  team id, the proxy key's user id, the end user (``user=``), else ``default_customer_id``. A call
  with no customer is logged and not metered (never billed to a made-up customer).
- **Pre-call authorization** (``authorize=True``, proxy: ``async_pre_call_hook``; SDK: call
  :meth:`MeterlineCallback.authorize_call` before the call): ``POST /v1/authorize`` reserves the
  worst case; a deny raises :class:`MeterlineDenied` (``status_code`` 402, or 429 for the runaway
  guard, which the LiteLLM proxy returns to its client) before the provider is called. The
  authorization's ``request_id`` travels in ``metadata.meterline_request_id`` and becomes the usage
  event's ``request_id``, which settles the hold.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import httpx

from meterline.core.errors import InvalidEvent
from meterline.core.naming import normalize_model
from meterline.integrations.decisions import deny_status
from schemas.adapters import usage_event_from_litellm
from schemas.jsonio import event_to_json
from schemas.models import UsageEvent

try:  # LiteLLM is what loads this module; importing meterline without it still works
    from litellm.integrations.custom_logger import CustomLogger
except ImportError:  # pragma: no cover - exercised only without litellm installed
    CustomLogger = object  # type: ignore[misc,assignment]

__all__ = ["MeterlineCallback", "MeterlineDenied", "proxy_handler_instance"]

log = logging.getLogger(__name__)

CUSTOMER_KEY = "meterline_customer_id"
REQUEST_KEY = "meterline_request_id"
DEFAULT_MAX_OUTPUT_TOKENS = 4096
SEND_ATTEMPTS = 3


class MeterlineDenied(Exception):
    """meterline refused the call. ``status_code`` (402 / 429) and ``code`` (the reason) are what the
    LiteLLM proxy answers its client with."""

    def __init__(self, message: str, *, status_code: int, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.code = code


def _metadata(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The caller's request metadata, wherever this LiteLLM path put it."""
    out: dict[str, Any] = {}
    params = kwargs.get("litellm_params") or {}
    for source in (params.get("metadata"), params.get("litellm_metadata"), kwargs.get("metadata")):
        if isinstance(source, Mapping):
            out.update({k: v for k, v in source.items() if v is not None})
    payload = kwargs.get("standard_logging_object") or {}
    requester = (payload.get("metadata") or {}).get("requester_metadata")
    if isinstance(requester, Mapping):
        out = {**requester, **out}
    return out


class MeterlineCallback(CustomLogger):
    """Meter LiteLLM calls into meterline (see the module docstring)."""

    def __init__(
        self,
        *,
        api_url: str | None = None,
        api_key: str | None = None,
        default_customer_id: str | None = None,
        authorize: bool = False,
        default_max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS,
        timeout_s: float = 30.0,
        **kwargs: Any,
    ) -> None:
        if CustomLogger is not object:
            super().__init__(**kwargs)
        self.api_url = (api_url or os.environ.get("METERLINE_API_URL") or "http://127.0.0.1:8787").rstrip("/")
        self.api_key = api_key or os.environ.get("METERLINE_API_KEY")
        self.default_customer_id = default_customer_id or os.environ.get("METERLINE_DEFAULT_CUSTOMER_ID")
        self.authorize = authorize
        self.default_max_output_tokens = default_max_output_tokens
        self.timeout_s = timeout_s
        self.sent: list[UsageEvent] = []  # what this instance metered (most recent last; bounded)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ usage

    def customer_of(self, kwargs: Mapping[str, Any]) -> str | None:
        meta = _metadata(kwargs)
        payload = kwargs.get("standard_logging_object") or {}
        pmeta = payload.get("metadata") or {}
        for candidate in (
            meta.get(CUSTOMER_KEY),
            pmeta.get("user_api_key_team_id"),
            pmeta.get("user_api_key_user_id"),
            payload.get("end_user"),
            self.default_customer_id,
        ):
            if isinstance(candidate, str) and candidate:
                return candidate
        return None

    def event_for(self, kwargs: Mapping[str, Any]) -> UsageEvent | None:
        """The usage event of one successful call (None, logged, when it cannot be metered)."""
        payload = kwargs.get("standard_logging_object")
        if payload is None:
            log.error("meterline: LiteLLM gave no standard_logging_object; call not metered")
            return None
        customer = self.customer_of(kwargs)
        if customer is None:
            log.error(
                "meterline: call %s has no customer (set metadata.%s); not metered", payload.get("id"), CUSTOMER_KEY
            )
            return None
        request_id = _metadata(kwargs).get(REQUEST_KEY)
        try:
            return usage_event_from_litellm(
                payload, customer_id=customer, request_id=request_id if isinstance(request_id, str) else None
            )
        except InvalidEvent as exc:
            log.error("meterline: call %s not metered: %s (%s)", payload.get("id"), exc.message, exc.reason_code)
            return None

    def _first_time(self, event: UsageEvent) -> bool:
        with self._lock:
            if event.event_id in self._seen:
                return False
            self._seen[event.event_id] = None
            if len(self._seen) > 10_000:
                self._seen.popitem(last=False)
            return True

    def _body(self, event: UsageEvent) -> dict[str, Any]:
        return {"events": [event_to_json(event)]}

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _record(self, event: UsageEvent, response: httpx.Response | None, error: Exception | None) -> None:
        if error is not None or response is None or response.status_code != 200:
            detail = error if error is not None else (response.status_code, response.text[:300])  # type: ignore[union-attr]
            log.error(
                "meterline: usage event %s NOT recorded (%s); replay it with `meterline produce`: %s",
                event.event_id,
                detail,
                json.dumps(event_to_json(event), default=str),
            )
            with self._lock:
                self._seen.pop(event.event_id, None)  # a later report of the same call may try again
            return
        with self._lock:
            self.sent.append(event)
            del self.sent[:-1000]

    def log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        event = self.event_for(kwargs)
        if event is None or not self._first_time(event):
            return
        r: httpx.Response | None = None
        error: Exception | None = None
        for attempt in range(SEND_ATTEMPTS):  # the event id makes a re-send harmless
            try:
                r, error = (
                    httpx.post(
                        f"{self.api_url}/v1/events",
                        json=self._body(event),
                        headers=self._headers(),
                        timeout=self.timeout_s,
                    ),
                    None,
                )
                if r.status_code < 500:
                    break
            except httpx.HTTPError as exc:
                error = exc
            time.sleep(0.5 * (attempt + 1))
        self._record(event, r, error)

    async def async_log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        event = self.event_for(kwargs)
        if event is None or not self._first_time(event):
            return
        r: httpx.Response | None = None
        error: Exception | None = None
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            for attempt in range(SEND_ATTEMPTS):
                try:
                    r, error = (
                        await client.post(f"{self.api_url}/v1/events", json=self._body(event), headers=self._headers()),
                        None,
                    )
                    if r.status_code < 500:
                        break
                except httpx.HTTPError as exc:
                    error = exc
                await asyncio.sleep(0.5 * (attempt + 1))
        self._record(event, r, error)

    # ------------------------------------------------------------------ authorization

    def _authorize_doc(self, customer_id: str, model: str, messages: Any, max_tokens: Any) -> dict[str, Any]:
        provider, _, name = model.partition("/") if "/" in model else ("openai", "", model)
        p, m, v = normalize_model(provider, name)
        prompt = json.dumps(messages or "", ensure_ascii=False, default=str)
        return {
            "customer_id": customer_id,
            "request_id": f"litellm_{uuid.uuid4().hex}",
            "provider": p,
            "model": m,
            "model_version": v,
            "input_tokens_estimate": len(prompt.encode()) // 3 + 1,
            "max_output_tokens": max_tokens if isinstance(max_tokens, int) else self.default_max_output_tokens,
        }

    def _decide(self, doc: dict[str, Any], r: httpx.Response) -> str:
        if r.status_code != 200:
            raise MeterlineDenied(
                f"meterline did not authorize the call: {r.status_code} {r.text[:200]}",
                status_code=503 if r.status_code >= 500 else r.status_code,
                code="authorize_failed",
            )
        reply = r.json()
        if reply.get("decision") != "allow":
            reason = str(reply.get("reason") or "denied")
            status, _ = deny_status(reason)
            raise MeterlineDenied(
                f"meterline refused the call for customer {doc['customer_id']}: {reason}",
                status_code=status,
                code=reason,
            )
        return str(doc["request_id"])

    def authorize_call(
        self, customer_id: str, model: str, messages: Any = None, max_tokens: int | None = None
    ) -> dict[str, Any]:
        """SDK pre-call check: reserve, then pass the returned dict as the call's ``metadata``.
        Raises :class:`MeterlineDenied` when meterline refuses."""
        doc = self._authorize_doc(customer_id, model, messages, max_tokens)
        r = httpx.post(f"{self.api_url}/v1/authorize", json=doc, headers=self._headers(), timeout=self.timeout_s)
        return {CUSTOMER_KEY: customer_id, REQUEST_KEY: self._decide(doc, r)}

    async def async_pre_call_hook(
        self, user_api_key_dict: Any, cache: Any, data: dict[str, Any], call_type: Any
    ) -> dict[str, Any]:
        """LiteLLM proxy hook: authorize before the provider is called (when ``authorize`` is on)."""
        if not self.authorize:
            return data
        meta = data.setdefault("metadata", {})
        customer = (
            meta.get(CUSTOMER_KEY)
            or getattr(user_api_key_dict, "team_id", None)
            or getattr(user_api_key_dict, "user_id", None)
            or data.get("user")
            or self.default_customer_id
        )
        if not customer:
            raise MeterlineDenied("no meterline customer for this call", status_code=401, code="unknown_customer")
        doc = self._authorize_doc(
            str(customer),
            str(data.get("model") or ""),
            data.get("messages"),
            data.get("max_completion_tokens") or data.get("max_tokens"),
        )
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            r = await client.post(f"{self.api_url}/v1/authorize", json=doc, headers=self._headers())
        meta[CUSTOMER_KEY] = str(customer)
        meta[REQUEST_KEY] = self._decide(doc, r)
        return data


#: What a LiteLLM proxy ``config.yaml`` names (``callbacks: meterline.integrations.litellm.proxy_handler_instance``);
#: configured from the environment, with pre-call authorization on.
proxy_handler_instance = MeterlineCallback(authorize=True)
