"""Ledger-command rules the single writer applies around :func:`apply`: the default overage policy
and the command-id dedupe. Pure: the credit agent keeps their state beside the ledger in its table
value (``"x"``: ``explicit_policy``, ``cmds``), and calls these to decide.

Default policy: a new customer is postpaid (``allow``) until its first grant or top-up, which
switches it to prepaid (``block``), unless a ``set_policy`` came first (then the customer's own
policy stands, whatever grants follow).

Command dedupe: every applied (or refused) command's id is remembered as a fixed-size digest with
its time, packed (:func:`pack_recent`), within a window and a count bound, oldest dropped first; a
command whose id is remembered is not applied again. The older stored form, a list of
``[command_id, t]``, still loads.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from meterline.core.ledger._apply import apply
from meterline.core.ledger._state import CustomerLedger, dedupe_digest, pack_recent, unpack_recent
from meterline.core.ledger._types import DAY_MS, Command, Effects, Grant, Policy, SetPolicy, TopUp

#: How many command ids, and for how long, a customer's value remembers (production bounds).
MAX_COMMAND_IDS = 10_000
COMMAND_ID_WINDOW_MS = 35 * DAY_MS


def default_policy() -> Policy:
    """A new customer's policy: postpaid (``allow``) until it gets credit."""
    return Policy(overage="allow")


def apply_command(
    state: CustomerLedger, command: Command, *, explicit_policy: bool
) -> tuple[CustomerLedger, list[Effects], bool]:
    """``apply(state, command)`` plus the default-policy rule.

    Returns the new state, the effects (one per applied command, in order) and whether the
    customer's policy is now explicit (a ``set_policy`` was applied, now or before). A first
    grant / top-up of a customer whose policy is not explicit switches ``allow`` to ``block``.
    Raises :class:`LedgerCommandError` like :func:`apply`.
    """
    had_grants = bool(state.grants)
    state, eff = apply(state, command)
    effects = [eff]
    if isinstance(command, SetPolicy):
        return state, effects, True
    if (
        isinstance(command, (Grant, TopUp))
        and not had_grants
        and not explicit_policy
        and state.grants
        and state.policy.overage != "block"
    ):
        # Default policy: prepaid (block) once a customer has credit, postpaid (allow) before.
        state, eff = apply(state, SetPolicy(policy=replace(state.policy, overage="block"), at_ms=command.at_ms))
        effects.append(eff)
    return state, effects, explicit_policy


def command_ids(stored: Any) -> dict[bytes, int]:
    """The remembered command ids (digest -> time) from a stored ``cmds``: the packed string,
    the older ``[[command_id, t], ...]`` list (digested as it is read), or nothing."""
    if not stored:
        return {}
    return unpack_recent(stored)


def command_seen(seen: dict[bytes, int], command_id: str) -> bool:
    return dedupe_digest(command_id) in seen


def remember_command(
    seen: dict[bytes, int],
    command_id: str,
    at_ms: int,
    *,
    max_ids: int = MAX_COMMAND_IDS,
    window_ms: int = COMMAND_ID_WINDOW_MS,
) -> str:
    """Add ``command_id`` (at ``at_ms``) to ``seen`` and return the packed, bounded form to store:
    the most recent ids within ``window_ms`` of the newest and at most ``max_ids`` of them, so the
    stored bytes stay bounded whatever the ids' length or number."""
    seen[dedupe_digest(command_id)] = at_ms
    horizon = max(seen.values()) - window_ms
    items = sorted(((t, k) for k, t in seen.items() if t >= horizon))[-max_ids:]
    return pack_recent({k: t for t, k in items})
