"""Anthropic Messages usage → :class:`UsageEvent`, plus a streaming accumulator.

Anthropic's classes are already disjoint: ``input_tokens`` EXCLUDES cache reads and writes, so
``input = input_tokens``, ``cached_input = cache_read_input_tokens``,
``cache_write = cache_creation_input_tokens``, ``output = output_tokens``. Extended-thinking tokens
are billed inside ``output_tokens`` and not reported separately, so ``reasoning_tokens`` stays 0
(they are priced at the output rate either way). The 5-minute / 1-hour cache-write split
(``usage.cache_creation``) is checked for consistency but folded into one class.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from meterline.errors import InvalidEvent
from schemas.adapters._common import (
    INCONSISTENT_USAGE,
    MISSING_USAGE,
    build_event,
    count,
    dated_model_version,
    get_mapping,
    optional_str,
    require_str,
)
from schemas.models import UsageEvent

__all__ = ["AnthropicMessageStream", "usage_event_from_anthropic"]


def usage_event_from_anthropic(
    response: Mapping[str, Any],
    *,
    customer_id: str,
    event_id: str | None = None,
    occurred_at: datetime | None = None,
    provider: str = "anthropic",
    **context: Any,
) -> UsageEvent:
    """Event for one Messages API response (``type: "message"``).

    The response carries no creation time: ``occurred_at`` defaults to now (UTC) unless given.
    ``provider`` may be overridden (e.g. ``"bedrock"``, ``"vertex_ai"``) when the host bills.
    """
    where = "anthropic"
    model = require_str(response, "model", where=where)
    usage = get_mapping(response, "usage", where=where, required=True)
    assert usage is not None
    inp = count(usage, "input_tokens", where=where, required=True)
    out = count(usage, "output_tokens", where=where, required=True)
    write = count(usage, "cache_creation_input_tokens", where=where)
    read = count(usage, "cache_read_input_tokens", where=where)
    split = get_mapping(usage, "cache_creation", where=where)
    if split is not None:
        by_ttl = count(split, "ephemeral_5m_input_tokens", where=where) + count(
            split, "ephemeral_1h_input_tokens", where=where
        )
        if by_ttl != write:
            raise InvalidEvent(
                f"{where}: cache_creation split ({by_ttl}) != cache_creation_input_tokens ({write})",
                reason_code=INCONSISTENT_USAGE, field="cache_creation",
            )
    return build_event(
        source="anthropic",
        provider=provider,
        model=model,
        response_id=optional_str(response, "id"),
        customer_id=customer_id,
        event_id=event_id,
        occurred_at=occurred_at,
        created=None,
        model_version=dated_model_version(model),
        input_tokens=inp,
        cached_input_tokens=read,
        cache_write_tokens=write,
        output_tokens=out,
        context=context,
    )


class AnthropicMessageStream:
    """Accumulates Messages streaming events and builds the event when the stream is done.

    ``message_start`` carries the message (id, model) and the initial usage; each
    ``message_delta`` carries CUMULATIVE usage (at least ``output_tokens``), whose fields replace
    the earlier values. Without ``message_start`` or without any ``message_delta`` usage the
    final output count is unknown: :meth:`event` raises ``InvalidEvent(reason_code="missing_usage")``.
    Not thread-safe: one instance per stream.
    """

    def __init__(self, *, provider: str = "anthropic") -> None:
        self._provider = provider
        self._message: dict[str, Any] | None = None
        self._usage: dict[str, Any] = {}
        self._delta_seen = False
        self.events = 0

    def add(self, event: Mapping[str, Any]) -> None:
        """Feed one parsed SSE event payload (``{"type": "message_start", ...}``)."""
        self.events += 1
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message")
            if isinstance(message, Mapping):
                self._message = dict(message)
                usage = message.get("usage")
                if isinstance(usage, Mapping):
                    self._usage.update(usage)
        elif kind == "message_delta":
            usage = event.get("usage")
            if isinstance(usage, Mapping):
                self._usage.update({k: v for k, v in usage.items() if v is not None})
                self._delta_seen = True

    def extend(self, events: Iterable[Mapping[str, Any]]) -> None:
        for event in events:
            self.add(event)

    def event(
        self,
        *,
        customer_id: str,
        event_id: str | None = None,
        occurred_at: datetime | None = None,
        **context: Any,
    ) -> UsageEvent:
        """The event for the whole stream; ``missing_usage`` if the final usage never arrived."""
        if self._message is None or not self._delta_seen:
            missing = "message_start" if self._message is None else "message_delta usage"
            raise InvalidEvent(
                f"anthropic stream: no {missing} after {self.events} event(s); the stream did not finish",
                reason_code=MISSING_USAGE, field="usage",
            )
        merged = dict(self._message)
        merged["usage"] = self._usage
        return usage_event_from_anthropic(
            merged, customer_id=customer_id, event_id=event_id, occurred_at=occurred_at,
            provider=self._provider, **context,
        )
