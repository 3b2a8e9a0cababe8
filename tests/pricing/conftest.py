from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from meterline.core.pricing import PricingEngine, load_price_book
from meterline.core.pricing._model import epoch_ms

BOOK = """
currency: USD
prices:
  - provider: openai
    model: gpt-4o
    aliases: ["gpt-4o-2024-08-06"]
    effective_from: "2024-05-13T00:00:00Z"
    per_million: {input: "5.00", output: "15.00", cached_input: "2.50"}
  - provider: openai
    model: gpt-4o
    aliases: ["gpt-4o-2024-08-06"]
    effective_from: "2024-10-01T00:00:00Z"
    per_million: {input: "2.50", output: "10.00", cached_input: "1.25"}
  - provider: openai
    model: o1
    effective_from: "2024-01-01T00:00:00Z"
    per_million: {input: "15", output: "60", cached_input: "7.5"}
  - provider: openai
    model: o3
    effective_from: "2024-01-01T00:00:00Z"
    per_million: {input: "2", output: "8", reasoning: "9.000001"}
    request_fee: "0.000000000123"
  - provider: anthropic
    model: claude-3-5-sonnet
    model_version: "20241022"
    effective_from: "2024-10-22T00:00:00Z"
    per_million: {input: "3.00", output: "15.00", cache_write: "3.75", cached_input: "0.30"}
  - provider: anthropic
    model: claude-3-5-sonnet
    effective_from: "2024-06-20T00:00:00Z"
    per_million: {input: "3.10", output: "15.10"}
  - provider: meta
    model: llama-3-70b
    effective_from: "2024-01-01T00:00:00Z"
    per_million: {input: "0.59", output: "0.79"}
rate_cards:
  - customer_id: "*"
    markup_pct: "10"
  - customer_id: acme
    markup_pct: "20"
  - customer_id: bigco
    discount_pct: "12.5"
    overrides:
      - {provider: openai, model: gpt-4o, per_million: {input: "4.00"}}
      - {provider: anthropic, model: claude-3-5-sonnet, model_version: "20241022", per_million: {output: "11"}, request_fee: "0.01"}
"""


def ms(text: str) -> int:
    return epoch_ms(datetime.fromisoformat(text).astimezone(UTC))


@pytest.fixture
def book_text() -> str:
    return BOOK


@pytest.fixture
def engine() -> PricingEngine:
    return PricingEngine.from_book(load_price_book(BOOK))


@pytest.fixture
def record() -> Callable[..., dict[str, Any]]:
    def make(**kw: Any) -> dict[str, Any]:
        r: dict[str, Any] = {
            "provider": "openai",
            "model": "gpt-4o",
            "model_version": None,
            "occurred_at": ms("2024-07-01T12:00:00+00:00"),
            "customer_id": "nobody",
            "input_tokens": 0,
            "output_tokens": 0,
            "cached_input_tokens": 0,
            "cache_write_tokens": 0,
            "reasoning_tokens": 0,
            "requests": 1,
        }
        r.update(kw)
        return r

    return make
