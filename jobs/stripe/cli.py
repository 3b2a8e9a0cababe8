"""Typer commands: ``meterline stripe provision|sync|grants|reconcile`` and ``meterline statement``.

Wiring (meterline/cli.py)::

    from jobs.stripe.cli import stripe_app, statement_command
    app.add_typer(stripe_app, name="stripe")
    app.command("statement")(statement_command)

Stripe is the real API when ``METERLINE_STRIPE_API_KEY`` is set (``METERLINE_STRIPE_BASE_URL``
optionally overrides the address), a running local server when only the base URL is set, and
otherwise the bundled local server started for the command with its state in
``<data_dir>/stripe.sqlite``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from jobs.stripe._config import DEFAULT_CONFIG, BillingConfig, StripeTarget, load_billing_config, target_from_settings
from meterline.config import Settings
from meterline.errors import MeterlineError

stripe_app = typer.Typer(help="Stripe invoicing: provision, push usage, mirror credits, reconcile.",
                         no_args_is_help=True)  # fmt: skip
console = Console()
err = Console(stderr=True)
ConfigOpt = typer.Option(DEFAULT_CONFIG, "--config", help="Billing configuration YAML.")


@dataclass
class CommandIO:
    """Where a command's output goes and which settings it uses.

    Every command prints through :func:`_io` only, so the same command code runs in a terminal
    (the default: ``console`` / ``err`` on the real stdout / stderr, settings from the
    environment) or inside a running ``meterline up`` with both streams captured and the
    service's own settings (see :func:`run_captured`).
    """

    out: Console
    err: Console
    settings: Optional[Settings] = None  # None: read the environment (``Settings()``)
    results: list[Any] = field(default_factory=list)  # summaries the command reported (sync, provision ...)


_IO: ContextVar[Optional[CommandIO]] = ContextVar("meterline_stripe_cli_io", default=None)


def _io() -> CommandIO:
    """The current command's output and settings: the captured ones inside ``meterline up``, else
    the module's real-terminal consoles (looked up on every call, so tests can swap them)."""
    current = _IO.get()
    return current if current is not None else CommandIO(console, err)


def _settings() -> Settings:
    """The settings this command runs with (the service's inside ``meterline up``)."""
    current = _IO.get()
    if current is not None and current.settings is not None:
        return current.settings
    return Settings()


def _report(result: Any) -> None:
    """Hand a command's summary object to whoever runs it in-process (the periodic sync logs it)."""
    current = _IO.get()
    if current is not None:
        current.results.append(result)


def _fail(exc: BaseException, code: int = 1) -> typer.Exit:
    _io().err.print(f"[red]error:[/red] {exc}")
    return typer.Exit(code)


@contextlib.contextmanager
def _context(config: Path) -> Iterator[tuple[Settings, BillingConfig, StripeTarget, Any]]:
    from meterline.stack.clickhouse import apply_migrations, connect

    try:
        settings = _settings()
        cfg = load_billing_config(config)
        ch = connect(settings.resolved_clickhouse_dsn)
        apply_migrations(ch)
    except MeterlineError as exc:
        raise _fail(exc, 2) from exc
    except Exception as exc:  # pydantic ValidationError of Settings
        raise _fail(exc, 2) from exc
    target = target_from_settings(settings)
    local = None
    if target is None:
        from meterline.stripe_local import LocalStripe

        settings.data_dir.mkdir(parents=True, exist_ok=True)
        local = LocalStripe(settings.data_dir / "stripe.sqlite")
        target = StripeTarget.local(local.url)
        _io().err.print(f"[dim]no Stripe key: using the local Stripe server ({settings.data_dir / 'stripe.sqlite'})[/dim]")
    try:
        yield settings, cfg, target, ch
    except MeterlineError as exc:
        raise _fail(exc) from exc
    finally:
        if local is not None:
            local.stop()
        ch.close()


@stripe_app.command("provision")
def provision_command(
    config: Path = ConfigOpt,
    customer: list[str] = typer.Option([], "--customer", help="Map this meterline customer (repeatable)."),
    all_customers: bool = typer.Option(True, help="Also map every customer with priced usage."),
) -> None:
    """Create the meters, product, prices and customer subscriptions the config describes (idempotent)."""
    from jobs.stripe.provision import provision, usage_customers

    with _context(config) as (_settings_, cfg, target, ch):
        wanted = set(customer) | (set(usage_customers(ch)) if all_customers else set())
        report = provision(target.client(), ch, cfg, customers=sorted(wanted))
    _report(report)
    cio = _io()
    cio.out.print(f"created {len(report.created)}: {', '.join(report.created) or '-'}")
    cio.out.print(f"already there {len(report.existing)}")
    for w in report.warnings:
        cio.err.print(f"[yellow]warning:[/yellow] {w}")


@stripe_app.command("sync")
def sync_command(
    config: Path = ConfigOpt,
    now: Optional[int] = typer.Option(None, help="Stripe's clock as unix seconds (default: now)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Push priced usage per customer x meter x window to Stripe; print a summary."""
    from jobs.stripe.sync import sync

    cio = _io()
    with _context(config) as (_settings_, cfg, target, ch):
        s = sync(target, ch, cfg, now=now, progress=progress and cio.err.file.isatty())
    _report(s)
    t = Table(title=f"stripe sync ({cfg.mode} mode, {s.transport})")
    for col in ("windows", "planned", "resent", "sent", "acked", "carried", "retries", "too old", "failed"):
        t.add_column(col, justify="right")
    t.add_row(*(str(x) for x in (s.windows, s.planned, s.resent, s.sent, s.acked, s.carried, s.retries,
                                 len(s.too_old), len(s.failed))))  # fmt: skip
    cio.out.print(t)
    for p in s.too_old:
        cio.err.print(f"[yellow]too old (not invoiced):[/yellow] {p.identifier} amount {p.amount}")
    for p in s.failed:
        cio.err.print(f"[red]failed:[/red] {p.identifier}: {p.error}")
    for line in s.shrunk + s.unmapped:
        cio.err.print(f"[yellow]{line}[/yellow]")
    if s.other_currency_events:
        cio.err.print(f"[yellow]{s.other_currency_events} event(s) in another currency than {cfg.currency} not pushed[/yellow]")
    if not s.ok:
        raise typer.Exit(1)


@stripe_app.command("grants")
def grants_command(
    config: Path = ConfigOpt,
    idle: float = typer.Option(5.0, help="Stop after the topic has been idle this many seconds."),
) -> None:
    """Mirror ledger grants / top-ups / voids from the ledger-commands topic as Stripe credit grants."""
    from jobs.stripe.credits import consume_commands, mirror_grants

    with _context(config) as (settings, cfg, target, ch):
        if not settings.kafka_bootstrap:
            raise _fail(MeterlineError("set METERLINE_KAFKA_BOOTSTRAP to read ledger-commands"), 2)
        s = mirror_grants(target.client(), ch, cfg, consume_commands(settings.kafka_bootstrap,
                                                                     settings.topic("ledger-commands"), idle_seconds=idle))
    _report(s)
    cio = _io()
    cio.out.print(f"created {len(s.created)}, existing {len(s.existing)}, voided {len(s.voided)}, ignored {s.ignored}")
    for line in s.skipped:
        cio.err.print(f"[yellow]skipped:[/yellow] {line}")
    if s.skipped:
        raise typer.Exit(1)


@stripe_app.command("reconcile")
def reconcile_command(
    period: str = typer.Option(..., help="YYYY-MM, YYYY-MM-DD or START..END (UTC, end exclusive)."),
    customer: Optional[str] = typer.Option(None, help="Only this customer."),
    config: Path = ConfigOpt,
) -> None:
    """Compare ClickHouse, the sync cursor and Stripe's meter summaries; exit 1 on any drift."""
    from jobs.stripe.reconcile import parse_period, reconcile

    try:
        start, end = parse_period(period)
    except MeterlineError as exc:
        raise _fail(exc, 2) from exc
    with _context(config) as (_settings_, cfg, target, ch):
        rows = reconcile(target.client(), ch, cfg, start, end, customer=customer)
    _report(rows)
    t = Table(title=f"reconcile {period} (meter units)")
    for col in ("customer", "meter", "clickhouse", "pushed", "stripe", "unpushed", "drift"):
        t.add_column(col, justify="left" if col in ("customer", "meter") else "right")
    for r in rows:
        t.add_row(r.customer_id, r.meter, format(r.clickhouse, "f"), str(r.pushed),
                  "-" if r.stripe is None else format(r.stripe, "f"), format(r.unpushed, "f"),
                  "[red]DRIFT[/red]" if r.drifted else "ok")  # fmt: skip
    cio = _io()
    cio.out.print(t)
    drifted = sum(r.drifted for r in rows)
    cio.out.print(f"{drifted} drift(s) in {len(rows)} row(s)")
    if drifted:
        raise typer.Exit(1)


def statement_command(
    customer: str = typer.Argument(..., help="meterline customer id."),
    period: str = typer.Option(..., help="YYYY-MM, YYYY-MM-DD or START..END (UTC, end exclusive)."),
    fmt: str = typer.Option("html", "--format", help="html | csv"),
    out: Optional[Path] = typer.Option(None, help="Write here (default: stdout)."),
) -> None:
    """The itemized usage statement behind an invoice (per day, project, model, token class)."""
    from jobs.stripe.reconcile import parse_period
    from jobs.stripe.statement import build_statement, render_csv, render_html
    from meterline.stack.clickhouse import connect

    if fmt not in ("html", "csv"):
        raise _fail(MeterlineError("--format must be html or csv"), 2)
    try:
        start, end = parse_period(period)
        ch = connect(_settings().resolved_clickhouse_dsn)
        try:
            st = build_statement(ch, customer, start, end)
        finally:
            ch.close()
    except MeterlineError as exc:
        raise _fail(exc, 2) from exc
    text = render_html(st) if fmt == "html" else render_csv(st)
    cio = _io()
    if out is None:
        cio.out.file.write(text)
    else:
        out.write_text(text)
        cio.out.print(f"wrote {out} ({len(st.lines)} line(s))")
