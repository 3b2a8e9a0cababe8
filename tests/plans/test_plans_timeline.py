"""Period arithmetic and the subscription fold."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from meterline.core.plans import (
    SubscriptionEvent,
    add_intervals,
    fold_timeline,
    format_instant,
    parse_event,
    period_bounds,
    period_index,
)
from tests.plans.helpers import JAN, catalog, plan, subscribed, ts


def test_month_ends_clamp_from_the_anchor_not_the_previous_boundary() -> None:
    a = ts("2026-01-31T10:30:00Z")
    got = [format_instant(add_intervals(a, k, "month")) for k in range(5)]
    assert got == [
        "2026-01-31T10:30:00Z",
        "2026-02-28T10:30:00Z",
        "2026-03-31T10:30:00Z",
        "2026-04-30T10:30:00Z",
        "2026-05-31T10:30:00Z",
    ]
    leap = ts("2028-01-30T00:00:00Z")
    assert format_instant(add_intervals(leap, 1, "month")) == "2028-02-29T00:00:00Z"
    feb29 = ts("2028-02-29T00:00:00Z")
    assert [format_instant(add_intervals(feb29, k, "year")) for k in (1, 4)] == [
        "2029-02-28T00:00:00Z",
        "2032-02-29T00:00:00Z",
    ]
    assert add_intervals(a, 2, "week") - a == 14 * 86400 and add_intervals(a, 3, "day") - a == 3 * 86400


@given(
    anchor=st.integers(0, 4_000_000_000),
    offset=st.integers(0, 400_000_000),
    interval=st.sampled_from(["day", "week", "month", "year"]),
)
def test_period_index_finds_the_containing_period(anchor: int, offset: int, interval: str) -> None:
    at = anchor + offset
    k = period_index(anchor, at, interval)
    start, end = period_bounds(anchor, at, interval)
    assert start == add_intervals(anchor, k, interval) <= at < end == add_intervals(anchor, k + 1, interval)


def test_subscription_from_the_past_anchors_periods_at_its_start() -> None:
    tl = subscribed(catalog(), "acme", "pro", "2026-01-15T12:00:00Z")
    ps = tl.periods(ts("2026-03-20T00:00:00Z"))
    assert [(format_instant(p.start), format_instant(p.end)) for p in ps] == [
        ("2026-01-15T12:00:00Z", "2026-02-15T12:00:00Z"),
        ("2026-02-15T12:00:00Z", "2026-03-15T12:00:00Z"),
        ("2026-03-15T12:00:00Z", "2026-04-15T12:00:00Z"),
    ]
    assert tl.period_at(ts("2026-01-15T11:59:59Z")) is None


def test_new_versions_leave_subscribers_alone_until_migrated() -> None:
    cat = catalog(plan(), plan(version=2, fee="250.00", effective_from="2026-03-01T00:00:00Z"))
    tl = subscribed(cat)
    assert tl.plan_at(ts("2026-05-01T00:00:00Z")).version == 1
    # a subscription made after v2 takes effect gets v2
    assert subscribed(cat, "b", "pro", "2026-03-02T00:00:00Z").plan_at(ts("2026-03-05T00:00:00Z")).version == 2
    # migrating on March 10 takes effect at the next period start (April 1): no proration
    mig = SubscriptionEvent("migrated", "acme", ts("2026-03-10T00:00:00Z"), "pro", 2)
    tl = subscribed(cat, "acme", "pro", JAN, mig)
    assert tl.plan_at(ts("2026-03-31T23:59:59Z")).version == 1
    assert tl.plan_at(ts("2026-04-01T00:00:00Z")).version == 2
    assert len(tl.period_at(ts("2026-03-15T00:00:00Z")).segments) == 1


def test_interval_change_starts_a_new_anchor() -> None:
    cat = catalog(plan(), plan(id="annual", interval="year", fee="2000.00"))
    tl = subscribed(cat, "acme", "pro", JAN, SubscriptionEvent("changed", "acme", ts("2026-01-11T00:00:00Z"), "annual"))
    first = tl.period_at(ts("2026-01-05T00:00:00Z"))
    assert first.stop == ts("2026-01-11T00:00:00Z") and first.end == ts("2026-02-01T00:00:00Z")
    second = tl.period_at(ts("2026-01-11T00:00:00Z"))
    assert (second.start, second.end) == (ts("2026-01-11T00:00:00Z"), ts("2027-01-11T00:00:00Z"))


def test_bad_facts_are_rejected_not_raised_and_duplicates_collapse() -> None:
    cat = catalog()
    sub = SubscriptionEvent("subscribed", "acme", ts(JAN), "pro")
    events = [
        SubscriptionEvent("changed", "acme", ts("2025-12-01T00:00:00Z"), "pro"),  # before any subscription
        sub,
        sub,
        SubscriptionEvent("subscribed", "acme", ts("2026-01-05T00:00:00Z"), "pro"),  # already subscribed
        SubscriptionEvent("changed", "acme", ts("2026-01-06T00:00:00Z"), "nope"),  # unknown plan
        SubscriptionEvent("subscribed", "acme", ts("2026-01-07T00:00:00Z"), "pro", 9),
        SubscriptionEvent("cancelled", "other", ts(JAN)),  # someone else's
    ]
    tl = fold_timeline("acme", events, cat)
    assert len(tl.runs) == 1 and tl.runs[0].anchor == ts(JAN)
    assert len(tl.rejected) == 4
    # cancelled, then subscribed again: a new anchor
    tl = fold_timeline(
        "acme",
        [
            sub,
            SubscriptionEvent("cancelled", "acme", ts("2026-01-10T00:00:00Z")),
            SubscriptionEvent("subscribed", "acme", ts("2026-01-20T00:00:00Z"), "pro"),
        ],
        cat,
    )
    assert [r.anchor for r in tl.runs] == [ts(JAN), ts("2026-01-20T00:00:00Z")] and not tl.rejected
    assert tl.plan_at(ts("2026-01-15T00:00:00Z")) is None


def test_events_round_trip_through_json_and_reject_garbage() -> None:
    import pytest

    from meterline.core.plans import SubscriptionError

    ev = SubscriptionEvent("cancelled", "acme", ts(JAN), at_period_end=True)
    key, value = ev.to_record()
    assert key == "acme" and parse_event(value) == ev and parse_event(value).event_id == ev.event_id
    for bad in (
        b"\xff",
        b"[]",
        b'{"type":"paused","customer_id":"a","at":"2026-01-01T00:00:00Z"}',
        b'{"type":"subscribed","customer_id":"a","at":"2026-01-01T00:00:00Z"}',
        b'{"type":"cancelled","customer_id":"a","at":"2026-01-01T00:00:00.5Z"}',
        b'{"type":"migrated","customer_id":"a","at":"2026-01-01T00:00:00Z","plan_id":"p"}',
        b'{"type":"cancelled","customer_id":"a","at":"2026-01-01T00:00:00Z","event_id":"x"}',
    ):
        with pytest.raises(SubscriptionError):
            parse_event(bad)


def test_the_fold_does_not_depend_on_the_recording_order() -> None:
    import itertools

    cat = catalog(plan(), plan(id="max", fee="500.00"))
    events = [
        SubscriptionEvent("subscribed", "acme", ts(JAN), "pro"),
        SubscriptionEvent("changed", "acme", ts("2026-01-10T00:00:00Z"), "max"),
        SubscriptionEvent("cancelled", "acme", ts("2026-01-10T00:00:00Z")),
        SubscriptionEvent("changed", "acme", ts("2026-01-10T00:00:00Z"), "pro"),
    ]
    results = {fold_timeline("acme", list(p), cat) for p in itertools.permutations(events)}
    assert len(results) == 1


def test_customer_ids_follow_the_contract_form() -> None:
    import pytest

    from meterline.core.plans import SubscriptionError

    for bad in ("", " acme", "a b", "-acme", "x" * 129, "acme\n"):
        with pytest.raises(SubscriptionError, match="customer"):
            parse_event(SubscriptionEvent("cancelled", bad, ts(JAN)).to_json())
    assert (
        parse_event(SubscriptionEvent("cancelled", "org:acme@eu+1", ts(JAN)).to_json()).customer_id == "org:acme@eu+1"
    )
