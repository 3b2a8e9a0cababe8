"""The one model/provider normalisation, and adapters under arbitrary input: every input either
gives a UsageEvent or raises InvalidEvent with a reason code, never anything else."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterline.core.errors import InvalidEvent
from meterline.core.naming import normalize_model, normalize_service_tier
from schemas.adapters import (
    AnthropicMessageStream,
    GeminiStream,
    OpenAIChatStream,
    usage_event_from_anthropic,
    usage_event_from_gemini,
    usage_event_from_litellm,
    usage_event_from_openai_chat,
    usage_event_from_openai_response,
    usage_event_from_openrouter,
)


@pytest.mark.parametrize(
    ("reported", "canonical"),
    [
        (("anthropic", "claude-3-5-sonnet-20241022", None), ("anthropic", "claude-3-5-sonnet", "20241022")),
        (("anthropic", "claude-3.5-sonnet", None), ("anthropic", "claude-3-5-sonnet", None)),
        (("Anthropic", "claude-3.5-sonnet:online", None), ("anthropic", "claude-3-5-sonnet", None)),
        (("openai", "gpt-4o-2024-08-06", None), ("openai", "gpt-4o", "2024-08-06")),
        (("openai", "gpt-4o-2024-08-06", "custom"), ("openai", "gpt-4o", "custom")),  # the caller's version wins
        (("openai", "gpt-4o:floor", None), ("openai", "gpt-4o", None)),
        (("openai", "gpt-4o:free", None), ("openai", "gpt-4o:free", None)),  # a different price: kept
        (("openai", "o1", None), ("openai", "o1", None)),
        (("gemini", "models/gemini-1.5-pro-002", None), ("google", "gemini-1.5-pro", "002")),
        (("google_ai_studio", "gemini-2.5-flash", None), ("google", "gemini-2.5-flash", None)),
        (("vertex_ai", "gemini-2.0-flash-001", None), ("vertex_ai", "gemini-2.0-flash", "001")),
        (("meta-llama", "llama-3.1-405b", None), ("meta", "llama-3.1-405b", None)),
        (("mistralai", "mistral-large-2", None), ("mistral", "mistral-large-2", None)),
    ],
)
def test_normalize_model(reported: tuple[str, str, str | None], canonical: tuple[str, str, str | None]) -> None:
    assert normalize_model(*reported) == canonical
    assert normalize_model(*canonical) == canonical  # idempotent


@pytest.mark.parametrize(
    ("tier", "canonical"),
    [
        (None, None),
        ("default", None),
        ("auto", None),
        ("standard", None),
        ("flex", "flex"),
        ("BATCH", "batch"),
        ("priority", "priority"),
        ("fast", "priority"),
    ],
)
def test_normalize_service_tier(tier: str | None, canonical: str | None) -> None:
    assert normalize_service_tier(tier) == canonical


_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-5, max_value=10**13),
    st.floats(allow_nan=True),
    st.text(max_size=12),
)
_keys = st.sampled_from(
    [
        "id",
        "model",
        "usage",
        "created",
        "created_at",
        "service_tier",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "prompt_tokens_details",
        "completion_tokens_details",
        "cached_tokens",
        "cache_write_tokens",
        "audio_tokens",
        "image_tokens",
        "reasoning_tokens",
        "input_tokens",
        "output_tokens",
        "input_tokens_details",
        "output_tokens_details",
        "cache_write_tokens_details",
        "ttl_30m_tokens",
        "ttl_12h_tokens",
        "tool_usage",
        "web_search",
        "num_requests",
        "image_gen",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
        "cache_creation",
        "ephemeral_5m_input_tokens",
        "ephemeral_1h_input_tokens",
        "server_tool_use",
        "web_search_requests",
        "iterations",
        "type",
        "usageMetadata",
        "promptTokenCount",
        "candidatesTokenCount",
        "thoughtsTokenCount",
        "totalTokenCount",
        "cachedContentTokenCount",
        "promptTokensDetails",
        "modality",
        "tokenCount",
        "modelVersion",
        "responseId",
        "createTime",
        "metadata",
        "usage_object",
        "status",
        "custom_llm_provider",
        "startTime",
        "response",
        "message",
        "delta",
    ]
)
_json = st.recursive(
    _scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=8)),
    max_leaves=40,
)
_ADAPTERS = [
    usage_event_from_openai_chat,
    usage_event_from_openai_response,
    usage_event_from_anthropic,
    usage_event_from_gemini,
    usage_event_from_litellm,
    usage_event_from_openrouter,
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=st.dictionaries(_keys, _json, max_size=10), which=st.integers(min_value=0, max_value=len(_ADAPTERS) - 1))
def test_any_document_gives_an_event_or_a_reason(doc: dict[str, Any], which: int) -> None:
    try:
        _ADAPTERS[which](doc, customer_id="acme", event_id="e1")
    except InvalidEvent as exc:
        assert exc.reason_code


_VALID_CHAT = {
    "id": "chatcmpl-1",
    "model": "gpt-4o",
    "created": 1_780_000_000,
    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    path=st.lists(st.sampled_from(["usage", "prompt_tokens_details", "completion_tokens_details"]), max_size=2),
    key=_keys,
    value=_json,
)
def test_one_bad_field_in_a_valid_response_gives_an_event_or_a_reason(path: list[str], key: str, value: Any) -> None:
    doc: dict[str, Any] = {**_VALID_CHAT, "usage": dict(_VALID_CHAT["usage"])}
    target = doc
    for p in path:
        nxt = target.get(p)
        if not isinstance(nxt, dict):
            nxt = target[p] = {}
        target = nxt
    target[key] = value
    for adapter in (usage_event_from_openai_chat, usage_event_from_openrouter):
        try:
            adapter(doc, customer_id="acme", event_id="e1")
        except InvalidEvent as exc:
            assert exc.reason_code


@pytest.mark.parametrize("created", [10**13, float("inf"), float("nan"), 1e300, -1])
def test_absurd_creation_times_are_invalid_timestamp(created: float) -> None:
    with pytest.raises(InvalidEvent) as exc:
        usage_event_from_openai_chat({**_VALID_CHAT, "created": created}, customer_id="acme")
    assert exc.value.reason_code == "invalid_timestamp"


@settings(max_examples=150, deadline=None)
@given(chunks=st.lists(st.dictionaries(_keys, _json, max_size=6), max_size=5))
def test_any_stream_gives_an_event_or_a_reason(chunks: list[dict[str, Any]]) -> None:
    for stream in (OpenAIChatStream(), AnthropicMessageStream(), GeminiStream()):
        try:
            stream.extend(chunks)
            stream.event(customer_id="acme", event_id="e1")
        except InvalidEvent as exc:
            assert exc.reason_code
