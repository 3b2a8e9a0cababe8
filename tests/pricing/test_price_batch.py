"""PricingEngine.price_batch (numpy int64 columns): event for event, to the pico, what price() gives.

Covers the base book's mix (price changes inside a batch, aliases, unknown models, missing
cached/cache-write rates, rate cards, datetimes), the v2 classes, tool fees and service tiers,
and counts large enough that the int64 bound does not hold (then Python ints price the batch).
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meterline.core.pricing import PricingEngine, load_price_book
from meterline.core.pricing._model import EXTRA_FIELDS
from meterline.core.pricing._vector import INT64_MAX, MIN_BATCH, overflow_bound
from tests.pricing.test_price_many import CUSTOMERS, TIMES, make_engine, outcome, records, same
from tests.pricing.test_v2_classes import V2
from tests.pricing.test_v2_classes import record as v2_record

_V2_BOOK = load_price_book(V2)


def check(engine: PricingEngine, batch: list[dict[str, Any]]) -> None:
    got = engine.price_batch(batch)
    want = [outcome(engine, r) for r in batch]
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert same(a, b), (i, batch[i], a, b)


@st.composite
def big_batches(draw: Any) -> list[dict[str, Any]]:
    """At least MIN_BATCH events (the columns' path), one customer or many."""
    n = draw(st.integers(MIN_BATCH, 70))
    if draw(st.booleans()):
        cust = draw(st.sampled_from(CUSTOMERS))
        batch = draw(st.lists(records(cust), min_size=n, max_size=n))
    else:
        batch = draw(st.lists(records(), min_size=n, max_size=n))
    if draw(st.integers(0, 3)):  # mostly counts inside the int64 bound (the columns' path)
        for r in batch:
            for f in ("input_tokens", "output_tokens", "cached_input_tokens"):
                r[f] %= 10**7
            if not isinstance(r["occurred_at"], int):  # a datetime sends the batch to price_many
                r["occurred_at"] = TIMES[4]
    return batch


@settings(max_examples=60, deadline=None)
@given(big_batches(), big_batches())
def test_price_batch_equals_price(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> None:
    engine = make_engine()
    check(engine, first)
    check(engine, second)


small_counts = st.one_of(st.just(0), st.integers(1, 10**6))


@st.composite
def v2_records(draw: Any) -> dict[str, Any]:
    over: dict[str, Any] = {
        "customer_id": draw(st.sampled_from(["acme", "other"])),
        "input_tokens": draw(small_counts),
        "output_tokens": draw(small_counts),
        "cached_input_tokens": draw(st.one_of(st.just(0), small_counts)),
        "cache_write_tokens": draw(st.one_of(st.just(0), small_counts)),
        "reasoning_tokens": draw(st.sampled_from([0, 3])),
        "requests": draw(st.integers(0, 2)),
        "service_tier": draw(st.sampled_from([None, None, None, "batch", "flex"])),
    }
    for f in EXTRA_FIELDS:  # v2 classes and tool calls: mostly 0, as in real traffic
        over[f] = draw(st.sampled_from([0, 0, 0, 0, 1, 250]))
    if draw(st.integers(0, 3)) == 0:  # a v1-shaped record: no v2 fields at all
        for f in (*EXTRA_FIELDS, "service_tier"):
            over.pop(f)
        return {k: v for k, v in v2_record(**over).items() if k not in EXTRA_FIELDS and k != "service_tier"}
    return v2_record(**over)


@settings(max_examples=60, deadline=None)
@given(st.lists(v2_records(), min_size=MIN_BATCH, max_size=70))
def test_price_batch_v2_classes_tool_fees_tiers_and_cards(batch: list[dict[str, Any]]) -> None:
    check(PricingEngine.from_book(_V2_BOOK), batch)


def test_beyond_the_int64_bound_python_ints_price_it_exactly() -> None:
    engine = PricingEngine.from_book(_V2_BOOK)
    huge = 10**12  # the validated maximum per count: × $15/M (15e6 picos/token) > 2**63
    batch = [v2_record(input_tokens=huge, output_tokens=huge, customer_id="acme") for _ in range(MIN_BATCH)]
    assert overflow_bound([huge, huge, 0, 0, 0, 1], [3_300_000, 16_500_000, 0, 0, 0, 0]) > INT64_MAX
    got = engine.price_batch(batch)
    assert got[0].cost_picos == huge * 3_000_000 + huge * 15_000_000  # type: ignore[union-attr]
    assert got[0].charge_picos == huge * 3_300_000 + huge * 16_500_000  # type: ignore[union-attr]
    check(engine, batch)


def test_columns_are_used_and_exact_on_a_plain_batch() -> None:
    engine = PricingEngine.from_book(_V2_BOOK)
    batch = [v2_record(input_tokens=i, output_tokens=2 * i, requests=1) for i in range(1, 200)]
    got = engine.price_batch(batch)
    assert [g.cost_picos for g in got] == [i * 3_000_000 + 2 * i * 15_000_000 for i in range(1, 200)]  # type: ignore[union-attr]
    assert {type(g.cost_picos) for g in got} == {int}  # Python ints out, not numpy scalars # type: ignore[union-attr]
    check(engine, batch)
