"""``meterline reprice``: re-rate a period with the catalog as it stands now; apply it as corrections.

Registered in meterline/shell/cli.py with ``app.command("reprice")(reprice_command)``. The catalog is the
compacted ``prices`` topic (read whole, like a worker's price feed), or ``--prices FILE``. The
diff goes to stdout (``--format table|json``); progress (rich, with counts) goes to stderr and only
on a terminal (meterline.shell.console). See docs/corrections.md.

While ``meterline up`` owns the embedded ClickHouse engine (a ``chdb:`` DSN) the command runs
inside it, like ``meterline stripe ...`` (meterline.shell.forwarding: ``POST /v1/admin/run``); it
prints through :func:`meterline.shell.forwarding.current_io` only, so the output is the same. The
audit row records the caller (``--ran-by``, a hidden option the CLI fills in when it forwards) and
the command line rebuilt from the parsed parameters, in both places.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from meterline.core.config import Settings
from meterline.core.errors import MeterlineError
from meterline.shell.console import is_terminal, make_console
from meterline.shell.forwarding import argv_from_params, captured, command_settings, current_io, forward_to_up, relay

__all__ = ["reprice_command"]


def _dec(d: Decimal) -> str:
    return f"{d:f}"


def _units(picos: int) -> str:
    return _dec(Decimal(picos).scaleb(-12))


def _plan_json(b: Any) -> dict[str, Any]:
    """One plan period of a plan customer: its bill as billed so far and re-rated (exact, before
    the invoice's one rounding; prepaid credit aside) and what the ledger carries of the change."""
    from meterline.core.plans import format_instant

    return {
        "period_start": format_instant(b.start),
        "period_end": format_instant(b.end),
        "period_stop": format_instant(b.stop),
        "plans": list(b.plans),
        "currency": b.currency,
        "old_usage_charge": _units(b.old_usage_charge),
        "new_usage_charge": _units(b.new_usage_charge),
        "old_bill": _units(b.old),
        "new_bill": _units(b.new),
        "delta": _units(b.delta),
        "prior_corrections": _units(b.prior),
        "ledger_delta": _units(b.ledger_delta),
        "old_lines": list(b.lines_old),
        "new_lines": list(b.lines_new),
    }


def _json(plan: Any, result: Any) -> dict[str, Any]:
    customers = []
    for c in plan.customers():
        customers.append(
            {
                "customer_id": c["customer_id"],
                "events": c["events"],
                "unpriceable_events": c["unpriceable"],
                "old_cost": _dec(c["old_cost"]),
                "new_cost": _dec(c["new_cost"]),
                "cost_delta": _dec(c["cost_delta"]),
                "old_charge": _dec(c["old_charge"]),
                "new_charge": _dec(c["new_charge"]),
                "delta": _dec(c["delta"]),
                "prior_corrections": _dec(c["prior_corrections"]),
                "plans": [_plan_json(b) for b in c["plan_bills"]],
                "models": [
                    {
                        "model": f"{m.provider}/{m.model}",
                        "events": m.events,
                        "old_price_versions": m.old_version.split(","),
                        "new_price_version": m.new_version,
                        "old_rate_cards": m.old_card.split(","),
                        "new_rate_card": m.new_card,
                        "unpriceable_events": m.unpriceable,
                        "unpriceable_reason": m.unpriceable_reason or None,
                        "plan_events": m.plan_events,
                        "old_cost": _dec(m.old_cost),
                        "new_cost": _dec(m.new_cost),
                        "old_charge": _dec(m.old_charge),
                        "new_charge": _dec(m.new_charge),
                    }
                    for m in c["models"]
                ],
            }
        )
    vb, va, cb, ca = plan.versions()
    out: dict[str, Any] = {
        "period": {"start": plan.filters.start, "end": plan.filters.end},
        "customers": customers,
        "versions_before": vb,
        "versions_after": va,
        "cards_before": cb,
        "cards_after": ca,
    }
    if result is not None:
        out["applied"] = {
            "correction_id": result.correction_id or None,
            "correction_rows": result.rows,
            "ledger_commands": result.commands,
            "resumed": result.resumed,
            "abandoned": result.abandoned,
            "noop": result.noop,
        }
    return out


def _iso(seconds: int) -> str:
    from meterline.core.plans import format_instant

    return str(format_instant(seconds))


def _table(plan: Any) -> Table:
    t = Table(title="re-rating (old = as billed so far, earlier corrections included)")
    for col in (
        "customer",
        "model",
        "events",
        "price versions old → new",
        "card old → new",
        "old cost",
        "new cost",
        "old charge",
        "new charge",
        "delta",
    ):
        t.add_column(
            col,
            justify="right"
            if col in ("events", "old cost", "new cost", "old charge", "new charge", "delta")
            else "left",
        )
    for c in plan.customers():
        for m in c["models"]:
            versions = f"{m.old_version} → {m.new_version or m.unpriceable_reason}"
            t.add_row(
                c["customer_id"],
                f"{m.provider}/{m.model}",
                str(m.events),
                versions,
                f"{m.old_card} → {m.new_card}",
                _dec(m.old_cost),
                _dec(m.new_cost),
                _dec(m.old_charge),
                _dec(m.new_charge),
                _dec(m.new_charge - m.old_charge),
            )
        for b in c["plan_bills"]:
            t.add_row(
                c["customer_id"],
                f"plan {','.join(b.plans)}",
                "",
                f"period {_iso(b.start)} → {_iso(b.stop)}",
                "",
                "",
                "",
                _units(b.old),
                _units(b.new),
                _units(b.delta),
            )
        if c["prior_corrections"]:
            t.add_row(
                c["customer_id"],
                "(earlier corrections)",
                "",
                "",
                "",
                "",
                "",
                _dec(c["prior_corrections"]),
                "",
                _dec(-c["prior_corrections"]),
            )
        t.add_row(
            f"[b]{c['customer_id']}[/b]",
            "[b]total[/b]",
            str(c["events"]),
            "",
            "",
            _dec(c["old_cost"]),
            _dec(c["new_cost"]),
            _dec(c["old_charge"]),
            _dec(c["new_charge"]),
            f"[b]{_dec(c['delta'])}[/b]",
        )
    return t


@contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    """A rich progress bar on stderr with counts, only on a terminal (never in pipes or logs, nor
    inside ``meterline up``: a forwarded run's stderr is captured and relayed when it ends)."""
    if not enabled or captured() or not is_terminal(sys.stderr):
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=make_console(stderr=True),
        transient=True,
    )
    tasks: dict[str, Any] = {}

    def step(name: str, done: int, total: int) -> None:
        if name not in tasks:
            tasks[name] = bar.add_task(name, total=max(total, 1))
        bar.update(tasks[name], completed=done, total=max(total, 1))

    with bar:
        yield step


def _engine(settings: Settings, prices: Path | None, bootstrap: tuple[str, str] | None) -> Any:
    from meterline.core.pricing import PricingEngine, load_price_book

    if prices is not None:
        return PricingEngine.from_book(load_price_book(prices))
    assert bootstrap is not None
    from pipeline.pricefeed import PriceFeed

    feed = PriceFeed(bootstrap[0], f"{bootstrap[1]}prices").start()
    try:
        if not feed.wait_ready(60):
            raise MeterlineError(f"the prices topic {bootstrap[1]}prices was not read within 60 s")
        engine = PricingEngine()
        feed.drain_into(engine)
        return engine
    finally:
        feed.stop()


def _operator() -> str:
    return os.environ.get("METERLINE_OPERATOR") or getpass.getuser()


def reprice_command(
    ctx: typer.Context,
    period: str = typer.Option(..., "--period", help="YYYY-MM, YYYY-MM-DD or START..END (whole UTC hours)."),
    customer: str | None = typer.Option(None, "--customer", help="Only this customer."),
    model: str | None = typer.Option(None, "--model", help="Only this model: PROVIDER/MODEL."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the diff; write nothing."),
    reason: str = typer.Option("", "--reason", help="Why (kept in the audit record)."),
    fmt: str = typer.Option("table", "--format", help="table | json"),
    prices: Path | None = typer.Option(None, "--prices", help="Price file to use instead of the prices topic."),
    ran_by: str | None = typer.Option(
        None, "--ran-by", hidden=True, help="Who ran it (set by the CLI when it forwards to meterline up)."
    ),
) -> None:
    """Re-rate a period with the catalog and rate cards as they stand now; without --dry-run, apply the
    difference as correction events (ClickHouse rollups, ledger adjustments, Stripe via sync)."""
    # While `meterline up` owns the embedded engine, run inside it (POST /v1/admin/run); the
    # operator and the command line recorded in the audit row are the caller's.
    ctx.params["ran_by"] = ran_by or _operator()
    remote = forward_to_up(ctx, "reprice")
    if remote is not None:
        relay(remote)
    command = " ".join(["meterline", "reprice", *argv_from_params(ctx, skip=("ran_by",))])
    _run(period, customer, model, dry_run, reason, fmt, prices, ran_by=str(ctx.params["ran_by"]), command=command)


def _run(
    period: str,
    customer: str | None,
    model: str | None,
    dry_run: bool,
    reason: str,
    fmt: str,
    prices: Path | None,
    *,
    ran_by: str,
    command: str,
) -> None:
    from jobs.reprice.apply import apply_plan
    from jobs.reprice.compute import Filters, open_reprice
    from jobs.stripe.reconcile import parse_period
    from meterline.stack.clickhouse import apply_migrations, connect

    cio = current_io()
    out, err = cio.out, cio.err
    if fmt not in ("table", "json"):
        err.print("[red]error:[/red] --format must be table or json")
        raise typer.Exit(2)
    provider_name = model_name = None
    if model is not None:
        if "/" not in model:
            err.print("[red]error:[/red] --model must be PROVIDER/MODEL")
            raise typer.Exit(2)
        provider_name, model_name = model.split("/", 1)
    try:
        settings = command_settings()
        start, end = parse_period(period)
        filters = Filters(start, end, customer, provider_name, model_name)
        need_broker = prices is None or not dry_run
        boot = _bootstrap(settings) if need_broker else None
        engine = _engine(settings, prices, boot)
        ch = connect(settings.resolved_clickhouse_dsn)
    except MeterlineError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    publisher = None
    try:
        apply_migrations(ch)
        result = None
        with _progress(True) as step, open_reprice(ch, engine, filters, step) as rp:
            plan = rp.report(step)
            if not dry_run:
                from pipeline.credits.client import CommandPublisher

                assert boot is not None
                publisher = CommandPublisher(boot[0], f"{boot[1]}ledger-commands")
                result = apply_plan(
                    ch,
                    rp,
                    ran_by=ran_by,
                    reason=reason,
                    command=command,
                    send=publisher.send,
                    at_ms=int(time.time() * 1000),
                )
    except MeterlineError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    finally:
        if publisher is not None:
            publisher.close()
        ch.close()
    if fmt == "json":
        out.file.write(json.dumps(_json(plan, result), ensure_ascii=False, indent=2) + "\n")
        out.file.flush()
        return
    out.print(_table(plan))
    if result is not None:
        if result.noop:
            out.print("nothing to correct: the period is already billed at the re-rated figures")
        for cid in result.resumed:
            out.print(f"resumed interrupted correction {cid}")
        if result.correction_id:
            out.print(
                f"applied correction {result.correction_id}: {result.rows} correction row(s), "
                f"{result.commands} ledger command(s); `meterline stripe sync` pushes the Stripe delta"
            )


def _bootstrap(settings: Settings) -> tuple[str, str]:
    """The Kafka bootstrap and topic prefix: configured, or those of a running ``meterline up``."""
    from meterline.shell.discovery import kafka_bootstrap

    return kafka_bootstrap(settings)
