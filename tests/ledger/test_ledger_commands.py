"""The ledger-command rules the credit agent applies around ``apply``: the default overage policy
(``allow`` until the first grant / top-up, unless a ``set_policy`` came first) and the command-id
dedupe (bounded, packed, the older list form still loads)."""

from __future__ import annotations

from dataclasses import replace

from meterline.core.ledger import (
    COMMAND_ID_WINDOW_MS,
    Policy,
    SetPolicy,
    apply_command,
    command_ids,
    command_seen,
    dedupe_digest,
    default_policy,
    new_ledger,
    pack_recent,
    remember_command,
)

from .helpers import CUST, DAY, grant


def test_a_new_customer_is_postpaid_until_its_first_grant() -> None:
    s = new_ledger(CUST, "usd", default_policy())
    assert s.policy.overage == "allow"
    s, effects, explicit = apply_command(s, grant("g1", "10.00", at=1), explicit_policy=False)
    assert s.policy.overage == "block" and not explicit
    assert len(effects) == 2  # the grant, then the policy switch
    # a second grant changes nothing more, and a customer switched back to allow stays there
    s = replace(s, policy=replace(s.policy, overage="allow"))
    s, effects, _ = apply_command(s, grant("g2", "5.00", at=2), explicit_policy=False)
    assert s.policy.overage == "allow" and len(effects) == 1


def test_a_top_up_switches_the_default_policy_too() -> None:
    s = new_ledger(CUST, "usd", default_policy())
    s, _, _ = apply_command(s, grant("t1", "10.00", at=1, topup=True), explicit_policy=False)
    assert s.policy.overage == "block"


def test_set_policy_first_keeps_the_customers_own_policy() -> None:
    s = new_ledger(CUST, "usd", default_policy())
    s, _, explicit = apply_command(s, SetPolicy(policy=Policy(overage="allow"), at_ms=1), explicit_policy=False)
    assert explicit
    s, effects, explicit = apply_command(s, grant("g1", "10.00", at=2), explicit_policy=explicit)
    assert explicit and s.policy.overage == "allow" and len(effects) == 1


def test_command_ids_are_remembered_packed_and_bounded() -> None:
    seen = command_ids(None)
    assert seen == {} and not command_seen(seen, "c1")
    packed = ""
    for i in range(5):
        packed = remember_command(seen, f"c{i}", 1_000 + i, max_ids=3)
    again = command_ids(packed)
    assert len(again) == 3  # the oldest dropped first
    assert command_seen(again, "c4") and command_seen(again, "c2") and not command_seen(again, "c1")
    assert again[dedupe_digest("c4")] == 1_004
    assert packed == pack_recent(again)  # what is stored reloads to the same bytes


def test_command_ids_outside_the_window_are_forgotten() -> None:
    seen: dict[bytes, int] = {}
    remember_command(seen, "old", 0)
    packed = remember_command(seen, "new", COMMAND_ID_WINDOW_MS + DAY)
    again = command_ids(packed)
    assert command_seen(again, "new") and not command_seen(again, "old")


def test_the_older_list_form_still_loads() -> None:
    seen = command_ids([["cmd-a", 5], ["cmd-b", 7]])
    assert command_seen(seen, "cmd-a") and seen[dedupe_digest("cmd-b")] == 7
