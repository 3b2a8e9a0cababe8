"""Google Gemini (Gemini API and Vertex AI ``generateContent``) usage → :class:`UsageEvent`.

Input: the ``google-genai`` SDK's ``GenerateContentResponse``, its ``.model_dump()`` (snake_case)
or the REST JSON (camelCase), or JSON text: all read the same.

``usage_metadata`` normalisation:

- ``prompt_token_count`` INCLUDES ``cached_content_token_count``: ``cached_input = cached``;
  ``tool_use_prompt_token_count`` (tool-use prompts) is billed as input;
- ``prompt_tokens_details`` by modality: AUDIO → ``input_audio_tokens``, IMAGE →
  ``input_image_tokens`` (each minus its cached part in ``cache_tokens_details``); the rest is
  ``input``;
- ``candidates_token_count`` EXCLUDES thinking in the current API: ``reasoning =
  thoughts_token_count``; ``candidates_tokens_details`` IMAGE / AUDIO → ``output_image_tokens`` /
  ``output_audio_tokens``, the rest is ``output``.
- ``total_token_count`` is checked so thoughts are never counted twice: it must equal
  prompt + tool-use prompt + candidates + thoughts. Older API versions counted thoughts inside
  ``candidates_token_count``; a total equal to prompt + tool-use prompt + candidates is read that
  way (``output = candidates - thoughts``). Any other total is ``inconsistent_usage``.

Gemini bills context-cache storage separately (per hour), not per request: ``cache_write`` is 0.
The response has no ``model`` field, only ``model_version``; pass ``model=`` to record the name you
requested, else ``model_version`` is used (normalised: ``gemini-1.5-pro-002`` → model
``gemini-1.5-pro``, version ``002``). The provider is ``google`` (``gemini`` is an alias of it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from enum import Enum
from typing import Any

from meterline.core.errors import InvalidEvent
from meterline.core.naming import normalize_model
from schemas.adapters._common import (
    INCONSISTENT_USAGE,
    INVALID_USAGE,
    MISSING_FIELD,
    MISSING_USAGE,
    as_mapping,
    build_event,
    count,
    get_mapping,
    optional_count,
    optional_str,
    rfc3339,
    subtract,
)
from schemas.models import UsageEvent

__all__ = ["GeminiStream", "gemini_counts", "usage_event_from_gemini"]


def _by_modality(usage: Mapping[str, Any], key: str, *, where: str) -> dict[str, int]:
    details = usage.get(key)
    if details is None:
        return {}
    if not isinstance(details, list):
        raise InvalidEvent(f"{where}: {key} must be a list", reason_code=INVALID_USAGE, field=key)
    out: dict[str, int] = {}
    for d in details:
        if not isinstance(d, Mapping):
            raise InvalidEvent(f"{where}: {key} entries must be objects", reason_code=INVALID_USAGE, field=key)
        raw = d.get("modality") or "MODALITY_UNSPECIFIED"
        modality = str(raw.value if isinstance(raw, Enum) else raw).upper()  # model_dump() keeps the enum
        out[modality] = out.get(modality, 0) + count(d, "token_count", where=where)
    return out


def gemini_counts(usage: Mapping[str, Any], *, where: str = "gemini") -> dict[str, int]:
    """Disjoint counts of one ``usage_metadata`` block (snake_case keys)."""
    prompt = count(usage, "prompt_token_count", where=where, required=True)
    cached = count(usage, "cached_content_token_count", where=where)
    tool_prompt = count(usage, "tool_use_prompt_token_count", where=where)
    candidates = count(usage, "candidates_token_count", where=where)
    thoughts = count(usage, "thoughts_token_count", where=where)
    total = optional_count(usage, "total_token_count", where=where)
    output = candidates
    if total is not None and total != prompt + tool_prompt + candidates + thoughts:
        if thoughts and total == prompt + tool_prompt + candidates:
            output = subtract(
                candidates, thoughts, total_name="candidates_token_count", part_name="thoughts_token_count", where=where
            )
        else:
            raise InvalidEvent(
                f"{where}: total_token_count ({total}) is neither prompt + tool-use prompt + candidates + thoughts "
                f"({prompt + tool_prompt + candidates + thoughts}) nor, for thoughts inside candidates, "
                f"prompt + tool-use prompt + candidates ({prompt + tool_prompt + candidates})",
                reason_code=INCONSISTENT_USAGE,
                field="total_token_count",
            )
    p_mod = _by_modality(usage, "prompt_tokens_details", where=where)
    c_mod = _by_modality(usage, "cache_tokens_details", where=where)
    o_mod = _by_modality(usage, "candidates_tokens_details", where=where)
    audio_in = subtract(
        p_mod.get("AUDIO", 0),
        c_mod.get("AUDIO", 0),
        total_name="prompt AUDIO tokens",
        part_name="cached AUDIO tokens",
        where=where,
    )
    image_in = subtract(
        p_mod.get("IMAGE", 0),
        c_mod.get("IMAGE", 0),
        total_name="prompt IMAGE tokens",
        part_name="cached IMAGE tokens",
        where=where,
    )
    audio_out = o_mod.get("AUDIO", 0)
    image_out = o_mod.get("IMAGE", 0)
    return {
        "input_tokens": subtract(
            prompt,
            cached + audio_in + image_in,
            total_name="prompt_token_count",
            part_name="cached_content_token_count + AUDIO + IMAGE tokens",
            where=where,
        )
        + tool_prompt,
        "cached_input_tokens": cached,
        "input_audio_tokens": audio_in,
        "input_image_tokens": image_in,
        "output_tokens": subtract(
            output,
            audio_out + image_out,
            total_name="candidates_token_count",
            part_name="AUDIO + IMAGE candidates tokens",
            where=where,
        ),
        "output_audio_tokens": audio_out,
        "output_image_tokens": image_out,
        "reasoning_tokens": thoughts,
    }


def usage_event_from_gemini(
    response: Any,
    *,
    customer_id: str,
    event_id: str | None = None,
    occurred_at: datetime | None = None,
    model: str | None = None,
    provider: str = "google",
    **context: Any,
) -> UsageEvent:
    """Event for one ``GenerateContentResponse`` (SDK object, snake_case or camelCase dict, JSON)."""
    where = "gemini"
    response = as_mapping(response, where=where)
    usage = get_mapping(response, "usage_metadata", where=where, required=True)
    assert usage is not None
    version = optional_str(response, "model_version")
    name = model or version
    if not name:
        raise InvalidEvent(
            f"{where}: response has no modelVersion; pass model=", reason_code=MISSING_FIELD, field="model"
        )
    return build_event(
        source="gemini",
        provider=provider,
        model=name,
        response_id=optional_str(response, "response_id"),
        customer_id=customer_id,
        event_id=event_id,
        occurred_at=occurred_at,
        created=rfc3339(response.get("create_time"), where=where, field="createTime"),
        model_version=None if version is None else normalize_model(provider, version)[2],
        context=context,
        counts=gemini_counts(usage, where=where),
    )


class GeminiStream:
    """Accumulates ``streamGenerateContent`` chunks; each chunk's ``usageMetadata`` is cumulative,
    so the last one seen wins. No usage at all → ``missing_usage`` from :meth:`event`."""

    def __init__(self, *, provider: str = "google") -> None:
        self._provider = provider
        self._last: Mapping[str, Any] | None = None
        self._ident: dict[str, Any] = {}
        self.chunks = 0

    def add(self, chunk: Any) -> None:
        """Feed one chunk: the SDK's ``GenerateContentResponse``, a dict (either key style) or JSON."""
        self.chunks += 1
        chunk = as_mapping(chunk, where="gemini stream")
        for key in ("response_id", "model_version", "create_time"):
            if chunk.get(key) is not None and key not in self._ident:
                self._ident[key] = chunk[key]
        if chunk.get("usage_metadata") is not None:
            self._last = chunk

    def extend(self, chunks: Iterable[Any]) -> None:
        for chunk in chunks:
            self.add(chunk)

    def event(
        self,
        *,
        customer_id: str,
        event_id: str | None = None,
        occurred_at: datetime | None = None,
        model: str | None = None,
        **context: Any,
    ) -> UsageEvent:
        if self._last is None:
            raise InvalidEvent(
                f"gemini stream: no usageMetadata after {self.chunks} chunk(s)",
                reason_code=MISSING_USAGE,
                field="usageMetadata",
            )
        merged = {**self._ident, "usage_metadata": self._last["usage_metadata"]}
        return usage_event_from_gemini(
            merged,
            customer_id=customer_id,
            event_id=event_id,
            occurred_at=occurred_at,
            model=model,
            provider=self._provider,
            **context,
        )
