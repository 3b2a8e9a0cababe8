"""Google Gemini (Gemini API and Vertex AI ``generateContent``) usage → :class:`UsageEvent`.

``usageMetadata`` normalisation:

- ``promptTokenCount`` INCLUDES ``cachedContentTokenCount``: ``input = prompt - cached``, plus
  ``toolUsePromptTokenCount`` (tool-use prompts are billed as input);
- ``cached_input = cachedContentTokenCount``;
- ``candidatesTokenCount`` EXCLUDES thinking: ``output = candidates``,
  ``reasoning = thoughtsTokenCount``.

Gemini bills context-cache storage separately (per hour), not per request: ``cache_write`` is 0.
The response has no ``model`` field, only ``modelVersion``; pass ``model=`` to record the name you
requested, else ``modelVersion`` is used for both.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from meterline.errors import InvalidEvent
from schemas.adapters._common import (
    MISSING_FIELD,
    MISSING_USAGE,
    build_event,
    count,
    get_mapping,
    optional_str,
    rfc3339,
    subtract,
)
from schemas.models import UsageEvent

__all__ = ["GeminiStream", "usage_event_from_gemini"]


def usage_event_from_gemini(
    response: Mapping[str, Any],
    *,
    customer_id: str,
    event_id: str | None = None,
    occurred_at: datetime | None = None,
    model: str | None = None,
    provider: str = "gemini",
    **context: Any,
) -> UsageEvent:
    """Event for one ``GenerateContentResponse`` (REST JSON, camelCase keys)."""
    where = "gemini"
    usage = get_mapping(response, "usageMetadata", where=where, required=True)
    assert usage is not None
    version = optional_str(response, "modelVersion")
    name = model or version
    if not name:
        raise InvalidEvent(f"{where}: response has no modelVersion; pass model=", reason_code=MISSING_FIELD,
                           field="model")
    prompt = count(usage, "promptTokenCount", where=where, required=True)
    cached = count(usage, "cachedContentTokenCount", where=where)
    tool_prompt = count(usage, "toolUsePromptTokenCount", where=where)
    candidates = count(usage, "candidatesTokenCount", where=where)
    thoughts = count(usage, "thoughtsTokenCount", where=where)
    return build_event(
        source="gemini",
        provider=provider,
        model=name,
        response_id=optional_str(response, "responseId"),
        customer_id=customer_id,
        event_id=event_id,
        occurred_at=occurred_at,
        created=rfc3339(response.get("createTime"), where=where, field="createTime"),
        model_version=version,
        input_tokens=subtract(prompt, cached, total_name="promptTokenCount",
                              part_name="cachedContentTokenCount", where=where) + tool_prompt,
        cached_input_tokens=cached,
        output_tokens=candidates,
        reasoning_tokens=thoughts,
        context=context,
    )


class GeminiStream:
    """Accumulates ``streamGenerateContent`` chunks; each chunk's ``usageMetadata`` is cumulative,
    so the last one seen wins. No usage at all → ``missing_usage`` from :meth:`event`."""

    def __init__(self, *, provider: str = "gemini") -> None:
        self._provider = provider
        self._last: Mapping[str, Any] | None = None
        self._ident: dict[str, Any] = {}
        self.chunks = 0

    def add(self, chunk: Mapping[str, Any]) -> None:
        self.chunks += 1
        for key in ("responseId", "modelVersion", "createTime"):
            if chunk.get(key) is not None and key not in self._ident:
                self._ident[key] = chunk[key]
        if chunk.get("usageMetadata") is not None:
            self._last = chunk

    def extend(self, chunks: Iterable[Mapping[str, Any]]) -> None:
        for chunk in chunks:
            self.add(chunk)

    def event(self, *, customer_id: str, event_id: str | None = None, occurred_at: datetime | None = None,
              model: str | None = None, **context: Any) -> UsageEvent:
        if self._last is None:
            raise InvalidEvent(f"gemini stream: no usageMetadata after {self.chunks} chunk(s)",
                               reason_code=MISSING_USAGE, field="usageMetadata")
        merged = {**self._ident, "usageMetadata": self._last["usageMetadata"]}
        return usage_event_from_gemini(merged, customer_id=customer_id, event_id=event_id,
                                       occurred_at=occurred_at, model=model, provider=self._provider, **context)
