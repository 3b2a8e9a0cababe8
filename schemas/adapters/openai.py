"""OpenAI usage → :class:`UsageEvent`: Chat Completions, the Responses API, and streamed chat.

Input: the ``openai`` SDK's ``ChatCompletion`` / ``Response`` objects, their ``.model_dump()``
dicts, or the raw JSON text (see :func:`schemas.adapters._common.as_mapping`).

Normalisation (OpenAI counts are inclusive; meterline's classes are disjoint):

- Chat: ``prompt_tokens`` includes ``prompt_tokens_details.cached_tokens`` (cache reads),
  ``cache_write_tokens`` (writes), ``audio_tokens`` and ``image_tokens``; each goes to its own class
  and ``input`` is what is left. ``completion_tokens`` includes ``reasoning_tokens`` and
  ``audio_tokens``; ``output`` is what is left (predicted-output accepted/rejected tokens are
  billed as output, so they stay there).
- Responses: the same with ``input_tokens`` / ``input_tokens_details`` (``cached_tokens``,
  ``cache_write_tokens`` split by ``cache_write_tokens_details`` into 30-minute →
  ``cache_write_tokens`` and 12-hour → ``cache_write_long_tokens``) and ``output_tokens`` /
  ``output_tokens_details.reasoning_tokens``. ``tool_usage.web_search.num_requests`` →
  ``web_search_requests``. Image-generation tool tokens (billed at the image model's rates) are
  not metered yet: a response that has them is refused (``unsupported_usage``), never under-billed.
- ``total_tokens``, when present, must equal prompt + completion (``inconsistent_usage``).
- ``service_tier`` (``flex``, ``priority``, ``batch``...) is carried to the event; ``default`` /
  ``auto`` are the standard tier.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from meterline.core.errors import InvalidEvent
from schemas.adapters._common import (
    INCONSISTENT_USAGE,
    MISSING_USAGE,
    UNSUPPORTED_USAGE,
    as_mapping,
    build_event,
    check_total,
    count,
    epoch_seconds,
    get_mapping,
    optional_count,
    optional_str,
    require_str,
    subtract,
)
from schemas.models import UsageEvent

__all__ = ["OpenAIChatStream", "openai_chat_counts", "usage_event_from_openai_chat", "usage_event_from_openai_response"]


def openai_chat_counts(usage: Mapping[str, Any], *, where: str) -> dict[str, int]:
    """Disjoint counts of an OpenAI-style chat ``usage`` block (also OpenRouter's and LiteLLM's).

    Checks ``total_tokens`` (when present) against prompt + completion.
    """
    prompt = count(usage, "prompt_tokens", where=where, required=True)
    completion = count(usage, "completion_tokens", where=where, required=True)
    check_total(
        optional_count(usage, "total_tokens", where=where),
        prompt + completion,
        total_name="total_tokens",
        parts_name="prompt_tokens + completion_tokens",
        where=where,
    )
    pdet = get_mapping(usage, "prompt_tokens_details", where=where)
    cdet = get_mapping(usage, "completion_tokens_details", where=where)
    cached = count(pdet, "cached_tokens", where=where)
    write = count(pdet, "cache_write_tokens", where=where)
    audio_in = count(pdet, "audio_tokens", where=where)
    image_in = count(pdet, "image_tokens", where=where)
    reasoning = count(cdet, "reasoning_tokens", where=where)
    audio_out = count(cdet, "audio_tokens", where=where)
    image_out = count(cdet, "image_tokens", where=where)
    return {
        "input_tokens": subtract(
            prompt,
            cached + write + audio_in + image_in,
            total_name="prompt_tokens",
            part_name="cached + cache_write + audio + image tokens",
            where=where,
        ),
        "cached_input_tokens": cached,
        "cache_write_tokens": write,
        "input_audio_tokens": audio_in,
        "input_image_tokens": image_in,
        "output_tokens": subtract(
            completion,
            reasoning + audio_out + image_out,
            total_name="completion_tokens",
            part_name="reasoning + audio + image tokens",
            where=where,
        ),
        "reasoning_tokens": reasoning,
        "output_audio_tokens": audio_out,
        "output_image_tokens": image_out,
    }


def usage_event_from_openai_chat(
    response: Any,
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
    response = as_mapping(response, where=where)
    model = require_str(response, "model", where=where)
    usage = get_mapping(response, "usage", where=where, required=True)
    assert usage is not None
    return build_event(
        source="openai",
        provider=provider,
        model=model,
        response_id=optional_str(response, "id"),
        customer_id=customer_id,
        event_id=event_id,
        occurred_at=occurred_at,
        created=epoch_seconds(response.get("created"), where=where, field="created"),
        model_version=None,
        service_tier=optional_str(response, "service_tier"),
        context=context,
        counts=openai_chat_counts(usage, where=where),
    )


def usage_event_from_openai_response(
    response: Any,
    *,
    customer_id: str,
    event_id: str | None = None,
    occurred_at: datetime | None = None,
    provider: str = "openai",
    **context: Any,
) -> UsageEvent:
    """Event for one Responses API object (``object: "response"``, e.g. from ``response.completed``)."""
    where = "openai responses"
    response = as_mapping(response, where=where)
    model = require_str(response, "model", where=where)
    usage = get_mapping(response, "usage", where=where, required=True)
    assert usage is not None
    inp = count(usage, "input_tokens", where=where, required=True)
    out = count(usage, "output_tokens", where=where, required=True)
    check_total(
        optional_count(usage, "total_tokens", where=where),
        inp + out,
        total_name="total_tokens",
        parts_name="input_tokens + output_tokens",
        where=where,
    )
    idet = get_mapping(usage, "input_tokens_details", where=where)
    cached = count(idet, "cached_tokens", where=where)
    write = count(idet, "cache_write_tokens", where=where)
    write_short, write_long = write, 0
    ttl = get_mapping(idet, "cache_write_tokens_details", where=where) if idet is not None else None
    if ttl is not None:
        write_short = count(ttl, "ttl_30m_tokens", where=where)
        write_long = count(ttl, "ttl_12h_tokens", where=where)
        if write_short + write_long != write:
            raise InvalidEvent(
                f"{where}: cache_write_tokens_details (30m {write_short} + 12h {write_long}) != "
                f"cache_write_tokens ({write})",
                reason_code=INCONSISTENT_USAGE,
                field="cache_write_tokens_details",
            )
    reasoning = count(get_mapping(usage, "output_tokens_details", where=where), "reasoning_tokens", where=where)
    web_search = 0
    tools = get_mapping(response, "tool_usage", where=where)
    if tools is not None:
        web_search = count(get_mapping(tools, "web_search", where=where), "num_requests", where=where)
        image_gen = get_mapping(tools, "image_gen", where=where)
        if (
            count(image_gen, "total_tokens", where=where)
            or count(image_gen, "input_tokens", where=where)
            or count(image_gen, "output_tokens", where=where)
        ):
            raise InvalidEvent(
                f"{where}: tool_usage.image_gen tokens are billed at the image model's rates, which meterline "
                "does not meter yet; refusing rather than under-billing",
                reason_code=UNSUPPORTED_USAGE,
                field="tool_usage.image_gen",
            )
    return build_event(
        source="openai",
        provider=provider,
        model=model,
        response_id=optional_str(response, "id"),
        customer_id=customer_id,
        event_id=event_id,
        occurred_at=occurred_at,
        created=epoch_seconds(response.get("created_at"), where=where, field="created_at"),
        model_version=None,
        input_tokens=subtract(
            inp, cached + write, total_name="input_tokens", part_name="cached_tokens + cache_write_tokens", where=where
        ),
        cached_input_tokens=cached,
        cache_write_tokens=write_short,
        cache_write_long_tokens=write_long,
        output_tokens=subtract(out, reasoning, total_name="output_tokens", part_name="reasoning_tokens", where=where),
        reasoning_tokens=reasoning,
        web_search_requests=web_search,
        service_tier=optional_str(response, "service_tier"),
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
        self._tier: str | None = None
        self.chunks = 0

    def add(self, chunk: Any) -> None:
        """Feed one chunk/event: the SDK's chunk object, its dict, or its JSON text."""
        self.chunks += 1
        chunk = as_mapping(chunk, where="openai stream")
        kind = chunk.get("type")
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            resp = chunk.get("response")
            if isinstance(resp, Mapping):
                self._response = resp
            return
        if self._first is None and chunk.get("id"):
            self._first = chunk
        if chunk.get("service_tier") is not None:
            self._tier = chunk["service_tier"]
        usage = chunk.get("usage")
        if usage is not None:
            self._usage = usage

    def extend(self, chunks: Iterable[Any]) -> None:
        for chunk in chunks:
            self.add(chunk)

    def _require_usage(self, where: str) -> None:
        if self._first is None or self._usage is None:
            raise InvalidEvent(
                f"{where}: no usage received after {self.chunks} chunk(s) "
                "(was stream_options.include_usage set? did the stream finish?)",
                reason_code=MISSING_USAGE,
                field="usage",
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
                self._response,
                customer_id=customer_id,
                event_id=event_id,
                occurred_at=occurred_at,
                provider=self._provider,
                **context,
            )
        self._require_usage("openai stream")
        assert self._first is not None
        merged = dict(self._first)
        merged["usage"] = self._usage
        merged["service_tier"] = self._tier
        return usage_event_from_openai_chat(
            merged,
            customer_id=customer_id,
            event_id=event_id,
            occurred_at=occurred_at,
            provider=self._provider,
            **context,
        )
