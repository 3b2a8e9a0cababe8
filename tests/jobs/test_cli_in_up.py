"""``meterline stripe ...`` / ``meterline statement`` while ``meterline up`` owns the embedded engine.

A real :class:`meterline.shell.runtime.Runtime` (broker of the session, this pytest process's chDB engine,
a faust worker, sinks, the HTTP API) runs for the module. The commands are started as separate
processes through the ``meterline`` console script: such a process cannot open the engine (the
runtime's process holds its lock, checked below with ``meterline migrate``), so they only succeed
by running inside the runtime through ``POST /v1/admin/run``. Stripe is the bundled local server
(no key is set), started inside the runtime with its state in ``<data_dir>/stripe.sqlite``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from typer.testing import CliRunner

from jobs.stripe._store import ACKED, load_pushes
from meterline.core.config import Settings
from meterline.shell.api.admin import CommandRunner, RunnerBusy
from meterline.shell.api.keys import KeyStore
from meterline.shell.cli_stripe import statement_command, stripe_app
from meterline.shell.forwarding import argv_from_params
from meterline.shell.runtime import Runtime
from meterline.stack.clickhouse import apply_migrations, connect, default_migrations_dir, with_database
from meterline.stack.topics import ensure_topics
from tests.jobs.conftest import DAY, HOUR, Usage

pytestmark = pytest.mark.broker

REPO = Path(__file__).resolve().parents[2]
METERLINE = str(Path(sys.executable).parent / "meterline")
# 1.500000000001 USD per window: exact to the pico, never a whole number of micro-dollars
CHARGE_PICOS = 1_500_000_000_001

app = typer.Typer()
app.add_typer(stripe_app, name="stripe")
app.command("statement")(statement_command)


@dataclass
class Up:
    runtime: Runtime
    settings: Settings
    dsn: str
    ch: Any
    usage: Usage
    base: int  # start of the first usage hour

    @property
    def url(self) -> str:
        return str(self.runtime.api_server.url)

    def env(self, **extra: str) -> dict[str, str]:
        """A CLI environment for this data_dir and engine (no Kafka, no Stripe key)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
        env.update(
            {"METERLINE_DATA_DIR": str(self.settings.data_dir), "METERLINE_CLICKHOUSE_DSN": self.dsn, "COLUMNS": "200"}
        )
        env.update(extra)
        return env

    def cli(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        """``meterline ARGS`` as its own process (as an operator would type it)."""
        return subprocess.run(
            [METERLINE, *args], env=self.env(**extra), capture_output=True, text=True, timeout=120, cwd=REPO
        )


@pytest.fixture(scope="module")
def up(kafka_bootstrap: str, chdb_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    prefix = f"t{uuid.uuid4().hex[:8]}."
    ensure_topics(kafka_bootstrap, prefix, 4)
    database = f"test_{uuid.uuid4().hex[:12]}"
    ch = connect(chdb_dsn, database=database)
    apply_migrations(ch, default_migrations_dir())
    dsn = with_database(chdb_dsn, database)
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("up"),
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=prefix,
        partitions=4,
        broker_flavor="tansu",
        clickhouse_dsn=dsn,
        api_port=0,
    )
    # 4 hours of acme usage, settled (ended hours ago), straight into usage_priced
    base = int(time.time()) // HOUR * HOUR - 6 * HOUR
    usage = Usage(ch)
    usage.add_many([("acme", base + h * HOUR + 60, CHARGE_PICOS) for h in range(4)])
    runtime = Runtime(settings).start()
    try:
        yield Up(runtime, settings, dsn, ch, usage, base)
    finally:
        _stop(runtime)
        ch.command(f"DROP DATABASE IF EXISTS `{database}` SYNC")
        ch.close()


def _stop(runtime: Runtime) -> None:
    """Stop the runtime; its faust worker (not under test here) is killed first, which is quicker."""
    for worker in runtime.workers:
        worker.kill()
    runtime.stop()


def _table(stdout: str) -> dict[str, int]:
    """The one-row rich table ``stripe sync`` prints, as {column: value}."""
    header = next(line for line in stdout.splitlines() if line.startswith("┃"))
    row = next(line for line in stdout.splitlines() if line.startswith("│"))
    names = [c.strip() for c in header.strip("┃").split("┃")]
    values = [int(c.strip()) for c in row.strip("│").split("│")]
    return dict(zip(names, values, strict=True))


def _period(base: int) -> str:
    start = datetime.fromtimestamp(base, tz=UTC).date()
    end = datetime.fromtimestamp(base + 2 * DAY, tz=UTC).date()
    return f"{start}..{end}"


def test_stripe_commands_run_inside_a_running_up(up: Up, tmp_path: Path) -> None:
    # The engine is the runtime's: a command that opens it itself fails in another process...
    refused = up.cli("migrate")
    assert refused.returncode != 0 and "owned by process" in refused.stderr.replace("\n", " ")

    # ...while the Stripe jobs run inside the runtime and print their real figures.
    provisioned = up.cli("stripe", "provision")
    assert provisioned.returncode == 0, provisioned.stdout + provisioned.stderr
    assert "customer:acme" in provisioned.stdout and "meter:meterline_charge" in provisioned.stdout
    assert "meterline up is running" in provisioned.stderr
    assert "using the local Stripe server" in provisioned.stderr  # printed by the command inside up
    assert str(up.settings.data_dir / "stripe.sqlite") in provisioned.stderr.replace("\n", "")

    synced = up.cli("stripe", "sync", "--no-progress")
    assert synced.returncode == 0, synced.stdout + synced.stderr
    figures = _table(synced.stdout)
    assert figures["windows"] == 4 and figures["planned"] == 4
    assert figures["sent"] == 4 and figures["acked"] == 4 and figures["failed"] == 0
    pushes = [p for p in load_pushes(up.ch) if p.status == ACKED]
    assert len(pushes) == 4
    # exact: 4 × 1.500000000001 USD in micro-dollars is 6000000.000004 — 6000000 pushed, 0.000004 carried
    assert sum(p.value for p in pushes) == int(up.usage.charges["acme"].scaleb(6))
    assert sum(p.value for p in pushes) == 6_000_000

    # The CLI in this process (typer's runner) takes the same route. Sync again: nothing new.
    runner = CliRunner()
    r = runner.invoke(app, ["stripe", "sync", "--no-progress"], env=up.env())
    assert r.exit_code == 0 and _table(r.stdout)["sent"] == 0 and "meterline up is running" in r.output

    # --out: the statement is rendered inside up and written here, by the CLI.
    out = tmp_path / "acme.csv"
    r = runner.invoke(
        app, ["statement", "acme", "--period", _period(up.base), "--format", "csv", "--out", str(out)], env=up.env()
    )
    assert r.exit_code == 0, r.output
    assert f"wrote {out}" in r.stdout.replace("\n", "")
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert sum(Decimal(x["charge"]) for x in rows) == up.usage.charges["acme"] == Decimal("6.000000000004")

    # Reconcile (ClickHouse vs cursor vs Stripe) sees no drift.
    r = CliRunner().invoke(app, ["stripe", "reconcile", "--period", _period(up.base)], env=up.env())
    assert r.exit_code == 0, r.output
    assert "0 drift(s) in 1 row(s)" in r.output and "meterline up is running" in r.output
    r = CliRunner().invoke(app, ["stripe", "reconcile", "--period", "not-a-period"], env=up.env())
    assert r.exit_code == 2 and "bad period" in r.output


def test_admin_run_route_auth_allow_list_and_busy(up: Up, request: pytest.FixtureRequest) -> None:
    _, customer_key = KeyStore(up.settings.data_dir / "api_keys.json").create("acme")
    http = httpx.Client(base_url=up.url, timeout=60)
    request.addfinalizer(http.close)
    admin = {"Authorization": f"Bearer {up.runtime.admin_key}"}
    run = {"argv": ["statement", "acme", "--period", _period(up.base), "--format", "csv"]}

    assert http.post("/v1/admin/run", json=run).status_code == 401
    r = http.post("/v1/admin/run", json=run, headers={"Authorization": f"Bearer {customer_key}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    for argv, code in (
        (["sql", "SELECT 1"], "command_not_allowed"),
        (["up"], "command_not_allowed"),
        (["stripe"], "command_not_allowed"),
        (["stripe", "nope"], "command_not_allowed"),
        (["stripe", "sync", "--help"], "help_not_available"),
        ([], "invalid_body"),
        ("stripe sync", "invalid_body"),
    ):
        r = http.post("/v1/admin/run", json={"argv": argv}, headers=admin)
        assert r.status_code == 400 and r.json()["error"]["code"] == code, (argv, r.text)
    assert (
        "'stripe', 'statement' and 'reprice'"
        in http.post("/v1/admin/run", json={"argv": ["sql"]}, headers=admin).json()["error"]["message"]
    )

    # A command that runs and fails is a 200 carrying its exit code and stderr.
    r = http.post("/v1/admin/run", json={"argv": ["stripe", "sync", "--bogus"]}, headers=admin)
    assert r.status_code == 200 and r.json()["exit_code"] == 2 and "No such option: --bogus" in r.json()["stderr"]
    r = http.post("/v1/admin/run", json=run, headers=admin)
    assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text
    rows = list(csv.DictReader(io.StringIO(r.json()["stdout"])))
    assert sum(Decimal(x["charge"]) for x in rows) == up.usage.charges["acme"] and r.json()["stderr"] == ""

    # One run at a time: while `stripe grants` waits for its topic to go idle, others are turned away.
    runner: CommandRunner = up.runtime.cli_runner
    first: dict[str, Any] = {}
    t = threading.Thread(target=lambda: first.update(r=runner.run(["stripe", "grants", "--idle", "1.5"])))
    t.start()
    try:
        deadline = time.monotonic() + 30
        while runner.running is None and "r" not in first:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(RunnerBusy, match="stripe grants"):
            runner.run(["stripe", "provision"], wait_s=0)
        runner.wait_s = 0
        try:
            r = http.post("/v1/admin/run", json=run, headers=admin)
        finally:
            runner.wait_s = 30.0
        assert r.status_code == 409 and r.json()["error"]["code"] == "busy", r.text
    finally:
        t.join(60)
    assert first["r"].exit_code == 0, first["r"]
    assert first["r"].stdout.startswith("created 0, existing 0, voided 0, ignored 0")


def test_runs_locally_without_a_running_up_or_with_a_server_dsn(
    up: Up, clickhouse: Any, clickhouse_dsn: str, tmp_path: Path
) -> None:
    usage = Usage(clickhouse)
    base = int(time.time()) // HOUR * HOUR - 5 * HOUR
    usage.add_many([("globex", base + h * HOUR, 2_000_000_000_000) for h in range(2)])
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # a runtime.json left by a `meterline up` that died: its pid is gone, so nothing is forwarded
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (data_dir / "runtime.json").write_text(json.dumps({"pid": int(dead.stdout), "api_url": up.url}))
    (data_dir / "admin.key").write_text(str(up.runtime.admin_key))
    env = {"METERLINE_DATA_DIR": str(data_dir), "METERLINE_CLICKHOUSE_DSN": clickhouse_dsn, "COLUMNS": "200"}
    runner = CliRunner()
    r = runner.invoke(app, ["stripe", "provision"], env=env)
    assert r.exit_code == 0, r.output
    assert "customer:globex" in r.output and "meterline up is running" not in r.output
    r = runner.invoke(app, ["stripe", "sync", "--no-progress"], env=env)
    assert r.exit_code == 0, r.output
    assert _table(r.output)["acked"] == 2
    assert sum(p.value for p in load_pushes(clickhouse) if p.status == ACKED) == 4_000_000
    assert (data_dir / "stripe.sqlite").exists()  # the local Stripe server ran here, for this data_dir
    assert not [p for p in load_pushes(up.ch) if "globex" in p.identifier]

    # A ClickHouse server DSN never goes through `up`, even when one runs for the data_dir.
    (data_dir / "runtime.json").write_text(json.dumps({"pid": os.getpid(), "api_url": up.url}))
    r = runner.invoke(
        app, ["stripe", "sync", "--no-progress"], env={**env, "METERLINE_CLICKHOUSE_DSN": "http://127.0.0.1:9/db"}
    )
    assert r.exit_code == 2 and "cannot reach ClickHouse at http://127.0.0.1:9/db" in r.output
    # With the embedded engine, the same data_dir now forwards (the runtime answers, with its data).
    r = runner.invoke(app, ["statement", "acme", "--period", _period(up.base), "--format", "csv"], env=env)
    assert r.exit_code == 0, r.output
    assert "meterline up is running" in r.output
    assert sum(Decimal(x["charge"]) for x in csv.DictReader(io.StringIO(r.stdout))) == up.usage.charges["acme"]


def test_forwarded_argv_reproduces_the_parsed_parameters() -> None:
    from typer.main import get_command

    root = get_command(app)
    cases = [
        (("stripe", "provision"), ["--customer", "a", "--customer", "b c", "--no-all-customers", "--config", "x.yaml"]),
        (("stripe", "sync"), ["--now", "1767225600", "--no-progress"]),
        (("stripe", "sync"), []),
        (("stripe", "grants"), ["--idle", "0.5"]),
        (("stripe", "reconcile"), ["--period", "2026-01", "--customer", "acme"]),
        (("statement",), ["--period", "2026-01..2026-02", "--format", "csv", "--", "-odd-customer"]),
    ]
    for path, argv in cases:
        command = root
        for name in path:
            command = command.commands[name]
        ctx = command.make_context(path[-1], list(argv))
        rebuilt = argv_from_params(ctx)
        again = command.make_context(path[-1], rebuilt)
        expected = dict(ctx.params)
        if "config" in expected:  # paths are sent absolute: the service has another working directory
            expected["config"] = Path(os.path.abspath(expected["config"]))
        assert again.params == expected, (path, argv, rebuilt)
        assert "--config" not in argv_from_params(ctx, skip=("config",))
    ctx = root.commands["statement"].make_context("statement", ["acme", "--period", "2026-01", "--out", "f.html"])
    assert argv_from_params(ctx, skip=("out",)) == ["--period", "2026-01", "--format", "html", "--", "acme"]


def test_up_syncs_to_stripe_periodically(
    settings_factory: Any, clickhouse: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="meterline.stripe_sync")
    usage = Usage(clickhouse)
    base = int(time.time()) // HOUR * HOUR - 4 * HOUR
    usage.add_many([("initech", base + h * HOUR, 1_000_000_000_001 * (h + 1)) for h in range(3)])
    runtime = Runtime(settings_factory(api_port=0, broker_flavor="tansu", stripe_sync_every_s=0.2)).start()
    try:

        def lines() -> list[str]:
            return [r.getMessage() for r in caplog.records if r.name == "meterline.stripe_sync"]

        # Nothing is provisioned in Stripe yet: the periodic runs fail, are logged, and `up` lives on.
        deadline = time.monotonic() + 30
        while not any(ln.startswith("stripe sync: exit 1") for ln in lines()):
            assert time.monotonic() < deadline, lines()
            time.sleep(0.05)
        assert runtime.workers[0].alive() and not runtime.stopping
        provisioned = runtime.cli_runner.run(["stripe", "provision"])
        assert provisioned.exit_code == 0 and "customer:initech" in provisioned.stdout, provisioned
        while not any("acked 3" in ln for ln in lines()):
            assert time.monotonic() < deadline, lines()
            time.sleep(0.05)
    finally:
        _stop(runtime)
    # (the failed first run had already planned the 3 windows: a later run sends them)
    done = next(ln for ln in lines() if "acked 3" in ln)
    assert done.startswith("stripe sync: exit 0") and "windows 3" in done and "sent 3, acked 3" in done
    assert "failed 0" in done
    pushes = [p for p in load_pushes(clickhouse) if p.status == ACKED]
    # (1 + 2 + 3) × 1.000000000001 USD = 6.000000000006 USD: 6000000 micro-dollars pushed, the rest carried
    assert sum(p.value for p in pushes) == int(usage.charges["initech"].scaleb(6)) == 6_000_000
