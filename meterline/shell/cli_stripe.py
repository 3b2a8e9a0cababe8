"""Typer commands: ``meterline stripe provision|sync|grants|reconcile`` and ``meterline statement``.

Wiring (meterline/shell/cli.py)::

    from meterline.shell.cli_stripe import stripe_app, statement_command
    app.add_typer(stripe_app, name="stripe")
    app.command("statement")(statement_command)

Stripe is the real API when ``METERLINE_STRIPE_API_KEY`` is set (``METERLINE_STRIPE_BASE_URL``
optionally overrides the address), a running local server when only the base URL is set, and
otherwise the bundled local server started for the command with its state in
``<data_dir>/stripe.sqlite``.

Where the commands run: with the embedded ClickHouse engine (a ``chdb:`` DSN) only one process may
open the engine, and while ``meterline up`` runs for this data_dir that is ``up``. The commands
then send their argv (rebuilt from the parsed parameters by :func:`argv_from_params`) to the
running service's ``POST /v1/admin/run`` (admin key from ``<data_dir>/admin.key``) and print what
it returns; ``up`` runs the same command code with :func:`run_captured`. With a ClickHouse server
DSN, or when no ``up`` runs, they run here. Output goes through
:func:`meterline.shell.forwarding.current_io` only, so the command code is the same in both places
(:mod:`meterline.shell.forwarding` has the mechanism).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from jobs.stripe._config import DEFAULT_CONFIG, BillingConfig, StripeTarget, load_billing_config, target_from_settings
from meterline.core.config import Settings
from meterline.core.errors import MeterlineError
from meterline.shell import forwarding
from meterline.shell.console import markup_mode
from meterline.shell.forwarding import (
    CapturedRun,
    captured,
    command_settings,
    current_io,
    fail,
    forward_to_up,
    relay,
    report_result,
    run_in_up_if_running,
)
from schemas.models import CUSTOMER_ID_RULE, is_customer_id

log = logging.getLogger(__name__)

stripe_app = typer.Typer(
    help="Stripe invoicing: provision, push usage, mirror credits, reconcile.",
    no_args_is_help=True,
    rich_markup_mode=markup_mode(),
)
ConfigOpt = typer.Option(DEFAULT_CONFIG, "--config", help="Billing configuration YAML.")


@contextlib.contextmanager
def _context(config: Path) -> Iterator[tuple[Settings, BillingConfig, StripeTarget, Any]]:
    from meterline.stack.clickhouse import apply_migrations, connect

    try:
        settings = command_settings()
        cfg = load_billing_config(config)
        ch = connect(settings.resolved_clickhouse_dsn)
        apply_migrations(ch)
    except MeterlineError as exc:
        raise fail(exc, 2) from exc
    except Exception as exc:  # pydantic ValidationError of Settings
        raise fail(exc, 2) from exc
    target = target_from_settings(settings)
    local = None
    if target is None:
        from devtools.stripe_local import LocalStripe
        from meterline.stack.private import private_dir

        local = LocalStripe(private_dir(settings.data_dir) / "stripe.sqlite")
        target = StripeTarget.local(local.url)
        current_io().err.print(
            f"[dim]no Stripe key: using the local Stripe server ({settings.data_dir / 'stripe.sqlite'})[/dim]"
        )
    try:
        yield settings, cfg, target, ch
    except MeterlineError as exc:
        raise fail(exc) from exc
    finally:
        if local is not None:
            local.stop()
        ch.close()


@stripe_app.command("provision")
def provision_command(
    ctx: typer.Context,
    config: Path = ConfigOpt,
    customer: list[str] = typer.Option([], "--customer", help="Map this meterline customer (repeatable)."),
    all_customers: bool = typer.Option(True, help="Also map every customer with priced usage."),
) -> None:
    """Create the meters, product, prices and customer subscriptions the config describes (idempotent)."""
    from jobs.stripe.provision import provision, usage_customers

    run_in_up_if_running(ctx, "stripe", "provision")

    with _context(config) as (_settings_, cfg, target, ch):
        wanted = set(customer) | (set(usage_customers(ch)) if all_customers else set())
        report = provision(target.client(), ch, cfg, customers=sorted(wanted), now=target.now())
    report_result(report)
    cio = current_io()
    cio.out.print(f"created {len(report.created)}: {', '.join(report.created) or '-'}")
    cio.out.print(f"already there {len(report.existing)}")
    for w in report.warnings:
        cio.err.print(f"[yellow]warning:[/yellow] {w}")


@stripe_app.command("sync")
def sync_command(
    ctx: typer.Context,
    config: Path = ConfigOpt,
    now: int | None = typer.Option(None, help="Stripe's clock as unix seconds (default: now)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Push priced usage per customer x meter x window to Stripe; print a summary."""
    from jobs.stripe.sync import sync

    run_in_up_if_running(ctx, "stripe", "sync")

    cio = current_io()
    with _context(config) as (_settings_, cfg, target, ch):
        s = sync(
            target, ch, cfg, now=now if now is not None else target.now(), progress=progress and cio.err.file.isatty()
        )
    report_result(s)
    t = Table(title=f"stripe sync ({cfg.mode} mode, {s.transport})")
    for col in ("windows", "planned", "resent", "sent", "acked", "carried", "credited", "retries", "too old", "failed"):
        t.add_column(col, justify="right")
    t.add_row(
        *(
            str(x)
            for x in (
                s.windows,
                s.planned,
                s.resent,
                s.sent,
                s.acked,
                s.carried,
                s.credited,
                s.retries,
                len(s.too_old),
                len(s.failed),
            )
        )
    )
    cio.out.print(t)
    for line in s.plan_updates:
        cio.out.print(f"plan subscription {line}")
    for marker in s.true_ups:
        cio.out.print(f"minimum commitment true-up added: {marker}")
    for c in s.corrections:  # re-rated money Stripe can no longer take as meter events: next invoice
        cio.out.print(
            f"corrective amount {c.correction_id}: {c.cents} {c.currency} minor units "
            f"(exact {c.amount}) {'invoice item ' + c.stripe_id if c.stripe_id else 'all carried'}"
        )
    for c in s.corrections_failed:
        cio.err.print(f"[red]corrective amount refused:[/red] {c.correction_id}: {c.error}")
    for p in s.too_old:
        cio.err.print(f"[yellow]too old (not invoiced):[/yellow] {p.identifier} amount {p.amount}")
    for p in s.failed:
        cio.err.print(f"[red]failed:[/red] {p.identifier}: {p.error}")
    for line in s.shrunk + s.unmapped:
        cio.err.print(f"[yellow]{line}[/yellow]")
    if s.other_currency_events:
        cio.err.print(
            f"[yellow]{s.other_currency_events} event(s) in another currency than {cfg.currency} not pushed[/yellow]"
        )
    if not s.ok:
        raise typer.Exit(1)


@stripe_app.command("grants")
def grants_command(
    ctx: typer.Context,
    config: Path = ConfigOpt,
    idle: float = typer.Option(0.0, help="Wait this many seconds first, for entries the ledger just wrote."),
) -> None:
    """Mirror the grants / top-ups / voids the ledger applied (ClickHouse ledger_entries) as Stripe credit grants."""
    from jobs.stripe.credits import ledger_grant_facts, mirror_grants

    run_in_up_if_running(ctx, "stripe", "grants")

    if idle > 0:
        time.sleep(idle)  # let entries the ledger just wrote reach ClickHouse
    with _context(config) as (_settings, cfg, target, ch):
        s = mirror_grants(target.client(), ch, cfg, ledger_grant_facts(ch))
    report_result(s)
    cio = current_io()
    cio.out.print(f"created {len(s.created)}, existing {len(s.existing)}, voided {len(s.voided)}, ignored {s.ignored}")
    for line in s.skipped:
        cio.err.print(f"[yellow]skipped:[/yellow] {line}")
    if s.skipped:
        raise typer.Exit(1)


@stripe_app.command("reconcile")
def reconcile_command(
    ctx: typer.Context,
    period: str = typer.Option(..., help="YYYY-MM, YYYY-MM-DD or START..END (UTC, end exclusive)."),
    customer: str | None = typer.Option(None, help="Only this customer."),
    config: Path = ConfigOpt,
    now: int | None = typer.Option(None, help="Stripe's clock as unix seconds (default: now); decides what is due."),
) -> None:
    """Compare ClickHouse, the sync cursor and Stripe's meter summaries; exit 1 on real drift only.

    Usage in windows that have not settled yet (``settle_seconds``) is reported as pending, with
    the time from which the next sync pushes it; it is not drift."""
    from jobs.stripe.reconcile import parse_period, reconcile

    run_in_up_if_running(ctx, "stripe", "reconcile")

    try:
        start, end = parse_period(period)
    except MeterlineError as exc:
        raise fail(exc, 2) from exc
    with _context(config) as (_settings_, cfg, target, ch):
        rows = reconcile(target.client(), ch, cfg, start, end, customer=customer, now=now)
    report_result(rows)
    t = Table(title=f"reconcile {period} (meter units)")
    cols = (
        "customer",
        "meter",
        "clickhouse",
        "pushed",
        "stripe",
        "credited",
        "unpushed",
        "pending",
        "due at",
        "status",
    )
    for col in cols:
        t.add_column(col, justify="left" if col in ("customer", "meter", "due at") else "right")
    label = {"drift": "[red]DRIFT[/red]", "pending": "[yellow]pending[/yellow]", "ok": "ok"}
    for r in rows:
        due = "-" if r.due_at is None else datetime.fromtimestamp(r.due_at, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        t.add_row(
            r.customer_id,
            r.meter,
            format(r.clickhouse, "f"),
            str(r.pushed),
            "-" if r.stripe is None else format(r.stripe, "f"),
            format(r.credited_stripe, "f"),
            format(r.unpushed, "f"),
            format(r.pending, "f"),
            due,
            label[r.status],
        )
    cio = current_io()
    cio.out.print(t)
    for r in rows:
        for issue in r.credit_issues:
            cio.err.print(f"[red]corrective amount not at Stripe as recorded:[/red] {r.customer_id}: {issue}")
    drifted = sum(r.drifted for r in rows)
    waiting = [r for r in rows if r.status == "pending"]
    line = f"{drifted} drift(s) in {len(rows)} row(s)"
    if waiting:
        last = max(r.due_at or 0 for r in waiting)
        line += (
            f"; {len(waiting)} row(s) pending (not due yet: settle_seconds={cfg.sync.settle_seconds}), "
            f"all pushed by the first sync after "
            f"{datetime.fromtimestamp(last, UTC).strftime('%Y-%m-%d %H:%M:%SZ')}"
        )
    cio.out.print(line)
    if drifted:
        raise typer.Exit(1)


def statement_command(
    ctx: typer.Context,
    customer: str = typer.Argument(..., help="meterline customer id."),
    period: str = typer.Option(..., help="YYYY-MM, YYYY-MM-DD or START..END (UTC, end exclusive)."),
    fmt: str = typer.Option("html", "--format", help="html | csv"),
    out: Path | None = typer.Option(None, help="Write here (default: stdout)."),
) -> None:
    """The itemized usage statement behind an invoice (per day, project, model, token class)."""
    from jobs.stripe.reconcile import parse_period
    from jobs.stripe.statement import build_statement, render_csv, render_html
    from meterline.stack.clickhouse import connect

    if not is_customer_id(customer):  # it lands in file names, HTML and CSV: the contract's form only
        raise fail(MeterlineError(f"bad customer id {escape(repr(customer[:64]))}: {CUSTOMER_ID_RULE}"), 2)
    if out is not None and captured():
        # Inside `meterline up` (POST /v1/admin/run): output goes back to the caller, never to a
        # path on the server. The CLI that forwarded the command writes --out on its own side.
        raise fail(
            MeterlineError(
                "--out is not available inside meterline up: the statement is returned "
                "to the caller, which writes the file"
            ),
            2,
        )
    remote = forward_to_up(ctx, "statement", keep_local=("out",))
    if remote is not None:
        if out is None or remote.exit_code != 0:
            relay(remote)
        # `up` rendered the statement to its stdout; the file is written here, by the caller.
        out.write_text(remote.stdout)
        current_io().err.file.write(remote.stderr)
        current_io().out.print(f"wrote {out} ({len(remote.stdout.encode()):,} bytes, rendered by meterline up)")
        return
    if fmt not in ("html", "csv"):
        raise fail(MeterlineError("--format must be html or csv"), 2)
    try:
        start, end = parse_period(period)
        ch = connect(command_settings().resolved_clickhouse_dsn)
        try:
            st = build_statement(ch, customer, start, end)
        finally:
            ch.close()
    except MeterlineError as exc:
        raise fail(exc, 2) from exc
    text = render_html(st) if fmt == "html" else render_csv(st)
    cio = current_io()
    if out is None:
        cio.out.file.write(text)
    else:
        out.write_text(text)
        cio.out.print(f"wrote {out} ({len(st.lines)} line(s))")


# -- running inside `meterline up` ------------------------------------------------------------------


_COMMAND: Any = None


def _root_command() -> Any:
    """``meterline stripe ...`` / ``meterline statement`` / ``meterline reprice`` as one click
    command (built once): what ``meterline up`` runs for ``POST /v1/admin/run``."""
    global _COMMAND
    if _COMMAND is None:
        from meterline.shell.cli_reprice import reprice_command

        app = typer.Typer(add_completion=False)
        app.add_typer(stripe_app, name="stripe")
        app.command("statement")(statement_command)
        app.command("reprice")(reprice_command)
        _COMMAND = typer.main.get_command(app)
    return _COMMAND


def run_captured(argv: Sequence[str], settings: Settings, *, width: int = 100, color: bool = False) -> CapturedRun:
    """Run ``meterline <argv>`` (a ``stripe``, ``statement`` or ``reprice`` command) in this thread with
    ``settings`` and both output streams captured (how ``meterline up`` runs a forwarded command)."""
    return forwarding.run_captured(_root_command(), argv, settings, width=width, color=color)


def stripe_subcommands() -> list[str]:
    """The ``meterline stripe`` commands (what ``POST /v1/admin/run`` may run)."""
    return sorted(str(info.name) for info in stripe_app.registered_commands)
