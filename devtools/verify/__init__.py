"""``meterline verify``: a bounded chaos session that proves nothing is lost and nothing is double-charged.

The invariant (pricing part; see docs/invariants.md)::

    Σ accepted events produced (distinct ids) + Σ bad inputs  =  rows(usage_priced) + rows(usage_rejected)
    per customer: Σ cost, Σ charge, count in usage_priced     =  an independent exact Decimal expectation
    usage_hourly / usage_daily                                =  the raw sums of usage_priced, exactly

and it must hold after SIGKILLed workers, replayed / duplicated input, hostile records and a
ClickHouse outage. The pieces are public so the test suite (``tests/invariants``) drives the same
harness as the CLI:

* :class:`Expected` — the oracle. It never calls :mod:`meterline.core.pricing`: cost is
  ``Σ tokens × per-million rate / 10^6`` in plain :class:`~decimal.Decimal`, charge is
  ``cost × (1 + markup_pct / 100)``, from :data:`RATES` / :data:`MARKUP_PCT` (the numbers of
  ``infra/prices/seed.yaml``).
* :data:`PRICING_CHECKS` — functions ``(query, expected) -> list[Delta]``. Credits / Stripe sync add
  their own checks of the same shape (e.g. "Σ grants − Σ debits = balance", "Σ meter events =
  Σ charge") and pass ``checks=PRICING_CHECKS + (...)`` to :func:`check_invariants`.
* :class:`FlakyClickHouse` — the sink's client factory, with a switch that makes ClickHouse
  unreachable (every call and the factory raise) until restored.
* :class:`ChaosStack` — broker topics + faust worker processes + sink thread on one chDB database.

:func:`run_verify` runs the session and returns a :class:`VerifyReport`; :func:`verify_command` is
the typer command the CLI mounts as ``meterline verify`` (exit 1 on any Δ).

Layout: :mod:`.oracle` (the expectation and the pricing checks), :mod:`.credits` (the ledger part),
:mod:`.stripe_sync` (the Stripe part), :mod:`.inputs` (events and hostile records), :mod:`.stack` (the
chaos stack), :mod:`.command` (the session and the CLI command). Everything public is re-exported
here.
"""

from __future__ import annotations

from devtools.verify.command import VerifyReport, run_verify, verify_command
from devtools.verify.credits import (
    CreditPlan,
    LedgerOutcome,
    credit_checks,
    ledger_check,
    plan_credits,
    status_check,
)
from devtools.verify.inputs import hostile_records, make_events
from devtools.verify.oracle import (
    CUSTOMERS,
    MARKUP_PCT,
    PRICING_CHECKS,
    RATES,
    Delta,
    Expected,
    InvariantCheck,
    check_invariants,
    price_file,
)
from devtools.verify.stack import ChaosStack, FlakyClickHouse
from devtools.verify.stripe_sync import (
    StripeReport,
    StripeSession,
    StripeUnits,
    SyncCrash,
    expected_stripe_units,
    stripe_deltas,
)

__all__ = [
    "CUSTOMERS",
    "MARKUP_PCT",
    "PRICING_CHECKS",
    "RATES",
    "ChaosStack",
    "CreditPlan",
    "Delta",
    "Expected",
    "FlakyClickHouse",
    "InvariantCheck",
    "LedgerOutcome",
    "StripeReport",
    "StripeSession",
    "StripeUnits",
    "SyncCrash",
    "VerifyReport",
    "check_invariants",
    "credit_checks",
    "expected_stripe_units",
    "hostile_records",
    "ledger_check",
    "make_events",
    "plan_credits",
    "price_file",
    "run_verify",
    "status_check",
    "stripe_deltas",
    "verify_command",
]
