"""``meterline plans ...`` (catalog and subscription facts) and ``meterline bill ...`` (plan bills).

Wiring (meterline/shell/cli.py): ``register(app)`` adds both sub-apps.

- ``plans load FILE`` validates a plan file and publishes each version to the compacted ``plans``
  topic. Idempotent: identical versions already published are not sent again; a published
  ``plan@version`` is immutable (changing one is refused: publish a new version and migrate).
- ``plans show CUSTOMER`` prints the folded timeline (runs, segments, rejected facts).
- ``plans subscribe|change|cancel|migrate`` publish subscription facts to ``subscriptions``
  (keyed by customer). Each fact is first folded with the customer's published facts: one the
  timeline would reject (a change with no subscription, an unknown version...) is refused here
  with the reason, and re-sending a fact already published (same ``event_id``) is a no-op.
- ``bill preview CUSTOMER --period YYYY-MM`` computes the period's bill from ClickHouse (through the
  running ``meterline up``'s read-only SQL API when it owns the embedded engine, else directly).
- ``bill close --period YYYY-MM`` writes the period's bills into ``plan_bills`` /
  ``plan_allowance_usage`` for analysts (needs direct ClickHouse access: a server DSN, or no
  ``meterline up`` running on the embedded engine).

Kafka: the bootstrap and prefix of a running ``meterline up``, or ``METERLINE_KAFKA_BOOTSTRAP``.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from meterline.core.config import Settings
from meterline.core.errors import InputError, MeterlineError
from meterline.shell.cli_common import fail as _fail
from meterline.shell.cli_common import load_settings as _settings
from meterline.shell.console import make_console, markup_mode

__all__ = ["bill_app", "plans_app", "register"]

plans_app = typer.Typer(
    help="Subscription plans: load the catalog, subscribe, change, cancel, migrate, show.",
    no_args_is_help=True,
    rich_markup_mode=markup_mode(),
)
bill_app = typer.Typer(
    help="Plan bills computed from meterline's own data.", no_args_is_help=True, rich_markup_mode=markup_mode()
)
_out = make_console()
_err = make_console(stderr=True)


def register(app: typer.Typer) -> None:
    """Add ``plans`` and ``bill`` to the root ``meterline`` app."""
    app.add_typer(plans_app, name="plans")
    app.add_typer(bill_app, name="bill")


# --------------------------------------------------------------------------- shared helpers


def _kafka(settings: Settings) -> tuple[str, str]:
    from meterline.shell.discovery import kafka_bootstrap

    try:
        return kafka_bootstrap(settings)
    except MeterlineError as exc:
        raise _fail(exc) from exc


def _now() -> int:
    from meterline.core.plans import instant_of

    return instant_of(datetime.now(UTC).replace(microsecond=0))


def _instant(text: str | None, option: str) -> int:
    from meterline.core.plans import SubscriptionError, parse_instant

    if text is None:
        return _now()
    try:
        return parse_instant(text, where=option, error=SubscriptionError)
    except MeterlineError as exc:
        raise _fail(exc, 2) from exc


def _published_catalog(bootstrap: str, prefix: str) -> Any:
    from meterline.core.plans import catalog_from_records
    from meterline.stack.kafka import read_topic

    msgs = read_topic(bootstrap, f"{prefix}plans")
    return catalog_from_records(((m.key() or b"").decode("utf-8", "replace"), m.value()) for m in msgs)


def _published_events(bootstrap: str, prefix: str) -> list[Any]:
    from meterline.core.plans import SubscriptionError, parse_event
    from meterline.stack.kafka import read_topic

    out = []
    for m in read_topic(bootstrap, f"{prefix}subscriptions"):
        try:
            out.append(parse_event(m.value() or b""))
        except SubscriptionError:
            continue  # not ours to judge here: the sink lands it in usage_rejected
    return out


def _record_fact(event: Any) -> None:
    """Fold ``event`` with the customer's published facts; refuse it if the timeline would, else
    publish it (a fact already published is reported and not sent again)."""
    from meterline.core.plans import SubscriptionEvent, fold_timeline, parse_event
    from pipeline.publish import publish_records

    try:
        parse_event(event.to_json())  # the checks every reader applies (customer id form, ...)
    except MeterlineError as exc:
        raise _fail(exc, 2) from exc
    settings = _settings()
    bootstrap, prefix = _kafka(settings)
    try:
        catalog = _published_catalog(bootstrap, prefix)
        if event.plan_id is not None and event.version is None:
            # Pin the version in the fact: resolved at fold time, a version published later with
            # an earlier effective_from would silently move the customer.
            current = catalog.current(event.plan_id, event.at)
            if current is None:
                raise _fail(MeterlineError(f"no version of plan {event.plan_id!r} is in force at {_iso(event.at)}"), 2)
            event = SubscriptionEvent(event.type, event.customer_id, event.at, event.plan_id, current.version)
        events = [e for e in _published_events(bootstrap, prefix) if e.customer_id == event.customer_id]
        if any(e.event_id == event.event_id for e in events):
            _out.print(f"{event.type} {event.customer_id}: already recorded ({event.event_id})")
            return
        before = {r.event.event_id for r in fold_timeline(event.customer_id, events, catalog).rejected}
        timeline = fold_timeline(event.customer_id, [*events, event], catalog)
        # Refused when the new fact is rejected, or when it would make a fact already recorded be
        # rejected (two facts at the same instant conflict: the fold orders them by type and id).
        for r in timeline.rejected:
            if r.event.event_id not in before:
                what = "" if r.event.event_id == event.event_id else f" (it would void {r.event.event_id}: {r.reason})"
                reason = r.reason if r.event.event_id == event.event_id else "conflicts with a recorded fact"
                raise _fail(MeterlineError(f"{event.type} {event.customer_id}: {reason}{what}"), 2)
        publish_records(bootstrap, f"{prefix}subscriptions", [event.to_record()])
    except MeterlineError as exc:
        raise _fail(exc) from exc
    plan = timeline.plan_at(max(event.at, _now()) if event.type != "cancelled" else event.at)
    _out.print(
        f"{event.type} {event.customer_id} at {_iso(event.at)}: recorded ({event.event_id})"
        + (f"; on {plan.key} now" if plan is not None and event.type != "cancelled" else "")
    )


def _iso(seconds: int) -> str:
    from meterline.core.plans import format_instant

    return format_instant(seconds)


# --------------------------------------------------------------------------- plans


@plans_app.command("load")
def plans_load(file: Path = typer.Argument(..., exists=True, dir_okay=False, help="YAML or JSON plan file.")) -> None:
    """Validate a plan file and publish its versions to the plans topic (idempotent)."""
    from meterline.core.plans import load_plan_catalog, version_conflicts
    from pipeline.publish import publish_records

    try:
        catalog = load_plan_catalog(file)
    except MeterlineError as exc:
        raise _fail(exc, 2) from exc
    settings = _settings()
    bootstrap, prefix = _kafka(settings)
    try:
        published = _published_catalog(bootstrap, prefix)
        conflicts = version_conflicts(catalog, published)
        if conflicts:
            raise _fail(
                MeterlineError(
                    f"published plan versions are immutable, and this file changes {', '.join(conflicts)}: "
                    "give the changed plan a new version (then `meterline plans migrate`)"
                ),
                2,
            )
        fresh = [
            (k, v)
            for (k, v), pv in zip(catalog.to_records(), catalog.versions, strict=True)
            if published.get(pv.plan_id, pv.version) is None
        ]
        if fresh:
            publish_records(bootstrap, f"{prefix}plans", fresh)
    except MeterlineError as exc:
        raise _fail(exc) from exc
    _out.print(
        f"published {len(fresh)} plan version(s) from {file} to {prefix}plans "
        f"({len(catalog.versions) - len(fresh)} already published)"
    )


@plans_app.command("subscribe")
def plans_subscribe(
    customer: str = typer.Argument(..., help="meterline customer id."),
    plan_id: str = typer.Argument(..., help="Plan id from the catalog."),
    version: int | None = typer.Option(None, "--version", help="Plan version (default: the one in force at --from)."),
    from_: str | None = typer.Option(
        None, "--from", help="ISO-8601 start, may be in the past (default: now). The period anchor."
    ),
) -> None:
    """Start a subscription: the billing periods are anchored at its start."""
    from meterline.core.plans import SubscriptionEvent

    _record_fact(SubscriptionEvent("subscribed", customer, _instant(from_, "--from"), plan_id, version))


@plans_app.command("change")
def plans_change(
    customer: str = typer.Argument(..., help="meterline customer id."),
    plan_id: str = typer.Argument(..., help="The plan to move to."),
    version: int | None = typer.Option(None, "--version", help="Plan version (default: the one in force at --at)."),
    at: str | None = typer.Option(None, "--at", help="ISO-8601 instant of the change (default: now)."),
) -> None:
    """Change plan: the period is split at --at and fee and allowances are prorated by seconds."""
    from meterline.core.plans import SubscriptionEvent

    _record_fact(SubscriptionEvent("changed", customer, _instant(at, "--at"), plan_id, version))


@plans_app.command("cancel")
def plans_cancel(
    customer: str = typer.Argument(..., help="meterline customer id."),
    at: str | None = typer.Option(None, "--at", help="ISO-8601 instant the subscription stops (default: now)."),
    at_period_end: bool = typer.Option(False, "--at-period-end", help="Stop at the end of the current period."),
) -> None:
    """Cancel a subscription now, at --at (prorated), or at the end of the current period."""
    from meterline.core.plans import SubscriptionEvent

    if at is not None and at_period_end:
        raise _fail(MeterlineError("give --at or --at-period-end, not both"), 2)
    _record_fact(SubscriptionEvent("cancelled", customer, _instant(at, "--at"), at_period_end=at_period_end))


@plans_app.command("migrate")
def plans_migrate(
    plan_id: str = typer.Argument(..., help="The plan whose subscribers move."),
    to: int = typer.Option(..., "--to", help="The version to move them to."),
    at: str | None = typer.Option(None, "--at", help="ISO-8601 instant of the decision (default: now)."),
) -> None:
    """Move every subscriber of PLAN to version --to, each at the start of its next period."""
    from meterline.core.plans import SubscriptionEvent, fold_timeline
    from pipeline.publish import publish_records

    when = _instant(at, "--at")
    settings = _settings()
    bootstrap, prefix = _kafka(settings)
    try:
        catalog = _published_catalog(bootstrap, prefix)
        target = catalog.get(plan_id, to)
        if target is None:
            raise _fail(MeterlineError(f"no published version {plan_id}@{to}: `meterline plans load` it first"), 2)
        events = _published_events(bootstrap, prefix)
        by_customer: dict[str, list[Any]] = {}
        for e in events:
            by_customer.setdefault(e.customer_id, []).append(e)
        records, skipped = [], []
        for cid in sorted(by_customer):
            timeline = fold_timeline(cid, by_customer[cid], catalog)
            period = timeline.period_at(when)
            # what the customer will be on in its next period: already there (an earlier
            # migration), cancelled, or on another plan -> nothing to do (so re-running is a no-op)
            upcoming = timeline.plan_at(period.end) if period is not None else None
            if upcoming is None or upcoming.plan_id != plan_id or upcoming.version == to:
                continue
            ev = SubscriptionEvent("migrated", cid, when, plan_id, to)
            if any(e.event_id == ev.event_id for e in by_customer[cid]):
                continue
            rejected = [
                r
                for r in fold_timeline(cid, [*by_customer[cid], ev], catalog).rejected
                if r.event.event_id == ev.event_id
            ]
            if rejected:
                skipped.append(f"{cid}: {rejected[0].reason}")
                continue
            records.append(ev.to_record())
        if records:
            publish_records(bootstrap, f"{prefix}subscriptions", records)
    except MeterlineError as exc:
        raise _fail(exc) from exc
    _out.print(f"migrating {len(records)} subscriber(s) of {plan_id} to {plan_id}@{to}, each at its next period start")
    for s in skipped:
        _err.print(f"skipped {s}")


@plans_app.command("show")
def plans_show(
    customer: str = typer.Argument(..., help="meterline customer id."),
    fmt: str = typer.Option("table", "--format", help="table | json"),
) -> None:
    """A customer's subscription timeline as folded from its facts: runs, segments, the plan in
    force now, and any fact the fold rejected (with the reason)."""
    from meterline.core.plans import fold_timeline

    if fmt not in ("table", "json"):
        raise _fail(MeterlineError("--format must be table or json"), 2)
    settings = _settings()
    bootstrap, prefix = _kafka(settings)
    try:
        catalog = _published_catalog(bootstrap, prefix)
        events = [e for e in _published_events(bootstrap, prefix) if e.customer_id == customer]
    except MeterlineError as exc:
        raise _fail(exc) from exc
    timeline = fold_timeline(customer, events, catalog)
    now = _now()
    current = timeline.plan_at(now)
    period = timeline.period_at(now)
    doc = {
        "customer_id": customer,
        "plan": current.key if current is not None else None,
        "current_period": None if period is None else {"start": _iso(period.start), "end": _iso(period.end)},
        "runs": [
            {
                "anchor": _iso(r.anchor),
                "interval": r.interval,
                "end": None if r.end is None else _iso(r.end),
                "cancelled": r.cancelled,
                "segments": [
                    {"plan": s.plan.key, "start": _iso(s.start), "end": None if s.end is None else _iso(s.end)}
                    for s in r.segments
                ],
            }
            for r in timeline.runs
        ],
        "facts": [e.to_json() for e in sorted(events, key=lambda e: (e.at, e.event_id))],
        "rejected": [{"event_id": r.event.event_id, "reason": r.reason} for r in timeline.rejected],
    }
    if fmt == "json":
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    t = Table(
        title=f"{customer}: " + (f"on {doc['plan']} now" if current is not None else "no plan now (pay-per-token)")
    )
    for col in ("plan", "from", "until", "run anchor", "interval"):
        t.add_column(col)
    for r in timeline.runs:
        for seg in r.segments:
            until = seg.end if seg.end is not None else r.end
            t.add_row(seg.plan.key, _iso(seg.start), "" if until is None else _iso(until), _iso(r.anchor), r.interval)
    _out.print(t)
    for rej in doc["rejected"]:
        _err.print(f"[yellow]rejected fact[/yellow] {rej['event_id']}: {rej['reason']}")


# --------------------------------------------------------------------------- bill


class _ReadClient:
    """``query(sql, parameters)`` -> ``.result_rows``: through the running ``meterline up``'s
    read-only SQL API when it runs (it owns the embedded engine), else straight to ClickHouse."""

    def __init__(self, settings: Settings) -> None:
        from meterline.shell.discovery import running_api

        self._api: Any = None
        self._client: Any = None
        api = running_api(settings.data_dir)
        if api is not None:
            from meterline.shell.api.client import ApiClient

            self._api = ApiClient(*api)
        else:
            from meterline.stack.clickhouse import connect

            self._client = connect(settings.resolved_clickhouse_dsn)

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        from types import SimpleNamespace

        from meterline.stack.analytics import run_readonly

        if self._api is not None:
            out = self._api.sql(sql, "json", parameters)
            return SimpleNamespace(result_rows=[tuple(r) for r in out["rows"]])
        _, rows = run_readonly(self._client, sql, parameters)
        return SimpleNamespace(result_rows=rows)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._api is not None:
            self._api.close()


@bill_app.command("preview")
def bill_preview_command(
    customer: str = typer.Argument(..., help="meterline customer id."),
    period: str = typer.Option(..., "--period", help="YYYY-MM: the billing periods starting in that UTC month."),
    fmt: str = typer.Option("table", "--format", help="table | json"),
) -> None:
    """A period's bill (current or past) from meterline's own data: fee, allowances, overage,
    true-up, prepaid credit and the total rounded once."""
    from jobs.plans.billing import bill_preview

    if fmt not in ("table", "json"):
        raise _fail(MeterlineError("--format must be table or json"), 2)
    settings = _settings()
    try:
        client = _ReadClient(settings)
        try:
            doc = bill_preview(client, customer, period)
        finally:
            client.close()
    except MeterlineError as exc:
        raise _fail(exc, 2 if isinstance(exc, InputError) else 1) from exc
    if fmt == "json":
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    _print_bill(doc)


def _print_bill(doc: dict[str, Any]) -> None:
    title = f"{doc['customer_id']} · {doc['period']} · " + (
        f"plan {doc['plan']}" if doc.get("plan") else "pay-per-token"
    )
    lines = Table(title=title)
    for col in ("kind", "description", "quantity", "unit price", "amount"):
        lines.add_column(col, justify="right" if col in ("quantity", "amount") else "left")
    for line in doc["lines"]:
        lines.add_row(line["kind"], line["description"], line["quantity"], line.get("unit_price") or "", line["amount"])
    lines.add_row("", f"[b]total ({doc['currency']})[/b]", "", "", f"[b]{doc['total']}[/b]")
    _out.print(lines)
    if doc["allowances"]:
        t = Table(title="allowances")
        for col in ("id", "plan", "included", "used", "remaining"):
            t.add_column(col)
        for a in doc["allowances"]:
            t.add_row(a["id"], a["plan"], str(a["included"]), str(a["used"]), str(a["remaining"]))
        _out.print(t)


@bill_app.command("close")
def bill_close_command(
    period: str = typer.Option(..., "--period", help="YYYY-MM: the billing periods starting in that UTC month."),
    customer: list[str] = typer.Option([], "--customer", help="Only these customers (repeatable)."),
) -> None:
    """Write the bills of the periods starting in --period into plan_bills / plan_allowance_usage."""
    from jobs.plans.billing import close_period
    from meterline.stack.clickhouse import connect

    settings = _settings()
    from meterline.core.plans import instant_of

    now = datetime.now(UTC)
    closed_at_ms = instant_of(now) * 1000 + now.microsecond // 1000
    try:
        client = connect(settings.resolved_clickhouse_dsn)
        try:
            n = close_period(client, period, customers=customer or None, closed_at_ms=closed_at_ms)
        finally:
            client.close()
    except MeterlineError as exc:
        raise _fail(exc) from exc
    _out.print(f"closed {n} bill(s) for periods starting in {period}")
