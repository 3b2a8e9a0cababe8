"""Typer commands: ``meterline stripe provision|sync|grants|reconcile`` and ``meterline statement``.

Wiring (meterline/cli.py)::

    from jobs.stripe.cli import stripe_app, statement_command
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
DSN, or when no ``up`` runs, they run here. Output goes through :func:`_io` only, so the command
code is the same in both places.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn, Optional
from urllib.parse import urlparse

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from jobs.stripe._config import DEFAULT_CONFIG, BillingConfig, StripeTarget, load_billing_config, target_from_settings
from meterline.config import Settings
from meterline.errors import MeterlineError

log = logging.getLogger(__name__)

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
    ctx: typer.Context,
    config: Path = ConfigOpt,
    customer: list[str] = typer.Option([], "--customer", help="Map this meterline customer (repeatable)."),
    all_customers: bool = typer.Option(True, help="Also map every customer with priced usage."),
) -> None:
    """Create the meters, product, prices and customer subscriptions the config describes (idempotent)."""
    from jobs.stripe.provision import provision, usage_customers

    _run_in_up_if_running(ctx, "stripe", "provision")

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
    ctx: typer.Context,
    config: Path = ConfigOpt,
    now: Optional[int] = typer.Option(None, help="Stripe's clock as unix seconds (default: now)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Push priced usage per customer x meter x window to Stripe; print a summary."""
    from jobs.stripe.sync import sync

    _run_in_up_if_running(ctx, "stripe", "sync")

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
    ctx: typer.Context,
    config: Path = ConfigOpt,
    idle: float = typer.Option(5.0, help="Stop after the topic has been idle this many seconds."),
) -> None:
    """Mirror ledger grants / top-ups / voids from the ledger-commands topic as Stripe credit grants."""
    from jobs.stripe.credits import consume_commands, mirror_grants

    _run_in_up_if_running(ctx, "stripe", "grants")

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
    ctx: typer.Context,
    period: str = typer.Option(..., help="YYYY-MM, YYYY-MM-DD or START..END (UTC, end exclusive)."),
    customer: Optional[str] = typer.Option(None, help="Only this customer."),
    config: Path = ConfigOpt,
    now: Optional[int] = typer.Option(None, help="Stripe's clock as unix seconds (default: now); decides what is due."),
) -> None:
    """Compare ClickHouse, the sync cursor and Stripe's meter summaries; exit 1 on real drift only.

    Usage in windows that have not settled yet (``settle_seconds``) is reported as pending, with
    the time from which the next sync pushes it; it is not drift."""
    from jobs.stripe.reconcile import parse_period, reconcile

    _run_in_up_if_running(ctx, "stripe", "reconcile")

    try:
        start, end = parse_period(period)
    except MeterlineError as exc:
        raise _fail(exc, 2) from exc
    with _context(config) as (_settings_, cfg, target, ch):
        rows = reconcile(target.client(), ch, cfg, start, end, customer=customer, now=now)
    _report(rows)
    t = Table(title=f"reconcile {period} (meter units)")
    for col in ("customer", "meter", "clickhouse", "pushed", "stripe", "unpushed", "pending", "due at", "status"):
        t.add_column(col, justify="left" if col in ("customer", "meter", "due at") else "right")
    label = {"drift": "[red]DRIFT[/red]", "pending": "[yellow]pending[/yellow]", "ok": "ok"}
    for r in rows:
        due = "-" if r.due_at is None else datetime.fromtimestamp(r.due_at, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
        t.add_row(r.customer_id, r.meter, format(r.clickhouse, "f"), str(r.pushed),
                  "-" if r.stripe is None else format(r.stripe, "f"), format(r.unpushed, "f"),
                  format(r.pending, "f"), due, label[r.status])  # fmt: skip
    cio = _io()
    cio.out.print(t)
    drifted = sum(r.drifted for r in rows)
    waiting = [r for r in rows if r.status == "pending"]
    line = f"{drifted} drift(s) in {len(rows)} row(s)"
    if waiting:
        last = max(r.due_at or 0 for r in waiting)
        line += (f"; {len(waiting)} row(s) pending (not due yet: settle_seconds={cfg.sync.settle_seconds}), "
                 f"all pushed by the first sync after "
                 f"{datetime.fromtimestamp(last, timezone.utc).strftime('%Y-%m-%d %H:%M:%SZ')}")
    cio.out.print(line)
    if drifted:
        raise typer.Exit(1)


def statement_command(
    ctx: typer.Context,
    customer: str = typer.Argument(..., help="meterline customer id."),
    period: str = typer.Option(..., help="YYYY-MM, YYYY-MM-DD or START..END (UTC, end exclusive)."),
    fmt: str = typer.Option("html", "--format", help="html | csv"),
    out: Optional[Path] = typer.Option(None, help="Write here (default: stdout)."),
) -> None:
    """The itemized usage statement behind an invoice (per day, project, model, token class)."""
    from jobs.stripe.reconcile import parse_period
    from jobs.stripe.statement import build_statement, render_csv, render_html
    from meterline.stack.clickhouse import connect

    remote = _forward_to_up(ctx, "statement", keep_local=("out",))
    if remote is not None:
        if out is None or remote.exit_code != 0:
            _relay(remote)
        # `up` rendered the statement to its stdout; the file is written here, by the caller.
        out.write_text(remote.stdout)
        _io().err.file.write(remote.stderr)
        _io().out.print(f"wrote {out} ({len(remote.stdout.encode()):,} bytes, rendered by meterline up)")
        return
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


# -- running inside `meterline up` ------------------------------------------------------------------


@dataclass(frozen=True)
class CapturedRun:
    exit_code: int
    stdout: str
    stderr: str
    results: tuple[Any, ...] = ()  # what the command passed to _report (SyncSummary, ProvisionReport ...)


_COMMAND: Any = None


def _root_command() -> Any:
    """``meterline stripe ...`` / ``meterline statement`` as one click command (built once)."""
    global _COMMAND
    if _COMMAND is None:
        app = typer.Typer(add_completion=False)
        app.add_typer(stripe_app, name="stripe")
        app.command("statement")(statement_command)
        _COMMAND = typer.main.get_command(app)
    return _COMMAND


def run_captured(argv: Sequence[str], settings: Settings, *, width: int = 100, color: bool = False) -> CapturedRun:
    """Run ``meterline <argv>`` (a ``stripe`` or ``statement`` command) in this thread, with
    ``settings`` instead of the environment's and both output streams captured.

    The command's own failures never raise: like in a terminal they are an exit code and text on
    stderr (usage errors exit 2; an unexpected exception is logged with its traceback and exits 1).
    Never forwards to a running ``meterline up`` (this is how ``up`` runs them).
    """
    out_buf, err_buf = io.StringIO(), io.StringIO()

    def capture(buf: io.StringIO) -> Console:
        return Console(file=buf, width=width, force_terminal=color, color_system="standard" if color else None,
                       force_jupyter=False, force_interactive=False, soft_wrap=False)  # fmt: skip

    cio = CommandIO(capture(out_buf), capture(err_buf), settings)
    token = _IO.set(cio)
    try:
        code = _invoke(list(argv), cio)
    finally:
        _IO.reset(token)
    return CapturedRun(code, out_buf.getvalue(), err_buf.getvalue(), tuple(cio.results))


def _invoke(argv: list[str], cio: CommandIO) -> int:
    try:
        rv = _root_command().main(args=argv, prog_name="meterline", standalone_mode=False)
    except typer.Abort:
        cio.err.file.write("Aborted!\n")
        return 1
    except typer.TyperException as exc:  # click's usage errors: bad option, missing argument ...
        show = getattr(exc, "show", None)
        if callable(show):
            show(file=cio.err.file)
        else:
            cio.err.file.write(f"Error: {exc.format_message()}\n")
        return int(exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - a bug or an unexpected library error: report, never raise
        log.exception("meterline %s failed", " ".join(argv))
        cio.err.print(f"[red]error:[/red] {escape(f'{type(exc).__name__}: {exc}')}")
        return 1
    return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0


# -- forwarding to a running `meterline up` ------------------------------------------------------------


def _arg_text(value: Any) -> str:
    if isinstance(value, Path):
        return os.path.abspath(value)  # the service does not share the caller's working directory
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


def argv_from_params(ctx: Any, *, skip: Sequence[str] = ()) -> list[str]:
    """The command line that reproduces ``ctx``'s parsed parameters (options, then ``--`` and the
    arguments). Every parameter is spelled out, defaults included, so the receiving side runs with
    exactly what was parsed here; an option whose value is None (not given) is left out, paths are
    made absolute, and the parameters named in ``skip`` are left out."""
    options: list[str] = []
    arguments: list[str] = []
    for param in ctx.command.params:
        name = param.name
        if name is None or name in skip or name not in ctx.params:
            continue
        value = ctx.params[name]
        if param.param_type_name == "argument":
            values = value if isinstance(value, (list, tuple)) else [value]
            arguments.extend(_arg_text(v) for v in values if v is not None)
            continue
        if getattr(param, "is_flag", False) and not getattr(param, "multiple", False):
            if param.secondary_opts:
                options.append(param.opts[0] if value else param.secondary_opts[0])
            elif value:
                options.append(param.opts[0])
            continue
        if value is None:
            continue
        opt = param.opts[0]
        if getattr(param, "multiple", False):
            for item in value:
                options.extend([opt, *(_arg_text(v) for v in (item if isinstance(item, tuple) else (item,)))])
        elif isinstance(value, tuple):
            options.extend([opt, *(_arg_text(v) for v in value)])
        else:
            options.extend([opt, _arg_text(value)])
    return options + (["--", *arguments] if arguments else [])


def _forward_to_up(ctx: Any, *path: str, keep_local: Sequence[str] = ()) -> CapturedRun | None:
    """Run this command in the ``meterline up`` of this data_dir when one runs and ClickHouse is the
    embedded engine (which ``up`` owns); return what it printed. None: run it here (a server DSN,
    no running ``up``, invalid settings — reported by the local path —, or already inside ``up``).
    Parameters named in ``keep_local`` are not sent (the caller handles them)."""
    if _IO.get() is not None:
        return None
    try:
        settings = Settings()
    except Exception:  # noqa: BLE001 - pydantic ValidationError: the local path reports it
        return None
    if urlparse(settings.resolved_clickhouse_dsn).scheme != "chdb":
        return None
    from meterline.cli_credits import _running_api  # the discovery `meterline sql` / `credits` use

    api = _running_api(settings.data_dir)
    if api is None:
        return None
    argv = [*path, *argv_from_params(ctx, skip=keep_local)]
    cio = _io()
    cio.err.print(f"[dim]meterline up is running ({api[0]}) and owns the embedded ClickHouse engine: "
                  f"running `meterline {' '.join(path)}` there, with its settings[/dim]", soft_wrap=True)  # fmt: skip
    try:
        return _post_run(api, argv, width=cio.out.width,
                         color=cio.out.is_terminal and cio.err.is_terminal and not cio.out.no_color)
    except MeterlineError as exc:
        raise _fail(exc) from exc


def _post_run(api: tuple[str, str], argv: list[str], *, width: int, color: bool) -> CapturedRun:
    import httpx

    from meterline.api.client import call_json

    body = {"argv": argv, "width": max(20, min(1000, width)), "color": color}
    # no read timeout: a sync may take minutes; the service answers when the command is done
    status, doc = call_json(*api, "POST", "/v1/admin/run", body, timeout=httpx.Timeout(30.0, read=None))
    if status >= 400 or "exit_code" not in doc:
        e = doc.get("error", {})
        hint = " (is the running meterline up older than this CLI? restart it)" if status == 404 else ""
        raise MeterlineError(f"meterline up did not run the command: HTTP {status} "
                             f"{e.get('code')}: {e.get('message')}{hint}")  # fmt: skip
    return CapturedRun(int(doc["exit_code"]), str(doc.get("stdout", "")), str(doc.get("stderr", "")))


def _relay(run: CapturedRun) -> NoReturn:
    """Print what the service's run printed, to the matching streams, and exit with its code."""
    cio = _io()
    cio.out.file.write(run.stdout)
    cio.out.file.flush()
    cio.err.file.write(run.stderr)
    cio.err.file.flush()
    raise typer.Exit(run.exit_code)


def _run_in_up_if_running(ctx: Any, *path: str) -> None:
    """Forward to the running ``meterline up`` (then exit with its code) or return to run here."""
    remote = _forward_to_up(ctx, *path)
    if remote is not None:
        _relay(remote)
