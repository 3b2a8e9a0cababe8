"""``meterline credits ...``: grant / top up prepaid credit, set the overage policy, show a balance.

Where commands go: when a ``meterline up`` for this data_dir runs (``data_dir/runtime.json`` with a
live pid, and ``data_dir/admin.key``), through its HTTP API with the admin key; otherwise straight
to Kafka (bootstrap from ``METERLINE_KAFKA_BOOTSTRAP``): commands are published to
``ledger-commands`` and ``balance`` reads ``customer-status`` to its end. Either way a command is
reported once Kafka acknowledged it; the credit agent applies it asynchronously.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import typer

from meterline.core.config import Settings
from meterline.core.errors import MeterlineError
from meterline.shell.cli_common import load_settings as _settings
from meterline.shell.console import make_console, markup_mode
from meterline.shell.discovery import kafka_bootstrap, running_api

__all__ = ["credits_app"]

credits_app = typer.Typer(
    help="Prepaid credits: grants, top-ups, balances, overage policy.",
    no_args_is_help=True,
    rich_markup_mode=markup_mode(),
)
_out = make_console()
_err = make_console(stderr=True)


def _api_call(
    api: tuple[str, str], method: str, path: str, body: dict[str, Any] | None = None, *, wait_s: float = 0.0
) -> dict[str, Any]:
    from meterline.shell.api.client import call_json

    status, doc = call_json(*api, method, path, body, wait_unavailable_s=wait_s)
    if status >= 400:
        e = doc.get("error", {})
        field = f" (field {e['field']})" if e.get("field") else ""
        raise MeterlineError(f"HTTP {status} {e.get('code')}: {e.get('message')}{field}")
    return doc


def _publish(settings: Settings, command: dict[str, Any]) -> None:
    from pipeline.credits.client import CommandPublisher

    bootstrap, prefix = kafka_bootstrap(settings)
    pub = CommandPublisher(bootstrap, f"{prefix}ledger-commands")
    try:
        pub.send(command)
    finally:
        pub.close()


def _run(fn: Any) -> None:
    try:
        fn()
    except MeterlineError as exc:
        _err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc


def _send_admin(settings: Settings, api_path: tuple[str, str], body: dict[str, Any], build: Any) -> None:
    """Through the running API when there is one, else straight to Kafka; print the command_id."""
    api = running_api(settings.data_dir)
    if api is not None:
        method, path = api_path
        result = _api_call(api, method, path, body)
    else:
        command = build()
        _publish(settings, command)
        result = {"command_id": command["command_id"], "type": command["type"], "customer_id": command["customer_id"]}
    _out.print_json(json.dumps(result))


def _grant(
    kind: str,
    customer: str,
    amount: str,
    expires: str | None,
    priority: int,
    promotional: bool,
    currency: str,
    grant_id: str | None,
) -> None:
    from pipeline.credits.client import grant_command

    settings = _settings()
    body: dict[str, Any] = {
        "type": kind,
        "customer_id": customer,
        "amount": amount,
        "currency": currency,
        "priority": priority,
        "category": "promotional" if promotional else "paid",
    }
    if expires:
        body["expires_at"] = expires
    if grant_id:
        body["grant_id"] = grant_id
    # validate locally first (same rules as the API), so a typo never leaves the machine
    body["grant_id"] = grant_command(body)["grant_id"]
    _run(lambda: _send_admin(settings, ("POST", "/v1/credits/grants"), body, lambda: grant_command(body)))


_EXPIRES = typer.Option(None, "--expires", help="ISO-8601 expiry instant, e.g. 2027-01-01T00:00:00Z.")
_PRIORITY = typer.Option(50, "--priority", min=0, max=100, help="0–100, lower is consumed first.")
_PROMO = typer.Option(False, "--promotional", help="Promotional (not paid) credit.")
_CURRENCY = typer.Option("usd", "--currency")
_GRANT_ID = typer.Option(None, "--grant-id", help="Idempotency: re-running with the same id grants once.")


def _input_errors(fn: Any) -> Any:
    from meterline.core.errors import InputError

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except InputError as exc:
            _err.print(f"[red]invalid input:[/red] {exc.message}" + (f" (field {exc.field})" if exc.field else ""))
            raise typer.Exit(2) from exc

    return wrapper


@credits_app.command("grant")
@_input_errors
def grant(
    customer: str = typer.Argument(..., help="Customer id."),
    amount: str = typer.Argument(..., help="Decimal amount in currency units, e.g. 10.00."),
    expires: str | None = _EXPIRES,
    priority: int = _PRIORITY,
    promotional: bool = _PROMO,
    currency: str = _CURRENCY,
    grant_id: str | None = _GRANT_ID,
) -> None:
    """Grant credit to a customer."""
    _grant("grant", customer, amount, expires, priority, promotional, currency, grant_id)


@credits_app.command("top-up")
@_input_errors
def top_up(
    customer: str = typer.Argument(..., help="Customer id."),
    amount: str = typer.Argument(..., help="Decimal amount in currency units, e.g. 10.00."),
    expires: str | None = _EXPIRES,
    priority: int = _PRIORITY,
    promotional: bool = _PROMO,
    currency: str = _CURRENCY,
    grant_id: str | None = _GRANT_ID,
) -> None:
    """Record a paid top-up (a grant written as a top_up entry)."""
    _grant("top_up", customer, amount, expires, priority, promotional, currency, grant_id)


@credits_app.command("policy")
@_input_errors
def policy(
    customer: str = typer.Argument(..., help="Customer id."),
    overage: str = typer.Option(..., "--overage", help="block | allow | credit_limit"),
    limit: str | None = typer.Option(None, "--limit", help="Credit limit (decimal) with --overage credit_limit."),
) -> None:
    """Set what happens when the customer's credit runs out."""
    from pipeline.credits.client import policy_command

    settings = _settings()
    body: dict[str, Any] = {"overage": overage, "credit_limit": limit}
    policy_command(customer, body)  # validate locally
    _run(
        lambda: _send_admin(
            settings, ("PUT", f"/v1/customers/{customer}/policy"), body, lambda: policy_command(customer, body)
        )
    )


@credits_app.command("balance")
def balance(
    customer: str = typer.Argument(..., help="Customer id."),
    timeout: float = typer.Option(
        15.0,
        help="Seconds to wait for customer-status to be read (from Kafka, or by a running API that is catching up).",
    ),
) -> None:
    """The customer's balance as JSON: available, per-grant remaining, overage, status."""
    settings = _settings()

    def show() -> None:
        api = running_api(settings.data_dir)
        if api is not None:
            doc = _api_call(api, "GET", f"/v1/customers/{customer}/balance", wait_s=timeout)
        else:
            doc = _balance_from_kafka(settings, customer, timeout)
        _out.print_json(json.dumps(doc))

    _run(show)


def _balance_from_kafka(settings: Settings, customer: str, timeout: float) -> dict[str, Any]:
    from pipeline.credits.client import StatusView, balance_summary

    bootstrap, prefix = kafka_bootstrap(settings)
    view = StatusView(bootstrap, f"{prefix}customer-status").start()
    try:
        if not view.wait_ready(timeout):
            raise MeterlineError(f"customer-status not read to its end within {timeout:g}s")
        value = view.get(customer)
    finally:
        view.close()
    if value is None:
        raise MeterlineError(f"no credit status for customer {customer!r}")
    return balance_summary(customer, value)
