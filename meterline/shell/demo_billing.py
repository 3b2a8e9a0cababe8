"""The demo's billing period: Stripe invoices the user can see, from the demo's own usage.

Runs against the bundled local Stripe-compatible server with its state in
``<data_dir>/stripe-demo.sqlite`` (kept after the run: inspect it with
``python -m devtools.stripe_local --state <that file>``). The story, in Stripe's clock:

1. at start: the clock is set to the start of the current hour and the customers are provisioned
   (meter, product, metered price, customer, subscription), so the period covers the demo's usage;
2. at the end: the clock moves past the last hourly window + its settle time, the prepaid grants
   are mirrored from ``ledger-commands`` as Stripe credit grants, usage is synced as meter events
   (deterministic identifiers), the clock moves past the period end and the period is invoiced:
   each invoice = the customer's ClickHouse charge − prepaid credit used.

The same jobs (``jobs.stripe``) run in production against the real Stripe API; only the clock
moves here are demo-only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from devtools.stripe_local import LocalStripe
from jobs.stripe import StripeTarget, load_billing_config, mirror_grants, provision, sync
from jobs.stripe.credits import ledger_grant_facts

HOUR = 3600
PERIOD_DAYS = 32  # past a monthly period's end


@dataclass(frozen=True)
class InvoiceRow:
    customer_id: str
    usage_charge: Decimal  # exact, from ClickHouse usage_priced
    invoice_id: str
    subtotal_cents: int
    credit_cents: int
    total_cents: int
    status: str


class DemoBilling:
    def __init__(self, runtime: Any, customers: list[str]) -> None:
        self.runtime = runtime
        self.path = runtime.settings.data_dir / "stripe-demo.sqlite"
        self.path.unlink(missing_ok=True)
        self.local = LocalStripe(self.path)
        self.target = StripeTarget.local(self.local.url)
        self.cfg = load_billing_config()
        # The period must start before the first hourly window (a meter event carries its window start).
        self.local.set_clock((int(time.time()) // HOUR) * HOUR - 60)
        with runtime.query_client() as ch:
            self.links = provision(self.target.client(), ch, self.cfg, customers=customers).customers
        self.local.set_clock(int(time.time()))

    def close_period(self) -> tuple[list[InvoiceRow], Any]:
        client = self.target.client()
        self.local.set_clock(int(time.time()) + HOUR + self.cfg.sync.settle_seconds + 1)
        with self.runtime.query_client() as ch:
            mirror_grants(client, ch, self.cfg, ledger_grant_facts(ch))
            summary = sync(self.target, ch, self.cfg, now=self.local.now())
            charges = dict(
                ch.query("SELECT customer_id, sum(charge) FROM usage_priced GROUP BY customer_id").result_rows
            )
        self.local.advance_clock(PERIOD_DAYS * 86_400)
        self.local.close_periods(finalize=True)
        rows = []
        for customer, link in sorted(self.links.items()):
            for inv in client.v1.invoices.list({"customer": link.stripe_customer_id}).data:
                if inv.billing_reason != "subscription_cycle":
                    continue  # the 0 invoice Stripe issues when a (metered-only) subscription starts
                rows.append(
                    InvoiceRow(
                        customer_id=customer,
                        usage_charge=charges.get(customer, Decimal(0)),
                        invoice_id=inv.id,
                        subtotal_cents=inv.subtotal,
                        credit_cents=inv.subtotal - inv.total,
                        total_cents=inv.total,
                        status=inv.status,
                    )
                )
        return rows, summary

    def stop(self) -> None:
        self.local.stop()
