"""A retroactive price change, end to end, the way an operator does it (issue #18), with the installed
``meterline`` as a subprocess for every step that has a command:

``stripe provision`` + ``stripe sync`` push the usage; Stripe's clock moves past its 24 h
cancellation window; ``prices load`` publishes a price cut; ``reprice --period … --reason …``
applies it; ``stripe sync`` sends the corrective amounts; ``stripe reconcile`` is clean. A second
reprice and a second sync send nothing. Then, past Stripe's 35-day meter-event limit, a price
RAISE: the growth reaches Stripe as positive corrective amounts (never ``too_old``), once.

Customers: ``acme`` (+20 % card) and ``initech`` pay per token; ``globex`` pays per token until it
subscribes mid-window (mid-hour) to a plan of included tokens + per-million overage: its plan bill
does not move with the catalog (docs/corrections.md), its pay-per-token hours before the plan do.

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
from decimal import ROUND_DOWN, Decimal
from pathlib import Path
from typing import Any

import yaml

from devtools.stripe_local import LocalStripe
from meterline.core.money import to_decimal
from tests.jobs.conftest import DAY, HOUR
from tests.jobs.reprice_helpers import BOOK_BEFORE, engine, make_events

PLANS = """
currency: USD
plans:
  - {id: tok, version: 1, effective_from: "2025-01-01T00:00:00Z", interval: month, fee: "20.00",
     allowances: [{id: tokens, tokens: 1000000}], overage: {per_million: "30.00"}, on_exhausted: allow}
"""
SEED = 29
N_EVENTS = 240
CLASSES = ("input", "output", "cached_input", "cache_write", "reasoning")


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
fact = SubscriptionEvent("subscribed", "globex", sub, "tok", 1)
ch.insert("subscription_events", [subscription_row(fact)], column_names=list(SUBSCRIPTION_COLUMNS))
insert_priced(ch, make_events(SEED, N_EVENTS, t0=base, seconds=5 * 3600), engine(BOOK_BEFORE))
ch.close()
"""


def _expected(events: list[dict[str, Any]], book: dict[str, Any], sub: int) -> dict[str, Decimal]:
    """Per customer, the pay-per-token charge (globex: only its events before the plan)."""
    eng = engine(book)
    picos = {"acme": 0, "globex": 0, "initech": 0}
    for ev in events:
        if ev["customer_id"] == "globex" and ev["occurred_at"] // 1000 >= sub:
            continue
        picos[ev["customer_id"]] += eng.price(ev).charge_picos
    return {c: to_decimal(p) for c, p in picos.items()}


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
    ls.set_clock(start)
    meterline("stripe", "provision")  # now globex's plan is in force: its plan subscription (from `sub`)
    first = meterline("stripe", "sync", "--now", str(ls.now()), "--no-progress")
    assert "corrective amount" not in first.stdout
    links = {r["customer_id"]: r for r in meterline.sql("SELECT * FROM stripe_customers FINAL")}
    assert set(links) == {"acme", "globex", "initech"}
    sc = {c: links[c]["stripe_customer_id"] for c in links}
    lo, hi = base - DAY, base + DAY
    pushed0, items0 = _stripe_state(client, lo, hi)
    assert not any(items0.values())
    for c in ("acme", "initech", "globex"):  # Stripe has the charge as priced then, to the µ$ carry
        assert 0 <= before[c] * 10**6 - pushed0[(sc[c], "meterline_charge")] < 1
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
    assert deltas == {c: cut[c] - before[c] for c in before}  # globex: its plan bill does not move
    (gplan,) = next(c for c in doc["customers"] if c["customer_id"] == "globex")["plans"]
    assert Decimal(gplan["delta"]) == 0 and doc["applied"]["correction_rows"] > 0

    synced = meterline("stripe", "sync", "--now", str(ls.now()), "--no-progress")
    lines = [ln for ln in synced.stdout.splitlines() if ln.startswith("corrective amount ")]
    assert len(lines) == 3, synced.stdout  # one per customer: acme, initech, globex's pay-per-token hours
    pushed1, items1 = _stripe_state(client, lo, hi)
    assert pushed1 == pushed0  # no meter event sent or cancelled: Stripe cannot cancel them any more
    corr = {
        r["customer_id"]: r
        for r in meterline.sql(
            "SELECT customer_id, sum(cents) AS cents, argMax(carry_after, seq) AS carry, count() AS n, "
            "countIf(status = 'sent') AS sent FROM stripe_corrections FINAL GROUP BY customer_id"
        )
    }
    carry = {
        r["customer_id"]: Decimal(r["carry"])
        for r in meterline.sql(
            "SELECT customer_id, argMax(carry_after, seq) AS carry FROM stripe_pushes FINAL "
            "WHERE meter = 'meterline_charge' GROUP BY customer_id"
        )
    }
    for c in ("acme", "initech", "globex"):
        (item,) = items1[sc[c]]
        exact = (cut[c] - before[c]) * 100
        assert item.amount == int(exact.to_integral_value(rounding=ROUND_DOWN)) < 0  # toward zero
        assert item.invoice is None and item.currency == "usd"  # on the customer's next invoice
        assert item.parent.subscription_details.subscription == links[c]["subscription_id"]
        assert corr[c]["n"] == corr[c]["sent"] == "1" and Decimal(corr[c]["carry"]) == exact - item.amount
        # Stripe's summaries + the credit = the re-rated charge, exactly with the two carries
        at_stripe = pushed1[(sc[c], "meterline_charge")] + item.amount * 10**4
        assert at_stripe + carry[c] + Decimal(corr[c]["carry"]) * 10**4 == cut[c] * 10**6
        preview = client.v1.invoices.create_preview({"subscription": links[c]["subscription_id"]})
        assert item.amount in [int(ln.amount) for ln in preview.lines.auto_paging_iter()]
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
    assert {c["customer_id"]: Decimal(c["delta"]) for c in doc["customers"]} == {c: raised[c] - cut[c] for c in before}
    grown = meterline("stripe", "sync", "--now", str(ls.now()), "--no-progress")
    assert meterline.sql("SELECT count() AS n FROM stripe_pushes FINAL WHERE status = 'too_old'") == [{"n": "0"}]
    lines = [ln for ln in grown.stdout.splitlines() if ln.startswith("corrective amount ")]
    assert len(lines) == 3, grown.stdout
    pushed2, items2 = _stripe_state(client, lo, hi)
    assert pushed2 == pushed0
    corr = {
        r["customer_id"]: r
        for r in meterline.sql(
            "SELECT customer_id, argMax(carry_after, seq) AS carry FROM stripe_corrections FINAL GROUP BY customer_id"
        )
    }
    for c in ("acme", "initech", "globex"):
        first_item, second_item = sorted(items2[sc[c]], key=lambda i: int(i.amount))
        assert second_item.amount > 0 and second_item.id not in {i.id for i in items1[sc[c]]}
        total = first_item.amount + second_item.amount
        # the two items add up to the whole correction, the sub-cent carry passed from one to the next
        assert total + Decimal(corr[c]["carry"]) == (raised[c] - before[c]) * 100
        at_stripe = pushed2[(sc[c], "meterline_charge")] + total * 10**4
        assert at_stripe + carry[c] + Decimal(corr[c]["carry"]) * 10**4 == raised[c] * 10**6
    rec = meterline("stripe", "reconcile", "--period", f"{iso(lo)}..{iso(hi)}", "--now", str(ls.now()))
    assert "0 drift(s)" in rec.stdout, rec.stdout
    assert "nothing to correct" in meterline("reprice", "--period", period).stdout
    final = meterline("stripe", "sync", "--now", str(ls.now()), "--no-progress")
    assert "corrective amount" not in final.stdout
    assert {k: len(v) for k, v in _stripe_state(client, lo, hi)[1].items()} == {sc[c]: 2 for c in sc}
