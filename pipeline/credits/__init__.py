"""Prepaid credits in the pipeline: the credit agent (single writer of every customer's ledger),
the JSON messages of the credits topics, and the ClickHouse sink for ledger entries.

See docs/credits.md ("The credit agent") for the design and why it is crash-exact.
"""

from __future__ import annotations

from pipeline.credits.agent import CreditAgent, register_credit_agent
from pipeline.credits.processor import CreditProcessor, Outcome, worst_case_charge
from schemas.credits import (
    AuthorizeRequest,
    LedgerRequest,
    alert_message,
    authorize_message,
    command_message,
    decode_command,
    decode_json,
    encode_message,
    entry_from_message,
    entry_message,
    reply_message,
    status_message,
)

__all__ = [
    "AuthorizeRequest",
    "CreditAgent",
    "CreditProcessor",
    "LedgerRequest",
    "Outcome",
    "alert_message",
    "authorize_message",
    "command_message",
    "decode_command",
    "decode_json",
    "encode_message",
    "entry_from_message",
    "entry_message",
    "register_credit_agent",
    "reply_message",
    "status_message",
    "worst_case_charge",
]
