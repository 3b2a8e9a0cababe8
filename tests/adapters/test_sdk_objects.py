"""Adapters fed with the providers' real SDK types (openai 3.63, anthropic 2.17, google-genai 3.6).

Each case states the provider's documented count semantics in the comment and checks the
normalised (disjoint) classes, then the exact price against a price book that states every class.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from anthropic.types import (
    CacheCreation,
    Message,
    MessageDeltaUsage,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    ServerToolUsage,
    Usage,
)
from anthropic.types.beta import BetaMessage
from google.genai import types as gt
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion
from openai.types.completion_usage import CompletionTokensDetails, PromptTokensDetails
from openai.types.responses import Response

from meterline.core.errors import InvalidEvent, UnpriceableEvent
from meterline.core.pricing import PricingEngine, load_price_book
from schemas.adapters import (
    AnthropicMessageStream,
    GeminiStream,
    usage_event_from_anthropic,
    usage_event_from_gemini,
    usage_event_from_openai_chat,
    usage_event_from_openai_response,
)
from schemas.codec import event_to_record

WHEN = datetime(2026, 6, 1, tzinfo=UTC)

# Every class priced, so each test can check an exact amount (picos = per_million x 10^6 per token).
BOOK = """
currency: USD
prices:
  - provider: openai
    model: gpt-4o
    effective_from: "2024-01-01T00:00:00Z"
    per_million: {input: "2.50", output: "10.00", cached_input: "1.25", cache_write: "3.125",
                  input_audio: "40.00", output_audio: "80.00", input_image: "2.50"}
  - provider: openai
    model: gpt-4o
    service_tier: flex
    effective_from: "2024-01-01T00:00:00Z"
    per_million: {input: "1.25", output: "5.00", cached_input: "0.625", cache_write: "1.5625",
                  input_audio: "20.00", output_audio: "40.00"}
  - provider: openai
    model: o4-mini
    service_tier: priority
    effective_from: "2024-01-01T00:00:00Z"
    per_million: {input: "2.00", output: "8.00", cached_input: "0.50", cache_write: "2.50", cache_write_long: "3.00"}
    tool_fees: {web_search: "0.01"}
  - provider: anthropic
    model: claude-3-5-sonnet
    model_version: "20241022"
    effective_from: "2024-01-01T00:00:00Z"
    per_million: {input: "3.00", output: "15.00", cached_input: "0.30", cache_write: "3.75", cache_write_long: "6.00"}
    tool_fees: {web_search: "0.01"}
  - provider: anthropic
    model: claude-3-5-sonnet
    model_version: "20241022"
    service_tier: batch
    effective_from: "2024-01-01T00:00:00Z"
    per_million: {input: "1.50", output: "7.50", cached_input: "0.15", cache_write: "1.875", cache_write_long: "3.00"}
  - provider: google
    model: gemini-2.5-flash
    effective_from: "2024-01-01T00:00:00Z"
    per_million: {input: "0.30", output: "2.50", cached_input: "0.075", input_audio: "1.00", output_image: "30.00"}
"""


@pytest.fixture(scope="module")
def engine() -> PricingEngine:
    return PricingEngine.from_book(load_price_book(BOOK))


def cost(engine: PricingEngine, ev: Any) -> int:
    return engine.price(event_to_record(ev)).cost_picos


def counts(ev: Any) -> dict[str, int]:
    names = (
        "input_tokens",
        "cached_input_tokens",
        "cache_write_tokens",
        "cache_write_long_tokens",
        "input_audio_tokens",
        "input_image_tokens",
        "output_tokens",
        "reasoning_tokens",
        "output_audio_tokens",
        "output_image_tokens",
        "web_search_requests",
    )
    return {n: getattr(ev, n) for n in names if getattr(ev, n)}


# --------------------------------------------------------------------------- OpenAI


def openai_chat(**usage_over: Any) -> ChatCompletion:
    usage = dict(
        prompt_tokens=1000,
        completion_tokens=300,
        total_tokens=1300,
        prompt_tokens_details=PromptTokensDetails(
            cached_tokens=400, cache_write_tokens=100, audio_tokens=50, image_tokens=30
        ),
        completion_tokens_details=CompletionTokensDetails(
            reasoning_tokens=100, audio_tokens=20, accepted_prediction_tokens=5, rejected_prediction_tokens=7
        ),
    )
    usage.update(usage_over)
    return ChatCompletion(
        id="chatcmpl-1",
        object="chat.completion",
        created=1_780_000_000,
        model="gpt-4o-2024-08-06",
        choices=[],
        usage=CompletionUsage(**usage),
        service_tier="flex",
    )


def test_openai_chat_object_dict_and_json_give_one_event(engine: PricingEngine) -> None:
    obj = openai_chat()
    forms = [
        obj,
        obj.model_dump(),
        obj.model_dump(exclude_none=True),
        obj.model_dump_json(),
        obj.model_dump_json().encode(),
    ]
    events = [usage_event_from_openai_chat(f, customer_id="acme") for f in forms]
    assert all(e == events[0] for e in events)
    ev = events[0]
    assert (ev.provider, ev.model, ev.model_version, ev.service_tier) == ("openai", "gpt-4o", "2024-08-06", "flex")
    # prompt 1000 includes 400 cache reads, 100 cache writes, 50 audio and 30 image tokens;
    # completion 300 includes 100 reasoning and 20 audio tokens (predictions stay in output)
    assert counts(ev) == {
        "input_tokens": 420,
        "cached_input_tokens": 400,
        "cache_write_tokens": 100,
        "input_audio_tokens": 50,
        "input_image_tokens": 30,
        "output_tokens": 180,
        "reasoning_tokens": 100,
        "output_audio_tokens": 20,
    }
    # flex tier price: input 1.25, cached 0.625, write 1.5625, audio in 20, image = input (fallback),
    # output and reasoning 5.00, audio out 40 ($/M) -> picos per token = x 10^6
    expected = (
        420 * 1_250_000
        + 400 * 625_000
        + 100 * 1_562_500
        + 50 * 20_000_000
        + 30 * 1_250_000
        + 180 * 5_000_000
        + 100 * 5_000_000
        + 20 * 40_000_000
    )
    assert cost(engine, ev) == expected


def test_openai_chat_total_tokens_is_cross_checked() -> None:
    with pytest.raises(InvalidEvent) as exc:
        usage_event_from_openai_chat(openai_chat(total_tokens=1299), customer_id="acme")
    assert (exc.value.reason_code, exc.value.field) == ("inconsistent_usage", "total_tokens")


def test_openai_responses_object_splits_cache_write_ttl_and_counts_web_search(engine: PricingEngine) -> None:
    body: dict[str, Any] = {
        "id": "resp_1",
        "created_at": 1_780_000_000,
        "model": "o4-mini-2025-04-16",
        "object": "response",
        "output": [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "service_tier": "priority",
        "usage": {
            "input_tokens": 1000,
            "output_tokens": 500,
            "total_tokens": 1500,
            "input_tokens_details": {
                "cached_tokens": 200,
                "cache_write_tokens": 300,
                "cache_write_tokens_details": {"ttl_30m_tokens": 100, "ttl_12h_tokens": 200},
            },
            "output_tokens_details": {"reasoning_tokens": 300},
        },
        "tool_usage": {
            "image_gen": {
                "input_tokens": 0,
                "output_tokens": 0,
                "total_tokens": 0,
                "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
            },
            "web_search": {"num_requests": 3},
        },
    }
    ev = usage_event_from_openai_response(Response.model_validate(body), customer_id="acme")
    assert (ev.model, ev.model_version, ev.service_tier) == ("o4-mini", "2025-04-16", "priority")
    assert counts(ev) == {
        "input_tokens": 500,
        "cached_input_tokens": 200,
        "cache_write_tokens": 100,
        "cache_write_long_tokens": 200,
        "output_tokens": 200,
        "reasoning_tokens": 300,
        "web_search_requests": 3,
    }
    assert cost(engine, ev) == (
        500 * 2_000_000 + 200 * 500_000 + 100 * 2_500_000 + 200 * 3_000_000 + 500 * 8_000_000 + 3 * 10_000_000_000
    )
    # the TTL split must add up, and image-generation tool tokens are refused, not under-billed
    bad = json.loads(json.dumps(body))
    bad["usage"]["input_tokens_details"]["cache_write_tokens_details"]["ttl_12h_tokens"] = 1
    with pytest.raises(InvalidEvent, match="cache_write_tokens_details"):
        usage_event_from_openai_response(Response.model_validate(bad), customer_id="acme")
    gen = json.loads(json.dumps(body))
    gen["tool_usage"]["image_gen"].update(input_tokens=10, output_tokens=1000, total_tokens=1010)
    with pytest.raises(InvalidEvent) as exc:
        usage_event_from_openai_response(Response.model_validate(gen), customer_id="acme")
    assert exc.value.reason_code == "unsupported_usage"
    total = json.loads(json.dumps(body))
    total["usage"]["total_tokens"] = 1000
    with pytest.raises(InvalidEvent, match="total_tokens"):
        usage_event_from_openai_response(Response.model_validate(total), customer_id="acme")


# --------------------------------------------------------------------------- Anthropic


def anthropic_message(**usage: Any) -> Message:
    return Message(
        id="msg_1",
        type="message",
        role="assistant",
        content=[],
        model="claude-3-5-sonnet-20241022",
        stop_reason="end_turn",
        stop_sequence=None,
        usage=Usage(**usage),
    )


def test_anthropic_message_prices_5m_and_1h_writes_apart(engine: PricingEngine) -> None:
    msg = anthropic_message(
        input_tokens=50,
        output_tokens=400,
        cache_read_input_tokens=1000,
        cache_creation_input_tokens=3000,
        cache_creation=CacheCreation(ephemeral_5m_input_tokens=1000, ephemeral_1h_input_tokens=2000),
        server_tool_use=ServerToolUsage(web_search_requests=2, web_fetch_requests=4),
    )
    ev = usage_event_from_anthropic(msg, customer_id="acme", occurred_at=WHEN)
    assert ev == usage_event_from_anthropic(msg.model_dump_json(), customer_id="acme", occurred_at=WHEN)
    # the dated id is the model plus its version: it prices against "claude-3-5-sonnet" 20241022
    assert (ev.provider, ev.model, ev.model_version) == ("anthropic", "claude-3-5-sonnet", "20241022")
    # input_tokens EXCLUDES cache reads and writes; web fetches have no fee
    assert counts(ev) == {
        "input_tokens": 50,
        "cached_input_tokens": 1000,
        "cache_write_tokens": 1000,
        "cache_write_long_tokens": 2000,
        "output_tokens": 400,
        "web_search_requests": 2,
    }
    # 5-minute writes 1.25x input (3.75), 1-hour writes 2x input (6.00), $10 / 1000 searches
    assert cost(engine, ev) == (
        50 * 3_000_000 + 1000 * 300_000 + 1000 * 3_750_000 + 2000 * 6_000_000 + 400 * 15_000_000 + 2 * 10_000_000_000
    )


def test_anthropic_batch_tier_is_priced_at_the_batch_price(engine: PricingEngine) -> None:
    msg = anthropic_message(input_tokens=1000, output_tokens=100, service_tier="batch")
    ev = usage_event_from_anthropic(msg, customer_id="acme", occurred_at=WHEN)
    assert ev.service_tier == "batch"
    assert cost(engine, ev) == 1000 * 1_500_000 + 100 * 7_500_000
    standard = usage_event_from_anthropic(
        anthropic_message(input_tokens=1000, output_tokens=100), customer_id="acme", occurred_at=WHEN
    )
    assert cost(engine, standard) == 2 * cost(engine, ev)
    # a tier the price list lacks is dead-lettered, never billed at the standard price
    priority = usage_event_from_anthropic(
        anthropic_message(input_tokens=1000, output_tokens=100, service_tier="priority"),
        customer_id="acme",
        occurred_at=WHEN,
    )
    with pytest.raises(UnpriceableEvent) as exc:
        cost(engine, priority)
    assert exc.value.reason_code == "no_price_for_service_tier"


def test_anthropic_compaction_iterations_are_added_not_message_iterations() -> None:
    body = {
        "id": "msg_2",
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": "claude-3-5-sonnet-20241022",
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 5000,
            "output_tokens": 700,
            "cache_read_input_tokens": 0,
            "cache_creation_input_tokens": 0,
            "iterations": [
                {
                    "type": "compaction",
                    "input_tokens": 160000,
                    "output_tokens": 3000,
                    "cache_read_input_tokens": 0,
                    "cache_creation_input_tokens": 0,
                },
                {
                    "type": "message",
                    "input_tokens": 5000,
                    "output_tokens": 700,
                    "cache_read_input_tokens": 0,
                    "cache_creation_input_tokens": 0,
                },
            ],
        },
    }
    ev = usage_event_from_anthropic(BetaMessage.model_validate(body), customer_id="acme")
    # the compaction request's tokens are NOT in the top-level usage; message iterations are
    assert (ev.input_tokens, ev.output_tokens) == (165000, 3700)


def test_anthropic_stream_whose_cache_writes_grow_in_message_delta() -> None:
    start = RawMessageStartEvent(
        type="message_start",
        message=anthropic_message(
            input_tokens=20,
            output_tokens=1,
            cache_read_input_tokens=0,
            cache_creation_input_tokens=1000,
            cache_creation=CacheCreation(ephemeral_5m_input_tokens=0, ephemeral_1h_input_tokens=1000),
        ),
    )
    delta = RawMessageDeltaEvent(
        type="message_delta",
        delta={"stop_reason": "end_turn", "stop_sequence": None},
        usage=MessageDeltaUsage(
            output_tokens=250, cache_creation_input_tokens=1500, cache_read_input_tokens=0, input_tokens=20
        ),
    )
    stream = AnthropicMessageStream()
    stream.extend([start, delta])
    ev = stream.event(customer_id="acme")
    # the delta is cumulative: 1500 writes in total, all 1-hour (the only retention message_start used)
    assert counts(ev) == {"input_tokens": 20, "cache_write_long_tokens": 1500, "output_tokens": 250}
    # when message_start used both retentions the growth cannot be attributed: refused with a reason
    both = RawMessageStartEvent(
        type="message_start",
        message=anthropic_message(
            input_tokens=20,
            output_tokens=1,
            cache_creation_input_tokens=1000,
            cache_creation=CacheCreation(ephemeral_5m_input_tokens=500, ephemeral_1h_input_tokens=500),
        ),
    )
    stream = AnthropicMessageStream()
    stream.extend([both, delta])
    with pytest.raises(InvalidEvent) as exc:
        stream.event(customer_id="acme")
    assert exc.value.reason_code == "inconsistent_usage"


# --------------------------------------------------------------------------- Gemini


def gemini(total: int | None = 1130, **over: Any) -> gt.GenerateContentResponse:
    usage: dict[str, Any] = dict(
        prompt_token_count=1000,
        cached_content_token_count=200,
        candidates_token_count=100,
        thoughts_token_count=30,
        total_token_count=total,
        prompt_tokens_details=[
            gt.ModalityTokenCount(modality=gt.MediaModality.AUDIO, token_count=300),
            gt.ModalityTokenCount(modality=gt.MediaModality.TEXT, token_count=700),
        ],
        cache_tokens_details=[gt.ModalityTokenCount(modality=gt.MediaModality.TEXT, token_count=200)],
        candidates_tokens_details=[
            gt.ModalityTokenCount(modality=gt.MediaModality.IMAGE, token_count=40),
            gt.ModalityTokenCount(modality=gt.MediaModality.TEXT, token_count=60),
        ],
    )
    usage.update(over)
    return gt.GenerateContentResponse(
        response_id="g-1",
        model_version="gemini-2.5-flash",
        create_time=datetime(2026, 3, 1, tzinfo=UTC),
        usage_metadata=gt.GenerateContentResponseUsageMetadata(**usage),
    )


def test_gemini_object_model_dump_and_rest_json_read_the_same(engine: PricingEngine) -> None:
    obj = gemini()
    forms = [
        obj,
        obj.model_dump(),
        obj.model_dump(mode="json", by_alias=True),  # REST JSON: camelCase
        obj.model_dump_json(by_alias=True, exclude_none=True),
    ]
    events = [usage_event_from_gemini(f, customer_id="acme") for f in forms]
    assert all(e == events[0] for e in events)
    ev = events[0]
    # the SDK's provider name "gemini" and the price list's "google" are one provider
    assert (ev.provider, ev.model, ev.model_version) == ("google", "gemini-2.5-flash", None)
    assert ev.occurred_at == datetime(2026, 3, 1, tzinfo=UTC)
    # prompt 1000 includes 200 cached (text) and 300 audio; candidates 100 exclude 30 thoughts and hold 40 image
    assert counts(ev) == {
        "input_tokens": 500,
        "cached_input_tokens": 200,
        "input_audio_tokens": 300,
        "output_tokens": 60,
        "output_image_tokens": 40,
        "reasoning_tokens": 30,
    }
    assert cost(engine, ev) == (
        500 * 300_000 + 200 * 75_000 + 300 * 1_000_000 + 60 * 2_500_000 + 40 * 30_000_000 + 30 * 2_500_000
    )
    assert usage_event_from_gemini(obj, customer_id="acme", provider="gemini") == ev


def test_gemini_total_token_count_keeps_thoughts_from_being_counted_twice() -> None:
    # older API versions counted thoughts inside candidates: total = prompt + candidates
    old = usage_event_from_gemini(gemini(total=1100, candidates_tokens_details=None), customer_id="acme")
    assert (old.output_tokens, old.reasoning_tokens) == (70, 30)
    current = usage_event_from_gemini(gemini(total=1130, candidates_tokens_details=None), customer_id="acme")
    assert (current.output_tokens, current.reasoning_tokens) == (100, 30)
    with pytest.raises(InvalidEvent) as exc:
        usage_event_from_gemini(gemini(total=999), customer_id="acme")
    assert (exc.value.reason_code, exc.value.field) == ("inconsistent_usage", "total_token_count")


def test_gemini_stream_of_sdk_chunks() -> None:
    first = gt.GenerateContentResponse(
        response_id="g-2",
        model_version="gemini-2.5-flash",
        usage_metadata=gt.GenerateContentResponseUsageMetadata(prompt_token_count=10),
    )
    last = gt.GenerateContentResponse(
        usage_metadata=gt.GenerateContentResponseUsageMetadata(
            prompt_token_count=10, candidates_token_count=5, total_token_count=15
        )
    )
    stream = GeminiStream()
    stream.extend([first, last])
    ev = stream.event(customer_id="acme")
    assert (ev.event_id, ev.provider, ev.input_tokens, ev.output_tokens) == ("gemini:g-2", "google", 10, 5)


# --------------------------------------------------------------------------- anything else


@pytest.mark.parametrize("bad", [42, None, ["not", "an", "object"], "not json", b"[1, 2]", object(), ChatCompletion])
@pytest.mark.parametrize(
    "adapter",
    [
        usage_event_from_openai_chat,
        usage_event_from_openai_response,
        usage_event_from_anthropic,
        usage_event_from_gemini,
    ],
)
def test_anything_else_is_invalid_input_with_a_reason(adapter: Any, bad: Any) -> None:
    with pytest.raises(InvalidEvent) as exc:
        adapter(bad, customer_id="acme")
    assert exc.value.reason_code == "invalid_input"
    assert exc.value.message
