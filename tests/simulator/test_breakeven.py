"""Break-even curves are exact and agree with billing's rating at every volume.

The curve of a plan is an analysis of the same rules as :func:`meterline.core.plans.rate_period`; here
it is checked against rate_period itself (for one full period) at many volumes and every plan
shape, and the issue's own example is checked to the exact rational."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterline.core.errors import InputError
from meterline.core.plans import Usage, rate_period
from meterline.core.simulator import crossings, fraction_json, mix_of, payg_curve, plan_curve
from meterline.core.simulator._routing import load_routing
from tests.plans.helpers import catalog, plan, subscribed

PER_TOKEN = 3_000_000  # $3 per million tokens, in picos per token

SHAPES = {
    "flat": plan(id="flat", fee="25", allowances=[], overage={"per_million": "0"}),
    "included": plan(id="included", fee="20", allowances=[{"id": "t", "tokens": 1000}], overage={"per_million": "30"}),
    "graduated": plan(
        id="graduated",
        fee="0",
        allowances=[],
        overage={
            "tiers": {
                "mode": "graduated",
                "unit": "tokens",
                "steps": [
                    {"up_to": 500, "per_million": "10"},
                    {"up_to": 2000, "per_million": "5"},
                    {"up_to": None, "per_million": "2"},
                ],
            }
        },
    ),
    "volume": plan(
        id="volume",
        fee="1",
        allowances=[{"id": "t", "tokens": 100}],
        overage={
            "tiers": {
                "mode": "volume",
                "unit": "tokens",
                "steps": [{"up_to": 500, "per_million": "10"}, {"up_to": None, "per_million": "4"}],
            }
        },
    ),
    "commitment": plan(
        id="commitment", fee="0", allowances=[], overage={"rate_card": {"multiplier": "1.5"}}, minimum_commitment="0.01"
    ),
    "capped": plan(
        id="capped",
        fee="5",
        allowances=[{"id": "t", "tokens": 300}],
        overage={"per_million": "40"},
        on_exhausted="cap",
        cap="0.02",
    ),
    "blocked": plan(
        id="blocked",
        fee="5",
        allowances=[{"id": "t", "tokens": 300}],
        overage={"per_million": "40"},
        on_exhausted="block",
    ),
    "amount": plan(
        id="amount", fee="2", allowances=[{"id": "a", "amount": "0.001"}], overage={"rate_card": {"multiplier": "1.2"}}
    ),
    "scoped": plan(
        id="scoped",
        fee="3",
        allowances=[{"id": "in", "tokens": 400, "token_classes": ["input"]}],
        overage={"per_million": "20"},
        minimum_commitment="3.01",
    ),
}


def _bill(shape: str, usage: Usage) -> int:
    cat = catalog(SHAPES[shape])
    [period] = subscribed(cat, plan_id=shape).periods(cat.versions[0].effective_from + 1)
    return rate_period(period, [[usage]]).subtotal


@settings(max_examples=60, deadline=None)
@given(shape=st.sampled_from(sorted(SHAPES)), k=st.integers(min_value=0, max_value=2500))
def test_curve_equals_rate_period_at_every_volume(shape: str, k: int) -> None:
    # a mix of 3 input : 1 output tokens at $3/M and $15/M; volume 4k keeps the mix exact
    unit = Usage("openai", "gpt-4o", {"input": 3, "output": 1}, 3 * PER_TOKEN + 15_000_000)
    usage = Usage("openai", "gpt-4o", {"input": 3 * k, "output": k}, k * unit.charge)
    curve = plan_curve(catalog(SHAPES[shape]).versions[0], mix_of([unit]))
    assert curve.at(4 * k) == _bill(shape, usage)


def test_flat_25_against_3_per_million_breaks_even_exactly() -> None:
    mix = mix_of([Usage("openai", "gpt-4o", {"input": 1_000_000}, 1_000_000 * PER_TOKEN)])
    flat = plan_curve(catalog(SHAPES["flat"]).versions[0], mix)
    [v] = crossings(flat, payg_curve(mix))
    assert v == Fraction(25_000_000, 3)
    assert fraction_json(v) == {"exact": "25000000/3", "tokens": "8333333.333333", "terminates": False}
    # just below, pay-per-token is cheaper; just above, the flat plan
    assert payg_curve(mix).at(8_333_333) < flat.at(8_333_333) and payg_curve(mix).at(8_333_334) > flat.at(8_333_334)


def test_volume_tier_jump_counts_as_a_crossing() -> None:
    # volume: $10/M up to 500 tokens then $4/M for all of them: the bill drops at 501 tokens.
    mix = mix_of([Usage("openai", "gpt-4o", {"input": 1}, 7_000_000)])  # $7/M pay-per-token
    vol = plan_curve(catalog(SHAPES["volume"]).versions[0], mix)
    xs = crossings(vol, payg_curve(mix))
    payg = payg_curve(mix)
    for x in xs:  # at each reported volume the order of the two bills changes (or they are equal)
        lo, hi = x - Fraction(1, 1000), x + Fraction(1, 1000)
        assert (vol.at(lo) - payg.at(lo)) * (vol.at(hi) - payg.at(hi)) <= 0 or vol.at(x) == payg.at(x)
    assert xs == sorted(xs) and len(xs) >= 1


def test_routing_file_is_validated() -> None:
    ok = load_routing(
        {
            "routes": [
                {
                    "from": {"provider": "a", "model": "big"},
                    "to": {"provider": "a", "model": "small"},
                    "under_tokens": 10,
                }
            ]
        }
    )
    assert ok[0].under_tokens == 10
    for bad in (
        {"routes": []},
        {"routes": [{"from": {"provider": "a", "model": "big"}, "to": {"provider": "a", "model": "big"}}]},
        {
            "routes": [
                {"from": {"provider": "a", "model": "x"}, "to": {"provider": "a", "model": "y"}, "under_tokens": 0}
            ]
        },
        {"routes": [{"from": {"provider": "a", "model": "x"}, "to": {"provider": "a", "model": "y"}, "extra": 1}]},
        {
            "routes": [
                {"from": {"provider": "a", "model": "x"}, "to": {"provider": "a", "model": "y"}},
                {"from": {"provider": "a", "model": "x"}, "to": {"provider": "a", "model": "z"}},
            ]
        },
    ):
        with pytest.raises(InputError):
            load_routing(bad)
