"""Anthropic Messages usage → :class:`UsageEvent`, plus a streaming accumulator.

Input: the ``anthropic`` SDK's ``Message`` / ``BetaMessage`` objects, their dicts or JSON text.

Anthropic's classes are already disjoint: ``input_tokens`` EXCLUDES cache reads and writes, so
``input = input_tokens``, ``cached_input = cache_read_input_tokens``, ``output = output_tokens``.
Cache writes are split by retention (``usage.cache_creation``): ``ephemeral_5m_input_tokens`` →
``cache_write_tokens`` (1.25× input), ``ephemeral_1h_input_tokens`` → ``cache_write_long_tokens``
(2× input); without the split every write is a 5-minute write (the API default). The split must
add up to ``cache_creation_input_tokens`` (``inconsistent_usage``).

Extended-thinking tokens are billed inside ``output_tokens`` (``output_tokens_details`` is a
read-only decomposition), so ``reasoning_tokens`` stays 0. ``server_tool_use.web_search_requests``
→ ``web_search_requests`` (web fetches have no fee). ``usage.service_tier`` (``batch``,
``priority``) → ``service_tier``. ``usage.iterations`` entries of type ``compaction`` hold tokens
that are NOT in the top-level usage (the compaction request itself): they are added to the
classes; ``message`` iterations are already summed in the top level.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from meterline.core.errors import InvalidEvent
from schemas.adapters._common import (
    INCONSISTENT_USAGE,
    INVALID_USAGE,
    MISSING_USAGE,
    as_mapping,
    build_event,
    count,
    get_mapping,
    optional_str,
    require_str,
)
from schemas.models import UsageEvent

__all__ = ["AnthropicMessageStream", "anthropic_counts", "usage_event_from_anthropic"]


def _block_counts(usage: Mapping[str, Any], *, where: str, required: bool) -> dict[str, int]:
    inp = count(usage, "input_tokens", where=where, required=required)
    out = count(usage, "output_tokens", where=where, required=required)
    write = count(usage, "cache_creation_input_tokens", where=where)
    read = count(usage, "cache_read_input_tokens", where=where)
    short, long = write, 0
    split = get_mapping(usage, "cache_creation", where=where)
    if split is not None:
        short = count(split, "ephemeral_5m_input_tokens", where=where)
        long = count(split, "ephemeral_1h_input_tokens", where=where)
        if short + long != write:
            raise InvalidEvent(
                f"{where}: cache_creation split ({short} 5m + {long} 1h) != cache_creation_input_tokens ({write})",
                reason_code=INCONSISTENT_USAGE,
                field="cache_creation",
            )
    return {
        "input_tokens": inp,
        "cached_input_tokens": read,
        "cache_write_tokens": short,
        "cache_write_long_tokens": long,
        "output_tokens": out,
    }


def anthropic_counts(usage: Mapping[str, Any], *, where: str = "anthropic") -> dict[str, int]:
    """Disjoint counts of one Messages ``usage`` block, compaction iterations included."""
    counts = _block_counts(usage, where=where, required=True)
    iterations = usage.get("iterations")
    if iterations is not None:
        if not isinstance(iterations, list):
            raise InvalidEvent(
                f"{where}: usage.iterations must be a list", reason_code=INVALID_USAGE, field="iterations"
            )
        for i, it in enumerate(iterations):
            if not isinstance(it, Mapping):
                raise InvalidEvent(
                    f"{where}: usage.iterations[{i}] must be an object", reason_code=INVALID_USAGE, field="iterations"
                )
            if it.get("type") == "compaction":
                for k, v in _block_counts(it, where=f"{where} iterations[{i}]", required=True).items():
                    counts[k] += v
    tools = get_mapping(usage, "server_tool_use", where=where)
    counts["web_search_requests"] = count(tools, "web_search_requests", where=where)
    return counts


def usage_event_from_anthropic(
    response: Any,
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
    A Message Batches result is billed at the batch tier: pass ``service_tier="batch"``.
    """
    where = "anthropic"
    response = as_mapping(response, where=where)
    model = require_str(response, "model", where=where)
    usage = get_mapping(response, "usage", where=where, required=True)
    assert usage is not None
    return build_event(
        source="anthropic",
        provider=provider,
        model=model,
        response_id=optional_str(response, "id"),
        customer_id=customer_id,
        event_id=event_id,
        occurred_at=occurred_at,
        created=None,
        model_version=None,
        service_tier=optional_str(usage, "service_tier"),
        context=context,
        counts=anthropic_counts(usage, where=where),
    )


class AnthropicMessageStream:
    """Accumulates Messages streaming events and builds the event when the stream is done.

    ``message_start`` carries the message (id, model) and the initial usage; each
    ``message_delta`` carries CUMULATIVE usage (at least ``output_tokens``), whose fields replace
    the earlier values. A delta may raise ``cache_creation_input_tokens`` without repeating the
    5m/1h split of ``message_start``: the growth goes to the retention ``message_start`` used (the
    5-minute one when it wrote nothing); if it used both, the split is ambiguous and
    :meth:`event` raises ``inconsistent_usage`` rather than guess a price. Without ``message_start`` or without any ``message_delta`` usage the
    final output count is unknown: :meth:`event` raises ``InvalidEvent(reason_code="missing_usage")``.
    Not thread-safe: one instance per stream.
    """

    def __init__(self, *, provider: str = "anthropic") -> None:
        self._provider = provider
        self._message: dict[str, Any] | None = None
        self._usage: dict[str, Any] = {}
        self._delta_seen = False
        self.events = 0

    def add(self, event: Any) -> None:
        """Feed one SSE event: the SDK's event object (``RawMessageStartEvent``...), a dict or JSON."""
        self.events += 1
        event = as_mapping(event, where="anthropic stream")
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

    def _final_usage(self) -> dict[str, Any]:
        """The cumulative usage, with a stale ``cache_creation`` split brought up to date."""
        usage = dict(self._usage)
        split = usage.get("cache_creation")
        write = usage.get("cache_creation_input_tokens")
        if not isinstance(split, Mapping) or not isinstance(write, int) or isinstance(write, bool):
            return usage
        where = "anthropic stream"
        short = count(split, "ephemeral_5m_input_tokens", where=where)
        long = count(split, "ephemeral_1h_input_tokens", where=where)
        grown = write - (short + long)
        if grown > 0:
            if short and long:
                raise InvalidEvent(
                    f"{where}: cache writes grew by {grown} after message_start but the 5m/1h split was not "
                    "updated and both retentions were used: cannot tell which rate applies",
                    reason_code=INCONSISTENT_USAGE,
                    field="cache_creation",
                )
            key = "ephemeral_1h_input_tokens" if long else "ephemeral_5m_input_tokens"
            usage["cache_creation"] = {**split, key: count(split, key, where=where) + grown}
        return usage

    def extend(self, events: Iterable[Any]) -> None:
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
                reason_code=MISSING_USAGE,
                field="usage",
            )
        merged = dict(self._message)
        merged["usage"] = self._final_usage()
        return usage_event_from_anthropic(
            merged,
            customer_id=customer_id,
            event_id=event_id,
            occurred_at=occurred_at,
            provider=self._provider,
            **context,
        )
