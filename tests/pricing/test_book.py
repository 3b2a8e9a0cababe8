from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from meterline.core.errors import PriceFileError
from meterline.core.pricing import PricingEngine, load_price_book
from tests.pricing.conftest import BOOK, ms

SEED = Path(__file__).resolve().parents[2] / "infra" / "prices" / "seed.yaml"


def one(per_million: str = '{input: "1", output: "2"}', extra: str = "", cards: str = "") -> str:
    return (
        "currency: USD\nprices:\n"
        f'  - provider: p\n    model: m\n    effective_from: "2024-01-01T00:00:00Z"\n'
        f"    per_million: {per_million}\n{extra}" + (f"rate_cards:\n{cards}" if cards else "")
    )


@pytest.mark.parametrize(
    ("text", "field", "needle"),
    [
        (one('{input: "1.0000001", output: "2"}'), "prices[0].per_million.input", "6 decimal"),
        (one('{input: "1", output: "2", cache_read: "1"}'), "prices[0].per_million.cache_read", "unknown token class"),
        (one('{input: "-1", output: "2"}'), "prices[0].per_million.input", "negative"),
        (one('{input: "abc", output: "2"}'), "prices[0].per_million.input", "not a decimal"),
        (one('{input: "NaN", output: "2"}'), "prices[0].per_million.input", "finite"),
        (one('{input: "1"}'), "prices[0].per_million.output", "required"),
        (one(extra='    request_fee: "0.0000000000001"\n'), "prices[0].request_fee", "12"),
        (one(extra="    model_version: 20241022\n"), "prices[0].model_version", "quote"),
        (one(extra="    colour: red\n"), "prices[0]", "unknown key"),
        (
            one(cards='  - {customer_id: acme, markup_pct: "5", discount_pct: "5"}\n'),
            "rate_cards[acme].markup_pct",
            "not both",
        ),
        (one(cards='  - {customer_id: acme, discount_pct: "101"}\n'), "rate_cards[acme].discount_pct", "above 100"),
        (one(cards='  - {customer_id: acme, markup_pct: "-1"}\n'), "rate_cards[acme].markup_pct", "negative"),
        (
            one(
                cards='  - {customer_id: acme, overrides: [{provider: p, model: m, per_million: {input: "0.1234567"}}]}\n'
            ),
            "rate_cards[acme].overrides[0].per_million.input",
            "6 decimal",
        ),
        (one(cards="  - {customer_id: a}\n  - {customer_id: a}\n"), "rate_cards[1]", "duplicate"),
        ("currency: usd\nprices: []\n", "currency", "ISO 4217"),
        ("currency: USD\nprices: []\n", "prices", "non-empty"),
    ],
)
def test_validation_errors(text: str, field: str, needle: str) -> None:
    with pytest.raises(PriceFileError) as e:
        load_price_book(text)
    assert e.value.field == field, e.value.message
    assert needle in e.value.message
    assert e.value.reason_code == "invalid_price_file"


@pytest.mark.parametrize(
    "ts", ["2024-01-01", "2024-01-01T00:00:00", "yesterday", "2024-13-01T00:00:00Z", "2024-01-01T00:00:00.0001Z"]
)
def test_bad_timestamps(ts: str) -> None:
    text = one().replace('"2024-01-01T00:00:00Z"', f'"{ts}"')
    with pytest.raises(PriceFileError) as e:
        load_price_book(text)
    assert e.value.field == "prices[0].effective_from"


def test_unquoted_yaml_timestamp_is_read_as_text() -> None:
    book = load_price_book(one().replace('"2024-01-01T00:00:00Z"', "2024-01-01T01:00:00+01:00"))
    assert book.versions[0].version_id.startswith("p/m@2024-01-01T00:00:00Z#")


def test_duplicate_version_rejected() -> None:
    text = (
        one()
        + '  - {provider: p, model: m, effective_from: "2024-01-01T00:00:00+00:00", per_million: {input: "1", output: "3"}}\n'
    )
    with pytest.raises(PriceFileError) as e:
        load_price_book(text)
    assert e.value.field == "prices[1]" and "duplicate of prices[0]" in e.value.message


def test_alias_collisions_rejected() -> None:
    base = one(extra="    aliases: [x]\n")
    with pytest.raises(PriceFileError, match="already an alias"):
        load_price_book(
            base
            + '  - {provider: p, model: n, aliases: [x], effective_from: "2024-01-01T00:00:00Z", per_million: {input: "1", output: "3"}}\n'
        )
    with pytest.raises(PriceFileError, match="itself a priced model"):
        load_price_book(
            base
            + '  - {provider: p, model: x, effective_from: "2024-01-01T00:00:00Z", per_million: {input: "1", output: "3"}}\n'
        )


def test_yaml_floats_and_ints_are_exact() -> None:
    book = load_price_book(one("{input: 0.1, output: 3, cached_input: 1.000001}"))
    r = book.versions[0].rates
    assert (r.input, r.output, r.cached_input) == (Decimal("0.1"), Decimal(3), Decimal("1.000001"))
    with pytest.raises(PriceFileError, match="finite"):
        load_price_book(one("{input: .inf, output: 3}"))


def test_json_equals_yaml(tmp_path: Path) -> None:
    data = yaml.safe_load(BOOK)
    # JSON with real number literals, read from their text
    data["prices"][0]["per_million"] = {"input": 5.00, "output": 15, "cached_input": 2.5}
    p = tmp_path / "book.json"
    p.write_text(json.dumps(data))
    assert load_price_book(p).to_records() == load_price_book(BOOK).to_records()
    assert load_price_book(str(p)).to_records() == load_price_book(json.dumps(data)).to_records()


def test_missing_file() -> None:
    with pytest.raises(PriceFileError, match="cannot read"):
        load_price_book("/nonexistent/prices.yaml")


def test_seed_file_loads() -> None:
    book = load_price_book(SEED)
    assert {c.customer_id for c in book.cards} == {"*", "acme"}
    assert len(book.versions) == 12


def test_records_are_deterministic_and_idempotent() -> None:
    a = load_price_book(BOOK).to_records()
    # same content, different order and number spelling
    data = yaml.safe_load(BOOK)
    data["prices"].reverse()
    data["prices"][-1]["per_million"]["input"] = "5.000000"
    data["rate_cards"].reverse()
    b = load_price_book(data).to_records()
    assert a == b
    keys = [k for k, _ in a]
    assert len(set(keys)) == len(keys)
    assert sum(k.startswith("price:") for k in keys) == 7 and sum(k.startswith("card:") for k in keys) == 3


def _engine_from_records(records: list[tuple[str, bytes | None]]) -> PricingEngine:
    e = PricingEngine()
    for k, v in records:
        e.apply_record(k, v)
    return e


def _sample(e: PricingEngine, record: Callable[..., dict[str, Any]]) -> list[Any]:
    out = []
    for cust in ("nobody", "acme", "bigco"):
        for when in ("2024-06-01T00:00:00+00:00", "2024-10-01T00:00:00+00:00", "2024-12-01T00:00:00+00:00"):
            for model, mv in (("gpt-4o", None), ("claude-3-5-sonnet", "20241022"), ("o1", None)):
                prov = "anthropic" if model.startswith("claude") else "openai"
                try:
                    out.append(
                        e.price(
                            record(
                                provider=prov,
                                model=model,
                                model_version=mv,
                                customer_id=cust,
                                occurred_at=ms(when),
                                input_tokens=101,
                                output_tokens=7,
                                requests=2,
                            )
                        )
                    )
                except Exception as exc:
                    out.append(type(exc).__name__ + getattr(exc, "reason_code", ""))
    return out


def test_apply_record_round_trip(engine: PricingEngine, record: Callable[..., dict[str, Any]]) -> None:
    records = load_price_book(BOOK).to_records()
    e = _engine_from_records(records + records)  # replay twice: idempotent
    assert _sample(e, record) == _sample(engine, record)
    assert e.keys() == sorted(k for k, _ in records)


def test_apply_record_updates_tombstones_and_late_events(record: Callable[..., dict[str, Any]]) -> None:
    v1 = load_price_book(BOOK)
    e = _engine_from_records(v1.to_records())
    r = record(occurred_at=ms("2025-06-01T00:00:00+00:00"), input_tokens=10**6, customer_id="acme")
    late = record(occurred_at=ms("2024-06-01T00:00:00+00:00"), input_tokens=10**6, customer_id="acme")
    assert e.price(r).cost_picos == 2_500_000 * 10**6

    # a new file version adds a price; old versions stay for late events
    v2 = load_price_book(
        BOOK.replace(
            "rate_cards:",
            """  - provider: openai
    model: gpt-4o
    effective_from: "2025-01-01T00:00:00Z"
    per_million: {input: "2.00", output: "8.00", cached_input: "1.00"}
rate_cards:""",
        ).replace('markup_pct: "20"', 'markup_pct: "30"')
    )
    for k, v in v2.to_records():
        e.apply_record(k, v)
    assert e.price(r).cost_picos == 2_000_000 * 10**6
    assert e.price(r).charge_picos == 2_600_000 * 10**6  # the changed acme card replaced the old one
    assert e.price(late).cost_picos == 5_000_000 * 10**6

    # tombstones: the card falls back to "*", the price version disappears
    e.apply_record("card:acme", None)
    assert e.price(r).rate_card.startswith("*#")
    new_key = next(k for k, _ in v2.to_records() if "gpt-4o@2025" in k)
    e.apply_record(new_key, None)
    assert e.price(r).cost_picos == 2_500_000 * 10**6


def test_corrected_price_supersedes_and_can_be_tombstoned(record: Callable[..., dict[str, Any]]) -> None:
    v1 = load_price_book(BOOK)
    fixed = load_price_book(BOOK.replace('input: "0.59"', 'input: "0.60"'))
    stale = fixed.superseded_keys(k for k, _ in v1.to_records())
    assert len(stale) == 1 and stale[0].startswith("price:meta/llama-3-70b@")
    e = _engine_from_records(v1.to_records() + fixed.to_records())
    r = record(provider="meta", model="llama-3-70b", input_tokens=1)
    assert e.price(r).cost_picos == 600_000  # last applied wins while both are live
    e.apply_record(stale[0], None)
    assert e.price(r).cost_picos == 600_000


def test_apply_record_rejects_tampered_or_unknown() -> None:
    e = PricingEngine()
    key, value = load_price_book(BOOK).to_records()[0]
    tampered = json.loads(value)
    tampered["per_million"]["input"] = "99"
    with pytest.raises(PriceFileError, match="does not match"):
        e.apply_record(key, json.dumps(tampered).encode())
    with pytest.raises(PriceFileError, match="not JSON"):
        e.apply_record(key, b"\xff")
    with pytest.raises(PriceFileError, match="unknown key prefix"):
        e.apply_record("other:x", None)
    assert e.keys() == []


def test_duplicate_yaml_key_rejected() -> None:
    with pytest.raises(PriceFileError, match="duplicate key 'input'") as e:
        load_price_book(one('{input: "1", output: "2", input: "3"}'))
    assert e.value.field == "line 6"


def test_amount_sanity_cap_and_exact_canonical_text() -> None:
    with pytest.raises(PriceFileError, match="sanity limit") as e:
        load_price_book(one('{input: "1000000.000001", output: "2"}'))
    assert e.value.field == "prices[0].per_million.input"
    book = load_price_book(one('{input: "999999.999999", output: "20.0"}'))
    assert book.versions[0].rates.per_million() == {"input": "999999.999999", "output": "20"}
