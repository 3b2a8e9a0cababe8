"""Live burn-down and the bill are the same computation: any split and order of events gives
the aggregate's bill."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meterline.core.plans import Consumption, Usage, consume, overage_price, rate_period, terms_for
from tests.plans.helpers import JAN, M, catalog, plan, subscribed, ts

MODELS = [("openai", "gpt-4o"), ("openai", "gpt-4o-mini"), ("anthropic", "claude")]
CLASSES = ["input", "output", "cached_input", "cache_write", "reasoning"]

PLANS = {
    "flat30": plan(),
    "scoped": plan(
        allowances=[
            {"id": "in", "tokens": 3 * M, "token_classes": ["input"]},
            {
                "id": "mini-out",
                "tokens": 2 * M,
                "token_classes": ["output"],
                "models": [{"provider": "openai", "model": "gpt-4o-mini"}],
            },
        ]
    ),
    "graduated": plan(
        overage={
            "tiers": {
                "mode": "graduated",
                "unit": "tokens",
                "steps": [
                    {"up_to": 2 * M, "per_million": "30"},
                    {"up_to": 5 * M, "per_million": "20.5"},
                    {"up_to": None, "per_million": "1"},
                ],
            }
        }
    ),
    "volume": plan(
        overage={
            "tiers": {
                "mode": "volume",
                "unit": "tokens",
                "steps": [
                    {"up_to": 2 * M, "per_million": "30"},
                    {"up_to": 5 * M, "per_million": "20.5"},
                    {"up_to": None, "per_million": "1"},
                ],
            }
        }
    ),
    "amount": plan(allowances=[{"id": "usage", "amount": "5.00"}], overage={"rate_card": {"multiplier": "1.333333"}}),
    "amount-tiers": plan(
        allowances=[{"id": "usage", "amount": "5.00", "models": [{"provider": "anthropic", "model": "claude"}]}],
        overage={
            "tiers": {
                "mode": "graduated",
                "unit": "amount",
                "steps": [{"up_to": "3.5", "multiplier": "1.1"}, {"up_to": None, "multiplier": "0.9"}],
            }
        },
    ),
}

event = st.builds(
    lambda m, toks, charge: Usage(m[0], m[1], toks, charge),
    st.sampled_from(MODELS),
    st.dictionaries(st.sampled_from(CLASSES), st.integers(0, 3 * M), max_size=5),
    st.integers(0, 7 * 10**12),
)


def _aggregate(events: list[Usage]) -> list[Usage]:
    agg: dict[tuple[str, str], tuple[dict[str, int], int]] = {}
    for e in events:
        toks, charge = agg.setdefault((e.provider, e.model), ({}, 0))
        for c, n in e.tokens.items():
            toks[c] = toks.get(c, 0) + n
        agg[(e.provider, e.model)] = (toks, charge + e.charge)
    return [Usage(p, m, t, c) for (p, m), (t, c) in agg.items()]


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(sorted(PLANS)), events=st.lists(event, max_size=25), seed=st.randoms(use_true_random=False))
def test_event_by_event_burn_down_equals_the_aggregate_bill(name: str, events: list[Usage], seed) -> None:
    cat = catalog(PLANS[name])
    period = subscribed(cat).period_at(ts(JAN))
    terms = terms_for(period, 0)
    shuffled = list(events)
    seed.shuffle(shuffled)
    cons = Consumption()
    overage_sum = 0
    drawn: dict[str, int] = {}
    for e in shuffled:
        before = cons
        cons, split = consume(terms, cons, e)
        overage_sum += split.overage_amount
        for k, v in split.allowance.items():
            drawn[k] = drawn.get(k, 0) + v
        assert sum(split.allowance.values()) + split.overage_quantity == (
            e.total_tokens() if terms.plan.unit == "tokens" else e.charge
        )
        assert cons.overage == before.overage + split.overage_quantity
    bill = rate_period(period, [_aggregate(events)])
    assert overage_sum == bill.amount_of("overage") == overage_price(terms.plan.overage, cons.overage)[0]
    assert {a.id: a.used for a in bill.allowances} == {a.id: drawn.get(a.id, 0) for a in terms.plan.allowances}
    for a in bill.allowances:
        assert 0 <= a.used <= a.included and a.remaining == a.included - a.used
    assert bill.subtotal == sum(line.amount for line in bill.lines)


def test_terms_at_follows_the_timeline_by_event_time() -> None:
    from meterline.core.plans import SubscriptionEvent, fold_timeline, terms_at

    cat = catalog(
        plan(),
        plan(id="max", fee="500.00", allowances=[{"id": "tokens", "tokens": 40 * M}], overage={"per_million": "20.00"}),
    )
    tl = fold_timeline(
        "acme",
        [
            SubscriptionEvent("subscribed", "acme", ts("2026-04-01T00:00:00Z"), "pro"),
            SubscriptionEvent("changed", "acme", ts("2026-04-16T00:00:00Z"), "max"),
            SubscriptionEvent("cancelled", "acme", ts("2026-05-10T00:00:00Z")),
        ],
        cat,
    )
    assert terms_at(tl, ts("2026-03-31T23:59:59Z")) is None
    first = terms_at(tl, ts("2026-04-15T23:59:59Z"))
    assert first.plan.key == "pro@1" and first.included == {"tokens": 5 * M} and first.fee == 100 * 10**12
    second = terms_at(tl, ts("2026-04-16T00:00:00Z"))
    assert second.plan.key == "max@1" and second.included == {"tokens": 20 * M}
    may = terms_at(tl, ts("2026-05-09T00:00:00Z"))
    assert may.plan.key == "max@1" and (may.start, may.end) == (ts("2026-05-01T00:00:00Z"), ts("2026-05-10T00:00:00Z"))
    assert terms_at(tl, ts("2026-05-10T00:00:00Z")) is None


def test_remaining_allowance_and_policy_room_for_enforcement() -> None:
    from meterline.core.plans import allowance_remaining, policy_room

    period = subscribed(catalog(plan(on_exhausted="cap", cap="45.00"))).period_at(ts(JAN))
    terms = terms_for(period, 0)
    cons, _ = consume(terms, Consumption(), Usage("openai", "gpt-4o", {"input": 4 * M, "output": 5 * M}))
    assert allowance_remaining(terms, cons) == {"tokens": 1 * M}
    cons, split = consume(terms, cons, Usage("openai", "gpt-4o", {"output": 2 * M}))
    assert allowance_remaining(terms, cons) == {"tokens": 0} and split.overage_amount == 30 * 10**12
    assert policy_room(terms, split.overage_amount) == 15 * 10**12
    assert policy_room(terms, 60 * 10**12) == 0
    assert policy_room(terms_for(subscribed(catalog(plan())).period_at(ts(JAN)), 0), 10**15) is None
    assert policy_room(terms_for(subscribed(catalog(plan(on_exhausted="block"))).period_at(ts(JAN)), 0), 0) == 0
