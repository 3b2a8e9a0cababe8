"""A role started without what it needs says so on one line and exits 1; it never falls back to an
embedded broker or to the embedded ClickHouse under its data dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.roles.conftest import run


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env["METERLINE_DATA_DIR"] = str(tmp_path / "data")
    env.update(extra)
    return env


@pytest.mark.parametrize("role", ["worker", "sink", "api"])
def test_a_role_without_a_broker_refuses_to_start(role: str, tmp_path: Path) -> None:
    dsn = f"chdb://{(tmp_path / 'chdb').resolve()}"
    proc = run(_env(tmp_path, METERLINE_CLICKHOUSE_DSN=dsn), role, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"`meterline {role}` needs an external Kafka broker" in lines[0], proc.stderr
    assert "METERLINE_KAFKA_BOOTSTRAP" in lines[0]
    assert not (tmp_path / "data" / "logs").exists()  # no embedded broker was started


@pytest.mark.parametrize("role", ["sink", "api"])
def test_sink_and_api_without_clickhouse_refuse_to_start(role: str, tmp_path: Path) -> None:
    # The bootstrap is never dialled: the missing DSN is found first.
    proc = run(_env(tmp_path, METERLINE_KAFKA_BOOTSTRAP="127.0.0.1:9"), role, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"`meterline {role}` needs ClickHouse: set METERLINE_CLICKHOUSE_DSN" in lines[0]
    assert not (tmp_path / "data" / "chdb").exists()  # no embedded engine opened under the data dir
