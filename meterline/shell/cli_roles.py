"""``meterline worker``, ``meterline sink``, ``meterline api``: one role per process (meterline/shell/roles.py).

Each runs in the foreground until SIGTERM or SIGINT, logs to stderr, and exits non-zero with one
line on stderr when its configuration is missing (no broker, no ClickHouse, unmigrated database)
or when a piece of it dies. None starts a broker or migrates: see docs/scaling.md.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from typing import Any

import typer

from meterline.core.errors import MeterlineError
from meterline.shell.cli_common import fail as _fail
from meterline.shell.cli_common import load_settings as _settings
from meterline.shell.console import make_console

err = make_console(stderr=True)
console = make_console()


def _logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _wait_for_signal(poll: Any) -> str | None:
    """Block until SIGTERM/SIGINT (returns None) or until ``poll()`` returns a reason to stop."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stop.wait(1.0):
        reason = poll()
        if reason:
            return str(reason)
    return None


def worker_command(
    name: str = typer.Option(
        "",
        help="This worker's name in logs and in its metrics advert (default: worker-<hostname>-<pid>).",
    ),
    metrics_port: int = typer.Option(
        0, "--metrics-port", min=0, max=65535, help="Port of this worker's /metrics (0: any free port)."
    ),
    metrics_host: str = typer.Option(
        "127.0.0.1", "--metrics-host", help="Address /metrics binds (0.0.0.0 in a container Prometheus scrapes)."
    ),
    loglevel: str = typer.Option("WARNING", "--loglevel", help="faust's log level (DEBUG, INFO, WARNING, ERROR)."),
) -> None:
    """Run one faust worker (pricing agent + credit agent) against an external Kafka broker.

    Workers form one consumer group (<prefix>pricing): start more, on any hosts, and faust
    spreads the partitions of usage-events, usage-priced and ledger-commands over them; a worker
    that stops hands its partitions to the others. More workers than partitions leaves the extra
    ones idle (standbys). The two agents are not split: they share the group, their tables'
    changelogs and co-partitioning, so a worker always runs both. SIGTERM / Ctrl-C stop it
    cleanly (faust commits what it acknowledged).
    """
    settings = _settings()
    _logging(loglevel.upper())
    from meterline.shell.roles import run_worker

    worker_name = name or f"worker-{socket.gethostname()}-{os.getpid()}"
    # A name ending in -<digits> would shift a fixed --metrics-port (meterline.stack.metrics);
    # here the port is given as is.
    try:
        run_worker(
            settings, name=worker_name, metrics_port=metrics_port, metrics_host=metrics_host, loglevel=loglevel.upper()
        )
    except MeterlineError as exc:
        raise _fail(exc) from exc


def sink_command(
    loglevel: str = typer.Option("WARNING", "--loglevel", help="Log level (DEBUG, INFO, WARNING, ERROR)."),
) -> None:
    """Run the ClickHouse sinks: usage-priced / usage-dead-letter, ledger-entries, plans, subscriptions,
    and the catalog mirrors.

    Needs METERLINE_KAFKA_BOOTSTRAP and METERLINE_CLICKHOUSE_DSN (a ClickHouse server in production)
    whose database `meterline migrate` has brought up to date. Sinks in several processes share the
    partitions through their consumer groups. SIGTERM / Ctrl-C: each sink flushes its batch,
    commits, and stops.
    """
    settings = _settings()
    _logging(loglevel.upper())
    from meterline.shell.roles import SinkService

    try:
        service = SinkService(settings).start()
    except MeterlineError as exc:
        raise _fail(exc) from exc
    err.print(f"meterline sink: {settings.kafka_bootstrap} -> ClickHouse ({settings.topic_prefix}*)", soft_wrap=True)
    try:
        failed = _wait_for_signal(lambda: ", ".join(service.failed()))
    finally:
        service.stop()
    if failed:
        errors = "; ".join(f"{type(e).__name__}: {e}" for e in service.errors) or "no error recorded"
        raise _fail(MeterlineError(f"sink piece(s) stopped: {failed} ({errors})"))


def api_command(
    host: str | None = typer.Option(
        None, "--host", help="Address to bind (default METERLINE_API_HOST, 127.0.0.1; 0.0.0.0 in a pod)."
    ),
    port: int | None = typer.Option(
        None, "--port", min=0, max=65535, help="Port to bind (default METERLINE_API_PORT; 0: any free port)."
    ),
    loglevel: str = typer.Option("WARNING", "--loglevel", help="Log level (DEBUG, INFO, WARNING, ERROR)."),
) -> None:
    """Run the HTTP API: ingest, authorize, balances, credits, read-only SQL, admin run.

    Needs METERLINE_KAFKA_BOOTSTRAP and a migrated METERLINE_CLICKHOUSE_DSN. Stateless: run as many
    replicas as the load needs (each reads balances from the customer-status topic). Its admin key
    is data_dir/admin.key (created on first start). SIGTERM / Ctrl-C stop it.
    """
    settings = _settings()
    _logging(loglevel.upper())
    from meterline.shell.roles import ApiRole

    try:
        role = ApiRole(
            settings, host=settings.api_host if host is None else host, port=settings.api_port if port is None else port
        ).start()
    except MeterlineError as exc:
        raise _fail(exc) from exc
    url = role.service.url if role.service is not None else "?"
    # One parseable line on stdout: tests and supervisors read the bound address (port 0).
    console.print(f"meterline api listening on {url}", soft_wrap=True)
    sys.stdout.flush()
    try:
        _wait_for_signal(lambda: None)
    finally:
        role.stop()


def register(app: typer.Typer) -> None:
    app.command("worker")(worker_command)
    app.command("sink")(sink_command)
    app.command("api")(api_command)
