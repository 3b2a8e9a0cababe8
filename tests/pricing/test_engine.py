from __future__ import annotations

from collections.abc import Callable
from datetime import UTC
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterline.core.errors import UnpriceableEvent
from meterline.core.pricing import PricingEngine, load_price_book
from tests.pricing.conftest import BOOK, ms

Rec = Callable[..., dict[str, Any]]
M = Decimal(10**6)
P = Decimal(10**12)


def dec_cost(tokens: dict[str, int], rates: dict[str, str], requests: int = 0, fee: str = "0") -> Decimal:
    """Independent Decimal formula: Σ tokens × rate / 1e6 + requests × fee."""
    total = sum((Decimal(n) * Decimal(rates[c]) / M for c, n in tokens.items()), Decimal(0))
    return total + Decimal(requests) * Decimal(fee)


def test_cost_matches_decimal_formula(engine: PricingEngine, record: Rec) -> None:
    r = record(input_tokens=1234, output_tokens=567, cached_input_tokens=89)
    got = engine.price(r)
    want = dec_cost(
        {"input": 1234, "output": 567, "cached_input": 89}, {"input": "5", "output": "15", "cached_input": "2.5"}
    )
    assert Decimal(got.cost_picos) / P == want
    assert got.currency == "USD"
    assert got.price_version.startswith("openai/gpt-4o@2024-05-13T00:00:00Z#")


def test_effective_from_boundary(engine: PricingEngine, record: Rec) -> None:
    change = ms("2024-10-01T00:00:00+00:00")
    at = engine.price(record(occurred_at=change, input_tokens=10**6))
    before = engine.price(record(occurred_at=change - 1, input_tokens=10**6))
    assert Decimal(at.cost_picos) / P == Decimal("2.50")
    assert Decimal(before.cost_picos) / P == Decimal("5.00")
    assert at.price_version != before.price_version


def test_late_event_after_price_change_keeps_old_price(engine: PricingEngine, record: Rec) -> None:
    new = engine.price(record(occurred_at=ms("2024-11-01T00:00:00+00:00"), output_tokens=10**6))
    late = engine.price(record(occurred_at=ms("2024-09-30T23:59:59+00:00"), output_tokens=10**6))  # arrives after
    assert (Decimal(new.cost_picos) / P, Decimal(late.cost_picos) / P) == (Decimal(10), Decimal(15))


def test_before_first_version_and_unknown_model(engine: PricingEngine, record: Rec) -> None:
    with pytest.raises(UnpriceableEvent) as e:
        engine.price(record(occurred_at=ms("2024-05-12T23:59:59.999+00:00"), input_tokens=1))
    assert e.value.reason_code == "no_price_at_time"
    with pytest.raises(UnpriceableEvent) as e:
        engine.price(record(model="gpt-4", input_tokens=1))
    assert e.value.reason_code == "unknown_model"
    with pytest.raises(UnpriceableEvent) as e:  # no fuzzy matching
        engine.price(record(model="GPT-4o", input_tokens=1))
    assert e.value.reason_code == "unknown_model"


def test_datetime_occurred_at_is_accepted(engine: PricingEngine, record: Rec) -> None:
    from datetime import datetime

    a = engine.price(record(occurred_at=datetime(2024, 7, 1, 12, tzinfo=UTC), input_tokens=7))
    b = engine.price(record(input_tokens=7))
    assert a == b


def test_alias_prices_as_its_model(engine: PricingEngine, record: Rec) -> None:
    for when in ("2024-07-01T00:00:00+00:00", "2024-12-01T00:00:00+00:00"):
        a = engine.price(record(model="gpt-4o-2024-08-06", occurred_at=ms(when), input_tokens=999))
        b = engine.price(record(model="gpt-4o", occurred_at=ms(when), input_tokens=999))
        assert a == b


def test_version_exact_then_fallback(engine: PricingEngine, record: Rec) -> None:
    base = dict(
        provider="anthropic", model="claude-3-5-sonnet", occurred_at=ms("2024-11-01T00:00:00+00:00"), input_tokens=10**6
    )
    exact = engine.price(record(model_version="20241022", **base))
    other = engine.price(record(model_version="20240620", **base))
    none = engine.price(record(model_version=None, **base))
    assert Decimal(exact.cost_picos) / P == Decimal("3.00")
    assert Decimal(other.cost_picos) / P == Decimal("3.10") == Decimal(none.cost_picos) / P
    assert other.price_version == none.price_version


def test_missing_class_rate_is_an_error_not_zero(engine: PricingEngine, record: Rec) -> None:
    with pytest.raises(UnpriceableEvent) as e:
        engine.price(record(model="llama-3-70b", provider="meta", cached_input_tokens=1))
    assert e.value.reason_code == "no_rate_for_token_class"
    with pytest.raises(UnpriceableEvent) as e:
        engine.price(record(cache_write_tokens=5))  # gpt-4o has no cache_write rate
    assert e.value.reason_code == "no_rate_for_token_class"
    assert e.value.field == "cache_write_tokens"
    # zero tokens of an unpriced class are fine
    assert engine.price(record(model="llama-3-70b", provider="meta", input_tokens=3)).cost_picos == 3 * 590_000


def test_reasoning_defaults_to_output_and_explicit_reasoning(engine: PricingEngine, record: Rec) -> None:
    o1 = engine.price(record(model="o1", reasoning_tokens=1000, output_tokens=10))
    assert Decimal(o1.cost_picos) / P == dec_cost(
        {"reasoning": 1000, "output": 10}, {"reasoning": "60", "output": "60"}
    )
    o3 = engine.price(record(model="o3", reasoning_tokens=3, output_tokens=1, requests=4))
    assert Decimal(o3.cost_picos) / P == dec_cost(
        {"reasoning": 3, "output": 1}, {"reasoning": "9.000001", "output": "8"}, requests=4, fee="0.000000000123"
    )


def test_rate_cards(engine: PricingEngine, record: Rec) -> None:
    r = dict(input_tokens=1001, output_tokens=333, cached_input_tokens=7)
    default = engine.price(record(customer_id="nobody", **r))
    acme = engine.price(record(customer_id="acme", **r))
    big = engine.price(record(customer_id="bigco", **r))
    cost = dec_cost(
        r_ := {"input": 1001, "output": 333, "cached_input": 7}, {"input": "5", "output": "15", "cached_input": "2.5"}
    )
    assert default.cost_picos == acme.cost_picos == big.cost_picos
    assert Decimal(default.cost_picos) / P == cost
    assert Decimal(default.charge_picos) / P == cost * Decimal("1.10")  # "*" card: +10 %
    assert Decimal(acme.charge_picos) / P == cost * Decimal("1.20")
    # bigco: input overridden to 4.00, others list × 0.875
    want = dec_cost(
        r_,
        {
            "input": "4",
            "output": str(Decimal(15) * Decimal("0.875")),
            "cached_input": str(Decimal("2.5") * Decimal("0.875")),
        },
    )
    assert Decimal(big.charge_picos) / P == want
    assert (default.rate_card.split("#")[0], acme.rate_card.split("#")[0], big.rate_card.split("#")[0]) == (
        "*",
        "acme",
        "bigco",
    )


def test_versioned_override_and_request_fee(engine: PricingEngine, record: Rec) -> None:
    base = dict(
        provider="anthropic",
        model="claude-3-5-sonnet",
        customer_id="bigco",
        occurred_at=ms("2024-11-01T00:00:00+00:00"),
        output_tokens=2000,
        input_tokens=100,
        requests=3,
    )
    exact = engine.price(record(model_version="20241022", **base))
    assert Decimal(exact.charge_picos) / P == dec_cost(
        {"output": 2000, "input": 100},
        {"output": "11", "input": str(Decimal(3) * Decimal("0.875"))},
        requests=3,
        fee="0.01",
    )
    # the override names version 20241022 only; the version-less price gets the plain discount
    other = engine.price(record(model_version=None, **base))
    assert other.charge_picos * 8 == other.cost_picos * 7


def test_markup_rate_definition_rounds_half_even_per_token() -> None:
    # 0.000001 / M = 1 pico/token; +50 % = 1.5 picos -> 2 (even); 0.000003 -> 4.5 -> 4 (even)
    text = """
currency: USD
prices:
  - {provider: p, model: a, effective_from: "2024-01-01T00:00:00Z", per_million: {input: "0.000001", output: "0.000003"}}
rate_cards:
  - {customer_id: c, markup_pct: "50"}
"""
    e = PricingEngine.from_book(load_price_book(text))
    rec = {
        "provider": "p",
        "model": "a",
        "model_version": None,
        "occurred_at": ms("2024-02-01T00:00:00+00:00"),
        "customer_id": "c",
        "input_tokens": 1000,
        "output_tokens": 1000,
        "cached_input_tokens": 0,
        "cache_write_tokens": 0,
        "reasoning_tokens": 0,
        "requests": 1,
    }
    got = e.price(rec)
    assert got.cost_picos == 1000 * 1 + 1000 * 3
    assert got.charge_picos == 1000 * 2 + 1000 * 4


def test_no_default_card_means_charge_equals_cost(record: Rec) -> None:
    text = BOOK.split("rate_cards:")[0]
    e = PricingEngine.from_book(load_price_book(text))
    got = e.price(record(input_tokens=17, output_tokens=4))
    assert got.charge_picos == got.cost_picos
    assert got.rate_card == "none"


@settings(max_examples=200, deadline=None)
@given(
    it=st.integers(0, 10**12),
    ot=st.integers(0, 10**12),
    ct=st.integers(0, 10**12),
    wt=st.integers(0, 10**12),
    xt=st.integers(0, 10**12),
    n=st.integers(0, 10**6),
)
def test_property_additive_and_exact(it: int, ot: int, ct: int, wt: int, xt: int, n: int) -> None:
    e = PricingEngine.from_book(load_price_book(BOOK))
    base = {
        "provider": "anthropic",
        "model": "claude-3-5-sonnet",
        "model_version": "20241022",
        "occurred_at": ms("2025-01-01T00:00:00+00:00"),
        "customer_id": "acme",
        "input_tokens": 0,
        "output_tokens": 0,
        "cached_input_tokens": 0,
        "cache_write_tokens": 0,
        "reasoning_tokens": 0,
        "requests": 0,
    }
    counts = {
        "input_tokens": it,
        "output_tokens": ot,
        "cached_input_tokens": ct,
        "cache_write_tokens": wt,
        "reasoning_tokens": xt,
    }
    whole = e.price({**base, **counts, "requests": n})
    parts = [e.price({**base, k: v}) for k, v in counts.items()] + [e.price({**base, "requests": n})]
    assert whole.cost_picos == sum(p.cost_picos for p in parts)
    assert whole.charge_picos == sum(p.charge_picos for p in parts)
    want = dec_cost(
        {"input": it, "output": ot, "cached_input": ct, "cache_write": wt, "reasoning": xt},
        {"input": "3", "output": "15", "cached_input": "0.3", "cache_write": "3.75", "reasoning": "15"},
    )
    assert Decimal(whole.cost_picos) / P == want
    assert whole.charge_picos * 5 == whole.cost_picos * 6  # +20 % on rates that are multiples of 5 picos
