"""Price file and engine for UsageEvent v2's classes, tool fees and service tiers (issue 14)."""

from __future__ import annotations

import pytest

from meterline.core.errors import PriceFileError, UnpriceableEvent
from meterline.core.pricing import PricingEngine, load_price_book
from meterline.core.pricing._model import short_hash

BASE = """
currency: USD
prices:
  - provider: anthropic
    model: claude-3-5-sonnet
    model_version: "20241022"
    effective_from: "2024-01-01T00:00:00Z"
    per_million: {input: "3.00", output: "15.00", cached_input: "0.30", cache_write: "3.75"}
rate_cards:
  - customer_id: acme
    markup_pct: "10"
"""
V2 = BASE.replace(
    """cache_write: "3.75"}""",
    """cache_write: "3.75", cache_write_long: "6.00",
                  input_audio: "0.000001"}
    tool_fees: {web_search: "0.01"}
  - provider: anthropic
    model: claude-3-5-sonnet
    model_version: "20241022"
    service_tier: batch
    effective_from: "2024-01-01T00:00:00Z"
    per_million: {input: "1.50", output: "7.50"}""",
)


def record(**over: object) -> dict[str, object]:
    r: dict[str, object] = dict(
        event_id="e",
        customer_id="acme",
        provider="anthropic",
        model="claude-3-5-sonnet",
        model_version="20241022",
        occurred_at=1_780_000_000_000,
        input_tokens=100,
        output_tokens=10,
        cached_input_tokens=0,
        cache_write_tokens=0,
        reasoning_tokens=0,
        requests=1,
    )
    r.update(over)
    return r


def test_version_ids_of_prices_without_v2_fields_do_not_change() -> None:
    old = load_price_book(BASE).versions[0].version_id
    # the hash covers exactly the v1 fields, as before v2 (so published ids stay valid)
    v1_fields = {
        "provider": "anthropic",
        "model": "claude-3-5-sonnet",
        "model_version": "20241022",
        "effective_from": "2024-01-01T00:00:00Z",
        "currency": "USD",
        "per_million": {"input": "3", "output": "15", "cached_input": "0.3", "cache_write": "3.75"},
        "request_fee": "0",
    }
    assert old == f"anthropic/claude-3-5-sonnet:20241022@2024-01-01T00:00:00Z#{short_hash(v1_fields)}"
    # stating a new class or a tool fee is a different price (new id); the tier shows in the id
    ids = {v.version_id for v in load_price_book(V2).versions}
    assert old not in ids
    assert any("~batch@" in i for i in ids)
    assert load_price_book(BASE).versions[0].version_id == old  # deterministic


def test_v2_classes_and_tool_fees_are_priced_exactly_with_markup() -> None:
    engine = PricingEngine.from_book(load_price_book(V2))
    priced = engine.price(record(cache_write_long_tokens=1000, input_audio_tokens=7, web_search_requests=3))
    cost = 100 * 3_000_000 + 10 * 15_000_000 + 1000 * 6_000_000 + 7 * 1 + 3 * 10_000_000_000
    assert priced.cost_picos == cost
    # +10 %: each rate defined once in integer picos (1 pico/token * 1.1 -> 1, ties to even)
    assert priced.charge_picos == (100 * 3_300_000 + 10 * 16_500_000 + 1000 * 6_600_000 + 7 * 1 + 3 * 11_000_000_000)
    # batch tier: its own price; price_many agrees with price
    batch = record(service_tier="batch")
    assert engine.price(batch).cost_picos == 100 * 1_500_000 + 10 * 7_500_000
    many = engine.price_many([record(), batch, record(web_search_requests=1)])
    assert [m.cost_picos for m in many] == [
        engine.price(r).cost_picos for r in (record(), batch, record(web_search_requests=1))
    ]


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"cache_write_long_tokens": 1}, "cache_write_long_tokens"),
        ({"output_audio_tokens": 1}, "output_audio_tokens"),
        ({"output_image_tokens": 1}, "output_image_tokens"),
        ({"web_search_requests": 1}, "web_search_requests"),
    ],
)
def test_a_class_the_price_lacks_is_never_priced_at_zero(over: dict[str, int], field: str) -> None:
    engine = PricingEngine.from_book(load_price_book(BASE))
    with pytest.raises(UnpriceableEvent) as exc:
        engine.price(record(**over))
    assert (exc.value.reason_code, exc.value.field) == ("no_rate_for_token_class", field)
    (err,) = engine.price_many([record(**over)])
    assert isinstance(err, UnpriceableEvent) and err.reason_code == "no_rate_for_token_class"


def test_image_input_falls_back_to_the_input_rate_and_unknown_tier_is_refused() -> None:
    engine = PricingEngine.from_book(load_price_book(BASE))
    assert engine.price(record(input_image_tokens=10)).cost_picos == 110 * 3_000_000 + 10 * 15_000_000
    with pytest.raises(UnpriceableEvent) as exc:
        engine.price(record(service_tier="flex"))
    assert exc.value.reason_code == "no_price_for_service_tier"


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ('tool_fees: {web_search: "0.01"}', None),
        ('tool_fees: {image_gen: "0.01"}', "prices[0].tool_fees.image_gen"),
        ('tool_fees: {web_search: "0.0000000000001"}', "prices[0].tool_fees.web_search"),
        ("service_tier: default", "prices[0].service_tier"),
        ("service_tier: Batch", "prices[0].service_tier"),
    ],
)
def test_price_file_rules_for_tool_fees_and_tiers(patch: str, field: str | None) -> None:
    text = BASE.replace(
        '    effective_from: "2024-01-01T00:00:00Z"', f'    {patch}\n    effective_from: "2024-01-01T00:00:00Z"'
    )
    if field is None:
        book = load_price_book(text)
        assert book.versions[0].rates.tool_fee("web_search") is not None
        return
    with pytest.raises(PriceFileError) as exc:
        load_price_book(text)
    assert exc.value.field == field


def test_records_round_trip_through_the_prices_topic() -> None:
    book = load_price_book(V2)
    engine = PricingEngine()
    for key, value in book.to_records():
        engine.apply_record(key, value)
    direct = PricingEngine.from_book(book)
    for r in (record(web_search_requests=2, cache_write_long_tokens=5), record(service_tier="batch")):
        assert engine.price(r) == direct.price(r)
