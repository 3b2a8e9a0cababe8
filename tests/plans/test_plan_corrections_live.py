"""A plan correction (``reprice``) applied to the live segment: ``correct_segment`` (pure).

The credit agent keeps per live segment ``used`` per allowance, the overage quantity and the
``invoiced`` overage a ``cap`` counts; a re-rating of the open period moves them on both signs
(docs/corrections.md, "Subscription plans": "The live plan gate follows corrections")."""

from __future__ import annotations

from meterline.core.plans import (
    LivePlan,
    PlanCatalog,
    SegmentChange,
    SegmentUse,
    Terms,
    Usage,
    burn,
    correct_segment,
    gate,
    segment_consumptions,
    terms_for,
)
from tests.plans.helpers import JAN, catalog, plan, subscribed, ts

P = 10**12  # picos per dollar


def _catalog() -> PlanCatalog:
    """$100 of usage included, overage at the rate card, capped at $20 a period."""
    return catalog(
        plan(
            id="amt",
            fee="50.00",
            allowances=[{"id": "credit", "amount": "100.00"}],
            overage={"rate_card": {"multiplier": "1"}},
            on_exhausted="cap",
            cap="20.00",
        )
    )


def _terms() -> Terms:
    period = subscribed(_catalog(), plan_id="amt").period_at(ts(JAN))
    assert period is not None
    return terms_for(period, 0)


def _burned(terms: Terms, charge_dollars: int) -> SegmentUse:
    seg, split = burn(terms, SegmentUse(terms.start, terms.plan.key), Usage("openai", "gpt-4o", {}, charge_dollars * P))
    seg.invoiced += max(split.overage_amount, 0)  # no prepaid credit: all overage is invoiced
    return seg


def test_a_raise_then_a_cut_moves_used_overage_and_invoiced_and_the_cap_gate_follows() -> None:
    t = _terms()
    seg = _burned(t, 115)  # $100 allowance used, $15 of overage invoiced, cap $20
    assert (seg.used, seg.overage, seg.invoiced) == ({"credit": 100 * P}, 15 * P, 15 * P)
    assert gate(t, seg, 0) is None
    raise_ = SegmentChange(t.start, t.plan.key, {}, 6 * P, 6 * P)
    up = correct_segment(t, seg, raise_, "c1", 6 * P)
    assert up is not None
    assert (up.used, up.overage, up.invoiced, up.corrections) == ({"credit": 100 * P}, 21 * P, 21 * P, ["c1"])
    assert gate(t, up, 0) == "plan_cap_reached"
    assert seg.invoiced == 15 * P and seg.corrections == []  # pure: the input is not changed
    # the same correction again changes nothing (a re-send)
    assert correct_segment(t, up, raise_, "c1", 6 * P) is None
    cut = SegmentChange(t.start, t.plan.key, {}, -6 * P, -6 * P)
    down = correct_segment(t, up, cut, "c2", -6 * P)
    assert down is not None and (down.overage, down.invoiced) == (15 * P, 15 * P)
    assert gate(t, down, 0) is None


def test_an_amount_allowance_follows_on_both_signs_within_zero_and_the_allowance() -> None:
    t = _terms()
    seg = _burned(t, 70)
    cut = correct_segment(t, seg, SegmentChange(t.start, t.plan.key, {"credit": -20 * P}), "c1", 0)
    assert cut is not None and cut.used == {"credit": 50 * P} and cut.invoiced == 0
    up = correct_segment(t, cut, SegmentChange(t.start, t.plan.key, {"credit": 30 * P}), "c2", 0)
    assert up is not None and up.used == {"credit": 80 * P}
    # a cut larger than what the agent counted stops at zero; a raise stops at the allowance
    # (the rest is overage, which the correction's overage change and ledger amount carry)
    low = correct_segment(t, up, SegmentChange(t.start, t.plan.key, {"credit": -500 * P}), "c3", 0)
    assert low is not None and low.used == {"credit": 0}
    high = correct_segment(t, low, SegmentChange(t.start, t.plan.key, {"credit": 500 * P, "nope": 1}), "c4", 0)
    assert high is not None and high.used == {"credit": 100 * P}  # an unknown allowance id is ignored


def test_invoiced_moves_by_what_prepaid_credit_did_not_carry_bounded_by_the_share_never_negative() -> None:
    t = _terms()
    seg = _burned(t, 110)  # $10 invoiced
    # a $6 raise of which prepaid credit paid $4: only $2 is invoiced overage
    up = correct_segment(t, seg, SegmentChange(t.start, t.plan.key, {}, 6 * P, 6 * P), "c1", 2 * P)
    assert up is not None and up.invoiced == 12 * P
    # the ledger refunded $9 of overage but this segment's share is only -$3: it moves by -$3
    down = correct_segment(t, up, SegmentChange(t.start, t.plan.key, {}, -3 * P, -3 * P), "c2", -9 * P)
    assert down is not None and down.invoiced == 9 * P
    # a refund beyond what the segment counted stops at zero (overage counted in another segment)
    zero = correct_segment(t, down, SegmentChange(t.start, t.plan.key, {}, -50 * P, -50 * P), "c3", -50 * P)
    assert zero is not None and (zero.invoiced, zero.overage) == (0, 0)
    # the effect and the share disagree in sign (a refund that went to grants only): no move
    same = correct_segment(t, zero, SegmentChange(t.start, t.plan.key, {}, 0, 5 * P), "c4", -1 * P)
    assert same is not None and same.invoiced == 0


def test_another_segment_is_not_touched_and_corrections_survive_serialisation() -> None:
    t = _terms()
    seg = _burned(t, 105)
    assert correct_segment(t, seg, SegmentChange(t.start + 1, t.plan.key, {}, P, P), "c1", P) is None
    assert correct_segment(t, seg, SegmentChange(t.start, "other@1", {}, P, P), "c1", P) is None
    up = correct_segment(t, seg, SegmentChange(t.start, t.plan.key, {}, P, P), "c1", P)
    assert up is not None
    live = LivePlan()
    live.put(up)
    back = LivePlan.from_dict(live.to_dict())
    assert back.segs[0].corrections == ["c1"] and back.segs[0].invoiced == up.invoiced
    # a value stored before corrections existed (7 fields per segment) still reads
    old = live.to_dict()
    old["segs"] = [s[:7] for s in old["segs"]]
    assert LivePlan.from_dict(old).segs[0].corrections == []


def test_segment_consumptions_fold_like_the_bill() -> None:
    t = _terms()
    period = subscribed(_catalog(), plan_id="amt").period_at(ts(JAN))
    assert period is not None
    [(terms, cons)] = segment_consumptions(period, [[Usage("openai", "gpt-4o", {}, 115 * P)]])
    assert terms.start == t.start and (dict(cons.used), cons.overage) == ({"credit": 100 * P}, 15 * P)
