"""Stripe invoicing jobs: provision meters/prices/customers, push usage, mirror credits, reconcile.

Public surface (see docs/stripe.md):

- ``BillingConfig`` / ``load_billing_config``  the billing configuration (infra/stripe/billing.yaml)
- ``StripeTarget``                            where Stripe is (real API or the local server)
- ``provision``                               idempotent meters, product, prices, customers
- ``sync`` / ``SyncSummary``                  push meter events from ClickHouse (durable cursor)
- ``mirror_grants`` / ``GrantSummary``        ledger grants/top-ups -> Stripe credit grants
- ``reconcile`` / ``Drift``                   ClickHouse vs cursor vs Stripe meter summaries
- ``build_statement`` / ``render_html`` / ``render_csv``  the itemized usage statement
- ``top_up_command``                          paid top-ups (the webhook's logic; its route: meterline.shell.api.stripe_webhook)
- ``apply_plans`` / ``PlanReport``            plan customers' Stripe subscriptions (docs/stripe.md, Plans)
- ``stripe_period_cents``                     what Stripe bills for one service period of a subscription
"""

from __future__ import annotations

from jobs.stripe._config import BillingConfig, MeterSpec, StripeTarget, load_billing_config, meter_specs
from jobs.stripe.credits import GrantSummary, mirror_grants
from jobs.stripe.plans import PlanReport, apply_plans, stripe_period_cents
from jobs.stripe.provision import ProvisionReport, provision
from jobs.stripe.reconcile import Drift, parse_period, reconcile
from jobs.stripe.statement import Statement, build_statement, render_csv, render_html
from jobs.stripe.sync import SyncSummary, sync
from jobs.stripe.webhooks import ClickHouseSeen, kafka_publisher, top_up_command

__all__ = [
    "BillingConfig",
    "ClickHouseSeen",
    "Drift",
    "GrantSummary",
    "MeterSpec",
    "PlanReport",
    "ProvisionReport",
    "Statement",
    "StripeTarget",
    "SyncSummary",
    "apply_plans",
    "build_statement",
    "kafka_publisher",
    "load_billing_config",
    "meter_specs",
    "mirror_grants",
    "parse_period",
    "provision",
    "reconcile",
    "render_csv",
    "render_html",
    "stripe_period_cents",
    "sync",
    "top_up_command",
]
