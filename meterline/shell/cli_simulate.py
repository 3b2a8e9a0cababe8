"""``meterline plans simulate``: what customers would pay under other plans, on their real usage.

Read-only: it queries ClickHouse (aggregates only, see :mod:`jobs.plans.simulate`) and, with
``--routing``, reads the prices topic to price substitutes; it publishes and writes nothing.
Registered on the ``plans`` sub-app by :func:`register` (meterline/shell/cli.py).
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import typer

from meterline.core.errors import InputError, MeterlineError

__all__ = ["load_price_engine", "register"]


def load_price_engine(bootstrap: str, prefix: str) -> tuple[Any, dict[tuple[str, str], list[int]]]:
    """A PricingEngine from the compacted prices topic, and each model's price version starts
    (epoch ms; aliases count as their model) for the routing what-if."""
    from meterline.core.pricing import PriceVersion, PricingEngine
    from meterline.core.pricing._book import PRICE_KEY_PREFIX, decode_record
    from meterline.stack.kafka import read_topic

    engine = PricingEngine()
    versions: dict[tuple[str, str], list[int]] = {}
    for m in read_topic(bootstrap, f"{prefix}prices"):
        key = (m.key() or b"").decode("utf-8", "replace")
        value = m.value()
        engine.apply_record(key, value)
        if value is not None and key.startswith(PRICE_KEY_PREFIX):
            v = decode_record(key, value)
            if isinstance(v, PriceVersion):
                for name in (v.model, *v.aliases):
                    versions.setdefault((v.provider, name), []).append(v.effective_ms)
    return engine, versions


def _plans_arg(value: str) -> tuple[list[str], Any]:
    """``FILE`` (a plan file: all its plans) or ``ID,ID@N,...`` (the published catalog)."""
    from meterline.core.plans import load_plan_catalog

    path = Path(value)
    if path.suffix.lower() in (".yaml", ".yml", ".json") or path.is_file():
        return [], load_plan_catalog(path)
    return [s for s in value.split(",") if s.strip()], None


def register(plans_app: typer.Typer) -> None:
    """Add ``simulate`` to the ``plans`` sub-app."""
    plans_app.command("simulate")(simulate_command)


def simulate_command(
    period: str = typer.Option(..., "--period", help="YYYY-MM, or YYYY-MM..YYYY-MM for several months."),
    customer: str | None = typer.Option(None, "--customer", help="One customer."),
    all_: bool = typer.Option(False, "--all", help="Every customer with usage or a subscription in the period."),
    plans: str = typer.Option(..., "--plans", help="A plan file (YAML/JSON), or published plan ids: ID,ID@VERSION,..."),
    routing: Path | None = typer.Option(None, "--routing", exists=True, dir_okay=False, help="Routing what-if file."),
    cohort: str | None = typer.Option(None, "--cohort", help="Only customers currently on this plan id (with --all)."),
    fmt: str = typer.Option("table", "--format", help="table | json | html"),
    out: Path | None = typer.Option(None, "--out", help="Write the output to this file instead of stdout."),
) -> None:
    """Re-rate real usage under pay-per-token, the customer's current plan and each given plan
    (same rating code as billing), with break-even volumes, cohort and routing what-ifs."""
    from rich.console import Console

    from jobs.plans.billing import load_catalog, month_bounds
    from jobs.plans.simulate import parse_months, resolve_plans, simulate
    from meterline.core.simulator._html import render_html
    from meterline.core.simulator._routing import load_routing
    from meterline.shell.cli_plans import _ReadClient, _settings

    err = Console(stderr=True)

    def fail(exc: BaseException, code: int) -> typer.Exit:
        err.print(f"[red]error:[/red] {exc}")
        return typer.Exit(code)

    if fmt not in ("table", "json", "html"):
        raise fail(InputError("--format must be table, json or html"), 2)
    if (customer is None) == (not all_):
        raise fail(InputError("give --customer C or --all"), 2)
    settings = _settings()
    try:
        months = parse_months(period)
        ids, file_catalog = _plans_arg(plans)
        routes = load_routing(routing) if routing is not None else ()
        engine: Any = None
        versions: dict[tuple[str, str], list[int]] = {}
        if routes:
            from meterline.shell.discovery import kafka_bootstrap

            engine, versions = load_price_engine(*kafka_bootstrap(settings))
        client = _ReadClient(settings)
        try:
            catalog = load_catalog(client)
            candidates = resolve_plans(ids, catalog, month_bounds(months[0])[0], file_catalog)
            doc = simulate(
                client,
                period,
                candidates,
                customer=customer,
                cohort=cohort,
                routes=routes,
                price_engine=engine,
                substitute_versions=versions,
            )
        finally:
            client.close()
    except MeterlineError as exc:
        raise fail(exc, 2 if isinstance(exc, InputError) else 1) from exc
    if fmt == "json":
        text = json.dumps(doc, indent=2) + "\n"
    elif fmt == "html":
        text = render_html(doc)
    else:
        text = _table(doc)
    if out is not None:
        out.write_text(text, encoding="utf-8")
        err.print(f"wrote {out}")
    else:
        sys.stdout.write(text)


def _table(doc: dict[str, Any]) -> str:
    from rich.console import Console
    from rich.table import Table

    console = Console(record=True, width=160, file=io.StringIO())  # recorded, exported as text
    for c in doc["customers"]:
        t = Table(
            title=f"{c['customer_id']} · {doc['period']} · current {c['current_plan'] or 'pay-per-token'} · cheapest {c['cheapest']}"
        )
        for col in (
            "plan",
            "role",
            "total",
            "fee",
            "overage",
            "true-up",
            "per M",
            "unused incl.",
            "min",
            "max",
            "average",
        ):
            t.add_column(col, justify="left" if col in ("plan", "role") else "right")
        for x in c["candidates"]:
            rng = x["range"] or {"min": "", "max": ""}
            t.add_row(
                x["plan"],
                x["role"],
                x["total"],
                x["fee"],
                x["overage"],
                x["true_up"],
                x["effective_per_million"] or "",
                str(x["unused_included_tokens"]),
                rng["min"],
                rng["max"],
                x["average"],
            )
        console.print(t)
        for p in c.get("break_even", []):
            vols = ", ".join(f"{v['tokens']} ({v['exact']})" for v in p["volumes"]) or "never"
            console.print(f"  break-even {p['a']} vs {p['b']}: {vols} tokens per period")
        if c.get("routing"):
            console.print(f"  routing what-if savings: {c['routing']['savings']}")
    for k in doc.get("cohorts", []):
        t = Table(title=f"cohort {k['plan']}: {k['customers']} customer(s), revenue {k['revenue']}")
        for col in ("against", "revenue", "difference", "pay more", "pay less", "same"):
            t.add_column(col)
        for a in k["against"]:
            t.add_row(
                a["plan"],
                a["revenue"],
                a["difference"],
                str(a["would_pay_more"]),
                str(a["would_pay_less"]),
                str(a["same"]),
            )
        console.print(t)
    return console.export_text()
