"""Plans end to end, through the real console script: `meterline up` (Tansu, faust worker, chDB,
sinks, API), `meterline plans load|subscribe|change|cancel`, usage through the real pipeline, and
`meterline bill preview` computing bills from ClickHouse aggregates and the subscription timeline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
METERLINE = str(Path(sys.executable).parent / "meterline")

pytestmark = pytest.mark.broker

PLANS = """
currency: USD
plans:
  - id: pro
    version: 1
    effective_from: "2026-01-01T00:00:00Z"
    interval: month
    fee: "200.00"
    allowances:
      - id: tokens
        tokens: 10000000
        token_classes: [input, output]
    overage:
      per_million: "30.00"
    on_exhausted: allow
  - id: flat
    version: 1
    effective_from: "2026-01-01T00:00:00Z"
    interval: month
    fee: "25.00"
    overage: {per_million: "0"}
  - id: max
    version: 1
    effective_from: "2026-01-01T00:00:00Z"
    interval: month
    fee: "500.00"
    allowances:
      - id: tokens
        tokens: 40000000
    overage:
      per_million: "20.00"
"""


def _run(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([METERLINE, *args], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    if check and proc.returncode != 0:
        pytest.fail(f"meterline {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _count(env: dict[str, str], sql: str) -> int:
    return int(_run(env, "sql", sql, "--format", "csv").stdout.strip().splitlines()[-1].strip('"'))


def test_plan_bills_from_the_real_pipeline(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env.update(
        {"METERLINE_DATA_DIR": str(tmp_path / "data"), "METERLINE_API_PORT": "0", "METERLINE_TOPIC_PREFIX": "plans."}
    )
    log = (tmp_path / "up.log").open("w")
    up = subprocess.Popen([METERLINE, "up"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        runtime_file = tmp_path / "data" / "runtime.json"
        deadline = time.monotonic() + 120
        while not runtime_file.exists():
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, "meterline up did not come up:\n" + (tmp_path / "up.log").read_text()
            time.sleep(0.2)

        _run(env, "prices", "load", "infra/prices/seed.yaml")
        plans = tmp_path / "plans.yaml"
        plans.write_text(PLANS)
        assert "published 3 plan version(s)" in _run(env, "plans", "load", str(plans)).stdout
        assert "published 0 plan version(s)" in _run(env, "plans", "load", str(plans)).stdout  # idempotent
        changed = tmp_path / "changed.yaml"
        changed.write_text(PLANS.replace('fee: "200.00"', 'fee: "199.00"'))
        refused = _run(env, "plans", "load", str(changed), check=False)
        assert refused.returncode == 2 and "immutable" in refused.stderr

        now = datetime.now(UTC)
        month = now.strftime("%Y-%m")
        start = now.strftime("%Y-%m-01T00:00:00Z")
        for customer, plan in (("plan-7m", "pro"), ("plan-12m", "pro"), ("plan-flat", "flat"), ("plan-up", "pro")):
            assert "recorded" in _run(env, "plans", "subscribe", customer, plan, "--from", start).stdout
        assert "already recorded" in _run(env, "plans", "subscribe", "plan-7m", "pro", "--from", start).stdout
        bad = _run(env, "plans", "change", "nobody", "pro", check=False)
        assert bad.returncode == 2 and "no subscription" in bad.stderr
        bad = _run(env, "plans", "subscribe", "plan-7m", "flat", "--from", start, "--version", "1", check=False)
        assert bad.returncode == 2 and ("already subscribed" in bad.stderr or "conflicts" in bad.stderr)

        # plan-up upgrades to max exactly half-way through the month (a whole number of seconds)
        first = datetime.strptime(start, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        nxt = first.replace(year=first.year + first.month // 12, month=first.month % 12 + 1)
        half = first + (nxt - first) / 2
        assert (
            "recorded"
            in _run(env, "plans", "change", "plan-up", "max", "--at", half.strftime("%Y-%m-%dT%H:%M:%SZ")).stdout
        )
        assert "recorded" in _run(env, "plans", "cancel", "plan-flat", "--at-period-end").stdout
        early = int(first.timestamp()) * 1000 + 3_600_000  # in the first half, whatever today is
        shown = json.loads(_run(env, "plans", "show", "plan-up", "--format", "json").stdout)
        assert [s["plan"] for s in shown["runs"][0]["segments"]] == ["pro@1", "max@1"] and shown["rejected"] == []
        assert shown["runs"][0]["segments"][1]["start"] == half.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert "pro@1" in _run(env, "plans", "show", "plan-7m").stdout
        at = int(now.timestamp()) * 1000 - 60_000  # a minute ago: inside the period that began on the 1st
        at = max(at, int(datetime.strptime(start, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()) * 1000)
        usage = [
            ("plan-7m", 4_000_000, 3_000_000),
            ("plan-12m", 5_000_000, 1_000_000),
            ("plan-12m", 4_000_000, 2_000_000),
            ("plan-flat", 40_000_000, 10_000_000),
            ("payg", 1_000_000, 1_000_000),
            ("plan-up", 6_000_000, 1_000_000),
        ]
        events = tmp_path / "events.jsonl"
        events.write_text(
            "".join(
                json.dumps(
                    {
                        "event_id": f"e{i}",
                        "occurred_at": early if c == "plan-up" else at,
                        "customer_id": c,
                        "provider": "meta",
                        "model": "llama-3-70b",
                        "input_tokens": n_in,
                        "output_tokens": n_out,
                    }
                )
                + "\n"
                for i, (c, n_in, n_out) in enumerate(usage)
            )
        )
        assert f"produced {len(usage)} event(s)" in _run(env, "produce", str(events)).stdout

        deadline = time.monotonic() + 90
        while (
            _count(env, "SELECT count() FROM usage_priced"),
            _count(env, "SELECT count() FROM subscription_events"),
            _count(env, "SELECT count() FROM plans"),
        ) != (len(usage), 6, 3):
            assert time.monotonic() < deadline, "usage, plans and subscriptions did not land in ClickHouse in time"
            time.sleep(0.5)

        def preview(customer: str) -> dict:
            return json.loads(_run(env, "bill", "preview", customer, "--period", month, "--format", "json").stdout)

        b7 = preview("plan-7m")
        assert b7["total"] == "200.00" and b7["plan"] == "pro@1"
        assert [(a["id"], a["included"], a["used"], a["remaining"]) for a in b7["allowances"]] == [
            ("tokens", 10_000_000, 7_000_000, 3_000_000)
        ]
        assert [(line["kind"], line["amount"]) for line in b7["lines"]] == [("fee", "200.00"), ("allowance", "0.00")]

        b12 = preview("plan-12m")
        assert b12["total"] == "260.00"
        assert [
            (line["kind"], line["quantity"], line["amount"]) for line in b12["lines"] if line["kind"] == "overage"
        ] == [("overage", "2000000", "60.00")]
        assert b12["allowances"][0]["remaining"] == 0

        assert preview("plan-flat")["total"] == "25.00"
        payg = preview("payg")  # no plan: the pay-per-token bill, (0.59 + 0.79) at list price
        assert payg["plan"] is None and payg["total"] == "1.38" and payg["lines"][0]["kind"] == "usage"

        # mid-period upgrade: half of each fee (100 + 250), half of pro's allowance (5M) for the
        # first half, whose 7M tokens leave 2M overage at $30; max's 20M (half of 40M) is unused
        up_bill = preview("plan-up")
        assert [
            (line["kind"], line["plan"], line["amount"])
            for line in up_bill["lines"]
            if line["kind"] in ("fee", "overage")
        ] == [("fee", "pro@1", "100.00"), ("overage", "pro@1", "60.00"), ("fee", "max@1", "250.00")]
        assert [(a["plan"], a["included"], a["used"], a["remaining"]) for a in up_bill["allowances"]] == [
            ("pro@1", 5_000_000, 5_000_000, 0),
            ("max@1", 20_000_000, 0, 20_000_000),
        ]
        assert up_bill["total"] == "410.00"

        table = _run(env, "bill", "preview", "plan-12m", "--period", month).stdout
        assert "260.00" in table and "overage" in table
        bad = _run(env, "bill", "preview", "plan-12m", "--period", "2026-13", check=False)
        assert bad.returncode == 2

        # a new version leaves subscribers alone until migrated; a migration starts next period
        v2 = tmp_path / "v2.yaml"
        v2.write_text(PLANS.replace("version: 1", "version: 2", 1).replace('fee: "200.00"', 'fee: "210.00"'))
        assert "published 1 plan version(s)" in _run(env, "plans", "load", str(v2)).stdout
        assert "migrating 2 subscriber(s)" in _run(env, "plans", "migrate", "pro", "--to", "2").stdout
        assert "migrating 0 subscriber(s)" in _run(env, "plans", "migrate", "pro", "--to", "2").stdout
        deadline = time.monotonic() + 60
        while _count(env, "SELECT count() FROM subscription_events WHERE type = 'migrated'") != 2:
            assert time.monotonic() < deadline, "the migrations did not land"
            time.sleep(0.5)
        assert preview("plan-7m")["total"] == "200.00"  # this period stays on pro@1
        following = nxt.strftime("%Y-%m")
        nb = (
            preview("plan-7m")
            if following == month
            else json.loads(_run(env, "bill", "preview", "plan-7m", "--period", following, "--format", "json").stdout)
        )
        assert nb["plan"] == "pro@2" and nb["total"] == "210.00"
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait(10)
