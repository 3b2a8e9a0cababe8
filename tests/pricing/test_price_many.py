"""PricingEngine.price_many: element for element what price() returns or raises."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meterline.core.errors import UnpriceableEvent
from meterline.core.pricing import PricedAmounts, PricingEngine, load_price_book
from meterline.core.pricing._book import _dumps, card_record_value, parse_card, parse_price, price_record_value
from tests.pricing.conftest import BOOK, ms

# Models of BOOK plus unknown ones; gpt-4o changes price on 2024-10-01, llama has no cached rate,
# gpt-4o has no cache_write rate, o3 has a request fee and an explicit reasoning rate.
MODELS = [
    ("openai", "gpt-4o", None),
    ("openai", "gpt-4o-2024-08-06", None),  # alias
    ("openai", "o1", None),
    ("openai", "o3", None),
    ("anthropic", "claude-3-5-sonnet", "20241022"),
    ("anthropic", "claude-3-5-sonnet", "20240620"),  # falls back to the version-less timeline
    ("anthropic", "claude-3-5-sonnet", None),
    ("meta", "llama-3-70b", None),
    ("openai", "gpt-4", None),  # unknown
    ("meta", "llama-3-70b", "x"),  # fallback to version-less
]
CUSTOMERS = ["acme", "bigco", "nobody", "other"]
TIMES = [
    ms("2024-01-01T00:00:00+00:00"),  # before gpt-4o's first price
    ms("2024-05-13T00:00:00+00:00"),
    ms("2024-09-30T23:59:59.999+00:00"),
    ms("2024-10-01T00:00:00+00:00"),  # gpt-4o price change
    ms("2024-10-22T00:00:00+00:00"),
    ms("2025-03-01T00:00:00+00:00"),
]

counts = st.one_of(st.just(0), st.integers(1, 10**7), st.integers(0, 10**12))
occurred = st.one_of(
    st.sampled_from(TIMES),
    st.integers(TIMES[0] - 10**9, TIMES[-1] + 10**9),
    st.sampled_from(TIMES).map(lambda t: datetime.fromtimestamp(t / 1000, tz=UTC)),
)


@st.composite
def records(draw: Any, customer: str | None = None) -> dict[str, Any]:
    provider, model, mv = draw(st.sampled_from(MODELS))
    return {
        "provider": provider,
        "model": model,
        "model_version": mv,
        "occurred_at": draw(occurred) if draw(st.integers(0, 9)) == 0 else draw(st.sampled_from(TIMES)),
        "customer_id": customer or draw(st.sampled_from(CUSTOMERS)),
        "input_tokens": draw(counts),
        "output_tokens": draw(counts),
        "cached_input_tokens": draw(st.one_of(st.just(0), counts)),
        "cache_write_tokens": draw(st.sampled_from([0, 0, 0, 5])),
        "reasoning_tokens": draw(st.sampled_from([0, 0, 7])),
        "requests": draw(st.integers(0, 3)),
    }


@st.composite
def batches(draw: Any) -> list[dict[str, Any]]:
    if draw(st.booleans()):  # a UsageBatch: one customer
        cust = draw(st.sampled_from(CUSTOMERS))
        return draw(st.lists(records(cust), max_size=40))
    return draw(st.lists(records(), max_size=40))


def outcome(engine: PricingEngine, r: dict[str, Any]) -> Any:
    try:
        return engine.price(r)
    except UnpriceableEvent as exc:
        return exc


def same(a: Any, b: Any) -> bool:
    if isinstance(a, UnpriceableEvent) or isinstance(b, UnpriceableEvent):
        return type(a) is type(b) and (a.reason_code, a.field, a.message) == (b.reason_code, b.field, b.message)
    return type(a) is type(b) is PricedAmounts and a == b


def check(engine: PricingEngine, batch: list[dict[str, Any]]) -> None:
    fresh = PricingEngine()
    for key, value in engine_records(engine):
        fresh.apply_record(key, value)
    many = engine.price_many(batch)
    many_fresh = fresh.price_many(batch)  # price_many before any price() call warmed the caches
    one = [outcome(engine, r) for r in batch]
    assert len(many) == len(one) == len(many_fresh)
    for i, (a, b, c) in enumerate(zip(many, one, many_fresh)):
        assert same(a, b), (i, batch[i], a, b)
        assert same(c, b), (i, batch[i], c, b)


_BOOK = load_price_book(BOOK)


def engine_records(engine: PricingEngine) -> list[tuple[str, bytes]]:
    return engine._test_records  # type: ignore[no-any-return]


def make_engine() -> PricingEngine:
    e = PricingEngine()
    recs = _BOOK.to_records()
    for k, v in recs:
        e.apply_record(k, v)
    e._test_records = list(recs)  # type: ignore[attr-defined]
    return e


@settings(max_examples=300, deadline=None)
@given(batches(), batches())
def test_price_many_equals_price(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> None:
    engine = make_engine()
    check(engine, first)
    check(engine, second)  # warm caches


@settings(max_examples=60, deadline=None)
@given(batches(), st.sampled_from(["card", "price", "tombstone"]))
def test_price_many_after_updates(batch: list[dict[str, Any]], change: str) -> None:
    engine = make_engine()
    engine.price_many(batch)  # fill the batch caches, then change prices/cards under them
    if change == "card":
        card = parse_card({"customer_id": "nobody", "markup_pct": "33"}, where="t")
        rec = ("card:nobody", _dumps(card_record_value(card)))
    elif change == "price":
        v = parse_price(
            {
                "provider": "openai",
                "model": "gpt-4o",
                "effective_from": "2024-07-01T00:00:00Z",
                "per_million": {"input": "1", "output": "2", "cache_write": "3"},
            },
            currency="USD",
            where="t",
        )
        rec = ("price:" + v.version_id, _dumps(price_record_value(v)))
    else:
        rec = ("card:acme", None)  # type: ignore[assignment]
    engine.apply_record(*rec)
    engine._test_records.append(rec)  # type: ignore[attr-defined]
    if rec[1] is None:
        engine._test_records = [r for r in engine._test_records if r[0] != rec[0]]  # type: ignore[attr-defined]
    check(engine, batch)


def test_price_many_examples() -> None:
    engine = make_engine()
    base = {
        "provider": "openai",
        "model": "gpt-4o",
        "model_version": None,
        "customer_id": "acme",
        "input_tokens": 10**6,
        "output_tokens": 0,
        "cached_input_tokens": 0,
        "cache_write_tokens": 0,
        "reasoning_tokens": 0,
        "requests": 1,
    }
    change = ms("2024-10-01T00:00:00+00:00")
    got = engine.price_many(
        [
            {**base, "occurred_at": change - 1},
            {**base, "occurred_at": change},
            {**base, "occurred_at": change, "model": "gpt-5"},
            {**base, "occurred_at": change, "cache_write_tokens": 1},
            {**base, "occurred_at": ms("2024-05-12T00:00:00+00:00")},
        ]
    )
    assert [type(g).__name__ for g in got] == ["PricedAmounts", "PricedAmounts"] + ["UnpriceableEvent"] * 3
    assert (got[0].cost_picos, got[1].cost_picos) == (5 * 10**12, 25 * 10**11)  # type: ignore[union-attr]
    assert [g.reason_code for g in got[2:]] == ["unknown_model", "no_rate_for_token_class", "no_price_at_time"]  # type: ignore[union-attr]
    assert engine.price_many([]) == []
