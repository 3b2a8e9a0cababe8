"""OpenRouter chat-completion usage → :class:`UsageEvent`.

OpenRouter returns an OpenAI-style usage block on every response (``usage`` in the body, or in
the last SSE chunk: feed chunks to :class:`schemas.adapters.openai.OpenAIChatStream`'s sibling
:class:`OpenRouterStream`). ``prompt_tokens`` is inclusive, so
``input = prompt_tokens - prompt_tokens_details.cached_tokens - prompt_tokens_details.cache_write_tokens``
and ``output = completion_tokens - completion_tokens_details.reasoning_tokens``.

The model id is ``"<provider>/<model>"`` (``anthropic/claude-3.5-sonnet``): the event gets
``provider="anthropic"``, ``model="claude-3.5-sonnet"`` and, unless the caller says otherwise,
``gateway="openrouter"``. OpenRouter's own ``usage.cost`` (credits) is ignored: meterline prices
tokens itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from meterline.errors import InvalidEvent
from schemas.adapters._common import (
    MISSING_FIELD,
    build_event,
    count,
    dated_model_version,
    epoch_seconds,
    get_mapping,
    optional_str,
    require_str,
    subtract,
)
from schemas.adapters.openai import OpenAIChatStream
from schemas.models import UsageEvent

__all__ = ["OpenRouterStream", "split_model", "usage_event_from_openrouter"]


def split_model(model_id: str) -> tuple[str, str]:
    """``"anthropic/claude-3.5-sonnet"`` → ``("anthropic", "claude-3.5-sonnet")``."""
    provider, sep, model = model_id.partition("/")
    if not sep or not provider or not model:
        raise InvalidEvent(f"openrouter: model {model_id!r} is not '<provider>/<model>'",
                           reason_code=MISSING_FIELD, field="model")
    return provider, model


def usage_event_from_openrouter(
    response: Mapping[str, Any],
    *,
    customer_id: str,
    event_id: str | None = None,
    occurred_at: datetime | None = None,
    **context: Any,
) -> UsageEvent:
    """Event for one OpenRouter ``chat.completion`` response (or its merged stream)."""
    where = "openrouter"
    provider, model = split_model(require_str(response, "model", where=where))
    usage = get_mapping(response, "usage", where=where, required=True)
    assert usage is not None
    prompt = count(usage, "prompt_tokens", where=where, required=True)
    completion = count(usage, "completion_tokens", where=where, required=True)
    details = get_mapping(usage, "prompt_tokens_details", where=where)
    cached = count(details, "cached_tokens", where=where)
    write = count(details, "cache_write_tokens", where=where)
    reasoning = count(get_mapping(usage, "completion_tokens_details", where=where), "reasoning_tokens", where=where)
    context.setdefault("gateway", "openrouter")
    return build_event(
        source="openrouter",
        provider=provider,
        model=model,
        response_id=optional_str(response, "id"),
        customer_id=customer_id,
        event_id=event_id,
        occurred_at=occurred_at,
        created=epoch_seconds(response.get("created"), where=where, field="created"),
        model_version=dated_model_version(model),
        input_tokens=subtract(prompt, cached + write, total_name="prompt_tokens",
                              part_name="cached_tokens + cache_write_tokens", where=where),
        cached_input_tokens=cached,
        cache_write_tokens=write,
        output_tokens=subtract(completion, reasoning, total_name="completion_tokens",
                               part_name="reasoning_tokens", where=where),
        reasoning_tokens=reasoning,
        context=context,
    )


class OpenRouterStream(OpenAIChatStream):
    """:class:`OpenAIChatStream` for OpenRouter SSE chunks (usage arrives in the last chunk)."""

    def event(self, *, customer_id: str, event_id: str | None = None, occurred_at: datetime | None = None,
              **context: Any) -> UsageEvent:
        self._require_usage("openrouter stream")
        assert self._first is not None
        merged = {**self._first, "usage": self._usage}
        return usage_event_from_openrouter(merged, customer_id=customer_id, event_id=event_id,
                                           occurred_at=occurred_at, **context)
