"""The CLI end to end (provision, sync, reconcile exit codes) and the usage statement (HTML + CSV)."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from devtools.stripe_local import LocalStripe
from jobs.stripe._store import load_pushes
from jobs.stripe.statement import build_statement, render_csv, render_html
from meterline.shell.cli_stripe import statement_command, stripe_app
from tests.jobs.conftest import DAY, HOUR, Usage

app = typer.Typer()
app.add_typer(stripe_app, name="stripe")
app.command("statement")(statement_command)


@pytest.fixture
def env(ls: LocalStripe, clickhouse_dsn: str, tmp_path: Path) -> dict[str, str]:
    return {
        "METERLINE_CLICKHOUSE_DSN": clickhouse_dsn,
        "METERLINE_STRIPE_BASE_URL": ls.url,
        "METERLINE_DATA_DIR": str(tmp_path),
        "METERLINE_STRIPE_API_KEY": "",
    }


def test_cli_provision_sync_reconcile(ls: LocalStripe, clickhouse: Any, usage: Usage, env: dict[str, str]) -> None:
    runner = CliRunner()
    base = ls.now() // HOUR * HOUR - 6 * HOUR
    usage.add_many([("acme", base + h * HOUR, 1_500_000_000_001) for h in range(4)])
    r = runner.invoke(app, ["stripe", "provision"], env=env)
    assert r.exit_code == 0, r.output
    assert "customer:acme" in r.output
    r = runner.invoke(app, ["stripe", "provision"], env=env)
    assert r.exit_code == 0 and "created 0" in r.output
    r = runner.invoke(app, ["stripe", "sync", "--now", str(ls.now()), "--no-progress"], env=env)
    assert r.exit_code == 0, r.output
    day = datetime.fromtimestamp(base, tz=UTC).strftime("%Y-%m-%d")
    period = f"{day}..{datetime.fromtimestamp(base + 2 * DAY, tz=UTC):%Y-%m-%d}"
    r = runner.invoke(app, ["stripe", "reconcile", "--period", period], env=env)
    assert r.exit_code == 0, r.output
    assert "0 drift(s)" in r.output
    ls.delete_meter_event(load_pushes(clickhouse)[0].identifier)
    r = runner.invoke(app, ["stripe", "reconcile", "--period", period], env=env)
    assert r.exit_code == 1 and "DRIFT" in r.output


def test_statement_html_and_csv(clickhouse: Any, usage: Usage, env: dict[str, str], tmp_path: Path) -> None:
    day0 = 1_767_225_600  # 2026-01-01
    usage.add_many([("acme", day0 + d * DAY + 3600, 123_456_789_012 * (d + 1)) for d in range(5)], model="gpt-4o")
    usage.add_many(
        [("acme", day0 + d * DAY + 7200, 2_000_000_000_000) for d in range(3)],
        model="o1",
        project="search",
        output_tokens=5000,
    )
    usage.add("globex", day0 + 3600, 9_000_000_000_000)
    st = build_statement(clickhouse, "acme", day0, day0 + 31 * DAY)
    assert st.totals() == {"usd": usage.charges["acme"]}
    rows = list(csv.DictReader(io.StringIO(render_csv(st))))
    assert len(rows) == 8 and sum(Decimal(r["charge"]) for r in rows) == usage.charges["acme"]
    assert {r["model"] for r in rows} == {"gpt-4o", "o1"} and rows[0]["day"] == "2026-01-01"
    page = render_html(st)
    assert "<svg" in page and page.count('<rect class="bar"') == 5 + 2 + 2  # days, models, projects
    assert "src=" not in page and "<script" not in page and "<link" not in page
    out = tmp_path / "acme.html"
    r = CliRunner().invoke(app, ["statement", "acme", "--period", "2026-01", "--out", str(out)], env=env)
    assert r.exit_code == 0, r.output and out.read_text().startswith("<!doctype html>")
    r = CliRunner().invoke(app, ["statement", "acme", "--period", "2026-01", "--format", "csv"], env=env)
    assert r.exit_code == 0 and r.output.splitlines()[0].startswith("day,project,provider,model")
