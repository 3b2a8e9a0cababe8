"""The plan simulator on usage produced through the real pipeline (Tansu, faust pricing worker,
sink, chDB). Every expected figure is computed here with plain Decimal arithmetic from the events
this test sends and the plan/price numbers written below, independently of meterline.core.plans.

Then the installed ``meterline`` command is run as a subprocess on a copy of the same data (chDB
allows one engine per process): ``plans simulate`` must agree with the in-process run, and the
current plan's figure must equal ``meterline bill preview`` to the cent. The HTML report is opened
in Debian's Chromium (Playwright) and its numbers compared with the JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from jobs.plans.billing import bill_preview
from jobs.plans.simulate import simulate
from meterline.core.plans import SubscriptionEvent, load_plan_catalog, parse_instant
from meterline.core.simulator._routing import load_routing
from meterline.shell.cli_simulate import load_price_engine
from pipeline.plans_sink import PLAN_COLUMNS, SUBSCRIPTION_COLUMNS, plan_row, subscription_row
from schemas.models import UsageEvent

pytestmark = [pytest.mark.broker, pytest.mark.slow]

BIN = Path(sys.executable).parent
CENT = Decimal("0.01")
M = Decimal(1_000_000)

PRICES = {
    "currency": "USD",
    "prices": [
        {
            "provider": "openai",
            "model": "gpt-4o",
            "effective_from": "2024-01-01T00:00:00Z",
            "per_million": {"input": "5.00", "output": "15.00"},
        },
        {
            "provider": "anthropic",
            "model": "claude-3-opus",
            "effective_from": "2024-01-01T00:00:00Z",
            "per_million": {"input": "15.00", "output": "75.00"},
        },
        {
            "provider": "anthropic",
            "model": "claude-3-haiku",
            "effective_from": "2024-01-01T00:00:00Z",
            "per_million": {"input": "0.25", "output": "1.25"},
        },
        # the substitute's price doubles on 1 February: routed January events keep the old price
        {
            "provider": "anthropic",
            "model": "claude-3-haiku",
            "effective_from": "2026-02-01T00:00:00Z",
            "per_million": {"input": "0.50", "output": "2.50"},
        },
    ],
    "rate_cards": [{"customer_id": "*", "markup_pct": "0"}, {"customer_id": "sim-b", "markup_pct": "20"}],
}
RATES = {
    ("openai", "gpt-4o"): [("2024-01-01", "5.00", "15.00")],
    ("anthropic", "claude-3-opus"): [("2024-01-01", "15.00", "75.00")],
    ("anthropic", "claude-3-haiku"): [("2024-01-01", "0.25", "1.25"), ("2026-02-01", "0.50", "2.50")],
}
MARKUP = {"sim-b": Decimal("1.2")}

PLANS = {
    "currency": "USD",
    "plans": [
        {
            "id": "incl",
            "version": 1,
            "effective_from": "2025-01-01T00:00:00Z",
            "interval": "month",
            "fee": "20.00",
            "allowances": [{"id": "tokens", "tokens": 100000}],
            "overage": {"per_million": "30"},
        },
        {
            "id": "flat",
            "version": 1,
            "effective_from": "2025-01-01T00:00:00Z",
            "interval": "month",
            "fee": "25",
            "overage": {"per_million": "0"},
        },
        {
            "id": "grad",
            "version": 1,
            "effective_from": "2025-01-01T00:00:00Z",
            "interval": "month",
            "fee": "0",
            "overage": {
                "tiers": {
                    "mode": "graduated",
                    "unit": "tokens",
                    "steps": [{"up_to": 50000, "per_million": "10"}, {"up_to": None, "per_million": "5"}],
                }
            },
        },
        {
            "id": "vol",
            "version": 1,
            "effective_from": "2025-01-01T00:00:00Z",
            "interval": "month",
            "fee": "0",
            "overage": {
                "tiers": {
                    "mode": "volume",
                    "unit": "tokens",
                    "steps": [{"up_to": 50000, "per_million": "10"}, {"up_to": None, "per_million": "5"}],
                }
            },
        },
        {
            "id": "commit",
            "version": 1,
            "effective_from": "2025-01-01T00:00:00Z",
            "interval": "month",
            "fee": "0",
            "overage": {"rate_card": {"multiplier": "1.0"}},
            "minimum_commitment": "3.00",
        },
    ],
}


def expected_plan(plan: str, tokens: int, charge: Decimal) -> Decimal:
    """One full month of each candidate plan, by hand."""
    t = Decimal(tokens)
    if plan == "incl@1":
        return Decimal(20) + max(t - 100000, Decimal(0)) * 30 / M
    if plan == "flat@1":
        return Decimal(25)
    if plan == "grad@1":
        return min(t, Decimal(50000)) * 10 / M + max(t - 50000, Decimal(0)) * 5 / M
    if plan == "vol@1":
        return t * (10 if tokens <= 50000 else 5) / M
    if plan == "commit@1":
        return max(charge, Decimal(3))
    raise AssertionError(plan)


def rate_at(provider: str, model: str, at: datetime) -> tuple[Decimal, Decimal]:
    best = None
    for since, i, o in RATES[(provider, model)]:
        if at >= datetime.fromisoformat(since).replace(tzinfo=UTC):
            best = (Decimal(i), Decimal(o))
    assert best is not None
    return best


def charge_of(ev: UsageEvent, provider: str | None = None, model: str | None = None) -> Decimal:
    i, o = rate_at(provider or ev.provider, model or ev.model, ev.occurred_at)
    return (ev.input_tokens * i + ev.output_tokens * o) / M * MARKUP.get(ev.customer_id, Decimal(1))


def cents(d: Decimal) -> Decimal:
    return d.quantize(CENT, rounding=ROUND_HALF_EVEN)


def make_events() -> list[UsageEvent]:
    out = []

    def ev(cust: str, model: tuple[str, str], at: datetime, i: int, o: int) -> None:
        out.append(
            UsageEvent(
                event_id=str(uuid.uuid4()),
                occurred_at=at,
                customer_id=cust,
                provider=model[0],
                model=model[1],
                input_tokens=i,
                output_tokens=o,
            )
        )

    jan, feb = datetime(2026, 1, 3, tzinfo=UTC), datetime(2026, 2, 3, tzinfo=UTC)
    gpt, opus = ("openai", "gpt-4o"), ("anthropic", "claude-3-opus")
    for k in range(16):  # sim-a, January: 16 x 10,000 = 160,000 tokens (over its 100,000 allowance)
        ev("sim-a", gpt, jan + timedelta(hours=7 * k), 7000 + k, 3000 - k)
    for k in range(3):  # sim-a, February: a quiet month (30,000 tokens: 70,000 included tokens unused)
        ev("sim-a", gpt, feb + timedelta(hours=5 * k), 6000, 4000)
    for k in range(12):  # sim-b: opus, small requests (routed) and big ones (not routed), both months
        for base in (jan, feb):
            small = k % 2 == 0
            ev(
                "sim-b",
                opus,
                base + timedelta(hours=3 * k, minutes=k),
                900 + k if small else 30000 + k,
                400 if small else 9000,
            )
    return out


def land_plans(ch: Any, catalog: Any, facts: list[SubscriptionEvent]) -> None:
    """Plan versions and facts as pipeline/plans_sink writes them (its own row builders)."""
    ch.insert("plans", [plan_row(v) for v in catalog.versions], column_names=PLAN_COLUMNS)
    ch.insert("subscription_events", [subscription_row(e) for e in facts], column_names=SUBSCRIPTION_COLUMNS)


def test_simulator_on_produced_usage(pipeline: Any, tmp_path: Path) -> None:

    pipeline.publish_prices(PRICES)
    pipeline.start_worker()
    events = make_events()
    pipeline.produce(events)
    pipeline.wait_priced(len(events), timeout=180)

    catalog = load_plan_catalog(PLANS)
    land_plans(
        pipeline.ch,
        catalog,
        [SubscriptionEvent("subscribed", "sim-a", parse_instant("2026-01-01T00:00:00Z", where="t"), "incl", 1)],
    )
    candidates = list(catalog.versions)  # a plan file's versions, in the catalog's order (as the CLI takes them)
    routes = load_routing(
        {
            "routes": [
                {
                    "from": {"provider": "anthropic", "model": "claude-3-opus"},
                    "to": {"provider": "anthropic", "model": "claude-3-haiku"},
                    "under_tokens": 2000,
                }
            ]
        }
    )
    engine, versions = load_price_engine(pipeline.settings.kafka_bootstrap, pipeline.settings.topic_prefix)
    doc = simulate(
        pipeline.ch, "2026-01..2026-02", candidates, routes=routes, price_engine=engine, substitute_versions=versions
    )

    # ---- the independent oracle: per customer and month, tokens and charge; then each plan by hand
    months = ["2026-01", "2026-02"]
    tokens: dict[tuple[str, str], int] = defaultdict(int)
    charge: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for e in events:
        key = (e.customer_id, e.occurred_at.strftime("%Y-%m"))
        tokens[key] += e.input_tokens + e.output_tokens
        charge[key] += charge_of(e)
    by_c = {c["customer_id"]: c for c in doc["customers"]}
    assert set(by_c) == {"sim-a", "sim-b"}
    for cid, c in by_c.items():
        cands = {(x["role"], x["plan"]): x for x in c["candidates"]}
        payg = cands[("payg", "payg")]
        assert [p["total"] for p in payg["periods"]] == [str(cents(charge[(cid, m)])) for m in months]
        for pv in candidates:
            x = cands[("plan", pv.key)]
            want = [cents(expected_plan(pv.key, tokens[(cid, m)], charge[(cid, m)])) for m in months]
            assert [p["total"] for p in x["periods"]] == [str(w) for w in want], (cid, pv.key)
            assert Decimal(x["total"]) == sum(want)
            assert x["range"] == {"min": str(min(want)), "max": str(max(want))}
        totals = {k: Decimal(x["total"]) for k, x in cands.items()}
        assert c["cheapest"] == min(cands.values(), key=lambda x: Decimal(x["total"]))["plan"]
        assert min(totals.values()) == Decimal(next(x["total"] for x in c["candidates"] if x["plan"] == c["cheapest"]))

    # ---- sim-a: the spike month pays overage, the quiet month wastes allowance; current == bill preview
    a = {(x["role"], x["plan"]): x for x in by_c["sim-a"]["candidates"]}
    cur = a[("current", "incl@1")]
    assert cur["periods"] == a[("plan", "incl@1")]["periods"]
    assert [p["total"] for p in cur["periods"]] == ["21.80", "20.00"]  # 20 + 60,000 x $30/M ; 20
    assert cur["overage"] == "1.80"
    assert cur["allowances"][0]["unused"] == 70000 and cur["unused_included_tokens"] == 70000
    assert [p["unused_included_tokens"] for p in cur["periods"]] == [0, 70000]  # the quiet month's waste
    assert [p["overage"] for p in cur["periods"]] == ["1.80", "0.00"]  # the spike month's overage
    assert cur["allowances"][0]["utilisation_pct"] == str(cents(Decimal(130000 * 100) / Decimal(200000)))
    for i, m in enumerate(months):
        assert bill_preview(pipeline.ch, "sim-a", m)["total"] == cur["periods"][i]["total"]
    assert a[("plan", "commit@1")]["true_up"] != "0.00"  # February's charge is under the $3 commitment

    # ---- break-even, exact: flat $25 against sim-b's own pay-per-token price per token
    b_tokens = sum(tokens[("sim-b", m)] for m in months)
    b_charge = sum(charge[("sim-b", m)] for m in months)
    per_token = Fraction(b_charge) / b_tokens
    want_be = Fraction(25) / per_token
    pair = next(p for p in by_c["sim-b"]["break_even"] if {p["a"], p["b"]} == {"payg", "flat@1"})
    assert [Fraction(v["exact"]) for v in pair["volumes"]] == [want_be]

    # ---- routing: small opus requests re-priced at haiku's price of their own month, with sim-b's markup
    saved: dict[str, Decimal] = defaultdict(Decimal)
    for e in events:
        if e.model == "claude-3-opus" and e.input_tokens + e.output_tokens < 2000:
            saved[e.customer_id] += charge_of(e) - charge_of(e, "anthropic", "claude-3-haiku")
    r = {c["customer_id"]: c for c in doc["routing"]["customers"]}
    assert Decimal(r["sim-b"]["savings"]) == saved["sim-b"] and saved["sim-b"] > 0
    assert len(r["sim-b"]["by_model"][0]["substitute_price_versions"]) == 2  # both haiku prices were used
    flat_price = sum(
        (charge_of(e) - (e.input_tokens * Decimal("0.25") + e.output_tokens * Decimal("1.25")) / M * Decimal("1.2"))
        for e in events
        if e.model == "claude-3-opus" and e.input_tokens + e.output_tokens < 2000
    )
    assert Decimal(r["sim-b"]["savings"]) != flat_price  # today's-price-for-all would be wrong

    # ---- cohort view adds up
    [co] = doc["cohorts"]
    assert co["plan"] == "incl@1" and co["customers"] == 1 and co["revenue"] == cur["total"]
    for against in co["against"]:
        alt = next(x for x in by_c["sim-a"]["candidates"] if x["plan"] == against["plan"] and x["role"] != "current")
        assert against["revenue"] == alt["total"]
        assert Decimal(against["difference"]) == Decimal(alt["total"]) - Decimal(cur["total"])
        assert against["would_pay_more"] + against["would_pay_less"] + against["same"] == 1

    # ---- the installed command, on a copy of the same data
    _cli_checks(pipeline, tmp_path, doc)


def _copy_engine(ch: Any, dst: Path) -> str:
    """Copy the tables the simulator reads into a fresh chDB engine owned by a subprocess."""
    dumps = {}
    for table in ("usage_priced", "plans", "subscription_events", "ledger_entries"):
        path = dst / f"{table}.jsonl"
        path.write_bytes(ch.raw_query(f"SELECT * FROM {table} FORMAT JSONEachRow"))
        dumps[table] = str(path)
    dsn = f"chdb://{dst / 'engine'}?database=sim"
    script = (
        "import sys, json\n"
        "from meterline.stack.clickhouse import connect, apply_migrations, default_migrations_dir\n"
        f"c = connect({dsn!r})\n"
        "apply_migrations(c, default_migrations_dir())\n"
        f"for t, p in {dumps!r}.items():\n"
        "    data = open(p).read()\n"
        "    if data.strip():\n"
        "        c.command(f'INSERT INTO {t} FORMAT JSONEachRow ' + data)\n"
        "c.close()\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, cwd=dst)
    return dsn


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(BIN / "meterline"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def _cli_checks(pipeline: Any, tmp_path: Path, doc: dict[str, Any]) -> None:
    work = tmp_path / "cli"
    work.mkdir()
    dsn = _copy_engine(pipeline.ch, work)
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env.update({"METERLINE_CLICKHOUSE_DSN": dsn, "METERLINE_DATA_DIR": str(work / "data")})
    plans_file = work / "plans.json"
    plans_file.write_text(json.dumps({"currency": "USD", "plans": [p for p in PLANS["plans"]]}))
    out = json.loads(
        _run(
            [
                "plans",
                "simulate",
                "--period",
                "2026-01..2026-02",
                "--all",
                "--plans",
                str(plans_file),
                "--format",
                "json",
            ],
            env,
            work,
        ).stdout
    )
    strip = lambda d: [{k: v for k, v in c.items() if k != "routing"} for c in d["customers"]]  # noqa: E731
    assert strip(out) == strip(doc)
    assert out["cohorts"] == doc["cohorts"]
    sim_a = next(c for c in out["customers"] if c["customer_id"] == "sim-a")
    cur = next(x for x in sim_a["candidates"] if x["role"] == "current")
    for p in cur["periods"]:
        preview = json.loads(
            _run(["bill", "preview", "sim-a", "--period", p["period"], "--format", "json"], env, work).stdout
        )
        assert preview["total"] == p["total"]
    # ids from the published catalog work too, and one customer alone gives the same figures
    one = json.loads(
        _run(
            [
                "plans",
                "simulate",
                "--period",
                "2026-01..2026-02",
                "--customer",
                "sim-b",
                "--plans",
                "flat,grad@1",
                "--format",
                "json",
            ],
            env,
            work,
        ).stdout
    )
    full_b = {
        x["plan"]: x["total"] for x in next(c for c in doc["customers"] if c["customer_id"] == "sim-b")["candidates"]
    }
    assert {x["plan"]: x["total"] for x in one["customers"][0]["candidates"]} == {
        k: full_b[k] for k in ("payg", "flat@1", "grad@1")
    }
    # the routing what-if from the command line reads the prices topic of the running pipeline
    routing = work / "routing.yaml"
    routing.write_text(
        "routes:\n  - from: {provider: anthropic, model: claude-3-opus}\n"
        "    to: {provider: anthropic, model: claude-3-haiku}\n    under_tokens: 2000\n"
    )
    renv = {
        **env,
        "METERLINE_KAFKA_BOOTSTRAP": pipeline.settings.kafka_bootstrap,
        "METERLINE_TOPIC_PREFIX": pipeline.settings.topic_prefix,
    }
    routed = json.loads(
        _run(
            [
                "plans",
                "simulate",
                "--period",
                "2026-01..2026-02",
                "--customer",
                "sim-b",
                "--plans",
                "flat",
                "--routing",
                str(routing),
                "--format",
                "json",
            ],
            renv,
            work,
        ).stdout
    )
    assert (
        routed["customers"][0]["routing"]["savings"]
        == next(c for c in doc["routing"]["customers"] if c["customer_id"] == "sim-b")["savings"]
    )
    # a bad period is a clear usage error, not a traceback
    bad = subprocess.run(
        [str(BIN / "meterline"), "plans", "simulate", "--period", "2026-13", "--all", "--plans", "flat"],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "bad period" in bad.stderr and "Traceback" not in bad.stderr

    html = work / "report.html"
    _run(
        [
            "plans",
            "simulate",
            "--period",
            "2026-01..2026-02",
            "--all",
            "--plans",
            str(plans_file),
            "--format",
            "html",
            "--out",
            str(html),
        ],
        env,
        work,
    )
    from tests.simulator.browser import check_report

    check_report(html, out)
