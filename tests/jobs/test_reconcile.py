"""Reconcile: zero drift after a clean sync; the drift shows when Stripe loses an event."""

from __future__ import annotations

from typing import Any

from jobs.stripe import BillingConfig, StripeTarget, provision, sync
from jobs.stripe._store import load_pushes
from jobs.stripe.reconcile import parse_period, reconcile
from meterline.stripe_local import LocalStripe
from tests.jobs.conftest import DAY, HOUR, Usage


def test_parse_period() -> None:
    assert parse_period("2026-01") == (1_767_225_600, 1_769_904_000)
    assert parse_period("2026-12") == (1_796_083_200, 1_798_761_600)
    assert parse_period("2026-01-02") == (1_767_312_000, 1_767_398_400)
    assert parse_period("2026-01-01..2026-01-03T00:00:00Z") == (1_767_225_600, 1_767_398_400)


def test_reconcile_zero_drift_then_deleted_event_drifts(ls: LocalStripe, target: StripeTarget, clickhouse: Any,
                                                        usage: Usage, cfg: BillingConfig) -> None:
    client = target.client()
    provision(client, clickhouse, cfg, customers=["acme", "globex"])
    base = ls.now() // HOUR * HOUR - 8 * HOUR
    usage.add_many([(c, base + h * HOUR + 7, 3_333_333_333_337 * (h + 1)) for c in ("acme", "globex") for h in range(6)])
    assert sync(target, clickhouse, cfg, now=ls.now()).ok
    start, end = base - DAY, base + DAY
    rows = reconcile(client, clickhouse, cfg, start, end)
    assert [(r.customer_id, r.drifted) for r in rows] == [("acme", False), ("globex", False)]
    assert all(r.stripe == r.pushed and abs(r.clickhouse - r.pushed) < 1 for r in rows)

    victim = next(p for p in load_pushes(clickhouse, customer="globex") if p.window_start == base + 2 * HOUR)
    ls.delete_meter_event(victim.identifier)  # Stripe loses it behind our back
    rows = reconcile(client, clickhouse, cfg, start, end)
    drift = {r.customer_id: r for r in rows}
    assert not drift["acme"].drifted and drift["globex"].drifted
    assert drift["globex"].pushed - drift["globex"].stripe == victim.value
