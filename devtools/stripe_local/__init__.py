"""A local Stripe-compatible server for Billing Meters, credits and usage invoices.

Spoken to by the real stripe-python SDK (``stripe.StripeClient(key, base_addresses={"api": url,
"meter_events": url})``). See docs/stripe-local.md for what it implements and its fault switches.

Public surface:
- ``LocalStripe``  context manager for tests: server in a thread, SDK clients, clock, faults;
- ``Faults``       fault-injection helpers (``LocalStripe.faults``);
- ``StripeServer`` the server itself (``python -m devtools.stripe_local --port N --state FILE``).
"""

from __future__ import annotations

from devtools.stripe_local._server import StripeServer
from devtools.stripe_local._testing import Faults, LocalStripe

__all__ = ["Faults", "LocalStripe", "StripeServer"]
