from __future__ import annotations

import copy
from datetime import UTC, datetime

import pytest

from meterline.core.errors import InvalidEvent
from schemas.adapters import OpenAIChatStream, usage_event_from_openai_chat, usage_event_from_openai_response


def test_chat_completion_subtracts_cached_tokens(payload):
    ev = usage_event_from_openai_chat(
        payload("openai_chat_completion.json"),
        customer_id="cus_1",
        api_key_id="key_9",
        project="search",
        labels={"env": "prod"},
    )
    assert ev.event_id == "openai:chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG"
    assert ev.request_id == "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG"
    assert (ev.provider, ev.model, ev.model_version) == ("openai", "gpt-4o", "2024-08-06")
    assert ev.occurred_at == datetime.fromtimestamp(1741570283, tz=UTC)
    assert (ev.input_tokens, ev.cached_input_tokens, ev.cache_write_tokens) == (93, 1024, 0)
    assert (ev.output_tokens, ev.reasoning_tokens) == (46, 0)
    assert (ev.api_key_id, ev.project, ev.labels, ev.requests) == ("key_9", "search", {"env": "prod"}, 1)


def test_chat_completion_reasoning_model(payload):
    ev = usage_event_from_openai_chat(payload("openai_chat_reasoning.json"), customer_id="cus_1")
    assert (ev.input_tokens, ev.cached_input_tokens) == (2006 - 1920, 1920)
    assert (ev.output_tokens, ev.reasoning_tokens) == (1275 - 1024, 1024)
    assert ev.model_version == "2025-01-31"
    # disjoint classes add back up to the provider's total
    total = ev.input_tokens + ev.cached_input_tokens + ev.output_tokens + ev.reasoning_tokens
    assert total == payload("openai_chat_reasoning.json")["usage"]["total_tokens"]


def test_responses_api(payload):
    ev = usage_event_from_openai_response(payload("openai_response.json"), customer_id="cus_2")
    assert ev.event_id == "openai:resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41"
    assert (ev.model, ev.model_version) == ("o4-mini", "2025-04-16")
    assert (ev.input_tokens, ev.cached_input_tokens, ev.output_tokens, ev.reasoning_tokens) == (200, 128, 20, 832)
    assert ev.occurred_at == datetime.fromtimestamp(1741476777, tz=UTC)


def test_undated_model_has_no_version(payload):
    body = payload("openai_chat_completion.json")
    body["model"] = "gpt-4o"
    assert usage_event_from_openai_chat(body, customer_id="c").model_version is None


def test_explicit_event_id_and_time_win(payload):
    at = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    ev = usage_event_from_openai_chat(
        payload("openai_chat_completion.json"), customer_id="c", event_id="gw-123", occurred_at=at
    )
    assert (ev.event_id, ev.occurred_at) == ("gw-123", at)


def test_no_id_requires_event_id(payload):
    body = payload("openai_chat_completion.json")
    del body["id"]
    with pytest.raises(InvalidEvent) as exc:
        usage_event_from_openai_chat(body, customer_id="c")
    assert exc.value.reason_code == "missing_event_id"
    assert usage_event_from_openai_chat(body, customer_id="c", event_id="mine").event_id == "mine"


def test_no_created_defaults_to_now(payload):
    body = payload("openai_chat_completion.json")
    del body["created"]
    before = datetime.now(UTC)
    ev = usage_event_from_openai_chat(body, customer_id="c")
    assert before <= ev.occurred_at <= datetime.now(UTC)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b.pop("usage"), "missing_usage"),
        (lambda b: b.__setitem__("usage", None), "missing_usage"),
        (lambda b: b["usage"].pop("prompt_tokens"), "missing_usage"),
        (lambda b: b["usage"].__setitem__("completion_tokens", -1), "invalid_usage"),
        (lambda b: b["usage"].__setitem__("completion_tokens", "46"), "invalid_usage"),
        (lambda b: b["usage"].__setitem__("completion_tokens", 4.5), "invalid_usage"),
        (lambda b: b["usage"].__setitem__("completion_tokens", True), "invalid_usage"),
        (lambda b: b["usage"]["prompt_tokens_details"].__setitem__("cached_tokens", 2000), "inconsistent_usage"),
        (lambda b: b["usage"]["completion_tokens_details"].__setitem__("reasoning_tokens", 47), "inconsistent_usage"),
        (lambda b: b.pop("model"), "missing_field"),
    ],
)
def test_bad_usage_is_rejected(payload, mutate, reason):
    body = payload("openai_chat_completion.json")
    mutate(body)
    with pytest.raises(InvalidEvent) as exc:
        usage_event_from_openai_chat(body, customer_id="c")
    assert exc.value.reason_code == reason


def test_invalid_context_is_invalid_event(payload):
    with pytest.raises(InvalidEvent) as exc:
        usage_event_from_openai_chat(payload("openai_chat_completion.json"), customer_id="")
    assert (exc.value.reason_code, exc.value.field) == ("missing_customer_id", "customer_id")
    with pytest.raises(TypeError):
        usage_event_from_openai_chat(payload("openai_chat_completion.json"), customer_id="c", colour="red")


def test_stream_accumulates_final_usage_chunk(payload):
    stream = OpenAIChatStream()
    stream.extend(payload("openai_chat_stream.jsonl"))
    ev = stream.event(customer_id="cus_3", session_id="s-1")
    assert ev.event_id == "openai:chatcmpl-BQ4xXJ7fA2mLrC9dKpW3u5vT1yZ8e"
    assert (ev.model, ev.model_version) == ("gpt-4o-mini", "2024-07-18")
    assert (ev.input_tokens, ev.cached_input_tokens, ev.output_tokens, ev.reasoning_tokens) == (256, 1280, 9, 0)
    assert ev.session_id == "s-1"


def test_stream_without_usage_never_yields_zero_cost_event(payload):
    chunks = payload("openai_chat_stream.jsonl")[:-1]  # cut before the usage chunk
    stream = OpenAIChatStream()
    stream.extend(chunks)
    with pytest.raises(InvalidEvent) as exc:
        stream.event(customer_id="c")
    assert exc.value.reason_code == "missing_usage"
    with pytest.raises(InvalidEvent) as exc:
        OpenAIChatStream().event(customer_id="c")
    assert exc.value.reason_code == "missing_usage"


def test_responses_stream_uses_completed_event(payload):
    resp = payload("openai_response.json")
    stream = OpenAIChatStream()
    stream.add({"type": "response.created", "response": {**copy.deepcopy(resp), "usage": None}})
    stream.add({"type": "response.output_text.delta", "delta": "The"})
    with pytest.raises(InvalidEvent):
        stream.event(customer_id="c")
    stream.add({"type": "response.completed", "response": resp})
    ev = stream.event(customer_id="c")
    assert (ev.input_tokens, ev.cached_input_tokens, ev.output_tokens, ev.reasoning_tokens) == (200, 128, 20, 832)


def test_created_must_be_epoch_seconds(payload):
    body = payload("openai_chat_completion.json")
    body["created"] = "2025-01-01"
    with pytest.raises(InvalidEvent) as exc:
        usage_event_from_openai_chat(body, customer_id="c")
    assert (exc.value.reason_code, exc.value.field) == ("invalid_timestamp", "created")


def test_public_surface_is_pinned():
    import schemas.adapters

    assert sorted(schemas.adapters.__all__) == [
        "AnthropicMessageStream",
        "GeminiStream",
        "OpenAIChatStream",
        "OpenRouterStream",
        "usage_event_from_anthropic",
        "usage_event_from_gemini",
        "usage_event_from_litellm",
        "usage_event_from_openai_chat",
        "usage_event_from_openai_response",
        "usage_event_from_openrouter",
    ]
