"""LiteLLM ``StandardLoggingPayload`` (``kwargs["standard_logging_object"]`` in a LiteLLM callback,
or a proxy logging integration) → :class:`UsageEvent`.

Where the counts come from: ``metadata.usage_object`` (LiteLLM's OpenAI-style ``Usage``, with
details) when present, else the top-level ``prompt_tokens`` / ``completion_tokens``. LiteLLM's
``prompt_tokens`` is inclusive — for Anthropic it is ``input + cache_read + cache_creation`` — so:

- ``cached_input = prompt_tokens_details.cached_tokens`` (or ``cache_read_input_tokens``);
- ``cache_write = cache_creation_input_tokens`` (or ``prompt_tokens_details.cache_creation_tokens``);
- ``input = prompt_tokens - cached_input - cache_write``;
- ``reasoning = completion_tokens_details.reasoning_tokens``, ``output = completion_tokens - reasoning``.

(Old LiteLLM releases, before cache writes were folded into ``prompt_tokens``, give a smaller
input count here; use a current release.) Provider: ``custom_llm_provider``, else the prefix of
``model_map_information.model_map_key`` / ``model``. Defaults taken from the payload unless the
caller passes them: ``gateway="litellm"``, ``api_key_id`` = ``metadata.user_api_key_hash``,
``user_id`` = ``end_user``. A ``status: "failure"`` payload is not billable usage
(``reason_code="failed_request"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from meterline.errors import InvalidEvent
from schemas.adapters._common import (
    INCONSISTENT_USAGE,
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
from schemas.models import UsageEvent

__all__ = ["usage_event_from_litellm"]


def _provider_and_model(payload: Mapping[str, Any], where: str) -> tuple[str, str]:
    model = require_str(payload, "model", where=where)
    provider = optional_str(payload, "custom_llm_provider")
    if provider is None:
        info = payload.get("model_map_information")
        key = optional_str(info, "model_map_key") if isinstance(info, Mapping) else None
        for candidate in (key, model):
            if candidate and "/" in candidate:
                provider = candidate.split("/", 1)[0]
                break
    if provider is None:
        raise InvalidEvent(f"{where}: cannot tell the provider (no custom_llm_provider, no 'provider/' prefix)",
                           reason_code=MISSING_FIELD, field="custom_llm_provider")
    if model.startswith(provider + "/"):
        model = model[len(provider) + 1:]
    return provider, model


def usage_event_from_litellm(
    payload: Mapping[str, Any],
    *,
    customer_id: str,
    event_id: str | None = None,
    occurred_at: datetime | None = None,
    **context: Any,
) -> UsageEvent:
    """Event for one ``StandardLoggingPayload`` dict. ``event_id`` defaults to ``litellm:{payload.id}``."""
    where = "litellm"
    if payload.get("status") == "failure":
        raise InvalidEvent(f"{where}: payload status is 'failure': no billable usage",
                           reason_code="failed_request", field="status")
    provider, model = _provider_and_model(payload, where)
    metadata = get_mapping(payload, "metadata", where=where)
    usage = get_mapping(metadata, "usage_object", where=where) if metadata is not None else None
    top_prompt = count(payload, "prompt_tokens", where=where, required=usage is None)
    top_completion = count(payload, "completion_tokens", where=where, required=usage is None)
    if usage is not None:
        prompt = count(usage, "prompt_tokens", where=where, required=True)
        completion = count(usage, "completion_tokens", where=where, required=True)
        if ("prompt_tokens" in payload and top_prompt != prompt) or (
            "completion_tokens" in payload and top_completion != completion
        ):
            raise InvalidEvent(
                f"{where}: top-level counts ({top_prompt}/{top_completion}) disagree with "
                f"metadata.usage_object ({prompt}/{completion})",
                reason_code=INCONSISTENT_USAGE, field="usage_object",
            )
        pdet = get_mapping(usage, "prompt_tokens_details", where=where)
        cdet = get_mapping(usage, "completion_tokens_details", where=where)
        cached = count(pdet, "cached_tokens", where=where) if pdet and pdet.get("cached_tokens") is not None \
            else count(usage, "cache_read_input_tokens", where=where)
        write = count(usage, "cache_creation_input_tokens", where=where) \
            if usage.get("cache_creation_input_tokens") is not None \
            else count(pdet, "cache_creation_tokens", where=where)
        reasoning = count(cdet, "reasoning_tokens", where=where)
    else:
        prompt, completion, cached, write, reasoning = top_prompt, top_completion, 0, 0, 0

    ctx = dict(context)
    ctx.setdefault("gateway", "litellm")
    if metadata is not None and ctx.get("api_key_id") is None:
        ctx["api_key_id"] = optional_str(metadata, "user_api_key_hash")
    if ctx.get("user_id") is None:
        ctx["user_id"] = optional_str(payload, "end_user")
    return build_event(
        source="litellm",
        provider=provider,
        model=model,
        response_id=optional_str(payload, "id"),
        customer_id=customer_id,
        event_id=event_id,
        occurred_at=occurred_at,
        created=epoch_seconds(payload.get("startTime"), where=where, field="startTime"),
        model_version=dated_model_version(model),
        input_tokens=subtract(prompt, cached + write, total_name="prompt_tokens",
                              part_name="cached + cache_creation tokens", where=where),
        cached_input_tokens=cached,
        cache_write_tokens=write,
        output_tokens=subtract(completion, reasoning, total_name="completion_tokens",
                               part_name="reasoning_tokens", where=where),
        reasoning_tokens=reasoning,
        context=ctx,
    )
