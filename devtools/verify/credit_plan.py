"""One customer's prepaid setup in a chaos session and the ledger outcome it implies.

Its own module so that the oracle (which holds the plans in :class:`~.oracle.Expected`) and the
ledger checks (:mod:`.credits`) both import it, and neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any


@dataclass(frozen=True, slots=True)
class LedgerOutcome:
    """What a customer's ledger must end as, from Σ charge and the plan alone."""

    grant_debits: Decimal
    overage: Decimal
    remaining: Decimal
    status: str  # "active" | "blocked"
    reason: str | None


@dataclass(frozen=True, slots=True)
class CreditPlan:
    """One customer's prepaid setup, sent as ledger commands BEFORE any of its usage.

    ``grant``: one grant effective a day before the session, no expiry, no scope (None = no grant).
    ``policy``: the overage policy set explicitly (None = the credit agent's default: ``block`` once
    the customer has a grant, ``allow`` before). ``credit_limit`` only with ``credit_limit``.
    """

    customer_id: str
    grant: Decimal | None
    policy: str | None
    credit_limit: Decimal | None = None

    @property
    def effective_policy(self) -> str:
        return self.policy or ("block" if self.grant else "allow")

    def outcome(self, charge: Decimal) -> LedgerOutcome:
        """Every usage is debited (usage is a fact; the policy only decides the status): grants first,
        the rest is overage. Order-independent because all credit exists before the first event."""
        granted = self.grant or Decimal(0)
        from_grants = min(granted, charge)
        overage, remaining = charge - from_grants, granted - from_grants
        policy, reason = self.effective_policy, None
        if policy == "block" and remaining == 0:
            reason = "credit_exhausted"
        elif policy == "credit_limit" and remaining - overage <= -(self.credit_limit or Decimal(0)):
            reason = "credit_limit_reached"
        return LedgerOutcome(from_grants, overage, remaining, "blocked" if reason else "active", reason)

    def commands(self, at_ms: int) -> list[dict[str, Any]]:
        """``ledger-commands`` messages (policy first, then the grant), deterministic command ids."""
        c, out = self.customer_id, []
        if self.policy is not None:
            out.append(
                {
                    "type": "set_policy",
                    "command_id": f"verify-policy:{c}",
                    "customer_id": c,
                    "at_ms": at_ms,
                    "overage": self.policy,
                    "credit_limit": None if self.credit_limit is None else str(self.credit_limit),
                }
            )
        if self.grant is not None:
            out.append(
                {
                    "type": "grant",
                    "command_id": f"verify-grant:{c}",
                    "customer_id": c,
                    "at_ms": at_ms,
                    "grant_id": f"verify-{c}",
                    "amount": str(self.grant),
                    "currency": "usd",
                    "effective_at_ms": at_ms,
                    "expires_at_ms": None,
                    "priority": 50,
                    "category": "paid",
                    "scope": None,
                }
            )
        return out
