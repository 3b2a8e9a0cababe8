"""`make run` is `meterline up --demo`: the README's first command must work and tell its story,
and Ctrl-C must stop it in order and quietly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.broker


def _blocked(out: str, customer: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(f"│ {customer} ") and "blocked" in line]


def _plan_bill(data_dir: Path, customer: str) -> dict[str, int]:
    """The pure domain's bill (``rate_period``, what ``meterline bill preview`` shows) of the
    customer's current plan period for the usage ClickHouse holds, in cents per line kind."""
    from jobs.plans.billing import load_catalog, load_events, period_usage
    from jobs.stripe.plans import to_cents
    from meterline.core.plans import fold_timeline, rate_period
    from meterline.stack.clickhouse import connect

    ch: Any = connect(f"chdb://{data_dir / 'chdb'}")
    try:
        events = load_events(ch, customer)
        assert events, f"no subscription of {customer} in ClickHouse"
        period = fold_timeline(customer, events, load_catalog(ch)).period_at(events[0].at)
        assert period is not None
        bill = rate_period(period, period_usage(ch, period))
    finally:
        ch.close()
    # A block plan's overage is written off by a `blocked` line: Stripe's usage line is the net.
    net = {"fee": bill.amount_of("fee"), "overage": bill.amount_of("overage") + bill.amount_of("blocked")}
    net["minimum_commitment"] = bill.amount_of("minimum_commitment")
    net["blocked"] = bill.amount_of("blocked")
    return {kind: to_cents(Decimal(picos) / 10**12) for kind, picos in net.items()}


def _cents(text: str) -> int:
    return int(Decimal(text.replace("$", "").replace(",", "")) * 100)


def test_demo_prices_enforces_credit_invoices_and_stops_quietly_on_ctrl_c(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_") and k not in ("COLUMNS", "LINES")}
    env.update({"METERLINE_DATA_DIR": str(tmp_path / "data"), "METERLINE_API_PORT": "0"})
    out_file, err_file = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out_file.open("w") as stdout, err_file.open("w") as stderr:
        meterline = str(Path(sys.executable).parent / "meterline")
        demo = subprocess.Popen([meterline, "up", "--demo"], env=env, cwd=REPO, stdout=stdout, stderr=stderr)
        try:
            # Off a terminal the demo prints its summary every 10 s; run until the credit stories
            # have happened (umbrella out of credit, hooli's runaway agent, initech at its plan's
            # allowance), then press Ctrl-C.
            deadline = time.monotonic() + 240
            while not all(_blocked(out_file.read_text(), c) for c in ("umbrella", "hooli", "initech")):
                assert demo.poll() is None, out_file.read_text() + err_file.read_text()
                assert time.monotonic() < deadline, "the demo's credit stories did not happen:\n" + out_file.read_text()
                time.sleep(1.0)
            demo.send_signal(signal.SIGINT)
            rc = demo.wait(180)
        finally:
            if demo.poll() is None:
                demo.kill()
                demo.wait()
    out, err = out_file.read_text(), err_file.read_text()
    assert rc == 0, out + err
    # Priced spend per customer and model, and the unpriced model dead-lettered, never at $0.
    for text in ("priced spend per customer", "acme", "claude-3-5-sonnet", "unknown_model"):
        assert text in out, text
    # The prepaid customer ran out and the looping agent tripped the runaway guard: both blocked
    # (the reason whole: tables printed to a file are not squeezed).
    assert "credit_exhausted" in _blocked(out, "umbrella")[-1]
    assert "runaway_guard" in _blocked(out, "hooli")[-1]
    assert "allowance_exhausted" in _blocked(out, "initech")[-1]
    # The period closed with an invoice per customer; umbrella's prepaid credit was applied, and
    # a customer without prepaid credit shows no credit line (not "-$0.00").
    assert "Stripe invoices for the demo period" in out
    rows = [[cell.strip() for cell in line.strip("│").split("│")] for line in out.splitlines() if "│ in_" in line]
    # invoice columns: customer, usage charge, invoice, subtotal, prepaid credit, total due, status
    cells = [row for row in rows if len(row) == 7 and row[2].startswith("in_")]
    assert len(cells) == 5, out
    credits = {row[0]: row[4] for row in cells}
    assert credits.pop("umbrella") == "-$1.50", out
    assert set(credits.values()) == {""} and "-$0.00" not in out, out
    assert (tmp_path / "data" / "stripe-demo.sqlite").exists()
    # The plan customers' closed period, read from the Stripe invoice lines: globex's fee and
    # overage, initech's fee, its usage written off (block plan) and the minimum-commitment true-up;
    # each equal to the pure domain's bill of the usage ClickHouse holds.
    assert "plan lines of the closed period" in out
    # plan line columns: customer, line, description, quantity, amount, on invoice
    lines: dict[tuple[str, str], int] = {}
    for row in rows:
        if len(row) == 6 and row[1] in ("fee", "overage", "true-up"):
            lines[(row[0], row[1])] = lines.get((row[0], row[1]), 0) + _cents(row[4])
    globex, initech = _plan_bill(tmp_path / "data", "globex"), _plan_bill(tmp_path / "data", "initech")
    assert globex["fee"] == 2000 and globex["overage"] > 0, globex
    assert lines[("globex", "fee")] == globex["fee"], out
    assert lines[("globex", "overage")] == globex["overage"], out
    assert ("globex", "true-up") not in lines, out
    assert initech["minimum_commitment"] == 1500 and initech["overage"] == 0 and initech["blocked"] < 0, initech
    assert lines[("initech", "fee")] == initech["fee"] == 1000, out
    assert lines[("initech", "overage")] == 0, out
    assert lines[("initech", "true-up")] == initech["minimum_commitment"], out
    # Ctrl-C stopped everything in order: no client reconnecting to the stopped broker.
    assert out.rstrip().endswith("stopped"), out
    for noise in ("Connection refused", "rdkafka", "Traceback"):
        assert noise not in err and noise not in out, err
