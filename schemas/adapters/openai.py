"""OpenAI usage → :class:`UsageEvent`: Chat Completions, the Responses API, and streamed chat.

Normalisation (OpenAI counts are inclusive; meterline's classes are disjoint):

- Chat: ``input = prompt_tokens - prompt_tokens_details.cached_tokens``,
  ``output = completion_tokens - completion_tokens_details.reasoning_tokens``.
- Responses: the same with ``input_tokens`` / ``input_tokens_details.cached_tokens`` and
  ``output_tokens`` / ``output_tokens_details.reasoning_tokens``.

OpenAI has no cache-write class (``cache_write_tokens`` stays 0). Audio / predicted-output token
details are not split out: they stay inside input / output.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from meterline.errors import InvalidEvent
from schemas.adapters._common import (
    MISSING_USAGE,
    build_event,
    count,
    dated_model_version,
    epoch_seconds,
    get_mapping,
    optional_str,
    require_str,
    subtract,
)
from schemas.models import UsageEvent

__all__ = ["OpenAIChatStream", "usage_event_from_openai_chat", "usage_event_from_openai_response"]


def usage_event_from_openai_chat(
    response: Mapping[str, Any],
    *,
    customer_id: str,
    event_id: str | None = None,
    occurred_at: datetime | None = None,
    provider: str = "openai",
    **context: Any,
) -> UsageEvent:
    """Event for one Chat Completions response (``object: "chat.completion"``).

    ``provider`` may be overridden for OpenAI-compatible hosts (e.g. ``"azure"``). Raises
    :class:`InvalidEvent` for a missing/invalid usage block, see :mod:`schemas.adapters._common`.
    """
    where = "openai chat"
    model = require_str(response, "model", where=where)
    usage = get_mapping(response, "usage", where=where, required=True)
    assert usage is not None
    prompt = count(usage, "prompt_tokens", where=where, required=True)
    completion = count(usage, "completion_tokens", where=where, required=True)
    cached = count(get_mapping(usage, "prompt_tokens_details", where=where), "cached_tokens", where=where)
    reasoning = count(get_mapping(usage, "completion_tokens_details", where=where), "reasoning_tokens", where=where)
    return build_event(
        source="openai",
        provider=provider,
        model=model,
        response_id=optional_str(response, "id"),
        customer_id=customer_id,
        event_id=event_id,
        occurred_at=occurred_at,
        created=epoch_seconds(response.get("created"), where=where, field="created"),
        model_version=dated_model_version(model),
        input_tokens=subtract(prompt, cached, total_name="prompt_tokens", part_name="cached_tokens", where=where),
        cached_input_tokens=cached,
        output_tokens=subtract(completion, reasoning, total_name="completion_tokens",
                               part_name="reasoning_tokens", where=where),
        reasoning_tokens=reasoning,
        context=context,
    )


def usage_event_from_openai_response(
    response: Mapping[str, Any],
    *,
    customer_id: str,
    event_id: str | None = None,
    occurred_at: datetime | None = None,
    provider: str = "openai",
    **context: Any,
) -> UsageEvent:
    """Event for one Responses API object (``object: "response"``, e.g. from ``response.completed``)."""
    where = "openai responses"
    model = require_str(response, "model", where=where)
    usage = get_mapping(response, "usage", where=where, required=True)
    assert usage is not None
    inp = count(usage, "input_tokens", where=where, required=True)
    out = count(usage, "output_tokens", where=where, required=True)
    cached = count(get_mapping(usage, "input_tokens_details", where=where), "cached_tokens", where=where)
    reasoning = count(get_mapping(usage, "output_tokens_details", where=where), "reasoning_tokens", where=where)
    return build_event(
        source="openai",
        provider=provider,
        model=model,
        response_id=optional_str(response, "id"),
        customer_id=customer_id,
        event_id=event_id,
        occurred_at=occurred_at,
        created=epoch_seconds(response.get("created_at"), where=where, field="created_at"),
        model_version=dated_model_version(model),
        input_tokens=subtract(inp, cached, total_name="input_tokens", part_name="cached_tokens", where=where),
        cached_input_tokens=cached,
        output_tokens=subtract(out, reasoning, total_name="output_tokens", part_name="reasoning_tokens", where=where),
        reasoning_tokens=reasoning,
        context=context,
    )


class OpenAIChatStream:
    """Accumulates streamed ``chat.completion.chunk`` objects (requested with
    ``stream_options={"include_usage": true}``) and also Responses API stream events
    (``response.completed`` / ``response.incomplete``), then builds the event at the end.

    Usage arrives only in the final chunk; a stream that ended without it (client disconnect,
    ``include_usage`` not set) raises ``InvalidEvent(reason_code="missing_usage")`` from
    :meth:`event` — never a zero-cost event. Not thread-safe: one instance per stream.
    """

    def __init__(self, *, provider: str = "openai") -> None:
        self._provider = provider
        self._first: Mapping[str, Any] | None = None
        self._usage: Mapping[str, Any] | None = None
        self._response: Mapping[str, Any] | None = None  # Responses API final object
        self.chunks = 0

    def add(self, chunk: Mapping[str, Any]) -> None:
        """Feed one parsed chunk/event (a dict, e.g. ``chunk.model_dump()``)."""
        self.chunks += 1
        kind = chunk.get("type")
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            resp = chunk.get("response")
            if isinstance(resp, Mapping):
                self._response = resp
            return
        if self._first is None and chunk.get("id"):
            self._first = chunk
        usage = chunk.get("usage")
        if usage is not None:
            self._usage = usage

    def extend(self, chunks: Iterable[Mapping[str, Any]]) -> None:
        for chunk in chunks:
            self.add(chunk)

    def _require_usage(self, where: str) -> None:
        if self._first is None or self._usage is None:
            raise InvalidEvent(
                f"{where}: no usage received after {self.chunks} chunk(s) "
                "(was stream_options.include_usage set? did the stream finish?)",
                reason_code=MISSING_USAGE, field="usage",
            )

    def event(
        self,
        *,
        customer_id: str,
        event_id: str | None = None,
        occurred_at: datetime | None = None,
        **context: Any,
    ) -> UsageEvent:
        """The event for the whole stream; ``missing_usage`` if the usage chunk never arrived."""
        if self._response is not None:
            return usage_event_from_openai_response(
                self._response, customer_id=customer_id, event_id=event_id, occurred_at=occurred_at,
                provider=self._provider, **context,
            )
        self._require_usage("openai stream")
        assert self._first is not None
        merged = dict(self._first)
        merged["usage"] = self._usage
        return usage_event_from_openai_chat(
            merged, customer_id=customer_id, event_id=event_id, occurred_at=occurred_at,
            provider=self._provider, **context,
        )
