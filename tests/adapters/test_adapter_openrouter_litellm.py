from __future__ import annotations

from datetime import UTC, datetime

import pytest

from meterline.core.errors import InvalidEvent
from schemas.adapters import OpenRouterStream, usage_event_from_litellm, usage_event_from_openrouter


def test_openrouter_provider_from_model_prefix(payload):
    ev = usage_event_from_openrouter(payload("openrouter_chat.json"), customer_id="cus_1")
    assert ev.event_id == "openrouter:gen-1741624262-2fFXe2yqCMa4VbHlOPkK"
    assert (ev.provider, ev.model, ev.model_version, ev.gateway) == (
        "anthropic",
        "claude-3-5-sonnet",
        None,
        "openrouter",
    )  # Anthropic's own spelling
    # prompt 3194 includes 2900 cache reads and 200 cache writes
    assert (ev.input_tokens, ev.cached_input_tokens, ev.cache_write_tokens) == (94, 2900, 200)
    assert (ev.output_tokens, ev.reasoning_tokens) == (12, 0)
    assert ev.occurred_at == datetime.fromtimestamp(1741624262, tz=UTC)


def test_openrouter_reasoning(payload):
    ev = usage_event_from_openrouter(payload("openrouter_reasoning.json"), customer_id="c", gateway="edge")
    assert (ev.provider, ev.model, ev.gateway) == ("deepseek", "deepseek-r1", "edge")
    assert (ev.input_tokens, ev.output_tokens, ev.reasoning_tokens) == (18, 28, 612)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b.__setitem__("model", "claude-3.5-sonnet"), "missing_field"),
        (lambda b: b["usage"]["prompt_tokens_details"].__setitem__("cache_write_tokens", 300), "inconsistent_usage"),
        (lambda b: b.pop("usage"), "missing_usage"),
    ],
)
def test_openrouter_bad_payload(payload, mutate, reason):
    body = payload("openrouter_chat.json")
    mutate(body)
    with pytest.raises(InvalidEvent) as exc:
        usage_event_from_openrouter(body, customer_id="c")
    assert exc.value.reason_code == reason


def test_openrouter_stream(payload):
    body = payload("openrouter_chat.json")
    head = {k: body[k] for k in ("id", "model", "created", "provider")}
    stream = OpenRouterStream()
    stream.add({**head, "object": "chat.completion.chunk", "choices": [{"delta": {"content": "Paris"}}]})
    with pytest.raises(InvalidEvent) as exc:
        stream.event(customer_id="c")
    assert exc.value.reason_code == "missing_usage"
    stream.add({**head, "object": "chat.completion.chunk", "choices": [], "usage": body["usage"]})
    ev = stream.event(customer_id="c")
    assert (ev.provider, ev.input_tokens, ev.cached_input_tokens, ev.cache_write_tokens) == ("anthropic", 94, 2900, 200)


def test_litellm_anthropic_payload(payload):
    ev = usage_event_from_litellm(payload("litellm_anthropic.json"), customer_id="acme")
    assert ev.event_id == "litellm:0c1b5a6e-9f4d-4c8b-a2f1-7d3e8b9c1a42"
    assert (ev.provider, ev.model, ev.model_version) == ("anthropic", "claude-sonnet-4-5", "20250929")
    # LiteLLM's prompt_tokens = input + cache reads + cache writes
    assert (ev.input_tokens, ev.cached_input_tokens, ev.cache_write_tokens) == (50, 188086, 2048)
    assert (ev.output_tokens, ev.reasoning_tokens) == (1503, 0)
    assert ev.gateway == "litellm"
    assert ev.api_key_id == "88dc28d0f030c55ed4ab77ed8faf098196cb1c05df778539800c9f1243fe6b4b"
    assert ev.user_id == "enduser-77"
    assert ev.occurred_at == datetime.fromtimestamp(1741712400.125, tz=UTC)


def test_litellm_openai_payload_provider_from_model_map_key(payload):
    ev = usage_event_from_litellm(
        payload("litellm_openai_minimal.json"), customer_id="acme", api_key_id="k1", user_id="u1"
    )
    assert (ev.provider, ev.model, ev.model_version) == ("openai", "gpt-4o-mini", "2024-07-18")
    assert (ev.input_tokens, ev.cached_input_tokens, ev.output_tokens) == (176, 1024, 145)
    assert (ev.api_key_id, ev.user_id) == ("k1", "u1")


def test_litellm_without_usage_object_is_refused_not_over_billed(payload):
    # the top-level prompt_tokens (1200) include 1024 cache reads that cannot be told apart:
    # billing all 1200 at the input rate would over-bill, so the payload is refused with a reason
    body = payload("litellm_openai_minimal.json")
    body["metadata"].pop("usage_object")
    with pytest.raises(InvalidEvent) as exc:
        usage_event_from_litellm(body, customer_id="acme")
    assert exc.value.reason_code == "ambiguous_usage"


def test_litellm_without_usage_object_reads_the_logged_response_usage(payload):
    body = payload("litellm_openai_minimal.json")
    body["response"] = {"id": "chatcmpl-1", "usage": body["metadata"].pop("usage_object")}
    ev = usage_event_from_litellm(body, customer_id="acme")
    assert (ev.input_tokens, ev.cached_input_tokens, ev.output_tokens) == (176, 1024, 145)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b.__setitem__("status", "failure"), "failed_request"),
        (lambda b: b.__setitem__("prompt_tokens", 1), "inconsistent_usage"),
        (
            lambda b: b["metadata"]["usage_object"].__setitem__("cache_creation_input_tokens", 5000),
            "inconsistent_usage",
        ),
        (
            lambda b: (b.pop("custom_llm_provider"), b["model_map_information"].__setitem__("model_map_key", "x")),
            "missing_field",
        ),
        (lambda b: b["metadata"]["usage_object"].__setitem__("completion_tokens", None), "missing_usage"),
    ],
)
def test_litellm_bad_payload(payload, mutate, reason):
    body = payload("litellm_anthropic.json")
    mutate(body)
    with pytest.raises(InvalidEvent) as exc:
        usage_event_from_litellm(body, customer_id="c")
    assert exc.value.reason_code == reason


def test_litellm_service_tier_comes_from_the_logged_response(payload):
    body = payload("litellm_openai_minimal.json")
    body["response"] = {"id": "chatcmpl-1", "object": "chat.completion", "service_tier": "flex"}
    assert usage_event_from_litellm(body, customer_id="acme").service_tier == "flex"
    body["response"]["service_tier"] = "default"
    assert usage_event_from_litellm(body, customer_id="acme").service_tier is None
