"""OpenRouter chat-completion usage → :class:`UsageEvent`.

OpenRouter returns an OpenAI-style usage block on every response (``usage`` in the body, or in
the last SSE chunk: feed chunks to :class:`schemas.adapters.openai.OpenAIChatStream`'s sibling
:class:`OpenRouterStream`). ``prompt_tokens`` is inclusive, so
``input = prompt_tokens - prompt_tokens_details.cached_tokens - prompt_tokens_details.cache_write_tokens``
and ``output = completion_tokens - completion_tokens_details.reasoning_tokens``.

The model id is ``"<provider>/<model>"`` (``anthropic/claude-3.5-sonnet``): the event gets
``provider="anthropic"``, ``model="claude-3.5-sonnet"`` and, unless the caller says otherwise,
``gateway="openrouter"``. OpenRouter's own ``usage.cost`` (credits) is ignored: meterline prices
tokens itself. Counts are read exactly as OpenAI's (:func:`~schemas.adapters.openai.openai_chat_counts`,
including ``cache_write_tokens``, audio/image details and the ``total_tokens`` check), so the same
request gives the same event through OpenRouter as through OpenAI. Variant suffixes (``:online``,
``:floor``...) are dropped by :func:`meterline.core.naming.normalize_model`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from meterline.core.errors import InvalidEvent
from schemas.adapters._common import (
    MISSING_FIELD,
    as_mapping,
    build_event,
    epoch_seconds,
    get_mapping,
    optional_str,
    require_str,
)
from schemas.adapters.openai import OpenAIChatStream, openai_chat_counts
from schemas.models import UsageEvent

__all__ = ["OpenRouterStream", "split_model", "usage_event_from_openrouter"]


def split_model(model_id: str) -> tuple[str, str]:
    """``"anthropic/claude-3.5-sonnet"`` → ``("anthropic", "claude-3.5-sonnet")``."""
    provider, sep, model = model_id.partition("/")
    if not sep or not provider or not model:
        raise InvalidEvent(
            f"openrouter: model {model_id!r} is not '<provider>/<model>'", reason_code=MISSING_FIELD, field="model"
        )
    return provider, model


def usage_event_from_openrouter(
    response: Any,
    *,
    customer_id: str,
    event_id: str | None = None,
    occurred_at: datetime | None = None,
    **context: Any,
) -> UsageEvent:
    """Event for one OpenRouter ``chat.completion`` response (or its merged stream)."""
    where = "openrouter"
    response = as_mapping(response, where=where)
    provider, model = split_model(require_str(response, "model", where=where))
    usage = get_mapping(response, "usage", where=where, required=True)
    assert usage is not None
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
        model_version=None,
        service_tier=optional_str(response, "service_tier"),
        context=context,
        counts=openai_chat_counts(usage, where=where),
    )


class OpenRouterStream(OpenAIChatStream):
    """:class:`OpenAIChatStream` for OpenRouter SSE chunks (usage arrives in the last chunk)."""

    def event(
        self, *, customer_id: str, event_id: str | None = None, occurred_at: datetime | None = None, **context: Any
    ) -> UsageEvent:
        self._require_usage("openrouter stream")
        assert self._first is not None
        merged = {**self._first, "usage": self._usage, "service_tier": self._tier}
        return usage_event_from_openrouter(
            merged, customer_id=customer_id, event_id=event_id, occurred_at=occurred_at, **context
        )
