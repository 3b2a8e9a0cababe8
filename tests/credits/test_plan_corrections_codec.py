"""The ``plan_correction`` command of the ``ledger-commands`` contract (schemas/credits.py), and what
the credit step (``CreditProcessor``, the agent's Kafka-free logic) does with it: the ledger effect
and the live segment in one table value, a re-send changes nothing, a bad message is a dead letter."""

from __future__ import annotations

import json
from typing import Any

import pytest

from meterline.core.errors import InputError
from meterline.core.ledger import Adjust, ApplyPricedUsage
from meterline.core.plans import SegmentChange, SubscriptionEvent, load_plan_catalog
from meterline.core.pricing import PricingEngine, load_price_book
from pipeline.credits.plans import PlanBook
from schemas.credits import decode_command, encode_message, plan_correction_message
from tests.credits.conftest import SEED
from tests.credits.helpers import Replay, priced_event, priced_record

P = 10**12
START = 1_767_225_600  # 2026-01-01T00:00:00Z
CATALOG = load_plan_catalog(
    {
        "currency": "USD",
        "plans": [
            {
                "id": "capamt",
                "version": 1,
                "effective_from": "2025-01-01T00:00:00Z",
                "interval": "month",
                "fee": "10.00",
                "allowances": [{"id": "credit", "amount": "1.00"}],
                "overage": {"rate_card": {"multiplier": "1"}},
                "on_exhausted": "cap",
                "cap": "4.00",
            }
        ],
    }
)


def _msg(amount: int, refunds: list[tuple[str | None, int]], **seg: Any) -> dict[str, Any]:
    change = SegmentChange(START, "capamt@1", seg.get("used", {}), seg.get("overage", 0), seg.get("invoiced", amount))
    return plan_correction_message(
        event_id="reprice:rp-1:capco:plan@1767225600",
        customer_id="capco",
        at_ms=(START + 7200) * 1000,
        currency="USD",
        period_start=START,
        plans="capamt@1",
        amount_picos=amount,
        refunds=refunds,
        reason="reprice rp-1: test",
        segments=[(change, "amount", {"credit": "amount"})],
    )


def test_the_message_round_trips_into_ledger_commands_and_segment_changes() -> None:
    up = decode_command(encode_message(_msg(3 * P // 2, [], used={"credit": P // 4}, overage=3 * P)))
    assert up.type == "plan_correction" and up.command is None and up.currency == "usd"
    pc = up.plan_correction
    assert pc is not None and pc.amount_picos == 3 * P // 2 and pc.period_start == START
    [debit] = up.ledger_commands
    assert isinstance(debit, ApplyPricedUsage)
    assert (debit.event_id, debit.charge_picos, debit.provider, debit.model, debit.project) == (
        pc.correction_id,
        3 * P // 2,
        "plan",
        "capamt@1",
        None,
    )
    assert pc.segments == (SegmentChange(START, "capamt@1", {"credit": P // 4}, 3 * P, 3 * P // 2),)
    down = decode_command(encode_message(_msg(-2 * P, [(None, P), ("g1", P)])))
    assert [type(c) for c in down.ledger_commands] == [Adjust, Adjust]
    assert [(c.adjustment_id, c.grant_id, c.amount_picos) for c in down.ledger_commands] == [  # type: ignore[union-attr]
        ("reprice:rp-1:capco:plan@1767225600:overage", None, P),
        ("reprice:rp-1:capco:plan@1767225600:g1", "g1", P),
    ]
    # token quantities are integers on the wire
    tok = _msg(0, [])
    tok["segments"][0]["used"] = {"tokens": -5000}
    assert decode_command(json.dumps(tok)).plan_correction.segments[0].used == {"tokens": -5000}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "bad",
    [
        lambda m: m.update(amount="1.00", refunds=[{"grant_id": None, "amount": "1.00"}]),  # a raise with refunds
        lambda m: m.update(amount="-1.00", refunds=[{"grant_id": None, "amount": "0.50"}]),  # refunds don't add up
        lambda m: m.update(amount="-1.00", refunds=[{"grant_id": None, "amount": "-1.00"}]),
        lambda m: m.update(amount=1),  # money is a decimal string
        lambda m: m["segments"][0].update(used={"credit": 1.5}),  # never a float
        lambda m: m["segments"][0].pop("start"),
        lambda m: m.update(segments={"start": 1}),
    ],
)
def test_malformed_plan_corrections_are_refused(bad: Any) -> None:
    m = _msg(P, [])
    bad(m)
    with pytest.raises(InputError):
        decode_command(json.dumps(m))


def test_the_credit_step_applies_effect_and_segment_once_and_dead_letters_a_bad_one() -> None:
    topics = {"priced_topic": "t.usage-priced", "commands_topic": "t.ledger-commands"}
    r = Replay(
        PricingEngine.from_book(load_price_book(SEED)),
        subscriptions_topic="t.subscriptions",
        plans=PlanBook.of(CATALOG),
        **topics,
    )
    key, value = SubscriptionEvent("subscribed", "capco", START, "capamt").to_record()
    r.feed("t.subscriptions", 0, key, value, START * 1000)
    ev = priced_event("capco", "e1", "3.50", (START + 60) * 1000)
    r.feed("t.usage-priced", 0, "capco", priced_record([ev]), (START + 60) * 1000)

    def plan_view() -> dict[str, Any]:
        st = r.statuses["capco"]
        return {"invoiced": st["balance"]["plan"]["invoiced_overage"], "status": st["status"], "reason": st["reason"]}

    assert plan_view() == {"invoiced": "2.50", "status": "active", "reason": None}
    raise_ = encode_message(_msg(3 * P // 2, [], overage=3 * P))
    r.feed("t.ledger-commands", 0, "capco", raise_, (START + 7200) * 1000)
    assert plan_view() == {"invoiced": "4.00", "status": "blocked", "reason": "plan_cap_reached"}
    assert r.ledger("capco").overage_picos == 4 * P
    # the same command again, at a new offset: a duplicate (nothing moves)
    r.feed("t.ledger-commands", 0, "capco", raise_, (START + 7300) * 1000)
    assert plan_view()["invoiced"] == "4.00" and r.ledger("capco").overage_picos == 4 * P
    # a bad one: dead-lettered, nothing applied
    bad = json.loads(raise_)
    bad.update(command_id="other", event_id="other", refunds=[{"grant_id": None, "amount": "1.00"}])
    out = r.feed("t.ledger-commands", 0, "capco", json.dumps(bad).encode(), (START + 7400) * 1000)
    assert out.dead_letters == 1 and r.ledger("capco").overage_picos == 4 * P
    # the cut: refunded to the overage, the gate opens
    cut = _msg(-3 * P // 2, [(None, 3 * P // 2)], overage=-3 * P)
    cut.update(command_id=cut["command_id"] + ":undo", event_id=cut["event_id"] + ":undo")
    r.feed("t.ledger-commands", 0, "capco", encode_message(cut), (START + 7500) * 1000)
    assert plan_view() == {"invoiced": "2.50", "status": "active", "reason": None}
    assert r.ledger("capco").overage_picos == 5 * P // 2
