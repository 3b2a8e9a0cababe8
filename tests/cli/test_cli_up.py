"""The operator's path, through the real console script: `meterline up` starts the real broker,
ClickHouse engine, worker and API; other commands find it; Ctrl-C stops everything, no orphans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
METERLINE = str(Path(sys.executable).parent / "meterline")

pytestmark = pytest.mark.broker


def _children(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc; Linux)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _run(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([METERLINE, *args], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    if check and proc.returncode != 0:
        pytest.fail(f"meterline {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_up_serves_cli_commands_and_ctrl_c_leaves_no_orphans(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env.update(
        {"METERLINE_DATA_DIR": str(tmp_path / "data"), "METERLINE_API_PORT": "0", "METERLINE_TOPIC_PREFIX": "cli."}
    )
    with (tmp_path / "up.log").open("w") as log:  # the child keeps its own copy of the descriptor
        up = subprocess.Popen([METERLINE, "up"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        runtime_file = tmp_path / "data" / "runtime.json"
        deadline = time.monotonic() + 90
        while not runtime_file.exists():
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, "meterline up did not come up:\n" + (tmp_path / "up.log").read_text()
            time.sleep(0.2)
        info = json.loads(runtime_file.read_text())
        assert info["api_url"].startswith("http://127.0.0.1:")
        children = _children(up.pid)
        assert len(children) >= 2, "expected the broker and a worker as child processes"

        # Another process cannot open the embedded engine while `up` owns it, and says so on one
        # line (stderr is a pipe: never wrapped, however long the checkout's path)...
        refused = _run(env, "migrate", check=False)
        lines = [line for line in refused.stderr.splitlines() if "owned by process" in line]
        assert refused.returncode == 1 and len(lines) == 1, refused.stderr
        assert str(tmp_path / "data") in lines[0] and "while `meterline up` runs" in lines[0], refused.stderr
        # ...but `meterline sql` routes through the running service's API.
        _run(env, "prices", "load", "infra/prices/seed.yaml")
        now = int(time.time() * 1000)
        events = tmp_path / "events.jsonl"
        good = {
            "event_id": "cli-1",
            "occurred_at": now,
            "customer_id": "acme",
            "provider": "meta",
            "model": "llama-3-70b",
            "input_tokens": 1_000_000,
            "output_tokens": 1_000_000,
        }
        unpriced = dict(good, event_id="cli-2", model="not-a-model")
        events.write_text(json.dumps(good) + "\n{not json\n" + json.dumps(unpriced) + "\n")
        produced = _run(env, "produce", str(events), check=False)
        assert produced.returncode == 1 and ":2:" in produced.stderr and "produced 2 event(s)" in produced.stdout

        def count(table: str) -> int:
            out = _run(env, "sql", f"SELECT count() FROM {table}", "--format", "csv").stdout.strip().splitlines()
            return int(out[-1])

        deadline = time.monotonic() + 60
        while (count("usage_priced"), count("usage_rejected")) != (1, 1):
            assert time.monotonic() < deadline, "events were not priced / dead-lettered in time"
            time.sleep(0.5)
        charge = (
            _run(env, "sql", "SELECT sum(charge) FROM usage_priced", "--format", "csv").stdout.strip().splitlines()[-1]
        )
        # acme pays list price + 20 %: (0.59 + 0.79) per million × 1M tokens each × 1.20
        assert Decimal(charge.strip('"')) == Decimal("1.656")

        # Fix the cause (price the missing model), re-drive the dead letter: priced once, closed.
        prices = tmp_path / "more.yaml"
        prices.write_text(
            "currency: USD\nprices:\n  - provider: meta\n    model: not-a-model\n"
            '    effective_from: "2024-01-01T00:00:00Z"\n    per_million: {input: "1", output: "2"}\n'
        )
        _run(env, "prices", "load", str(prices))
        # The worker's price feed follows the prices topic asynchronously: until it has the new
        # price a re-driven event is dead-lettered again, so re-drive until it prices (re-driving
        # twice is safe: the event keeps its event_id and is priced once).
        deadline = time.monotonic() + 60
        while count("usage_priced") != 2:
            assert time.monotonic() < deadline, "the re-driven event was not priced"
            if count("v_rejected_open") >= 1:
                assert "re-drove" in _run(env, "dead-letters", "redrive", "--reason", "unknown_model").stdout
            time.sleep(1.0)
        assert count("v_rejected_open") == 0
        assert "0 open dead letter" in _run(env, "dead-letters", "redrive", "--dry-run").stdout
    finally:
        up.send_signal(signal.SIGINT)
        try:
            rc = up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            pytest.fail("meterline up did not stop on Ctrl-C")
    assert rc == 0, (tmp_path / "up.log").read_text()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in children if _alive(p)], "child processes survived Ctrl-C"
    assert not (tmp_path / "data" / "runtime.json").exists()


def test_sql_and_migrate_work_directly_when_nothing_runs(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env["METERLINE_DATA_DIR"] = str(tmp_path / "data")
    assert "applied" in _run(env, "migrate").stdout
    assert "applied 0 migration(s)" in _run(env, "migrate").stdout  # idempotent
    out = _run(
        env,
        "sql",
        "SELECT count() AS n, toDecimal128('0.000000000001', 12) * 3 AS exact FROM usage_priced",
        "--format",
        "csv",
    ).stdout
    assert out.strip().splitlines()[-1].replace('"', "") == "0,0.000000000003"
    refused = _run(env, "sql", "DROP TABLE usage_priced", check=False)
    assert refused.returncode != 0
    assert "usage_priced" in _run(env, "sql", "SHOW TABLES", "--format", "csv").stdout
