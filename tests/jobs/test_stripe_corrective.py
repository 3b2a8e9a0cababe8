"""A window re-rated DOWN after Stripe's 24 h cancellation window: the delta reaches Stripe as a
corrective amount (a negative invoice item on the customer's next invoice), exactly once, and
reconcile accounts for it (Stripe's meter summaries − the credits = the re-rated charge).

Real components: chDB (the migrated schema), the real re-rating job (jobs/reprice), the bundled
Stripe server driven by the stripe SDK; Stripe's clock is moved past 24 h with ``advance_clock``.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from datetime import UTC, datetime
from decimal import ROUND_DOWN, Decimal
from pathlib import Path
from typing import Any

import pytest

from devtools.stripe_local import LocalStripe
from jobs.reprice.apply import apply_plan
from jobs.reprice.compute import Filters, open_reprice
from jobs.stripe import BillingConfig, StripeTarget, provision, sync
from jobs.stripe._store import CREDITED, last_carry, load_customers, load_pushes
from jobs.stripe.corrective import SENT, load_corrections
from jobs.stripe.reconcile import reconcile
from meterline.shell.api.admin import RunResult
from meterline.shell.runtime import sync_summary_line
from tests.jobs.conftest import DAY, HOUR
from tests.jobs.reprice_helpers import BOOK_BEFORE, CUSTOMERS, engine, expected_totals, insert_priced, make_events

DISCOUNTED: dict[str, Any] = {
    **BOOK_BEFORE,
    "rate_cards": [*BOOK_BEFORE["rate_cards"], {"customer_id": "globex", "discount_pct": "15"}],
}


def _seed(ls: LocalStripe, target: StripeTarget, ch: Any, cfg: BillingConfig, n: int = 300) -> tuple[int, list]:
    now = ls.now()
    base = now // HOUR * HOUR - 6 * HOUR
    ls.set_clock(base - HOUR)  # the subscriptions start before the usage (so their invoice bills it)
    provision(target.client(), ch, cfg, customers=list(CUSTOMERS))
    ls.set_clock(now)
    events = make_events(23, n, t0=base, seconds=5 * HOUR)
    insert_priced(ch, events, engine(BOOK_BEFORE))
    first = sync(target, ch, cfg, now=ls.now())
    assert first.ok and first.acked > 0
    return base, events


def _discount_after_the_fact(ls: LocalStripe, ch: Any, base: int) -> None:
    with open_reprice(ch, engine(DISCOUNTED), Filters(base, base + 6 * HOUR)) as rp:
        rp.report()
        res = apply_plan(
            ch, rp, ran_by="test", reason="discount", command="test", send=lambda c: None, at_ms=ls.now() * 1000
        )
    assert res.rows > 0


def _items(client: Any, stripe_customer: str) -> list[Any]:
    return [
        ii
        for ii in client.v1.invoice_items.list({"customer": stripe_customer, "limit": 100}).auto_paging_iter()
        if (ii.metadata.to_dict() if ii.metadata else {}).get("meterline_correction")
    ]


def test_a_discount_older_than_24h_is_credited_on_the_next_invoice_and_reconcile_is_clean(
    ls: LocalStripe, target: StripeTarget, clickhouse: Any, cfg: BillingConfig
) -> None:
    client = target.client()
    base, events = _seed(ls, target, clickhouse, cfg)
    before = {(p.customer_id, p.window_start, p.revision): p for p in load_pushes(clickhouse)}
    ls.advance_clock(25 * HOUR)  # Stripe can no longer cancel those meter events
    _discount_after_the_fact(ls, clickhouse, base)

    s = sync(target, clickhouse, cfg, now=ls.now())
    assert s.ok, s
    assert s.cancels == 0 and s.sent == 0 and s.credited > 0  # nothing un-pushed, nothing re-pushed
    assert [c.customer_id for c in s.corrections] == ["globex"]
    # the meter events Stripe has are untouched; the shrunk windows are credited revisions
    credited = [p for p in load_pushes(clickhouse) if p.status == CREDITED]
    assert {p.customer_id for p in credited} == {"globex"} and len(credited) == s.credited
    assert all(p.value == 0 and p.amount < 0 for p in credited)
    assert all(before[k].status == "acked" for k in before)

    # the corrective amount: exact delta, whole cents toward zero, the sub-cent rest carried
    old = expected_totals(events, engine(BOOK_BEFORE))["globex"][1]
    new = expected_totals(events, engine(DISCOUNTED))["globex"][1]
    (corr,) = load_corrections(clickhouse, customer="globex")
    assert corr.status == SENT and corr.amount == new - old < 0
    assert corr.cents == int((corr.amount * 100).to_integral_value(rounding=ROUND_DOWN))
    assert corr.carry_after == corr.amount * 100 - corr.cents
    link = load_customers(clickhouse)["globex"]
    (item,) = _items(client, link.stripe_customer_id)
    assert item.id == corr.stripe_id and item.amount == corr.cents and item.currency == "usd"
    assert item.invoice is None  # pending: the customer's next invoice takes it
    assert item.period.start == base and item.period.end == base + 5 * HOUR

    # the next invoice (preview) carries the credit line
    preview = client.v1.invoices.create_preview({"subscription": link.subscription_id})
    assert corr.cents in [int(ln.amount) for ln in preview.lines.auto_paging_iter()]

    # reconcile: Stripe's summaries − the credit = the re-rated charge (exact, carries accounted)
    rows = reconcile(client, clickhouse, cfg, base - DAY, base + DAY, now=ls.now())
    assert rows and not any(r.drifted for r in rows), rows
    meter_carry = last_carry(clickhouse)
    r_stripe = {r.customer_id: r.stripe for r in rows}
    for r in rows:
        totals = expected_totals(events, engine(DISCOUNTED))[r.customer_id][1]
        assert r.clickhouse == totals * 10**6 and r.stripe == r.pushed
        if r.customer_id != "globex":
            assert r.credited == 0 and r.credited_stripe == 0
            continue
        assert r.credited == (old - new) * 10**6 and r.credited_stripe == -corr.cents * 10**4
        carry = meter_carry[("globex", r.meter)][1]
        assert r.stripe - r.credited_stripe + carry + corr.carry_after * 10**4 == r.clickhouse

    # `up`'s periodic sync log line names the credited windows and the corrective amount
    line = sync_summary_line(RunResult(0, "", "", (s,)), 0.1)
    assert f"credited windows {s.credited}, corrective amounts 1 ({corr.cents} minor units)" in line

    # a second sync sends nothing: no meter event, no second credit
    again = sync(target, clickhouse, cfg, now=ls.now())
    assert again.ok and again.planned == 0 and again.sent == 0 and again.corrections == []
    assert len(_items(client, link.stripe_customer_id)) == 1

    # the period closes: the credit lands on the invoice, which equals usage − credit to the cent
    ls.advance_clock(40 * DAY)
    ls.close_periods(finalize=True)
    invoiced = client.v1.invoice_items.retrieve(corr.stripe_id)
    assert invoiced.invoice is not None
    inv = client.v1.invoices.retrieve(invoiced.invoice)
    lines = [int(ln.amount) for ln in inv.lines.auto_paging_iter()]
    assert corr.cents in lines and int(inv.subtotal) == sum(lines)
    # usage line (Stripe rounds the µ$ aggregate once, half-up) + the credit = the re-rated charge
    usage_line = (Decimal(int(r_stripe["globex"])) / 10**4).quantize(Decimal(1), rounding="ROUND_HALF_UP")
    assert int(inv.subtotal) == usage_line + corr.cents
    assert abs(int(inv.subtotal) - new * 100) < 2  # to the cent (two roundings: the line's and the credit's)


def test_a_further_shrink_of_a_credited_window_is_credited_again_with_the_carry(
    ls: LocalStripe, target: StripeTarget, clickhouse: Any, cfg: BillingConfig
) -> None:
    """Two discounts, one after the other, both older than 24 h: two corrective amounts whose cents
    add up to the whole delta toward zero; the sub-cent carry goes from the first to the second."""
    client = target.client()
    base, events = _seed(ls, target, clickhouse, cfg, n=120)
    ls.advance_clock(25 * HOUR)
    _discount_after_the_fact(ls, clickhouse, base)
    assert sync(target, clickhouse, cfg, now=ls.now()).ok
    deeper = {
        **BOOK_BEFORE,
        "rate_cards": [*BOOK_BEFORE["rate_cards"], {"customer_id": "globex", "discount_pct": "40"}],
    }
    with open_reprice(clickhouse, engine(deeper), Filters(base, base + 6 * HOUR)) as rp:
        rp.report()
        apply_plan(clickhouse, rp, ran_by="t", reason="more", command="t", send=lambda c: None, at_ms=ls.now() * 1000)
    s = sync(target, clickhouse, cfg, now=ls.now())
    assert s.ok and s.sent == 0 and len(s.corrections) == 1
    first, second = load_corrections(clickhouse, customer="globex")
    old = expected_totals(events, engine(BOOK_BEFORE))["globex"][1]
    new = expected_totals(events, engine(deeper))["globex"][1]
    assert first.amount + second.amount == new - old
    total = (new - old) * 100
    assert first.cents + second.cents == int(total.to_integral_value(rounding=ROUND_DOWN))
    assert second.carry_after == total - first.cents - second.cents and abs(second.carry_after) < 1
    link = load_customers(clickhouse)["globex"]
    assert sorted(int(i.amount) for i in _items(client, link.stripe_customer_id)) == sorted([first.cents, second.cents])
    rows = reconcile(client, clickhouse, cfg, base - DAY, base + DAY, now=ls.now())
    assert rows and not any(r.drifted for r in rows), rows


def test_growth_older_than_35_days_is_a_positive_corrective_amount_once(
    ls: LocalStripe, target: StripeTarget, clickhouse: Any, cfg: BillingConfig
) -> None:
    """A price raised after the fact on windows Stripe received more than 35 days ago: a meter event
    would be refused (``timestamp_too_far_in_past``), so the growth is one positive invoice item on
    the next invoice (never ``too_old``), exactly once; reconcile is clean."""
    client = target.client()
    base, events = _seed(ls, target, clickhouse, cfg, n=150)
    ls.advance_clock(36 * DAY)  # past Stripe's 35-day meter event limit (and its 24 h cancellation)
    raised = {**BOOK_BEFORE, "rate_cards": [*BOOK_BEFORE["rate_cards"], {"customer_id": "globex", "markup_pct": "7"}]}
    with open_reprice(clickhouse, engine(raised), Filters(base, base + 6 * HOUR)) as rp:
        rp.report()
        apply_plan(clickhouse, rp, ran_by="t", reason="raise", command="t", send=lambda c: None, at_ms=ls.now() * 1000)
    s = sync(target, clickhouse, cfg, now=ls.now())
    assert s.ok and s.too_old == [] and s.sent == 0 and s.credited > 0, s
    (corr,) = s.corrections
    old = expected_totals(events, engine(BOOK_BEFORE))["globex"][1]
    new = expected_totals(events, engine(raised))["globex"][1]
    assert corr.customer_id == "globex" and corr.amount == new - old > 0
    assert corr.cents == int((corr.amount * 100).to_integral_value(rounding=ROUND_DOWN)) > 0
    link = load_customers(clickhouse)["globex"]
    (item,) = _items(client, link.stripe_customer_id)
    assert item.id == corr.stripe_id and item.amount == corr.cents and item.invoice is None
    rows = reconcile(client, clickhouse, cfg, base - DAY, base + DAY, now=ls.now())
    assert rows and not any(r.drifted for r in rows), rows
    (g,) = [r for r in rows if r.customer_id == "globex"]
    assert (
        g.clickhouse == new * 10**6 and g.credited == -(new - old) * 10**6 and g.credited_stripe == -corr.cents * 10**4
    )
    again = sync(target, clickhouse, cfg, now=ls.now())
    assert again.ok and again.planned == 0 and again.corrections == [] and again.too_old == []
    assert len(_items(client, link.stripe_customer_id)) == 1


class Crash(Exception):
    pass


@pytest.mark.parametrize("where", ["before_recording", "after_stripe_answered", "response_lost"])
def test_a_crash_between_recording_and_sending_resumes_exactly_once(
    ls: LocalStripe, target: StripeTarget, clickhouse: Any, cfg: BillingConfig, where: str, monkeypatch: Any
) -> None:
    client = target.client()
    base, events = _seed(ls, target, clickhouse, cfg, n=120)
    ls.advance_clock(25 * HOUR)
    _discount_after_the_fact(ls, clickhouse, base)
    link = load_customers(clickhouse)["globex"]

    if where == "before_recording":  # the credited revisions are stored, the corrective amount not yet
        sync_mod = importlib.import_module("jobs.stripe.sync")  # the module (the package exports sync())

        def boom(ch: Any, cfg: BillingConfig) -> list[Any]:
            raise Crash("killed after the cursor insert")

        with monkeypatch.context() as m:
            m.setattr(sync_mod, "record_window_corrections", boom)
            with pytest.raises(Crash):
                sync(target, clickhouse, cfg, now=ls.now())
        assert any(p.status == CREDITED for p in load_pushes(clickhouse))
        assert load_corrections(clickhouse) == []
    elif where == "after_stripe_answered":  # Stripe created the item; the store still says pending

        def crash(c: Any) -> None:
            raise Crash("killed before recording")

        with pytest.raises(Crash):
            sync(target, clickhouse, cfg, now=ls.now(), on_corrected=crash)
        assert [c.status for c in load_corrections(clickhouse)] == ["pending"]
        assert len(_items(client, link.stripe_customer_id)) == 1
    else:  # Stripe created it, the answer never came back: the SDK retries with the same key
        ls.faults.drop_response(path_prefix="/v1/invoiceitems", method="POST")
        assert sync(target, clickhouse, cfg, now=ls.now()).ok
        assert ls.faults.armed() == []  # the create was processed and its answer dropped

    resumed = sync(target, clickhouse, cfg, now=ls.now())
    assert resumed.ok and resumed.sent == 0
    (corr,) = load_corrections(clickhouse)
    assert corr.status == SENT
    items = _items(client, link.stripe_customer_id)
    assert [i.id for i in items] == [corr.stripe_id]  # exactly one credit at Stripe
    old = expected_totals(events, engine(BOOK_BEFORE))["globex"][1]
    new = expected_totals(events, engine(DISCOUNTED))["globex"][1]
    assert corr.amount == new - old and items[0].amount == corr.cents
    rows = reconcile(client, clickhouse, cfg, base - DAY, base + DAY, now=ls.now())
    assert rows and not any(r.drifted for r in rows), rows
    final = sync(target, clickhouse, cfg, now=ls.now())
    assert final.ok and final.planned == 0 and final.corrections == []
    assert len(_items(client, link.stripe_customer_id)) == 1


def test_reconcile_reports_a_credit_missing_at_stripe(
    ls: LocalStripe, target: StripeTarget, clickhouse: Any, cfg: BillingConfig
) -> None:
    """A corrective amount recorded but not at Stripe (here: refused) is drift, never clean."""
    client = target.client()
    base, _ = _seed(ls, target, clickhouse, cfg, n=120)
    ls.advance_clock(25 * HOUR)
    _discount_after_the_fact(ls, clickhouse, base)
    ls.faults.server_error(count=50, status=500, path_prefix="/v1/invoiceitems")
    with pytest.raises(Exception, match="Stripe still failing"):
        sync(target, clickhouse, cfg.with_sync(max_attempts=2, backoff_seconds=0.0), now=ls.now())
    ls.faults.clear()
    rows = reconcile(client, clickhouse, cfg, base - DAY, base + DAY, now=ls.now())
    globex = [r for r in rows if r.customer_id == "globex"]
    assert globex and all(r.drifted and r.credit_issues for r in globex)
    assert sync(target, clickhouse, cfg, now=ls.now()).ok  # the next run sends it
    rows = reconcile(client, clickhouse, cfg, base - DAY, base + DAY, now=ls.now())
    assert not any(r.drifted for r in rows)


_DRIVER = """
import sys
from jobs.reprice.apply import apply_plan
from jobs.reprice.compute import Filters, open_reprice
from jobs.stripe import StripeTarget, load_billing_config, provision, sync
from meterline.stack.clickhouse import apply_migrations, connect
from tests.jobs.reprice_helpers import BOOK_BEFORE, CUSTOMERS, engine, insert_priced, make_events
from tests.jobs.test_stripe_corrective import DISCOUNTED
step, dsn, url, now, base = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
ch = connect(dsn)
apply_migrations(ch)
cfg = load_billing_config().with_sync(settle_seconds=0, backoff_seconds=0.01)
target = StripeTarget.local(url, max_network_retries=2)
if step == "seed":
    provision(target.client(), ch, cfg, customers=list(CUSTOMERS))
    insert_priced(ch, make_events(23, 120, t0=base, seconds=5 * 3600), engine(BOOK_BEFORE))
    assert sync(target, ch, cfg, now=now).ok
else:
    with open_reprice(ch, engine(DISCOUNTED), Filters(base, base + 6 * 3600)) as rp:
        rp.report()
        apply_plan(ch, rp, ran_by="t", reason="discount", command="t", send=lambda c: None, at_ms=now * 1000)
ch.close()
"""


def test_cli_sync_prints_the_corrective_amount_and_reconcile_is_clean(ls: LocalStripe, tmp_path: Path) -> None:
    """The installed ``meterline`` as a subprocess, on its own embedded engine (this test's process
    holds the session's): the sync's ``credited`` column and corrective amount line, reconcile's
    ``credited`` column and exit 0; a second sync prints no corrective amount."""
    root = Path(__file__).resolve().parents[2]
    dsn = f"chdb://{tmp_path / 'engine'}?database=sc"
    env = {
        **os.environ,
        "METERLINE_CLICKHOUSE_DSN": dsn,
        "METERLINE_STRIPE_BASE_URL": ls.url,
        "METERLINE_STRIPE_API_KEY": "",
        "METERLINE_DATA_DIR": str(tmp_path / "data"),
        "PYTHONPATH": str(root),
        "COLUMNS": "200",
    }
    base = ls.now() // HOUR * HOUR - 6 * HOUR

    def drive(step: str) -> None:
        done = subprocess.run(
            [sys.executable, "-c", _DRIVER, step, dsn, ls.url, str(ls.now()), str(base)],
            env=env,
            cwd=root,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr

    def meterline(*args: str) -> subprocess.CompletedProcess[str]:
        exe = Path(sys.executable).with_name("meterline")
        return subprocess.run([str(exe), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    drive("seed")
    ls.advance_clock(25 * HOUR)
    drive("discount")
    out = meterline("stripe", "sync", "--now", str(ls.now()), "--no-progress")
    assert out.returncode == 0, out.stdout + out.stderr
    header = next(line for line in out.stdout.splitlines() if "planned" in line)
    assert "credited" in header
    (line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("corrective amount ")]
    assert line.startswith("corrective amount w:globex:meterline_charge:s") and "invoice item ii_" in line
    cents = int(line.split(": ", 1)[1].split()[0])
    assert cents < 0
    items = [i for i in ls.client().v1.invoice_items.list({"limit": 100}).auto_paging_iter()]
    assert [int(i.amount) for i in items] == [cents]
    period = f"{datetime.fromtimestamp(base - DAY, UTC):%Y-%m-%d}..{datetime.fromtimestamp(base + DAY, UTC):%Y-%m-%d}"
    rec = meterline("stripe", "reconcile", "--period", period, "--now", str(ls.now()))
    assert rec.returncode == 0, rec.stdout + rec.stderr
    assert "credited" in rec.stdout and "0 drift(s)" in rec.stdout
    globex = next(ln for ln in rec.stdout.splitlines() if "globex" in ln)
    assert str(-cents * 10**4) in globex  # the credit, in meter units (µ$)
    again = meterline("stripe", "sync", "--now", str(ls.now()), "--no-progress")
    assert again.returncode == 0 and "corrective amount" not in again.stdout
