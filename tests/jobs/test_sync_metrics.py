"""`stripe sync` counts every meter event it sent by outcome (meterline_stripe_meter_events_total),
against the real stripe SDK and the bundled Stripe-compatible server."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY

from devtools.stripe_local import LocalStripe
from jobs.stripe import BillingConfig, StripeTarget, sync
from tests.jobs.conftest import Usage
from tests.jobs.test_provision_sync import _seed, _setup


def _sent(outcome: str) -> float:
    return REGISTRY.get_sample_value("meterline_stripe_meter_events_total", {"outcome": outcome}) or 0.0


def test_sync_counts_meter_events_by_outcome(
    ls: LocalStripe, target: StripeTarget, clickhouse: Any, usage: Usage, cfg: BillingConfig
) -> None:
    before = {o: _sent(o) for o in ("acked", "too_old", "failed")}
    custs = ["acme", "globex"]
    base, _ = _setup(ls, target, clickhouse, cfg, custs)
    _seed(usage, base, custs)
    summary = sync(target, clickhouse, cfg, now=ls.now())
    assert summary.acked > 0
    assert _sent("acked") - before["acked"] == summary.acked
    assert _sent("failed") - before["failed"] == len(summary.failed) == 0
    again = sync(target, clickhouse, cfg, now=ls.now())  # nothing new: nothing sent, nothing counted
    assert again.sent == 0 and _sent("acked") - before["acked"] == summary.acked
