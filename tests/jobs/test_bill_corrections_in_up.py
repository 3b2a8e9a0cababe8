"""Bills after a re-rating while ``meterline up`` owns the embedded engine: ``meterline reprice``
runs inside the runtime (``POST /v1/admin/run``), ``meterline bill preview`` reads through the
runtime's read-only SQL API and ``meterline statement`` is forwarded to it. All three are the
installed console script as their own processes; the runtime is real (the session's Tansu broker,
this process's chDB engine, a faust worker with the credit agent, the sinks, the HTTP API).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from meterline.core.config import Settings
from meterline.shell.runtime import Runtime
from meterline.stack.clickhouse import apply_migrations, connect, default_migrations_dir, with_database
from meterline.stack.topics import ensure_topics
from tests.jobs.reprice_helpers import BOOK_AFTER, BOOK_BEFORE, PERIOD
from tests.jobs.test_bill_corrections import MONTH, _cents, _check_acme
from tests.jobs.test_reprice_plans import expected, setup_plan_usage

pytestmark = pytest.mark.broker

REPO = Path(__file__).resolve().parents[2]
METERLINE = str(Path(sys.executable).parent / "meterline")


@dataclass
class Up:
    settings: Settings
    dsn: str
    ch: Any
    events: list[dict[str, Any]]
    prices: Path  # the corrected catalog: a price raised after the fact

    def cli(self, *args: str) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
        env.update(
            {"METERLINE_DATA_DIR": str(self.settings.data_dir), "METERLINE_CLICKHOUSE_DSN": self.dsn, "COLUMNS": "200"}
        )
        out = subprocess.run([METERLINE, *args], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
        assert out.returncode == 0, f"meterline {' '.join(args)}: {out.stdout}{out.stderr}"
        return out.stdout


@pytest.fixture(scope="module")
def up(kafka_bootstrap: str, chdb_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    prefix = f"t{uuid.uuid4().hex[:8]}."
    ensure_topics(kafka_bootstrap, prefix, 4)
    database = f"test_{uuid.uuid4().hex[:12]}"
    ch = connect(chdb_dsn, database=database)
    apply_migrations(ch, default_migrations_dir())
    dsn = with_database(chdb_dsn, database)
    tmp = tmp_path_factory.mktemp("bill-corrections-up")
    events = setup_plan_usage(ch, tmp, BOOK_AFTER)  # priced low; the correction raises the prices
    prices = tmp / "raised.yaml"
    prices.write_text(yaml.safe_dump(BOOK_BEFORE))
    settings = Settings(
        data_dir=tmp / "data",
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=prefix,
        partitions=4,
        broker_flavor="tansu",
        clickhouse_dsn=dsn,
        api_port=0,
    )
    runtime = Runtime(settings).start()
    try:
        yield Up(settings, dsn, ch, events, prices)
    finally:
        for worker in runtime.workers:
            worker.kill()
        runtime.stop()
        ch.command(f"DROP DATABASE IF EXISTS `{database}` SYNC")
        ch.close()


def test_bill_preview_and_statement_through_a_running_up_show_the_correction(up: Up) -> None:
    old, new = expected(up.events, BOOK_AFTER), expected(up.events, BOOK_BEFORE)
    before = json.loads(up.cli("bill", "preview", "acme", "--period", MONTH, "--format", "json"))
    assert before["total"] == _cents(old["acme"]["payg"] + old["acme"]["bill"]) and before["corrections"] == []

    applied = json.loads(
        up.cli("reprice", "--period", PERIOD, "--reason", "late price", "--prices", str(up.prices), "--format", "json")
    )
    cid = applied["applied"]["correction_id"]
    assert cid and not applied["applied"]["noop"]

    # bill preview through up's read-only SQL API: the re-rated bill, with the correction lines
    _check_acme(
        json.loads(up.cli("bill", "preview", "acme", "--period", MONTH, "--format", "json")),
        old,
        new,
        cid,
        "late price",
    )
    # the pay-per-token statement, forwarded into up: usage as priced + the correction table
    csv_text = up.cli("statement", "initech", "--period", MONTH, "--format", "csv")
    usage_part, _, corr_part = csv_text.partition("\n\n")
    rows = [r.split(",") for r in corr_part.strip().splitlines()]
    assert rows[0] == ["correction_id", "reason", "day", "project", "provider", "model", "currency", "charge"]
    assert {(r[0], r[1]) for r in rows[1:]} == {(cid, "late price")}
    assert sum(Decimal(r[-1]) for r in rows[1:]) == new["initech"]["payg"] - old["initech"]["payg"] > 0
    assert sum(Decimal(r.split(",")[-1]) for r in usage_part.strip().splitlines()[1:]) == old["initech"]["payg"]
