"""``meterline``: the single entry point for operators (typer)."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table

from meterline.core.config import Settings
from meterline.core.errors import MeterlineError
from meterline.shell.cli_common import fail as _fail
from meterline.shell.cli_common import load_settings as _settings
from meterline.shell.console import make_console, markup_mode

app = typer.Typer(
    help="meterline: meter, price, enforce and invoice pay-per-token AI usage.",
    no_args_is_help=True,
    rich_markup_mode=markup_mode(),
)
prices_app = typer.Typer(
    help="Price catalog: load price files, import LiteLLM's price map.",
    no_args_is_help=True,
    rich_markup_mode=markup_mode(),
)
keys_app = typer.Typer(help="API keys for the HTTP API.", no_args_is_help=True, rich_markup_mode=markup_mode())
app.add_typer(prices_app, name="prices")
app.add_typer(keys_app, name="keys")
from meterline.shell.cli_credits import credits_app  # noqa: E402 - sub-app defined in its own module

app.add_typer(credits_app, name="credits")
from meterline.shell.cli_stripe import statement_command, stripe_app  # noqa: E402

app.add_typer(stripe_app, name="stripe")
app.command("statement")(statement_command)
from devtools.verify import verify_command  # noqa: E402

app.command("verify")(verify_command)
from meterline.shell.cli_proxy import proxy_command  # noqa: E402

app.command("proxy")(proxy_command)
from meterline.shell.cli_reprice import reprice_command  # noqa: E402

app.command("reprice")(reprice_command)
dead_app = typer.Typer(
    help="Dead-lettered events: re-drive them once the cause is fixed.",
    no_args_is_help=True,
    rich_markup_mode=markup_mode(),
)
app.add_typer(dead_app, name="dead-letters")
from meterline.shell.cli_plans import register as register_plans  # noqa: E402 - `meterline plans ...` and `meterline bill ...`

register_plans(app)
from meterline.shell.cli_plans import plans_app  # noqa: E402
from meterline.shell.cli_simulate import register as register_simulate  # noqa: E402 - `meterline plans simulate`

register_simulate(plans_app)
from meterline.shell.cli_roles import register as register_roles  # noqa: E402 - `meterline worker|sink|api`

register_roles(app)

# Off a terminal (CI logs, `| tee`, a file) nothing is wrapped and tables come out whole: meterline.shell.console.
console = make_console()
err = make_console(stderr=True)


def _bootstrap(settings: Settings) -> tuple[str, str]:
    """The Kafka bootstrap and topic prefix: configured, or those of a running ``meterline up``."""
    from meterline.shell.discovery import kafka_bootstrap

    try:
        return kafka_bootstrap(settings)
    except MeterlineError as exc:
        raise _fail(exc) from exc


# -- up ---------------------------------------------------------------------------------------


@app.command()
def up(
    demo: bool = typer.Option(False, "--demo", help="Load the seed prices and generate demo gateway traffic."),
    workers: int | None = typer.Option(None, help="faust worker processes (default METERLINE_WORKERS)."),
    duration: float | None = typer.Option(None, help="Stop by itself after this many seconds."),
    rate: float = typer.Option(200.0, help="Demo events per second."),
) -> None:
    """Start broker (embedded unless configured), migrations, faust workers, sink and HTTP API."""
    settings = _settings()
    from meterline.shell.runtime import Runtime

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("meterline.stripe_sync").setLevel(logging.INFO)  # one line per periodic sync
    runtime = Runtime(settings, workers=workers)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        runtime.start(on_step=lambda s: console.print(f"[dim]·[/dim] {s}"))
    except MeterlineError as exc:
        raise _fail(exc) from exc
    console.print(f"[green]meterline is up[/green]  API {runtime.api_server.url}  (Ctrl-C to stop)")
    console.print(f"[dim]admin API key in {settings.data_dir / 'admin.key'}[/dim]")
    console.print(f"[yellow]{runtime.durability_line}[/yellow]")
    traffic = None
    demo_thread = None
    try:
        if demo:
            traffic, demo_thread = _start_demo(runtime, stop)
        deadline = time.monotonic() + duration if duration else None
        live = Live(console=console, refresh_per_second=1, transient=False) if demo and console.is_terminal else None
        last_print = time.monotonic()
        with live if live is not None else contextlib.nullcontext():
            while not stop.is_set():
                if deadline is not None and time.monotonic() >= deadline:
                    break
                stop.wait(1.0)
                if demo and live is not None:
                    live.update(Group(*_summary_tables(runtime, traffic)))
                elif demo and time.monotonic() - last_print >= 10:
                    last_print = time.monotonic()
                    _print_summary(runtime, traffic)
                dead = [w.name for w in runtime.workers if not w.alive()]
                if dead:
                    err.print(f"[red]worker(s) exited: {', '.join(dead)}[/red]")
                    for w in runtime.workers:
                        if not w.alive():
                            err.print(w.log_tail())
                    break
    finally:
        stop.set()
        if demo_thread is not None:
            demo_thread.join(timeout=15)
            traffic.producer.close()
        if demo:
            _drain_and_summarise(runtime, traffic)
            _close_demo_period(traffic)
        console.print("[dim]· stopping[/dim]")
        runtime.stop()
        console.print("[green]stopped[/green]")


def _start_demo(runtime: Any, stop: threading.Event) -> tuple[Any, threading.Thread]:
    from meterline.core.pricing import load_price_book
    from meterline.shell.demo import (
        RUNAWAY_AFTER_S,
        RUNAWAY_CAP_PER_MINUTE,
        RUNAWAY_CUSTOMER,
        SEED_PRICES,
        UMBRELLA_CREDIT,
        DemoTraffic,
        demo_credit_commands,
    )
    from meterline.stack.producer import UsageProducer
    from pipeline.publish import publish_records

    seed = Path(__file__).resolve().parents[2] / SEED_PRICES
    book = load_price_book(seed)
    n = publish_records(runtime.settings.kafka_bootstrap, runtime.settings.topic("prices"), book.to_records())
    console.print(f"[dim]·[/dim] published {n} price records from {SEED_PRICES}")
    for command in demo_credit_commands():
        runtime.commands.send(command)
    console.print(
        f"[dim]·[/dim] umbrella prepaid ${UMBRELLA_CREDIT} (blocked when it runs out); "
        f"{RUNAWAY_CUSTOMER}'s agent loops after {RUNAWAY_AFTER_S:.0f}s (runaway guard: ${RUNAWAY_CAP_PER_MINUTE}/min)"
    )
    producer = UsageProducer(runtime.settings.kafka_bootstrap, runtime.settings.topic("usage-events"))
    status_view = runtime.status_view

    def allowed(customer_id: str) -> bool:
        value = status_view.get(customer_id)
        return not (value and value.get("status") == "blocked")

    traffic = DemoTraffic(producer, allowed=allowed)
    from meterline.shell.demo import CUSTOMERS, PLAN_SUBSCRIPTIONS, plan_customer_ids
    from meterline.shell.demo_billing import DemoBilling

    on_plans = plan_customer_ids()
    traffic.billing = DemoBilling(runtime, [c.customer_id for c in CUSTOMERS if c.customer_id not in on_plans])
    console.print(f"[dim]·[/dim] Stripe (local server, {traffic.billing.path}): customers provisioned for this period")
    _publish_demo_plans()
    for warning in traffic.billing.provision_plans(sorted(on_plans), timeout=15):
        err.print(f"[yellow]plan billing: {warning}[/yellow]")
    console.print(
        "[dim]·[/dim] plans: "
        + "; ".join(f"{customer} on {plan}" for customer, plan in PLAN_SUBSCRIPTIONS)
        + " (from now; Stripe fee + allowance/overage prices provisioned)"
    )
    thread = threading.Thread(target=traffic.run, args=(stop,), name="meterline-demo", daemon=True)
    thread.start()
    return traffic, thread


def _publish_demo_plans() -> None:
    """The demo's plans and subscriptions (start = now), through ``meterline plans load|subscribe``."""
    from meterline.shell.cli_plans import plans_load, plans_subscribe
    from meterline.shell.demo import DEMO_PLANS, PLAN_SUBSCRIPTIONS

    plans_load(Path(__file__).resolve().parents[2] / DEMO_PLANS)
    for customer, plan in PLAN_SUBSCRIPTIONS:
        try:
            plans_subscribe(customer, plan, version=None, from_=None)
        except typer.Exit:  # refused with its reason printed (e.g. already subscribed in this data dir)
            err.print(f"[yellow]{customer} keeps its recorded subscription[/yellow]")


def _summary_tables(runtime: Any, traffic: Any) -> list[Table]:
    from meterline.shell.demo import collect_summary, money

    with runtime.query_client() as ch:
        summary = collect_summary(lambda sql: ch.query(sql).result_rows)
    t1 = Table(title="priced spend per customer (live, from ClickHouse usage_priced)")
    for col in ("customer", "events", "in tok", "out tok", "list cost", "charge", "margin"):
        t1.add_column(col, justify="right" if col != "customer" else "left")
    for cust, events, p, c, cost, charge in summary["customers"]:
        t1.add_row(cust, f"{events:,}", f"{p:,}", f"{c:,}", money(cost, 4), money(charge, 4), money(charge - cost, 4))
    t2 = Table(title="spend per model")
    for col in ("provider", "model", "events", "charge"):
        t2.add_column(col)
    for provider, model, events, charge in summary["models"]:
        t2.add_row(provider, model, f"{events:,}", money(charge))
    t3 = Table(title="dead-lettered (never priced at $0)")
    t3.add_column("reason")
    t3.add_column("events")
    for reason, events in summary["rejected"]:
        t3.add_row(reason, f"{events:,}")
    priced = sum(row[1] for row in summary["customers"])
    rejected = sum(row[1] for row in summary["rejected"])
    t1.caption = (
        f"gateway sent {traffic.sent:,} events + {traffic.resent:,} retries of already-sent events; "
        f"priced {priced:,} + dead-lettered {rejected:,} = {priced + rejected:,} "
        f"(retries charged once; the rest is in flight)"
    )
    t4 = Table(title="credit enforcement (live, from the credit agent's customer-status)")
    for col in ("customer", "status", "reason", "available", "overage", "gateway refused"):
        t4.add_column(col)
    view = runtime.status_view
    for customer in sorted(view.customers()) if view is not None else []:
        value = view.get(customer) or {}
        balance = value.get("balance") or {}
        blocked = value.get("status") == "blocked"
        t4.add_row(
            customer,
            "[red]blocked[/red]" if blocked else "[green]active[/green]",
            str(value.get("reason") or ""),
            f"${balance.get('available', '0')}",
            f"${balance.get('overage', '0')}",
            f"{traffic.refused.get(customer, 0):,}",
        )
    return [t1, t2, t3, t4]


def _print_summary(runtime: Any, traffic: Any) -> None:
    try:
        tables = _summary_tables(runtime, traffic)
    except Exception as exc:
        err.print(f"[yellow]summary unavailable: {exc}[/yellow]")
        return
    console.print(f"[dim]{datetime.now(UTC):%H:%M:%S}[/dim]")
    for t in tables:
        console.print(t)


def _drain_and_summarise(runtime: Any, traffic: Any) -> None:
    """Give the pipeline a few seconds to price what the demo produced, then print the totals."""
    deadline = time.monotonic() + 20
    expected = traffic.sent - traffic.unpriced if traffic else 0
    while time.monotonic() < deadline:
        with runtime.query_client() as ch:
            got = ch.query("SELECT count() FROM usage_priced").result_rows[0][0]
        if got >= expected:
            break
        time.sleep(0.5)
    _print_summary(runtime, traffic)


def _close_demo_period(traffic: Any) -> None:
    """End the demo billing period in (local) Stripe and show the invoices."""
    billing = getattr(traffic, "billing", None)
    if billing is None:
        return
    console.print(
        "[dim]·[/dim] closing the billing period: mirror prepaid grants, sync usage to Stripe meters, invoice"
    )
    try:
        rows, summary = billing.close_period()
    except Exception as exc:
        err.print(f"[red]billing failed: {exc}[/red]")
        billing.stop()
        return
    table = Table(title=f"Stripe invoices for the demo period ({summary.acked} meter events acknowledged)")
    for col in ("customer", "usage charge (exact)", "invoice", "subtotal", "prepaid credit", "total due", "status"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r.customer_id,
            f"${r.usage_charge.normalize():f}",
            r.invoice_id,
            f"${r.subtotal_cents / 100:,.2f}",
            f"-${r.credit_cents / 100:,.2f}" if r.credit_cents else "",
            f"${r.total_cents / 100:,.2f}",
            r.status,
        )
    console.print(table)
    for warning in billing.warnings:
        err.print(f"[yellow]plan billing: {warning}[/yellow]")
    plan_lines = billing.plan_lines(rows)
    if plan_lines:
        plans = Table(title=f"plan lines of the closed period ({len(summary.true_ups)} true-up(s) added)")
        for col in ("customer", "line", "description", "quantity", "amount", "on invoice"):
            plans.add_column(col, justify="right" if col in ("quantity", "amount") else "left")
        for p in plan_lines:
            plans.add_row(
                p.customer_id, p.kind, p.description, f"{p.quantity:,}", f"${p.amount_cents / 100:,.2f}", p.invoice_id
            )
        console.print(plans)
    console.print(
        f"[dim]invoices are kept in {billing.path}: python -m devtools.stripe_local --state {billing.path}[/dim]"
    )
    billing.stop()


# -- migrate / topics -------------------------------------------------------------------------


@app.command()
def migrate() -> None:
    """Apply ClickHouse migrations from infra/clickhouse (idempotent); their cluster form (Replicated +
    Distributed tables, ON CLUSTER) when METERLINE_CLICKHOUSE_CLUSTER is set."""
    from meterline.stack.clickhouse import apply_migrations, connect

    settings = _settings()
    try:
        client = connect(settings.resolved_clickhouse_dsn)
        applied = apply_migrations(client, cluster=settings.clickhouse_cluster)
    except MeterlineError as exc:
        raise _fail(exc) from exc
    console.print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))


# -- prices -----------------------------------------------------------------------------------


@prices_app.command("load")
def prices_load(file: Path = typer.Argument(..., exists=True, dir_okay=False, help="YAML or JSON price file.")) -> None:
    """Validate a price file and publish its versions and rate cards (idempotent)."""
    from meterline.core.pricing import load_price_book
    from pipeline.publish import publish_records

    settings = _settings()
    try:
        book = load_price_book(file)
    except MeterlineError as exc:
        raise _fail(exc, 2) from exc
    bootstrap, prefix = _bootstrap(settings)
    records = book.to_records()
    try:
        publish_records(bootstrap, f"{prefix}prices", records)
    except MeterlineError as exc:
        raise _fail(exc) from exc
    console.print(f"published {len(records)} price record(s) from {file} to {prefix}prices")


@prices_app.command("import-litellm")
def prices_import_litellm(
    source: Path | None = typer.Option(
        None, help="LiteLLM model_prices JSON; default: the installed litellm package's."
    ),
    effective_from: str = typer.Option(..., help="ISO-8601 instant the imported prices take effect."),
    out: Path = typer.Option(Path("prices-litellm.yaml"), help="Where to write the price file."),
    provider: list[str] = typer.Option([], help="Only these litellm providers (repeatable)."),
) -> None:
    """Convert LiteLLM's price map into a meterline price file (exact: via Decimal(repr(x)))."""
    import yaml

    from meterline.core.pricing import import_litellm

    try:
        when = datetime.fromisoformat(effective_from.replace("Z", "+00:00"))
        if when.tzinfo is None:
            raise ValueError("effective_from needs a timezone, e.g. 2025-01-01T00:00:00Z")
        doc, report = import_litellm(source, effective_from=when, providers=set(provider) or None)
    except (MeterlineError, ValueError) as exc:
        raise _fail(exc, 2) from exc
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    console.print(f"wrote {out}: {report.summary() if hasattr(report, 'summary') else report}")


# -- produce / sql ----------------------------------------------------------------------------


@app.command()
def produce(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="Canonical JSON events, one per line."),
) -> None:
    """Validate and produce canonical JSON usage events; bad lines are reported, good ones still go."""
    from meterline.core.errors import InvalidEvent
    from meterline.stack.producer import UsageProducer
    from schemas.jsonio import iter_jsonl

    settings = _settings()
    bootstrap, prefix = _bootstrap(settings)
    good = bad = 0
    with UsageProducer(bootstrap, f"{prefix}usage-events") as producer:
        for line_no, item in iter_jsonl(file):
            if isinstance(item, InvalidEvent):
                bad += 1
                err.print(f"{file}:{line_no}: {item.reason_code}: {item.message}")
                continue
            producer.send(item)
            good += 1
        producer.flush(30)
    console.print(f"produced {good} event(s), rejected {bad} line(s)")
    if bad:
        raise typer.Exit(1)


def _query(settings: Settings, query: str, parameters: dict[str, Any] | None = None) -> tuple[list[str], list[Any]]:
    """Read-only SQL: through the running service's API if ``meterline up`` owns the engine, else directly."""
    from meterline.shell.discovery import running_api
    from meterline.stack.analytics import run_readonly

    api = running_api(settings.data_dir)
    if api is not None:
        from meterline.shell.api.client import ApiClient

        out = ApiClient(*api).sql(query, "json", parameters)
        return list(out["columns"]), [tuple(r) for r in out["rows"]]
    from meterline.stack.analytics import SqlLimits
    from meterline.stack.clickhouse import connect

    return run_readonly(
        connect(settings.resolved_clickhouse_dsn), query, parameters, limits=SqlLimits.from_settings(settings)
    )


@app.command()
def sql(
    query: str = typer.Argument(..., help="Read-only SQL (SELECT / WITH / SHOW / DESCRIBE / EXPLAIN)."),
    fmt: str = typer.Option("table", "--format", help="table | csv | json"),
) -> None:
    """Run read-only SQL on ClickHouse: through the running service's API, or directly if none runs."""
    from meterline.stack.analytics import format_result

    settings = _settings()
    try:
        columns, rows = _query(settings, query)
    except MeterlineError as exc:
        raise _fail(exc) from exc
    text = format_result(columns, rows, fmt)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


@dead_app.command("redrive")
def dead_letters_redrive(
    reason: str | None = typer.Option(None, help="Only this reason_code (e.g. unknown_model)."),
    customer: str | None = typer.Option(None, help="Only this customer."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Count what would be re-driven; send nothing."),
) -> None:
    """Re-send open dead-lettered events (e.g. after adding the missing price) to usage-events.

    Only events that were dead-lettered one by one (payload_format usage_batch) can be re-driven;
    each keeps its event_id, so re-driving twice still prices it once.
    """
    from pipeline.publish import publish_records

    settings = _settings()
    where = ["payload_format = 'usage_batch'"]
    params: dict[str, Any] = {}
    if reason:
        where.append("reason_code = {reason:String}")
        params["reason"] = reason
    if customer:
        where.append("customer_id = {customer:String}")
        params["customer"] = customer
    query = f"SELECT customer_id, hex(payload) FROM v_rejected_open WHERE {' AND '.join(where)}"
    try:
        _, rows = _query(settings, query, params)
    except MeterlineError as exc:
        raise _fail(exc) from exc
    if dry_run:
        console.print(f"{len(rows)} open dead letter(s) would be re-driven")
        return
    bootstrap, prefix = _bootstrap(settings)
    records = [(str(cust), bytes.fromhex(str(payload))) for cust, payload in rows]
    try:
        n = publish_records(bootstrap, f"{prefix}usage-events", records)
    except MeterlineError as exc:
        raise _fail(exc) from exc
    console.print(f"re-drove {n} dead-lettered event(s) to {prefix}usage-events")


# -- keys -------------------------------------------------------------------------------------


@keys_app.command("create")
def keys_create(
    customer: str | None = typer.Argument(None, help="Customer the key acts for (omit with --admin)."),
    admin: bool = typer.Option(False, "--admin", help="An operator key that can act on every customer."),
) -> None:
    """Create an API key; the secret is shown once and stored only as a hash."""
    from meterline.shell.api.keys import KeyStore

    if not admin and not customer:
        raise _fail(MeterlineError("give a CUSTOMER or --admin"), 2)
    settings = _settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    key_id, secret = KeyStore(settings.data_dir / "api_keys.json").create(
        None if admin else customer, role="admin" if admin else "customer"
    )
    console.print(json.dumps({"key_id": key_id, "secret": secret}))


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke an API key by its id."""
    from meterline.shell.api.keys import KeyStore

    settings = _settings()
    KeyStore(settings.data_dir / "api_keys.json").revoke(key_id)
    console.print(f"revoked {key_id}")


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
