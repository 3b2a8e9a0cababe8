"""The README's "Sending usage" example, run as written with a real ``openai`` SDK response object
against the real broker; the event read back prices against the shipped price list
(``infra/prices/seed.yaml``), dated model ids included."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from anthropic.types import Message, Usage
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion
from openai.types.completion_usage import PromptTokensDetails

from meterline.core.pricing import PricingEngine, load_price_book
from meterline.stack.kafka import read_topic
from schemas.adapters import usage_event_from_anthropic, usage_event_from_gemini
from schemas.codec import decode_usage_batch, event_to_record

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "infra" / "prices" / "seed.yaml"


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Sending usage") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    return match.group(1)


@pytest.fixture(scope="module")
def seed() -> PricingEngine:
    return PricingEngine.from_book(load_price_book(SEED))


def test_readme_example_with_a_real_sdk_response(
    kafka_bootstrap: str, topics: dict[str, str], seed: PricingEngine
) -> None:
    response = ChatCompletion(
        id="chatcmpl-readme",
        object="chat.completion",
        created=1_780_000_000,
        model="gpt-4o-2024-05-13",
        choices=[],
        usage=CompletionUsage(
            prompt_tokens=1200,
            completion_tokens=145,
            total_tokens=1345,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=1024),
        ),
    )
    code = readme_example()
    assert "usage_event_from_openai_chat(response" in code
    code = code.replace("127.0.0.1:9092", kafka_bootstrap).replace("meterline.usage-events", topics["usage-events"])
    exec(compile(code, "README.md", "exec"), {"response": response})

    (message,) = read_topic(kafka_bootstrap, topics["usage-events"])
    (record,) = decode_usage_batch(message.value())
    assert (record["customer_id"], record["project"], record["event_id"]) == (
        "acme",
        "search",
        "openai:chatcmpl-readme",
    )
    assert (record["provider"], record["model"], record["model_version"]) == ("openai", "gpt-4o", "2024-05-13")
    assert (record["input_tokens"], record["cached_input_tokens"], record["output_tokens"]) == (176, 1024, 145)
    priced = seed.price(record)
    # gpt-4o list: $5 input, $2.50 cached, $15 output per million; acme has a 20 % markup
    assert priced.cost_picos == 176 * 5_000_000 + 1024 * 2_500_000 + 145 * 15_000_000
    assert priced.charge_picos == 176 * 6_000_000 + 1024 * 3_000_000 + 145 * 18_000_000


def test_dated_and_aliased_ids_price_against_the_shipped_list(seed: PricingEngine) -> None:
    when = datetime(2026, 6, 1, tzinfo=UTC)
    claude = usage_event_from_anthropic(
        Message(
            id="msg_1",
            type="message",
            role="assistant",
            content=[],
            model="claude-3-5-sonnet-20241022",
            stop_reason="end_turn",
            stop_sequence=None,
            usage=Usage(input_tokens=1000, output_tokens=100),
        ),
        customer_id="zeta",
        occurred_at=when,
    )
    priced = seed.price(event_to_record(claude))
    assert priced.cost_picos == 1000 * 3_000_000 + 100 * 15_000_000
    assert priced.price_version.startswith("anthropic/claude-3-5-sonnet:20241022@")
    # the Gemini SDK's provider "gemini" and a stable-version model id resolve to google/gemini-1.5-pro
    gemini = usage_event_from_gemini(
        {
            "responseId": "g1",
            "modelVersion": "gemini-1.5-pro-002",
            "usageMetadata": {"promptTokenCount": 100, "candidatesTokenCount": 10, "totalTokenCount": 110},
        },
        customer_id="zeta",
        occurred_at=when,
        provider="gemini",
    )
    assert seed.price(event_to_record(gemini)).price_version.startswith("google/gemini-1.5-pro@")
    # the price lookup normalises too: a record written by an older gateway with the raw names prices
    raw = {**event_to_record(claude), "model": "claude-3-5-sonnet-20241022", "model_version": None}
    assert seed.price(raw).cost_picos == priced.cost_picos
    # and a model that really is unknown stays unknown_model
    from meterline.core.errors import UnpriceableEvent

    with pytest.raises(UnpriceableEvent) as exc:
        seed.price({**raw, "model": "claude-9-opus-20300101"})
    assert exc.value.reason_code == "unknown_model"
