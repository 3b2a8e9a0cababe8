"""Reconcile: zero drift after a clean sync; the drift shows when Stripe loses an event."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from devtools.stripe_local import LocalStripe
from jobs.stripe import BillingConfig, StripeTarget, load_billing_config, provision, sync
from jobs.stripe._store import load_pushes
from jobs.stripe.reconcile import parse_period, reconcile
from tests.jobs.conftest import DAY, HOUR, Usage


def test_parse_period() -> None:
    assert parse_period("2026-01") == (1_767_225_600, 1_769_904_000)
    assert parse_period("2026-12") == (1_796_083_200, 1_798_761_600)
    assert parse_period("2026-01-02") == (1_767_312_000, 1_767_398_400)
    assert parse_period("2026-01-01..2026-01-03T00:00:00Z") == (1_767_225_600, 1_767_398_400)


def test_reconcile_zero_drift_then_deleted_event_drifts(
    ls: LocalStripe, target: StripeTarget, clickhouse: Any, usage: Usage, cfg: BillingConfig
) -> None:
    client = target.client()
    provision(client, clickhouse, cfg, customers=["acme", "globex"])
    base = ls.now() // HOUR * HOUR - 8 * HOUR
    usage.add_many(
        [(c, base + h * HOUR + 7, 3_333_333_333_337 * (h + 1)) for c in ("acme", "globex") for h in range(6)]
    )
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


def test_reconcile_tells_pending_from_drift(
    ls: LocalStripe, target: StripeTarget, clickhouse: Any, usage: Usage
) -> None:
    """Usage in windows that have not settled yet is pending (with when it is due), not drift;
    once due and synced it is ok; a real loss is still drift."""
    cfg = load_billing_config().with_sync(settle_seconds=300, backoff_seconds=0.01)
    client = target.client()
    provision(client, clickhouse, cfg, customers=["acme"])
    now = ls.now() // HOUR * HOUR + 120  # 2 min into an hour: the previous window is still settling
    usage.add_many(
        [
            ("acme", now - 3 * HOUR + 5, 2_000_000_000_000),  # settled: pushed by the sync
            ("acme", now - HOUR + 5, 3_000_000_000_000),  # ended 2 min ago: held back
            ("acme", now - 60, 5_000_000_000_000),
        ]
    )  # current window
    assert sync(target, clickhouse, cfg, now=now).ok
    start, end = now - DAY, now + DAY
    (row,) = reconcile(client, clickhouse, cfg, start, end, now=now)
    assert row.clickhouse == 10_000_000 and row.pushed == 2_000_000 and row.stripe == 2_000_000
    assert row.pending == 8_000_000 and not row.drifted and row.status == "pending"
    assert row.due_at == now // HOUR * HOUR + HOUR + 300  # the current window's end + settle time

    # Without the settle logic the same numbers are drift: the old rule flagged exactly this.
    assert abs(row.clickhouse - row.pushed) >= 1

    # A real loss among pending usage is still drift.
    victim = load_pushes(clickhouse, customer="acme")[0]
    ls.delete_meter_event(victim.identifier)
    (lost,) = reconcile(client, clickhouse, cfg, start, end, now=now)
    assert lost.drifted and lost.status == "drift" and lost.pending == 8_000_000

    # Due: the next sync pushes everything and it reconciles (except the deleted event).
    later = row.due_at
    assert later is not None
    assert sync(target, clickhouse, cfg, now=later).ok
    (after,) = reconcile(client, clickhouse, cfg, start, end, now=later)
    assert after.pending == 0 and after.pushed == 10_000_000 and after.stripe == 10_000_000 - victim.value
    assert after.status == "drift"


def test_cli_reconcile_exit_code_pending_vs_drift(
    ls: LocalStripe, clickhouse: Any, usage: Usage, clickhouse_dsn: str, tmp_path: Any
) -> None:
    """``meterline stripe reconcile`` exits 0 with usage not due yet (and says when it is pushed),
    1 on real drift."""
    import typer
    from typer.testing import CliRunner

    from meterline.shell.cli_stripe import stripe_app

    app = typer.Typer()
    app.add_typer(stripe_app, name="stripe")
    env = {
        "METERLINE_CLICKHOUSE_DSN": clickhouse_dsn,
        "METERLINE_STRIPE_BASE_URL": ls.url,
        "METERLINE_DATA_DIR": str(tmp_path),
        "METERLINE_STRIPE_API_KEY": "",
    }
    runner = CliRunner()
    now = ls.now() // HOUR * HOUR + 120
    usage.add_many([("acme", now - 3 * HOUR, 1_500_000_000_000), ("acme", now - 30, 15_000_000_000_000)])
    assert runner.invoke(app, ["stripe", "provision"], env=env).exit_code == 0
    r = runner.invoke(app, ["stripe", "sync", "--now", str(now), "--no-progress"], env=env)
    assert r.exit_code == 0, r.output
    period = datetime.fromtimestamp(now, tz=UTC).strftime("%Y-%m")
    if datetime.fromtimestamp(now - 3 * HOUR, tz=UTC).month != datetime.fromtimestamp(now, tz=UTC).month:
        iso = lambda t: datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: E731
        period = f"{iso(now - DAY)}..{iso(now + DAY)}"  # the test runs near a month boundary
    r = runner.invoke(app, ["stripe", "reconcile", "--period", period, "--now", str(now)], env=env)
    assert r.exit_code == 0, r.output
    assert "pending" in r.output and "0 drift(s)" in r.output and "DRIFT" not in r.output
    ls.delete_meter_event(load_pushes(clickhouse)[0].identifier)
    r = runner.invoke(app, ["stripe", "reconcile", "--period", period, "--now", str(now)], env=env)
    assert r.exit_code == 1 and "DRIFT" in r.output
