"""`make run` is `meterline up --demo`: the README's first command must work and tell its story."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.broker


def test_demo_prices_enforces_credit_and_invoices(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env.update({"METERLINE_DATA_DIR": str(tmp_path / "data"), "METERLINE_API_PORT": "0"})
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "meterline"), "up", "--demo", "--duration", "30"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    # Priced spend per customer and model, and the unpriced model dead-lettered, never at $0.
    for text in ("priced spend per customer", "acme", "claude-3-5-sonnet", "unknown_model"):
        assert text in out, text
    # The prepaid customer ran out and the looping agent tripped the runaway guard: both blocked.
    umbrella = [line for line in out.splitlines() if line.startswith("│ umbrella") and "blocked" in line]
    hooli = [line for line in out.splitlines() if line.startswith("│ hooli") and "blocked" in line]
    assert umbrella and "credit_exhau" in umbrella[-1]
    assert hooli and "runaway_guard" in hooli[-1]
    # The period closed with an invoice per customer; umbrella's prepaid $1.50 was applied.
    assert "Stripe invoices for the demo period" in out
    invoice_rows = [line for line in out.splitlines() if "│ in_" in line]
    assert len(invoice_rows) == 5, out
    assert any(line.startswith("│ umbrella") and "-$1.50" in line for line in invoice_rows), out
    assert (tmp_path / "data" / "stripe-demo.sqlite").exists()
