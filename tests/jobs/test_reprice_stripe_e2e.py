"""A retroactive price change, end to end, the way an operator does it (issue #18), with the installed
``meterline`` as a subprocess for every step that has a command:

``stripe provision`` + ``stripe sync`` push the usage; Stripe's clock moves past its 24 h
cancellation window; ``prices load`` publishes a price cut; ``reprice --period … --reason …``
applies it; ``stripe sync`` sends the corrective amounts; ``stripe reconcile`` is clean. A second
reprice and a second sync send nothing. Then, past Stripe's 35-day meter-event limit, a price
RAISE: the growth reaches Stripe as positive corrective amounts (never ``too_old``), once.

Customers: ``initech`` pays per token; ``acme`` (+20 % card) is on a plan with an amount allowance
and rate-card overage (its bill follows the catalog: a plan-bill correction, an invoice item on its
plan subscription, whose usage goes to Stripe's plan charge meter); ``globex`` pays per token until
it subscribes mid-window (mid-hour) to a plan of included tokens + per-million overage: its plan
bill does not move with the catalog (docs/corrections.md), its pay-per-token hours before it do.

Real components: chDB (own engine, seeded by another process: this process holds the session's),
the Tansu broker (the ``prices`` and ``ledger-commands`` topics), the bundled Stripe server with a
movable clock, read back with the real stripe SDK. Expected money is computed here with the Python
pricing engine, event by event (never by the code under test).
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import yaml

from devtools.stripe_local import LocalStripe
from jobs.stripe.plans import stripe_period_cents
from meterline.core.money import to_decimal
from tests.jobs.conftest import DAY, HOUR
from tests.jobs.reprice_helpers import BOOK_BEFORE, engine, make_events

PLANS = """
currency: USD
plans:
  - {id: tok, version: 1, effective_from: "2025-01-01T00:00:00Z", interval: month, fee: "20.00",
     allowances: [{id: tokens, tokens: 1000000}], overage: {per_million: "30.00"}, on_exhausted: allow}
  - {id: amt, version: 1, effective_from: "2025-01-01T00:00:00Z", interval: month, fee: "10.00",
     allowances: [{id: credit, amount: "2.00"}], overage: {rate_card: {multiplier: "1.5"}}, on_exhausted: allow}
"""
AMT_FEE, AMT_INCLUDED, AMT_MULTIPLIER = Decimal("10.00"), Decimal("2.00"), Decimal("1.5")
SEED = 29
N_EVENTS = 240
CLASSES = ("input", "output", "cached_input", "cache_write", "reasoning")
CUSTS = ("acme", "globex", "initech")
METER = {"acme": "meterline_plan_charge", "globex": "meterline_charge", "initech": "meterline_charge"}
USAGE = {"acme": "acme_usage", "globex": "globex", "initech": "initech"}  # what each customer's meter counts


def _gpt4o(book: dict[str, Any], per_million: dict[str, str]) -> dict[str, Any]:
    """``book`` with gpt-4o's version corrected in place (same effective_from: a retroactive change)."""
    return {**book, "prices": [{**book["prices"][0], "per_million": per_million}, *book["prices"][1:]]}


BOOK_CUT = _gpt4o(BOOK_BEFORE, {"input": "4.00", "output": "12.00", "cached_input": "2.00"})
BOOK_RAISED = _gpt4o(BOOK_BEFORE, {"input": "6.00", "output": "18.50", "cached_input": "3.00"})

_SEED_DRIVER = """
import sys
from meterline.core.plans import SubscriptionEvent, load_plan_catalog
from meterline.stack.clickhouse import apply_migrations, connect
from pipeline.plans_sink import PLAN_COLUMNS, SUBSCRIPTION_COLUMNS, plan_row, subscription_row
from tests.jobs.reprice_helpers import BOOK_BEFORE, engine, insert_priced, make_events
from tests.jobs.test_reprice_stripe_e2e import N_EVENTS, PLANS, SEED
dsn, base, sub = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ch = connect(dsn)
apply_migrations(ch)
catalog = load_plan_catalog(PLANS)
ch.insert("plans", [plan_row(v) for v in catalog.versions], column_names=list(PLAN_COLUMNS))
facts = [SubscriptionEvent("subscribed", "globex", sub, "tok", 1), SubscriptionEvent("subscribed", "acme", base - 3600, "amt", 1)]
ch.insert("subscription_events", [subscription_row(f) for f in facts], column_names=list(SUBSCRIPTION_COLUMNS))
insert_priced(ch, make_events(SEED, N_EVENTS, t0=base, seconds=5 * 3600), engine(BOOK_BEFORE))
ch.close()
"""


def _expected(events: list[dict[str, Any]], book: dict[str, Any], sub: int) -> dict[str, Decimal]:
    """By hand: the pay-per-token charge of initech and of globex before its plan; ``acme_usage``
    (acme's in-plan charge, what its plan's allowance and overage consume) and ``acme`` (its plan
    bill: fee + the charge above the allowance x the multiplier)."""
    eng = engine(book)
    picos = {"acme_usage": 0, "globex": 0, "initech": 0}
    for ev in events:
        if ev["customer_id"] == "globex" and ev["occurred_at"] // 1000 >= sub:
            continue
        picos["acme_usage" if ev["customer_id"] == "acme" else ev["customer_id"]] += eng.price(ev).charge_picos
    out = {c: to_decimal(p) for c, p in picos.items()}
    out["acme"] = AMT_FEE + max(Decimal(0), out["acme_usage"] - AMT_INCLUDED) * AMT_MULTIPLIER
    return out


def iso(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ids(items: dict[str, list[Any]]) -> dict[str, list[str]]:
    return {k: sorted(i.id for i in v) for k, v in items.items()}


def _plan_tokens(events: list[dict[str, Any]], sub: int) -> int:
    return sum(
        sum(ev[f"{c}_tokens"] for c in CLASSES)
        for ev in events
        if ev["customer_id"] == "globex" and ev["occurred_at"] // 1000 >= sub
    )


class Operator:
    """The installed ``meterline`` command with the operator's environment."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env, self.cwd = env, cwd
        self.exe = str(Path(sys.executable).with_name("meterline"))

    def __call__(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [self.exe, *args], env=self.env, cwd=self.cwd, capture_output=True, text=True, timeout=300
        )
        if ok:
            assert done.returncode == 0, f"meterline {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done

    def sql(self, query: str) -> list[dict[str, str]]:
        out = self("sql", query, "--format", "csv").stdout
        return list(csv.DictReader(io.StringIO(out)))


def _stripe_state(client: Any, lo: int, hi: int) -> tuple[dict[tuple[str, str], Decimal], dict[str, list[Any]]]:
    """Stripe's meter event summaries per (stripe customer, meter event name) over [lo, hi), and the
    corrective invoice items per stripe customer (read with the SDK, not through meterline)."""
    sums: dict[tuple[str, str], Decimal] = {}
    customers = [c.id for c in client.v1.customers.list({"limit": 100}).auto_paging_iter()]
    for m in client.v1.billing.meters.list({"limit": 100}).auto_paging_iter():
        for cust in customers:
            res = client.v1.billing.meters.event_summaries.list(
                m.id, {"customer": cust, "start_time": lo, "end_time": hi}
            )
            sums[(cust, m.event_name)] = sum(
                (Decimal(str(s.aggregated_value)) for s in res.auto_paging_iter()), Decimal(0)
            )
    items: dict[str, list[Any]] = {c: [] for c in customers}
    for ii in client.v1.invoice_items.list({"limit": 100}).auto_paging_iter():
        if (ii.metadata.to_dict() if ii.metadata else {}).get("meterline_correction"):
            items[str(ii.customer)].append(ii)
    return sums, items


def test_a_retroactive_price_change_reaches_stripe_exactly_through_the_cli(
    ls: LocalStripe, tmp_path: Path, kafka_bootstrap: str, topics: dict[str, str], topic_prefix: str
) -> None:
    root = Path(__file__).resolve().parents[2]
    dsn = f"chdb://{tmp_path / 'engine'}?database=e2e"
    env = {
        **os.environ,
        "METERLINE_CLICKHOUSE_DSN": dsn,
        "METERLINE_STRIPE_BASE_URL": ls.url,
        "METERLINE_STRIPE_API_KEY": "",
        "METERLINE_DATA_DIR": str(tmp_path / "data"),
        "METERLINE_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "METERLINE_TOPIC_PREFIX": topic_prefix,
        "METERLINE_OPERATOR": "ops",
        "PYTHONPATH": str(root),
        "COLUMNS": "250",
    }
    meterline = Operator(env, tmp_path)
    client = ls.client()
    start = ls.now()
    base = start // HOUR * HOUR - 6 * HOUR
    sub = base + 2 * HOUR + 30 * 60  # globex subscribes mid-window, mid-hour
    events = make_events(SEED, N_EVENTS, t0=base, seconds=5 * HOUR)
    before, cut, raised = (_expected(events, b, sub) for b in (BOOK_BEFORE, BOOK_CUT, BOOK_RAISED))
    assert all(cut[c] < before[c] < raised[c] for c in before)  # every customer has gpt-4o usage
    assert cut["acme_usage"] > AMT_INCLUDED  # acme's overage moves with the price
    files = {}
    for name, book in (("before", BOOK_BEFORE), ("cut", BOOK_CUT), ("raised", BOOK_RAISED)):
        files[name] = tmp_path / f"prices-{name}.yaml"
        files[name].write_text(yaml.safe_dump(book))
    seeded = subprocess.run(
        [sys.executable, "-c", _SEED_DRIVER, dsn, str(base), str(sub)],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert seeded.returncode == 0, seeded.stderr

    # -- the usage is priced with the catalog of the time and pushed to Stripe ----------------------
    meterline("prices", "load", str(files["before"]))
    ls.set_clock(base - HOUR)  # the subscriptions start before the usage (their invoices bill it)
    meterline("stripe", "provision")
    ls.set_clock(start)  # globex's plan is in force now: the sync creates its plan subscription first
    first = meterline("stripe", "sync", "--now", str(ls.now()), "--no-progress")
    assert "corrective amount" not in first.stdout
    links = {r["customer_id"]: r for r in meterline.sql("SELECT * FROM stripe_customers FINAL")}
    assert set(links) == {"acme", "globex", "initech"}
    sc = {c: links[c]["stripe_customer_id"] for c in links}
    lo, hi = base - DAY, base + DAY
    pushed0, items0 = _stripe_state(client, lo, hi)
    assert not any(items0.values())
    # Stripe has the usage as priced then, to the µ$ carry: per token pay-per-token charge on the cost
    # meter, acme's in-plan charge on the plan charge meter, globex's in-plan tokens on the plan meter
    for c in CUSTS:
        assert 0 <= (before[USAGE[c]]) * 10**6 - pushed0[(sc[c], METER[c])] < 1
    plan_tokens = _plan_tokens(events, sub)
    assert pushed0[(sc["globex"], "meterline_plan_tokens")] == plan_tokens > 0

    # -- more than 24 h later, a retroactive price cut: prices load + reprice --------------------------
    ls.advance_clock(25 * HOUR)
    period = f"{iso(base)}..{iso(base + 6 * HOUR)}"
    meterline("prices", "load", str(files["cut"]))
    doc = json.loads(
        meterline(
            "reprice", "--period", period, "--reason", "gpt-4o price cut announced late", "--format", "json"
        ).stdout
    )
    deltas = {c["customer_id"]: Decimal(c["delta"]) for c in doc["customers"]}
    assert deltas == {c: cut[c] - before[c] for c in CUSTS}  # acme: its bill; globex: pay-per-token only
    plans = {c["customer_id"]: c["plans"] for c in doc["customers"]}
    assert [Decimal(p["delta"]) for p in plans["globex"]] == [0]  # included tokens: the bill does not move
    assert [Decimal(p["delta"]) for p in plans["acme"]] == [cut["acme"] - before["acme"]]
    assert doc["applied"]["correction_rows"] > 0

    synced = meterline("stripe", "sync", "--now", str(ls.now()), "--no-progress")
    lines = [ln for ln in synced.stdout.splitlines() if ln.startswith("corrective amount ")]
    assert len(lines) == 3, synced.stdout  # one each: acme's plan bill, initech, globex's pay-per-token hours
    pushed1, items1 = _stripe_state(client, lo, hi)
    assert pushed1 == pushed0  # no meter event sent or cancelled: Stripe cannot cancel them any more
    for c in CUSTS:
        (item,) = items1[sc[c]]
        exact = (cut[c] - before[c]) * 100
        assert item.amount == int(exact.to_integral_value(rounding=ROUND_DOWN)) < 0  # toward zero
        assert item.invoice is None and item.currency == "usd"  # on the customer's next invoice
        assert item.parent.subscription_details.subscription == links[c]["subscription_id"]
        preview = client.v1.invoices.create_preview({"subscription": links[c]["subscription_id"]})
        assert item.amount in [int(ln.amount) for ln in preview.lines.auto_paging_iter()]
    _assert_exact(meterline, client, sc, pushed0, before, cut, lo, hi)
    assert pushed1[(sc["globex"], "meterline_plan_tokens")] == plan_tokens  # tokens never move

    rec = meterline("stripe", "reconcile", "--period", f"{iso(lo)}..{iso(hi)}", "--now", str(ls.now()))
    assert "0 drift(s)" in rec.stdout, rec.stdout

    # -- a second reprice and a second sync send nothing ---------------------------------------------
    again = meterline("reprice", "--period", period, "--reason", "again")
    assert "nothing to correct" in again.stdout
    resync = meterline("stripe", "sync", "--now", str(ls.now()), "--no-progress")
    assert "corrective amount" not in resync.stdout
    pushed, items = _stripe_state(client, lo, hi)
    assert pushed == pushed1 and _ids(items) == _ids(items1)

    # -- past Stripe's 35-day limit, a price RAISE: positive corrective amounts, never too_old ----------
    ls.advance_clock(35 * DAY)
    meterline("prices", "load", str(files["raised"]))
    doc = json.loads(meterline("reprice", "--period", period, "--reason", "raise", "--format", "json").stdout)
    assert {c["customer_id"]: Decimal(c["delta"]) for c in doc["customers"]} == {c: raised[c] - cut[c] for c in CUSTS}
    grown = meterline("stripe", "sync", "--now", str(ls.now()), "--no-progress")
    assert meterline.sql("SELECT count() AS n FROM stripe_pushes FINAL WHERE status = 'too_old'") == [{"n": "0"}]
    lines = [ln for ln in grown.stdout.splitlines() if ln.startswith("corrective amount ")]
    assert len(lines) == 3, grown.stdout
    pushed2, items2 = _stripe_state(client, lo, hi)
    assert pushed2 == pushed0
    for c in CUSTS:
        assert len(items2[sc[c]]) == 2
        (raise_item,) = [i for i in items2[sc[c]] if i.id not in {j.id for j in items1[sc[c]]}]
        assert (
            raise_item.amount > 0 and raise_item.parent.subscription_details.subscription == links[c]["subscription_id"]
        )
    _assert_exact(meterline, client, sc, pushed0, before, raised, lo, hi)
    rec = meterline("stripe", "reconcile", "--period", f"{iso(lo)}..{iso(hi)}", "--now", str(ls.now()))
    assert "0 drift(s)" in rec.stdout, rec.stdout
    assert "nothing to correct" in meterline("reprice", "--period", period).stdout
    final = meterline("stripe", "sync", "--now", str(ls.now()), "--no-progress")
    assert "corrective amount" not in final.stdout
    assert _ids(_stripe_state(client, lo, hi)[1]) == _ids(items2)

    # -- acme's first plan period as Stripe invoices it: fee + its overage line + the corrections ------
    ls.close_periods(finalize=True)
    acme_start = base - HOUR
    ((acme_end,),) = {  # the plan period (meterline's, as the plan-bill rows carry it)
        (int(r["end"]),)
        for r in meterline.sql(
            "SELECT toUnixTimestamp(occurred_at) AS start, toUnixTimestamp(period_end) AS end "
            "FROM usage_corrections FINAL WHERE kind = 'plan' AND customer_id = 'acme'"
        )
        if int(r["start"]) == acme_start
    }
    # each plan corrective amount says which billing period it corrects
    assert {(int(i.period.start), int(i.period.end)) for i in items2[sc["acme"]]} == {(acme_start, acme_end)}
    billed = stripe_period_cents(client, links["acme"]["subscription_id"], acme_start, acme_end)
    units = pushed0[(sc["acme"], "meterline_plan_charge")]
    overage_line = ((units - AMT_INCLUDED * 10**6) * AMT_MULTIPLIER / 10**4).quantize(
        Decimal(1), rounding=ROUND_HALF_UP
    )
    corrections = sum(int(i.amount) for i in items2[sc["acme"]])
    # the raise came after the period's invoice: its item waits on the next one (the preview)
    preview = client.v1.invoices.create_preview({"subscription": links["acme"]["subscription_id"]})
    billed += sum(
        int(ln.amount)
        for ln in preview.lines.auto_paging_iter()
        if acme_start <= ln.period.start and ln.period.end <= acme_end
    )
    assert billed == AMT_FEE * 100 + overage_line + corrections
    assert abs(billed - raised["acme"] * 100) < 2  # Stripe's line rounding + the corrections' carry


def _assert_exact(
    meterline: Operator,
    client: Any,
    sc: dict[str, str],
    pushed: dict[tuple[str, str], Decimal],
    before: dict[str, Decimal],
    now: dict[str, Decimal],
    lo: int,
    hi: int,
) -> None:
    """Stripe's meter summaries and corrective invoice items = the re-rated charges, exactly, with the
    documented carries (the meter's µ$ carry, the corrective amounts' sub-cent carry)."""
    _, items = _stripe_state(client, lo, hi)
    meter_carry = {
        (r["customer_id"], r["meter"]): Decimal(r["carry"])
        for r in meterline.sql(
            "SELECT customer_id, meter, argMax(carry_after, seq) AS carry FROM stripe_pushes FINAL "
            "GROUP BY customer_id, meter"
        )
    }
    corr = {
        r["customer_id"]: r
        for r in meterline.sql(
            "SELECT customer_id, argMax(carry_after, seq) AS carry, count() AS n, countIf(status = 'sent') AS sent "
            "FROM stripe_corrections FINAL GROUP BY customer_id"
        )
    }
    for c in CUSTS:
        cents = sum(int(i.amount) for i in items[sc[c]])
        assert corr[c]["n"] == corr[c]["sent"] == str(len(items[sc[c]]))
        corr_carry = Decimal(corr[c]["carry"])
        # the invoice items add up to the whole correction, the sub-cent carry passed from one to the next
        assert cents + corr_carry == (now[c] - before[c]) * 100
        usage = pushed[(sc[c], METER[c])] + meter_carry[(c, METER[c])]
        assert usage == before[USAGE[c]] * 10**6  # what the meter holds: the usage as priced then
        if c != "acme":  # pay per token: Stripe's summaries + the items = the re-rated charge
            assert usage + cents * 10**4 + corr_carry * 10**4 == now[c] * 10**6
