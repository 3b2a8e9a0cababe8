"""Properties of the fold and of proration over arbitrary fact sets: never raises, periods tile
time, segments tile each period, and prorated fees add up to the fee to within a pico a segment."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from meterline.core.plans import SubscriptionEvent, fold_timeline, rate_period
from tests.plans.helpers import catalog, plan, ts

CAT = catalog(
    plan(),
    plan(version=2, fee="210.00", effective_from="2026-02-01T00:00:00Z"),
    plan(id="max", fee="500.00", allowances=[{"id": "tokens", "tokens": 40_000_000}], overage={"per_million": "20.00"}),
    plan(id="weekly", interval="week", fee="7.77", allowances=[], overage={"per_million": "1"}),
    plan(id="yearly", interval="year", fee="1999.99", allowances=[], overage={"per_million": "1"}),
)
T0 = ts("2026-01-31T00:00:00Z")
SPAN = 400 * 86_400

fact = st.one_of(
    st.builds(
        lambda t, p, v: SubscriptionEvent("subscribed", "c", T0 + t, p, v),
        st.integers(0, SPAN),
        st.sampled_from(["pro", "max", "weekly", "yearly", "nope"]),
        st.sampled_from([None, 1, 2, 3]),
    ),
    st.builds(
        lambda t, p, v: SubscriptionEvent("changed", "c", T0 + t, p, v),
        st.integers(0, SPAN),
        st.sampled_from(["pro", "max", "weekly", "yearly"]),
        st.sampled_from([None, 1, 2]),
    ),
    st.builds(
        lambda t, e: SubscriptionEvent("cancelled", "c", T0 + t, at_period_end=e), st.integers(0, SPAN), st.booleans()
    ),
    st.builds(
        lambda t, v: SubscriptionEvent("migrated", "c", T0 + t, "pro", v), st.integers(0, SPAN), st.sampled_from([1, 2])
    ),
)


@settings(max_examples=200, deadline=None)
@given(facts=st.lists(fact, max_size=12))
def test_any_fact_set_folds_into_tiling_periods(facts: list[SubscriptionEvent]) -> None:
    tl = fold_timeline("c", facts, CAT)
    periods = tl.periods(T0 + SPAN + 800 * 86_400)
    for p in periods:
        assert p.start < p.end and p.start < p.stop <= p.end
        assert p.segments and p.segments[0].start == p.start
        for a, b in itertools.pairwise(p.segments):
            assert a.end == b.start and a.plan != b.plan
        assert (p.segments[-1].end or p.stop) == p.stop
        assert all(s.plan.interval == p.segments[0].plan.interval for s in p.segments)
        mid = (p.start + p.stop) // 2
        assert tl.period_at(mid) == p and tl.plan_at(mid) is not None
    for a, b in itertools.pairwise(periods):
        assert a.stop <= b.start  # never overlapping
        if a.anchor == b.anchor:
            assert a.end == b.start and a.index + 1 == b.index
        bill = rate_period(a, [[] for _ in a.segments])
        fee = sum(line.amount for line in bill.lines if line.kind == "fee")
        if a.stop == a.end and len({s.plan for s in a.segments}) == 1:
            assert fee == a.segments[0].plan.fee
        # each prorated share is defined to the nearest pico: the sum is within a pico per segment
        exact = sum(s.plan.fee * ((s.end or a.stop) - s.start) for s in a.segments)
        assert abs(fee * a.seconds - exact) <= len(a.segments) * a.seconds
