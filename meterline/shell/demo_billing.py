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

Plan customers (``meterline plans subscribe`` facts in ClickHouse) are provisioned once their facts
have landed, at Stripe's clock = now (their period starts at the subscription): a licensed fee price
and a graduated metered price whose free tier is the allowance (``jobs.stripe.plans``). At the end,
between the period's draft invoice and its finalization, the minimum-commitment true-up is added,
and the plan lines of the closed period (fee billed in advance, usage beyond the allowance, true-up)
are read back from the invoices.

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
from jobs.stripe.plans import true_ups

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


@dataclass(frozen=True)
class PlanLine:
    """One Stripe invoice line of a plan customer's closed period."""

    customer_id: str
    kind: str  # fee | overage (the metered tokens: free up to the allowance) | true-up
    description: str
    quantity: int
    amount_cents: int
    invoice_id: str


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
        self.plan_customers: list[str] = []
        self.pending_plans: list[str] = []
        self.warnings: list[str] = []
        self.started = self.local.now()

    def provision_plans(self, customers: list[str], *, timeout: float = 60.0) -> list[str]:
        """Map the plan customers once the sink has landed their facts (the mapping reads ClickHouse);
        those not landed within ``timeout`` are mapped by :meth:`close_period`.

        Returns the provisioning warnings (a plan Stripe cannot express, a customer not landed)."""
        deadline = time.monotonic() + timeout
        with self.runtime.query_client() as ch:
            while True:
                landed = {
                    str(r[0])
                    for r in ch.query(
                        "SELECT DISTINCT customer_id FROM subscription_events FINAL WHERE customer_id IN {c:Array(String)}",
                        parameters={"c": customers},
                    ).result_rows
                }
                plans = ch.query("SELECT count() FROM plans").result_rows[0][0]
                if (landed == set(customers) and plans) or time.monotonic() >= deadline:
                    break
                time.sleep(0.5)
            self.local.set_clock(int(time.time()))
            self.started = self.local.now()
            report = provision(self.target.client(), ch, self.cfg, now=self.local.now())
        self.pending_plans = sorted(set(self.pending_plans) | set(customers))
        self.plan_customers = sorted(set(self.plan_customers) | {c for c in landed if c in report.customers})
        self.links.update({c: report.customers[c] for c in self.plan_customers})
        missing = [
            f"{c}: subscription not in ClickHouse yet (mapped to Stripe when the period closes)"
            for c in sorted(set(customers) - landed)
        ]
        return missing + list(report.warnings)

    def close_period(self) -> tuple[list[InvoiceRow], Any]:
        client = self.target.client()
        pending = [c for c in self.pending_plans if c not in self.plan_customers]
        if pending:  # the subscriptions had not landed at start: map them now (Stripe backdates to the period start)
            self.warnings = self.provision_plans(pending)
        self.local.set_clock(int(time.time()) + HOUR + self.cfg.sync.settle_seconds + 1)
        with self.runtime.query_client() as ch:
            mirror_grants(client, ch, self.cfg, ledger_grant_facts(ch))
            summary = sync(self.target, ch, self.cfg, now=self.local.now())
            charges = dict(
                ch.query("SELECT customer_id, sum(charge) FROM usage_priced GROUP BY customer_id").result_rows
            )
        if self.plan_customers:
            # Just past the plan periods' end (after the pay-per-token ones: those started earlier):
            # Stripe drafts the cycle invoices and keeps them editable for an hour, in which the
            # true-ups are added (what `sync` does in that hour); then they are finalized.
            self.local.set_clock(max(self._plan_period_ends()) + 120)
            with self.runtime.query_client() as ch:
                summary.true_ups = true_ups(client, ch, self.cfg)
        else:
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

    def _plan_period_ends(self) -> list[int]:
        from jobs.plans.billing import load_catalog, load_events
        from meterline.core.plans import fold_timeline

        ends = []
        with self.runtime.query_client() as ch:
            catalog = load_catalog(ch)
            for cid in self.plan_customers:
                period = fold_timeline(cid, load_events(ch, cid), catalog).period_at(self.started)
                if period is not None:
                    ends.append(int(period.end))
        return ends

    def plan_lines(self, rows: list[InvoiceRow]) -> list[PlanLine]:
        """The Stripe lines of each plan customer's closed period ``[period_start, period_end)`` of
        its cycle invoice: the fee (billed in advance on the invoice that opened the period), the
        metered usage (free up to the allowance, then overage) and the true-up."""
        client = self.target.client()
        out: list[PlanLine] = []
        usage_type: dict[str, str] = {}
        for row in rows:
            if row.customer_id not in self.plan_customers:
                continue
            closing = client.v1.invoices.retrieve(row.invoice_id)
            start, end = int(closing.period_start), int(closing.period_end)
            sub = self.links[row.customer_id].subscription_id
            for inv in client.v1.invoices.list({"subscription": sub, "limit": 100}).auto_paging_iter():
                if inv.status == "void":
                    continue
                for line in inv.lines.auto_paging_iter():
                    if not (start <= line.period.start and line.period.end <= end):
                        continue
                    if line.parent and line.parent.type == "invoice_item_details":
                        kind = "true-up"
                    else:
                        price = line.pricing.price_details.price
                        if price not in usage_type:
                            usage_type[price] = client.v1.prices.retrieve(price).recurring.usage_type
                        kind = "overage" if usage_type[price] == "metered" else "fee"
                    out.append(
                        PlanLine(
                            customer_id=row.customer_id,
                            kind=kind,
                            description=str(line.description or ""),
                            quantity=int(line.quantity or 0),
                            amount_cents=int(line.amount),
                            invoice_id=inv.id,
                        )
                    )
        order = {"fee": 0, "overage": 1, "true-up": 2}
        return sorted(out, key=lambda p: (p.customer_id, order[p.kind]))

    def stop(self) -> None:
        self.local.stop()
