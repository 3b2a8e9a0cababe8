"""`make run` is `meterline up --demo`: the README's first command must work and tell its story,
and Ctrl-C must stop it in order and quietly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.broker


def _blocked(out: str, customer: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(f"│ {customer} ") and "blocked" in line]


def test_demo_prices_enforces_credit_invoices_and_stops_quietly_on_ctrl_c(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_") and k not in ("COLUMNS", "LINES")}
    env.update({"METERLINE_DATA_DIR": str(tmp_path / "data"), "METERLINE_API_PORT": "0"})
    out_file, err_file = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out_file.open("w") as stdout, err_file.open("w") as stderr:
        meterline = str(Path(sys.executable).parent / "meterline")
        demo = subprocess.Popen([meterline, "up", "--demo"], env=env, cwd=REPO, stdout=stdout, stderr=stderr)
        try:
            # Off a terminal the demo prints its summary every 10 s; run until both credit stories
            # have happened (umbrella out of credit, hooli's runaway agent), then press Ctrl-C.
            deadline = time.monotonic() + 180
            while not (_blocked(out_file.read_text(), "umbrella") and _blocked(out_file.read_text(), "hooli")):
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
    # The period closed with an invoice per customer; umbrella's prepaid credit was applied, and
    # a customer without prepaid credit shows no credit line (not "-$0.00").
    assert "Stripe invoices for the demo period" in out
    invoice_rows = [line for line in out.splitlines() if "│ in_" in line]
    assert len(invoice_rows) == 5, out
    # columns: customer, usage charge, invoice, subtotal, prepaid credit, total due, status
    cells = [[cell.strip() for cell in row.strip("│").split("│")] for row in invoice_rows]
    credits = {row[0]: row[4] for row in cells}
    assert credits.pop("umbrella") == "-$1.50", out
    assert set(credits.values()) == {""} and "-$0.00" not in out, out
    assert (tmp_path / "data" / "stripe-demo.sqlite").exists()
    # Ctrl-C stopped everything in order: no client reconnecting to the stopped broker.
    assert out.rstrip().endswith("stopped"), out
    for noise in ("Connection refused", "rdkafka", "Traceback"):
        assert noise not in err and noise not in out, err
