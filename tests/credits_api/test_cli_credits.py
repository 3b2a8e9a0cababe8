"""``meterline credits ...`` against Kafka directly and through a running API (runtime.json)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from typer.testing import CliRunner

from meterline.shell.cli_credits import credits_app
from tests.credits_api.conftest import CreditsApi, Keys


def _env(kafka_bootstrap: str | None, prefix: str, data_dir: Path) -> dict[str, str]:
    env = {"METERLINE_TOPIC_PREFIX": prefix, "METERLINE_DATA_DIR": str(data_dir)}
    if kafka_bootstrap:
        env["METERLINE_KAFKA_BOOTSTRAP"] = kafka_bootstrap
    return env


def test_cli_through_kafka(credits_api: CreditsApi, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    env = _env(kafka_bootstrap, topic_prefix, tmp_path / "nothing-running")
    run = CliRunner().invoke
    r = run(
        credits_app,
        [
            "grant",
            "cust-a",
            "12.5",
            "--grant-id",
            "cli-g1",
            "--promotional",
            "--priority",
            "5",
            "--expires",
            "2027-01-01T00:00:00Z",
        ],
        env=env,
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["command_id"] == "grant:cli-g1"
    key, _, cmd = credits_api.agent.wait_for(lambda c: c["command_id"] == "grant:cli-g1")
    assert key == b"cust-a" and cmd["amount"] == "12.50" and cmd["category"] == "promotional"
    assert cmd["priority"] == 5 and cmd["expires_at_ms"] == 1798761600000

    r = run(credits_app, ["policy", "cust-a", "--overage", "credit_limit", "--limit", "30"], env=env)
    assert r.exit_code == 0, r.output
    cid = json.loads(r.output)["command_id"]
    _, _, cmd = credits_api.agent.wait_for(lambda c: c["command_id"] == cid)
    assert cmd["type"] == "set_policy" and cmd["credit_limit"] == "30.00"

    r = run(credits_app, ["grant", "cust-a", "1.5e"], env=env)
    assert r.exit_code == 2 and "amount" in r.output

    credits_api.agent.publish_status("cust-a")
    r = run(credits_app, ["balance", "cust-a"], env=env)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["available"] == "1.00" and doc["status"] == "active" and doc["grants"][0]["remaining"] == "1.00"
    r = run(credits_app, ["balance", "nobody"], env=env)
    assert r.exit_code == 1


def test_cli_through_running_api(credits_api: CreditsApi, keys: Keys, topic_prefix: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "up"
    data_dir.mkdir()
    # what `meterline up` leaves for CLI commands: runtime.json (live pid) + admin.key
    (data_dir / "runtime.json").write_text(
        json.dumps(
            {
                "pid": os.getpid(),
                "kafka_bootstrap": "127.0.0.1:1",
                "topic_prefix": topic_prefix,
                "api_url": credits_api.url,
            }
        )
    )
    (data_dir / "admin.key").write_text(keys.admin + "\n")
    env = _env(None, topic_prefix, data_dir)
    r = CliRunner().invoke(credits_app, ["top-up", "cust-a", "7", "--grant-id", "cli-pay"], env=env)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == {"command_id": "top_up:cli-pay", "type": "top_up", "customer_id": "cust-a"}
    _, _, cmd = credits_api.agent.wait_for(lambda c: c["command_id"] == "top_up:cli-pay")
    assert cmd["amount"] == "7.00" and cmd["category"] == "paid"
    credits_api.agent.publish_status("cust-b")
    assert credits_api.status.wait_ready(15)
    deadline = time.monotonic() + 10
    while credits_api.status.get("cust-b") is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = CliRunner().invoke(credits_app, ["balance", "cust-b"], env=env)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["available"] == "1.00"
