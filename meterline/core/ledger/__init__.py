"""Prepaid-credit ledger and enforcement: a pure, deterministic per-customer state machine.

No Kafka, ClickHouse or Stripe here. Money is integer picos (1e-12 of the currency unit) inside and
Decimal strings at the edges (``parse_amount`` / ``format_picos``); times are integer epoch ms (UTC)
taken only from commands. See docs/credits.md for the design.

    state = new_ledger("cus_1", "usd")
    state, effects = apply(state, Grant(grant=CreditGrant(...), at_ms=...))
    state, decision = authorize(state, "req_1", worst_case_picos, now_ms, provider=..., model=...)
    state, effects = apply(state, ApplyPricedUsage(..., request_id="req_1", source=SourcePos(t, p, o)))
    balance_view(state, now_ms)

How the faust agent (the single writer per customer) must use it — exactly-once by construction:

1. The table ``ledgers`` is keyed by customer_id; its value is ``CustomerLedger.to_dict()``: balances,
   holds, budgets, guards AND the applied source offsets / recent event ids, so progress and the
   state it describes are ONE value written atomically (one changelog record).
2. Per source record: ``cmd = ...(source=SourcePos(topic, partition, offset))``; first apply
   ``ExpireDue(now_ms=record.timestamp_ms)`` if due (use the broker record's timestamp, never the
   wall clock, so a replay recomputes the same state), then ``new, eff = apply(state, cmd)``.
   ``eff.skipped`` set → nothing to do. Otherwise write ``table[customer_id] = new.to_dict()``
   (with the record's undelivered effects in its outbox) and wait for that write's acknowledgement,
   THEN send ``eff.entries`` / ``eff.alerts`` / ``eff.status_changes`` (keyed by their
   deterministic ids: entry_id, alert_id). State before effects: "effects first, then state" is
   NOT exact with two source topics (a crash may replay the unpersisted suffix in another
   interleaving; docs/credits.md, "Why it is crash-exact"). A crash after the write re-sends the
   outbox; downstream dedupes by id.
   On ``LedgerCommandError`` (an InputError): dead-letter the record and store
   ``mark_applied(state, cmd.source)``.
3. Faust's committed offsets and the table changelog are NOT atomic (shared/notes/faust-recovery.md).
   On partition assignment, after table recovery (read the changelog to its real end), seek each
   source partition to ``resume_offsets(states of that partition's customers)[f"{topic}:{p}"]``
   (max applied offset + 1) instead of trusting the committed offset. That is exact when the
   changelog partition is a prefix of the processing order (one ordered, idempotent producer).
   Seeking EARLIER is always safe: records at or below a customer's applied offset are skipped and
   re-sent event ids are skipped within the dedupe window, so when in doubt seek to
   min(committed, resume).
4. ``authorize`` must run in the same single writer (it adds a hold to the state); route
   ``POST /v1/authorize`` to the agent owning the customer's partition.
"""

from __future__ import annotations

from meterline.core.ledger._apply import apply, apply_many, authorize, mark_applied, resume_offsets
from meterline.core.ledger._commands import (
    COMMAND_ID_WINDOW_MS,
    MAX_COMMAND_IDS,
    apply_command,
    command_ids,
    command_seen,
    default_policy,
    remember_command,
)
from meterline.core.ledger._guards import usable_credit
from meterline.core.ledger._money import (
    PICOS_PER_UNIT,
    LedgerCommandError,
    format_picos,
    parse_amount,
    period_key,
    to_decimal,
    to_ms,
)
from meterline.core.ledger._state import CustomerLedger, dedupe_digest, new_ledger, pack_recent, unpack_recent
from meterline.core.ledger._types import (
    MAX_DEDUPE_IDS,
    MAX_OPEN_HOLDS,
    PLAN_BLOCK_REASONS,
    Adjust,
    Alert,
    ApplyPricedUsage,
    Authorize,
    Budget,
    Command,
    CreditGrant,
    Decision,
    Effects,
    ExpireDue,
    Grant,
    GrantScope,
    Hold,
    LedgerEntry,
    Policy,
    SetBlock,
    SetBudget,
    SetPlanGate,
    SetPolicy,
    SourcePos,
    StatusChange,
    TopUp,
    VelocityRule,
    Void,
)
from meterline.core.ledger._view import balance_view, fold_entries, status_of

__all__ = [
    "COMMAND_ID_WINDOW_MS",
    "MAX_COMMAND_IDS",
    "MAX_DEDUPE_IDS",
    "MAX_OPEN_HOLDS",
    "PICOS_PER_UNIT",
    "PLAN_BLOCK_REASONS",
    "Adjust",
    "Alert",
    "ApplyPricedUsage",
    "Authorize",
    "Budget",
    "Command",
    "CreditGrant",
    "CustomerLedger",
    "Decision",
    "Effects",
    "ExpireDue",
    "Grant",
    "GrantScope",
    "Hold",
    "LedgerCommandError",
    "LedgerEntry",
    "Policy",
    "SetBlock",
    "SetBudget",
    "SetPlanGate",
    "SetPolicy",
    "SourcePos",
    "StatusChange",
    "TopUp",
    "VelocityRule",
    "Void",
    "apply",
    "apply_command",
    "apply_many",
    "authorize",
    "balance_view",
    "command_ids",
    "command_seen",
    "dedupe_digest",
    "default_policy",
    "fold_entries",
    "format_picos",
    "mark_applied",
    "new_ledger",
    "pack_recent",
    "parse_amount",
    "period_key",
    "remember_command",
    "resume_offsets",
    "status_of",
    "to_decimal",
    "to_ms",
    "unpack_recent",
    "usable_credit",
]
