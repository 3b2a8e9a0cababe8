"""Messages of the credits topics: round trips and clear errors (no broker)."""

from __future__ import annotations

import json

import pytest

from meterline.core.errors import InvalidEvent
from meterline.core.ledger import (
    Adjust,
    Budget,
    CreditGrant,
    Grant,
    GrantScope,
    LedgerCommandError,
    Policy,
    SetBlock,
    SetBudget,
    SetPolicy,
    TopUp,
    VelocityRule,
    Void,
    parse_amount,
)
from schemas.credits import (
    authorize_message,
    command_message,
    decode_command,
    encode_message,
    entry_from_message,
    entry_message,
)
from tests.credits.helpers import grant_msg

G = CreditGrant(
    "g1",
    "c1",
    parse_amount("10.5"),
    "usd",
    1000,
    5000,
    10,
    "promotional",
    GrantScope(frozenset({"openai"}), None, frozenset({"p1"})),
)
COMMANDS = [
    Grant(grant=G, at_ms=1000),
    TopUp(grant=CreditGrant("g2", "c1", parse_amount("0.000000000001"), "usd", 10, None), at_ms=10),
    Void(grant_id="g1", at_ms=7, reason="refund"),
    Adjust(adjustment_id="a1", amount_picos=-parse_amount("1.25"), reason="fix", at_ms=8, grant_id=None),
    SetPolicy(
        policy=Policy(
            overage="credit_limit",
            credit_limit_picos=parse_amount("5"),
            low_balance_picos=(parse_amount("1"),),
            runaway_customer=VelocityRule(abs_cap_picos=parse_amount("3"), block=True),
        ),
        at_ms=9,
    ),
    SetBudget(budget=Budget("b1", "project", "p1", "month", parse_amount("20"), hard=True), at_ms=3, remove=False),
    SetBlock(scope="api_key:k1", blocked=True, at_ms=4, reason="manual"),
]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: type(c).__name__)
def test_every_command_round_trips_through_json(cmd) -> None:
    msg = command_message(cmd, command_id="x1", customer_id="c1")
    req = decode_command(encode_message(msg))
    assert (req.command, req.command_id, req.customer_id, req.at_ms) == (cmd, "x1", "c1", cmd.time_ms)


def test_authorize_and_entries_round_trip() -> None:
    msg = authorize_message(
        request_id="r1",
        customer_id="c1",
        at_ms=5,
        provider="openai",
        model="gpt-4o",
        input_tokens_estimate=100,
        max_output_tokens=50,
    )
    req = decode_command(json.dumps(msg))
    assert req.command_id == "authorize:r1" and req.authorize is not None and req.authorize.max_output_tokens == 50
    from meterline.core.ledger import LedgerEntry

    e = LedgerEntry("c1:3", "c1", 3, "adjustment", -parse_amount("0.1"), "usd", 9, None, None, "x")
    assert entry_from_message(json.loads(encode_message(entry_message(e)))) == e


@pytest.mark.parametrize(
    "raw, err",
    [
        (b"not json", InvalidEvent),
        (b"[1]", InvalidEvent),
        (b'{"type":"nope"}', InvalidEvent),
        (encode_message({**grant_msg("c", "g", "1", 0), "amount": None}), LedgerCommandError),
        (json.dumps({**grant_msg("c", "g", "1", 0), "amount": 1.5}).encode(), LedgerCommandError),
        (json.dumps({**grant_msg("c", "g", "1", 0), "amount": 2}).encode(), LedgerCommandError),
        (encode_message({**grant_msg("c", "g", "1", 0), "amount": "1.0000000000001"}), LedgerCommandError),
        (encode_message({**grant_msg("c", "g", "1", 0), "at_ms": "5"}), LedgerCommandError),
        (encode_message({**grant_msg("c", "g", "1", 0), "customer_id": ""}), LedgerCommandError),
        (encode_message({**grant_msg("c", "g", "1", 0), "priority": 101}), LedgerCommandError),
    ],
)
def test_malformed_messages_raise_input_errors(raw: bytes, err: type) -> None:
    with pytest.raises(err):
        decode_command(raw)


def test_encode_refuses_floats() -> None:
    with pytest.raises(LedgerCommandError):
        encode_message({"amount": 1.0})
