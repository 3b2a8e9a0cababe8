"""``meterline verify`` runs small and reports every figure with Δ = 0; a broken oracle is caught."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import typer
from typer.testing import CliRunner

from devtools.verify import Delta, Expected, check_invariants, run_verify, verify_command
from meterline.core.config import Settings


def test_run_verify_small_session_has_no_delta(clickhouse_dsn: str, tmp_path: Path, seed: int) -> None:
    lines: list[str] = []
    report = run_verify(
        Settings(clickhouse_dsn=clickhouse_dsn, data_dir=tmp_path, partitions=4),
        events=600,
        kills=1,
        duplicates=60,
        outages=1,
        seed=seed,
        echo=lines.append,
        busy=300,
        restart=True,
    )
    text = report.render()
    assert report.ok, text
    assert report.kills_survived == 1 and report.outages_injected == 1
    assert report.duplicates_injected == 60 and report.bad_inputs > 10
    # oversized input: 300 events of one customer in the burst + one ~1 MB record of max-label events
    assert report.busy_events == 300 and report.big_record_bytes > 900_000
    assert report.distinct_events > 900 and report.priced_rows == report.distinct_events
    # restart of everything: broker SIGKILLed, state restored, every event re-sent, checks again
    assert report.restarts == 1 and report.balances_kept and report.restored_ledgers >= 5
    assert report.rejected_rows == report.bad_inputs
    assert all(want == got for want, got in report.per_customer.values()) and len(report.per_customer) >= 5
    assert f"seed {seed}" in text and "RESULT: OK" in text and any("SIGKILL" in s for s in lines)


def test_checks_report_a_delta_when_the_store_disagrees() -> None:
    """The checks are not vacuous: a store missing one cent for one customer is a Δ."""
    import random

    from devtools.verify import make_events

    expected = Expected()
    events = make_events(random.Random(7), 5)
    expected.add_priced(events)
    totals = expected.per_customer()
    victim = sorted(totals)[0]

    def query(sql: str) -> list[tuple]:
        if "uniqExact" in sql:
            return [
                (c, n, n, cost - (Decimal("0.01") if c == victim else 0), charge)
                for c, (n, cost, charge) in totals.items()
            ]
        if "usage_rejected" in sql:
            return [(0, 0)]
        if "SELECT customer_id, event_id" in sql:
            return list(expected.priced)
        return []

    deltas = check_invariants(query, expected)
    assert deltas and all(isinstance(d, Delta) for d in deltas)
    assert [d.subject for d in deltas] == [f"{victim} cost"]


def test_verify_command_exits_nonzero_on_delta(monkeypatch, tmp_path: Path) -> None:
    from devtools.verify import command as module

    class Broken(module.VerifyReport):
        pass

    bad = Broken(seed=1, settled=True, deltas=[Delta("priced_totals", "acme charge", "1", "2 (Δ 1)")])
    monkeypatch.setattr(module, "run_verify", lambda *a, **k: bad)
    monkeypatch.setenv("METERLINE_DATA_DIR", str(tmp_path))
    app = typer.Typer()
    app.command("verify")(verify_command)
    app.command("noop")(lambda: None)
    result = CliRunner().invoke(app, ["verify", "--events", "10", "--kills", "0", "--seed", "3"])
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.output and "acme charge" in result.output
