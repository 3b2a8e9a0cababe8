"""Issue #19.2 through the real console script: `meterline up` on the memory-only broker says at
start what it can lose; SIGKILL of the whole stack (up, broker, worker); `meterline up` again gives
`meterline credits balance` back to the pico-unit instead of "unknown_customer"."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
METERLINE = str(Path(sys.executable).parent / "meterline")

pytestmark = pytest.mark.broker


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([METERLINE, *args], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    if proc.returncode != 0:
        pytest.fail(f"meterline {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _up(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("w") as out:  # the child keeps its own copy of the descriptor
        up = subprocess.Popen(
            [METERLINE, "up"], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )  # its own process group: killed as a whole below
    runtime_file = Path(env["METERLINE_DATA_DIR"]) / "runtime.json"
    deadline = time.monotonic() + 180
    while not (runtime_file.exists() and "meterline is up" in log.read_text()):
        assert up.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "meterline up did not come up:\n" + log.read_text()
        time.sleep(0.3)
    return up


def _balance(env: dict[str, str], customer: str) -> dict[str, Any]:
    doc = json.loads(_run(env, "credits", "balance", customer).stdout)
    return {k: doc.get(k) for k in ("available", "credit_remaining", "overage", "net_balance")} | {
        "grants": sorted((g["grant_id"], g["granted"], g["remaining"]) for g in doc.get("grants", []))
    }


def test_sigkill_of_up_and_restart_keeps_the_balance(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env.update(
        {"METERLINE_DATA_DIR": str(tmp_path / "data"), "METERLINE_API_PORT": "0", "METERLINE_TOPIC_PREFIX": "restart."}
    )
    first = tmp_path / "up1.log"
    up = _up(env, first)
    try:
        assert "events accepted and not yet processed" in first.read_text()  # said plainly at start
        _run(env, "prices", "load", "infra/prices/seed.yaml")
        _run(env, "credits", "grant", "bigco", "25.000000000007", "--grant-id", "g-big")
        time.sleep(2)  # usage that occurred after the grant took effect
        now = int(time.time() * 1000)
        events = tmp_path / "events.jsonl"
        events.write_text(
            "".join(
                json.dumps(
                    {
                        "event_id": f"e-{i}",
                        "occurred_at": now - i,
                        "customer_id": "bigco",
                        "provider": "meta",
                        "model": "llama-3-70b",
                        "input_tokens": 10_000 + i,
                        "output_tokens": 2_000,
                    }
                )
                + "\n"
                for i in range(300)
            )
        )
        _run(env, "produce", str(events))
        deadline = time.monotonic() + 120
        while True:
            debited = (
                _run(env, "sql", "SELECT count() FROM ledger_entries FINAL WHERE kind = 'debit'", "--format", "csv")
                .stdout.strip()
                .splitlines()[-1]
            )
            if int(debited) >= 300:
                break
            assert time.monotonic() < deadline, "usage was not debited in time"
            time.sleep(0.5)
        time.sleep(2)  # the last status reaches the API's view
        before = _balance(env, "bigco")
        assert before["grants"] and before["grants"][0][1] != before["grants"][0][2]
    finally:
        os.killpg(up.pid, signal.SIGKILL)  # up, the broker and the worker: everything at once
        up.wait(30)
    time.sleep(1)

    second = tmp_path / "up2.log"
    up = _up(env, second)
    try:
        assert "restored 1 customer ledger(s)" in second.read_text(), second.read_text()
        deadline = time.monotonic() + 60
        while (after := _balance(env, "bigco")) != before and time.monotonic() < deadline:
            time.sleep(0.5)
        assert after == before
        # The gateway retries the whole file: nothing is debited twice.
        _run(env, "produce", str(events))
        time.sleep(8)
        assert _balance(env, "bigco") == before
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
