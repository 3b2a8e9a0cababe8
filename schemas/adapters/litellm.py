"""LiteLLM ``StandardLoggingPayload`` (``kwargs["standard_logging_object"]`` in a LiteLLM callback,
or a proxy logging integration) → :class:`UsageEvent`.

Where the counts come from: ``metadata.usage_object`` (LiteLLM's OpenAI-style ``Usage``, with
details), else ``response.usage`` (the logged response). Without either the payload is refused
(``ambiguous_usage``): the top-level ``prompt_tokens`` is inclusive of cache reads and writes,
which cannot be told apart, and billing them at the input rate would over-bill. LiteLLM's
``prompt_tokens`` is inclusive — for Anthropic it is ``input + cache_read + cache_creation`` — so
the counts are read exactly as OpenAI's (:func:`~schemas.adapters.openai.openai_chat_counts`):

- ``cached_input = prompt_tokens_details.cached_tokens`` (or ``cache_read_input_tokens``);
- ``cache_write = prompt_tokens_details.cache_write_tokens`` (or ``cache_creation_tokens`` /
  ``cache_creation_input_tokens``), split by ``cache_creation_token_details`` into short
  (5m/30m → ``cache_write_tokens``) and long (1h/12h → ``cache_write_long_tokens``) retention;
- audio / image details go to their classes; ``server_tool_use.web_search_requests`` →
  ``web_search_requests``;
- ``input`` = prompt minus all of those; ``output = completion_tokens - reasoning - audio``;
- ``total_tokens`` is checked against prompt + completion.

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

from meterline.core.errors import InvalidEvent
from schemas.adapters._common import (
    INCONSISTENT_USAGE,
    MISSING_FIELD,
    as_mapping,
    build_event,
    count,
    epoch_seconds,
    get_mapping,
    optional_str,
    require_str,
)
from schemas.adapters.openai import openai_chat_counts
from schemas.models import UsageEvent

__all__ = ["AMBIGUOUS_USAGE", "usage_event_from_litellm"]

AMBIGUOUS_USAGE = "ambiguous_usage"


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
        raise InvalidEvent(
            f"{where}: cannot tell the provider (no custom_llm_provider, no 'provider/' prefix)",
            reason_code=MISSING_FIELD,
            field="custom_llm_provider",
        )
    if model.startswith(provider + "/"):
        model = model[len(provider) + 1 :]
    return provider, model


def _litellm_usage(usage: Mapping[str, Any], where: str) -> dict[str, int]:
    """Disjoint counts of a LiteLLM ``Usage`` (OpenAI-style, with LiteLLM's provider extras)."""
    pdet = dict(get_mapping(usage, "prompt_tokens_details", where=where) or {})
    # Cache reads/writes come under OpenAI names (details) and Anthropic names (top level of the
    # usage); when both are there they must agree.
    for detail_keys, top_key in (
        (("cached_tokens",), "cache_read_input_tokens"),
        (("cache_write_tokens", "cache_creation_tokens"), "cache_creation_input_tokens"),
    ):
        values = {k: count(pdet, k, where=where) for k in detail_keys if pdet.get(k) is not None}
        if usage.get(top_key) is not None:
            values[top_key] = count(usage, top_key, where=where)
        if len(set(values.values())) > 1:
            raise InvalidEvent(
                f"{where}: the usage object's cache counts disagree: "
                + ", ".join(f"{k}={v}" for k, v in values.items()),
                reason_code=INCONSISTENT_USAGE,
                field=top_key,
            )
        pdet[detail_keys[0]] = next(iter(values.values()), 0)
    counts = openai_chat_counts({**usage, "prompt_tokens_details": pdet}, where=where)
    write = counts["cache_write_tokens"]
    ttl = get_mapping(pdet, "cache_creation_token_details", where=where)
    if ttl is not None:
        short = count(ttl, "ephemeral_5m_input_tokens", where=where) + count(
            ttl, "ephemeral_30m_input_tokens", where=where
        )
        long = count(ttl, "ephemeral_1h_input_tokens", where=where) + count(
            ttl, "ephemeral_12h_input_tokens", where=where
        )
        if short + long != write:
            raise InvalidEvent(
                f"{where}: cache_creation_token_details ({short} short + {long} long) != cache writes ({write})",
                reason_code=INCONSISTENT_USAGE,
                field="cache_creation_token_details",
            )
        counts["cache_write_tokens"], counts["cache_write_long_tokens"] = short, long
    tools = get_mapping(usage, "server_tool_use", where=where)
    counts["web_search_requests"] = (
        count(tools, "web_search_requests", where=where)
        if tools is not None and tools.get("web_search_requests") is not None
        else count(pdet, "web_search_requests", where=where)
    )
    return counts


def usage_event_from_litellm(
    payload: Any,
    *,
    customer_id: str,
    event_id: str | None = None,
    occurred_at: datetime | None = None,
    **context: Any,
) -> UsageEvent:
    """Event for one ``StandardLoggingPayload`` (dict, JSON text or object). ``event_id`` defaults to
    ``litellm:{payload.id}``."""
    where = "litellm"
    payload = as_mapping(payload, where=where)
    if payload.get("status") == "failure":
        raise InvalidEvent(
            f"{where}: payload status is 'failure': no billable usage", reason_code="failed_request", field="status"
        )
    provider, model = _provider_and_model(payload, where)
    metadata = get_mapping(payload, "metadata", where=where)
    usage = get_mapping(metadata, "usage_object", where=where) if metadata is not None else None
    if usage is None:
        response = get_mapping(payload, "response", where=where)
        usage = get_mapping(response, "usage", where=where) if response is not None else None
    if usage is None:
        raise InvalidEvent(
            f"{where}: no metadata.usage_object and no response.usage: the top-level prompt_tokens include "
            "cache reads and writes, which cannot be told apart, so the payload cannot be billed exactly",
            reason_code=AMBIGUOUS_USAGE,
            field="usage_object",
        )
    counts = _litellm_usage(usage, where)
    prompt = count(usage, "prompt_tokens", where=where, required=True)
    completion = count(usage, "completion_tokens", where=where, required=True)
    top_prompt = count(payload, "prompt_tokens", where=where)
    top_completion = count(payload, "completion_tokens", where=where)
    if ("prompt_tokens" in payload and top_prompt != prompt) or (
        "completion_tokens" in payload and top_completion != completion
    ):
        raise InvalidEvent(
            f"{where}: top-level counts ({top_prompt}/{top_completion}) disagree with "
            f"the usage object ({prompt}/{completion})",
            reason_code=INCONSISTENT_USAGE,
            field="usage_object",
        )

    ctx = dict(context)
    ctx.setdefault("gateway", "litellm")
    if metadata is not None and ctx.get("api_key_id") is None:
        ctx["api_key_id"] = optional_str(metadata, "user_api_key_hash")
    if ctx.get("user_id") is None:
        ctx["user_id"] = optional_str(payload, "end_user")
    # The tier the provider served at: the logged response's service_tier (OpenAI), else hidden_params.
    response = payload.get("response")
    hidden = get_mapping(payload, "hidden_params", where=where)
    tier = (optional_str(response, "service_tier") if isinstance(response, Mapping) else None) or (
        optional_str(hidden, "service_tier") if hidden is not None else None
    )
    return build_event(
        source="litellm",
        provider=provider,
        model=model,
        response_id=optional_str(payload, "id"),
        customer_id=customer_id,
        event_id=event_id,
        occurred_at=occurred_at,
        created=epoch_seconds(payload.get("start_time"), where=where, field="startTime"),
        model_version=None,
        service_tier=tier,
        context=ctx,
        counts=counts,
    )
