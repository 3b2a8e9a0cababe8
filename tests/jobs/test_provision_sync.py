"""Provision and sync against LocalStripe + real chDB: idempotency, crash safety, faults, late usage."""

from __future__ import annotations

from decimal import ROUND_FLOOR, Decimal
from typing import Any

import pytest
import stripe

from devtools.stripe_local import LocalStripe
from jobs.stripe import BillingConfig, StripeTarget, provision, sync
from jobs.stripe._store import load_customers, load_pushes
from tests.jobs.conftest import DAY, HOUR, Usage


def meter_total(client: stripe.StripeClient, event_name: str, stripe_customer: str, start: int, end: int) -> Decimal:
    meter = next(
        m for m in client.v1.billing.meters.list({"limit": 100}).auto_paging_iter() if m.event_name == event_name
    )
    res = client.v1.billing.meters.event_summaries.list(
        meter.id, {"customer": stripe_customer, "start_time": start - start % 60, "end_time": end - end % 60 + 60}
    )
    return Decimal(str(res.data[0].aggregated_value))


def micros_floor(amount: Decimal) -> int:
    return int((amount * 10**6).to_integral_value(rounding=ROUND_FLOOR))


def counts(client: stripe.StripeClient) -> dict[str, int]:
    return {
        "meters": len(list(client.v1.billing.meters.list({"limit": 100}).auto_paging_iter())),
        "prices": len(list(client.v1.prices.list({"limit": 100}).auto_paging_iter())),
        "products": len(list(client.v1.products.list({"limit": 100}).auto_paging_iter())),
        "customers": len(list(client.v1.customers.list({"limit": 100}).auto_paging_iter())),
        "subscriptions": len(list(client.v1.subscriptions.list({"limit": 100}).auto_paging_iter())),
    }


def test_provision_twice_creates_nothing_the_second_time(
    ls: LocalStripe, target: StripeTarget, clickhouse: Any, cfg: BillingConfig
) -> None:
    client = target.client()
    first = provision(client, clickhouse, cfg, customers=["acme", "globex"])
    assert {"meter:meterline_charge", "customer:acme", "customer:globex", "subscription:acme"} <= set(first.created)
    before = counts(client)
    assert before == {"meters": 1, "prices": 1, "products": 1, "customers": 2, "subscriptions": 2}
    second = provision(client, clickhouse, cfg, customers=["acme", "globex"])
    assert second.created == [] and second.warnings == []
    assert counts(client) == before
    # the mapping lost (a fresh ClickHouse): found again by metadata, still nothing created
    clickhouse.command("TRUNCATE TABLE stripe_customers")
    third = provision(client, clickhouse, cfg, customers=["acme", "globex"])
    assert third.created == [] and counts(client) == before
    assert set(load_customers(clickhouse)) == {"acme", "globex"}
    price = client.v1.prices.retrieve(first.prices["meterline_charge"])
    assert price.unit_amount_decimal == Decimal("0.0001") and price.recurring.meter == first.meters["meterline_charge"]


def _setup(
    ls: LocalStripe, target: StripeTarget, ch: Any, cfg: BillingConfig, customers: list[str]
) -> tuple[int, dict[str, str]]:
    provision(target.client(), ch, cfg, customers=customers)
    base = ls.now() // HOUR * HOUR - 10 * HOUR
    return base, {c: link.stripe_customer_id for c, link in load_customers(ch).items()}


def _seed(usage: Usage, base: int, customers: list[str], hours: int = 6, per_hour: int = 3) -> None:
    items = []
    for c_i, cust in enumerate(customers):
        for h in range(hours):
            for k in range(per_hour):  # awkward picos: sub-micro remainders in every window
                items.append((cust, base + h * HOUR + 60 * k + c_i, 1_234_567_891 * (h + 1) + 777_777 * k + 13 * c_i))
    usage.add_many(items)


def _assert_counted_once(ls: LocalStripe, target: StripeTarget, usage: Usage, base: int, sc: dict[str, str]) -> None:
    client = target.client()
    for cust, exact in usage.charges.items():
        got = meter_total(client, "meterline_charge", sc[cust], base - DAY, ls.now())
        assert got == micros_floor(exact), cust  # every window once; remainder < 1 micro carried


def test_sync_pushes_each_window_once_with_carried_rounding(
    ls: LocalStripe, target: StripeTarget, clickhouse: Any, usage: Usage, cfg: BillingConfig
) -> None:
    custs = ["acme", "globex"]
    base, sc = _setup(ls, target, clickhouse, cfg, custs)
    _seed(usage, base, custs)
    summary = sync(target, clickhouse, cfg, now=ls.now())
    assert summary.ok and summary.planned == 12 and summary.acked == 12 and summary.transport == "v1"
    _assert_counted_once(ls, target, usage, base, sc)
    idents = {p.identifier for p in load_pushes(clickhouse)}
    assert f"ml:acme:meterline_charge:{base}:r0" in idents
    again = sync(target, clickhouse, cfg, now=ls.now())  # nothing new: nothing sent
    assert (again.planned, again.sent) == (0, 0)
    _assert_counted_once(ls, target, usage, base, sc)


def test_crash_between_push_and_cursor_write_resends_only_unacked(
    ls: LocalStripe, target: StripeTarget, clickhouse: Any, usage: Usage, cfg: BillingConfig
) -> None:
    custs = ["acme", "globex"]
    base, sc = _setup(ls, target, clickhouse, cfg, custs)
    _seed(usage, base, custs)
    sent: list[str] = []

    def crash_after_five(push: Any) -> None:
        sent.append(push.identifier)
        if len(sent) == 5:  # Stripe has event 5, the cursor never hears of it
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        sync(target, clickhouse, cfg, now=ls.now(), on_sent=crash_after_five)
    states = [p.status for p in load_pushes(clickhouse)]
    assert states.count("acked") == 4 and states.count("pending") == 8
    resumed = sync(target, clickhouse, cfg, now=ls.now())
    assert resumed.planned == 0 and resumed.resent == 8 and resumed.acked == 8  # #5 answered "already exists"
    assert all(p.status == "acked" for p in load_pushes(clickhouse))
    _assert_counted_once(ls, target, usage, base, sc)
    assert len([e for e in ls.meter_events("meterline_charge") if e.get("status", "valid") == "valid"]) == 12


def test_faults_never_double_count(
    ls: LocalStripe, target: StripeTarget, clickhouse: Any, usage: Usage, cfg: BillingConfig
) -> None:
    custs = ["acme"]
    base, sc = _setup(ls, target, clickhouse, cfg, custs)
    _seed(usage, base, custs, hours=8)
    path = "/v1/billing/meter_events"
    ls.faults.drop_response(2, path_prefix=path)  # committed, answer lost: SDK replays the key
    ls.faults.server_error(2, status=503, path_prefix=path)
    ls.faults.rate_limit(3, path_prefix=path, should_retry=False)  # plain 429: our own back-off
    ls.faults.server_error(1, status=500, path_prefix=path)
    slept: list[float] = []
    summary = sync(target, clickhouse, cfg, now=ls.now(), sleep=slept.append)
    assert summary.ok and summary.acked == 8 and summary.retries >= 3 and len(slept) >= 3
    assert ls.faults.armed() == []
    _assert_counted_once(ls, target, usage, base, sc)


def test_transient_outage_leaves_rows_pending_then_next_run_delivers(
    ls: LocalStripe, target: StripeTarget, clickhouse: Any, usage: Usage, cfg: BillingConfig
) -> None:
    from meterline.core.errors import TransientError

    base, sc = _setup(ls, target, clickhouse, cfg, ["acme"])
    _seed(usage, base, ["acme"], hours=3)
    ls.faults.rate_limit(50, path_prefix="/v1/billing/meter_events", should_retry=False)
    with pytest.raises(TransientError):
        sync(target, clickhouse, cfg.with_sync(max_attempts=2), now=ls.now(), sleep=lambda s: None)
    ls.faults.clear()
    assert sync(target, clickhouse, cfg, now=ls.now()).acked == 3
    _assert_counted_once(ls, target, usage, base, sc)


def test_late_usage_goes_as_a_delta_revision(
    ls: LocalStripe, target: StripeTarget, clickhouse: Any, usage: Usage, cfg: BillingConfig
) -> None:
    base, sc = _setup(ls, target, clickhouse, cfg, ["acme"])
    _seed(usage, base, ["acme"], hours=4)
    sync(target, clickhouse, cfg, now=ls.now())
    usage.add("acme", base + HOUR + 1800, 2_500_000_000_000)  # $2.50 late, into the 2nd window
    late = sync(target, clickhouse, cfg, now=ls.now())
    assert late.planned == 1 and late.acked == 1
    rev = [p for p in load_pushes(clickhouse) if p.window_start == base + HOUR]
    assert [p.revision for p in rev] == [0, 1] and rev[1].identifier.endswith(":r1")
    assert rev[1].amount == Decimal("2.5")
    _assert_counted_once(ls, target, usage, base, sc)


def test_windows_older_than_35_days_are_reported(
    ls: LocalStripe, target: StripeTarget, clickhouse: Any, usage: Usage, cfg: BillingConfig
) -> None:
    base, _ = _setup(ls, target, clickhouse, cfg, ["acme"])
    usage.add("acme", base - 40 * DAY, 1_000_000_000_000)
    usage.add("acme", base, 1_000_000_000_000)
    summary = sync(target, clickhouse, cfg, now=ls.now())
    assert not summary.ok and summary.acked == 1
    assert [p.window_start for p in summary.too_old] == [base - 40 * DAY]
    assert [p.status for p in load_pushes(clickhouse)] == ["too_old", "acked"]


def test_stream_transport_above_threshold(
    ls: LocalStripe, target: StripeTarget, clickhouse: Any, usage: Usage, cfg: BillingConfig
) -> None:
    custs = [f"c{i}" for i in range(3)]
    base, sc = _setup(ls, target, clickhouse, cfg, custs)
    _seed(usage, base, custs, hours=8, per_hour=1)
    summary = sync(target, clickhouse, cfg.with_sync(stream_threshold=5), now=ls.now())
    assert summary.transport == "v2" and summary.acked == 24 and summary.ok
    _assert_counted_once(ls, target, usage, base, sc)
