"""The same request gives the same event whether it goes to the provider directly, through LiteLLM
(a real ``litellm.completion`` with a mock response, its real ``StandardLoggingPayload``) or
through OpenRouter: same provider/model/version, same disjoint counts, same tier, same price."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from anthropic.types import Message, Usage
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion

from meterline.core.pricing import PricingEngine, load_price_book
from schemas.adapters import (
    usage_event_from_anthropic,
    usage_event_from_litellm,
    usage_event_from_openai_chat,
    usage_event_from_openrouter,
)
from schemas.codec import event_to_record
from schemas.models import TOKEN_FIELDS, UsageEvent

WHEN = datetime(2026, 6, 1, tzinfo=UTC)
COMPARED = ("provider", "model", "model_version", "service_tier", *TOKEN_FIELDS, "web_search_requests", "requests")

BOOK = """
currency: USD
prices:
  - provider: openai
    model: gpt-4o
    effective_from: "2024-01-01T00:00:00Z"
    per_million: {input: "2.50", output: "10.00", cached_input: "1.25", cache_write: "3.125",
                  input_audio: "40.00", output_audio: "80.00"}
  - provider: anthropic
    model: claude-3-5-sonnet
    model_version: "20241022"
    effective_from: "2024-01-01T00:00:00Z"
    per_million: {input: "3.00", output: "15.00", cached_input: "0.30", cache_write: "3.75", cache_write_long: "6.00"}
"""


@pytest.fixture(scope="module")
def litellm_payload() -> Iterator[Any]:
    """``payload(model, openai_style_usage)`` -> the StandardLoggingPayload LiteLLM logs for it."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm
    from litellm.integrations.custom_logger import CustomLogger
    from litellm.types.utils import ModelResponse
    from litellm.types.utils import Usage as LiteUsage

    class Capture(CustomLogger):
        def __init__(self) -> None:
            super().__init__()
            self.payloads: list[dict[str, Any]] = []
            self.done = threading.Event()

        def log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
            # LiteLLM runs sync success callbacks on its logging thread pool
            self.payloads.append(kwargs["standard_logging_object"])
            self.done.set()

    # One instance for the module: LiteLLM copies litellm.callbacks into its handler lists once.
    capture = Capture()
    saved = litellm.callbacks
    litellm.callbacks = [capture]

    def run(model: str, usage: dict[str, Any]) -> dict[str, Any]:
        capture.payloads.clear()
        capture.done.clear()
        mock = ModelResponse(
            id="chatcmpl-lite",
            model=model.split("/", 1)[1],
            created=1_780_000_000,
            choices=[{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}],
            usage=LiteUsage(**usage),
        )
        litellm.completion(model=model, messages=[{"role": "user", "content": "hi"}], mock_response=mock)
        capture.done.wait(60)
        assert len(capture.payloads) == 1
        return capture.payloads[0]

    yield run
    litellm.callbacks = saved


def same(events: list[UsageEvent]) -> dict[str, Any]:
    first = {f: getattr(events[0], f) for f in COMPARED}
    for ev in events[1:]:
        assert {f: getattr(ev, f) for f in COMPARED} == first, ev.gateway
    engine = PricingEngine.from_book(load_price_book(BOOK))
    prices = {engine.price(event_to_record(ev)) for ev in events}
    assert len(prices) == 1
    return first


OPENAI_CASES = {
    "plain": {"prompt_tokens": 1200, "completion_tokens": 145, "total_tokens": 1345},
    "cache_read_and_write": {
        "prompt_tokens": 3194,
        "completion_tokens": 12,
        "total_tokens": 3206,
        "prompt_tokens_details": {"cached_tokens": 2900, "cache_write_tokens": 200},
    },
    "reasoning_and_audio": {
        "prompt_tokens": 1000,
        "completion_tokens": 300,
        "total_tokens": 1300,
        "prompt_tokens_details": {"cached_tokens": 400, "audio_tokens": 50},
        "completion_tokens_details": {"reasoning_tokens": 100, "audio_tokens": 20},
    },
}


@pytest.mark.parametrize("case", sorted(OPENAI_CASES))
def test_openai_request_direct_via_litellm_via_openrouter(case: str, litellm_payload: Any) -> None:
    usage = OPENAI_CASES[case]
    direct = usage_event_from_openai_chat(
        ChatCompletion(
            id="chatcmpl-1",
            object="chat.completion",
            created=1_780_000_000,
            model="gpt-4o-2024-08-06",
            choices=[],
            usage=CompletionUsage.model_validate(usage),
        ),
        customer_id="acme",
        occurred_at=WHEN,
    )
    router = usage_event_from_openrouter(
        {
            "id": "gen-1",
            "object": "chat.completion",
            "created": 1_780_000_000,
            "model": "openai/gpt-4o-2024-08-06",
            "choices": [],
            "usage": {**usage, "cost": 0.0123},
        },
        customer_id="acme",
        occurred_at=WHEN,
    )
    online = usage_event_from_openrouter(
        {"id": "gen-2", "model": "openai/gpt-4o-2024-08-06:online", "usage": usage},
        customer_id="acme",
        occurred_at=WHEN,
    )
    lite = usage_event_from_litellm(
        litellm_payload("openai/gpt-4o-2024-08-06", usage), customer_id="acme", occurred_at=WHEN
    )
    fields = same([direct, router, online, lite])
    assert (fields["provider"], fields["model"], fields["model_version"]) == ("openai", "gpt-4o", "2024-08-06")
    assert (direct.gateway, router.gateway, lite.gateway) == (None, "openrouter", "litellm")


def test_anthropic_request_direct_via_litellm_via_openrouter(litellm_payload: Any) -> None:
    direct = usage_event_from_anthropic(
        Message(
            id="msg_1",
            type="message",
            role="assistant",
            content=[],
            model="claude-3-5-sonnet-20241022",
            stop_reason="end_turn",
            stop_sequence=None,
            usage=Usage(
                input_tokens=50, output_tokens=400, cache_read_input_tokens=1000, cache_creation_input_tokens=3000
            ),
        ),
        customer_id="acme",
        occurred_at=WHEN,
    )
    # OpenAI-style gateways report the inclusive prompt: 50 + 1000 + 3000
    inclusive = {
        "prompt_tokens": 4050,
        "completion_tokens": 400,
        "total_tokens": 4450,
        "prompt_tokens_details": {"cached_tokens": 1000, "cache_write_tokens": 3000},
    }
    router = usage_event_from_openrouter(
        {"id": "gen-3", "model": "anthropic/claude-3.5-sonnet-20241022", "usage": inclusive},
        customer_id="acme",
        occurred_at=WHEN,
    )
    lite = usage_event_from_litellm(
        litellm_payload("anthropic/claude-3-5-sonnet-20241022", inclusive), customer_id="acme", occurred_at=WHEN
    )
    fields = same([direct, router, lite])
    assert (fields["model"], fields["model_version"]) == ("claude-3-5-sonnet", "20241022")
    assert (fields["input_tokens"], fields["cached_input_tokens"], fields["cache_write_tokens"]) == (50, 1000, 3000)


def test_anthropic_5m_and_1h_writes_direct_and_via_litellm(litellm_payload: Any) -> None:
    direct = usage_event_from_anthropic(
        Message(
            id="msg_2",
            type="message",
            role="assistant",
            content=[],
            model="claude-3-5-sonnet-20241022",
            stop_reason="end_turn",
            stop_sequence=None,
            usage=Usage(
                input_tokens=50,
                output_tokens=400,
                cache_read_input_tokens=1000,
                cache_creation_input_tokens=3000,
                cache_creation={"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
            ),
        ),
        customer_id="acme",
        occurred_at=WHEN,
    )
    inclusive = {
        "prompt_tokens": 4050,
        "completion_tokens": 400,
        "total_tokens": 4450,
        "prompt_tokens_details": {
            "cached_tokens": 1000,
            "cache_write_tokens": 3000,
            "cache_creation_token_details": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
        },
    }
    lite = usage_event_from_litellm(
        litellm_payload("anthropic/claude-3-5-sonnet-20241022", inclusive), customer_id="acme", occurred_at=WHEN
    )
    fields = same([direct, lite])
    assert (fields["cache_write_tokens"], fields["cache_write_long_tokens"]) == (1000, 2000)
