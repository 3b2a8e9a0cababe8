"""``meterline reprice`` while ``meterline up`` owns the embedded engine: forwarded to
``POST /v1/admin/run`` and run inside the runtime (dry run and apply, every flag).

A real :class:`meterline.shell.runtime.Runtime` (the session's Tansu broker, this pytest process's
chDB engine, a faust worker with the credit agent, the sinks, the HTTP API) runs for the module.
``meterline reprice`` is started through the installed console script as its own process: it
cannot open the engine (the runtime holds it), so it only succeeds by running inside the runtime.
The ledger commands it sends are applied by the runtime's real credit agent and land in
``ledger_entries`` through the ledger sink.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobs.reprice.compute import Filters, plan_reprice
from meterline.core.config import Settings
from meterline.shell.cli_reprice import _json
from meterline.shell.runtime import Runtime
from meterline.stack.clickhouse import apply_migrations, connect, default_migrations_dir, with_database
from meterline.stack.topics import ensure_topics
from tests.jobs.reprice_helpers import BOOK_AFTER, BOOK_BEFORE, PERIOD, T0, engine
from tests.jobs.test_reprice_plans import expected, setup_plan_usage

pytestmark = pytest.mark.broker

REPO = Path(__file__).resolve().parents[2]
METERLINE = str(Path(sys.executable).parent / "meterline")
FILTERS = Filters(T0, T0 + 31 * 86400)


@dataclass
class Up:
    runtime: Runtime
    settings: Settings
    dsn: str
    ch: Any
    events: list[dict[str, Any]]
    prices: Path  # the catalog as corrected: here, a price RAISED after the fact

    def cli(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
        env.update(
            {"METERLINE_DATA_DIR": str(self.settings.data_dir), "METERLINE_CLICKHOUSE_DSN": self.dsn, "COLUMNS": "200"}
        )
        env.update(extra)
        return subprocess.run([METERLINE, *args], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.fixture(scope="module")
def up(kafka_bootstrap: str, chdb_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    prefix = f"t{uuid.uuid4().hex[:8]}."
    ensure_topics(kafka_bootstrap, prefix, 4)
    database = f"test_{uuid.uuid4().hex[:12]}"
    ch = connect(chdb_dsn, database=database)
    apply_migrations(ch, default_migrations_dir())
    dsn = with_database(chdb_dsn, database)
    tmp = tmp_path_factory.mktemp("reprice-up")
    # usage priced with the LOW catalog; the corrected catalog raises prices (extra debits: the
    # fresh ledgers of the runtime's credit agent take them without earlier history)
    events = setup_plan_usage(ch, tmp, BOOK_AFTER)
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
        yield Up(runtime, settings, dsn, ch, events, prices)
    finally:
        for worker in runtime.workers:
            worker.kill()
        runtime.stop()
        ch.command(f"DROP DATABASE IF EXISTS `{database}` SYNC")
        ch.close()


def test_reprice_runs_inside_a_running_up(up: Up) -> None:
    old, new = expected(up.events, BOOK_AFTER), expected(up.events, BOOK_BEFORE)
    assert new["acme"]["overage"] > old["acme"]["overage"]

    # dry run, JSON: forwarded, and identical to the same re-rating computed here on up's engine
    dry = up.cli("reprice", "--period", PERIOD, "--dry-run", "--prices", str(up.prices), "--format", "json")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "meterline up is running" in dry.stderr and "\x1b[" not in dry.stderr + dry.stdout
    doc = json.loads(dry.stdout)
    assert doc == json.loads(json.dumps(_json(plan_reprice(up.ch, engine(BOOK_BEFORE), FILTERS), None)))
    got = {c["customer_id"]: c for c in doc["customers"]}
    for cust in ("acme", "globex", "initech"):
        o, n = old[cust]["payg"] + old[cust]["bill"], new[cust]["payg"] + new[cust]["bill"]
        assert (Decimal(got[cust]["old_charge"]), Decimal(got[cust]["new_charge"])) == (o, n), cust
        assert Decimal(got[cust]["delta"]) == n - o and isinstance(got[cust]["delta"], str)
    [acme_plan] = got["acme"]["plans"]
    assert acme_plan["plans"] == ["amt@1"] and acme_plan["period_start"] == "2025-12-05T12:30:00Z"
    assert (
        Decimal(acme_plan["old_bill"]) == old["acme"]["bill"] and Decimal(acme_plan["new_bill"]) == new["acme"]["bill"]
    )
    assert Decimal(acme_plan["delta"]) == new["acme"]["bill"] - old["acme"]["bill"]
    assert Decimal(acme_plan["ledger_delta"]) == new["acme"]["overage"] - old["acme"]["overage"]
    [globex_plan] = got["globex"]["plans"]
    assert Decimal(globex_plan["delta"]) == 0 and Decimal(globex_plan["old_bill"]) == new["globex"]["bill"]
    # filters and the table format go through too
    one = up.cli(
        "reprice",
        "--period",
        PERIOD,
        "--dry-run",
        "--prices",
        str(up.prices),
        "--customer",
        "acme",
        "--model",
        "anthropic/claude-3-5-sonnet",
        "--format",
        "json",
    )
    assert one.returncode == 0, one.stderr
    only = json.loads(one.stdout)["customers"]
    assert [c["customer_id"] for c in only] == ["acme"]
    assert {m["model"] for m in only[0]["models"]} == {"anthropic/claude-3-5-sonnet"}
    table = up.cli("reprice", "--period", PERIOD, "--dry-run", "--prices", str(up.prices))
    assert table.returncode == 0 and "plan amt@1" in table.stdout and "acme" in table.stdout, table.stderr
    bad = up.cli("reprice", "--period", "nope", "--dry-run", "--prices", str(up.prices))
    assert bad.returncode == 2 and "period" in bad.stderr
    assert up.ch.query("SELECT count() FROM usage_corrections").result_rows[0][0] == 0  # dry runs write nothing

    # apply: inside up, with the caller recorded; the ledger commands reach up's credit agent
    applied = up.cli(
        "reprice",
        "--period",
        PERIOD,
        "--reason",
        "late price",
        "--prices",
        str(up.prices),
        "--format",
        "json",
        METERLINE_OPERATOR="alice",
    )
    assert applied.returncode == 0, applied.stdout + applied.stderr
    adoc = json.loads(applied.stdout)
    assert adoc["applied"]["correction_id"] and not adoc["applied"]["noop"] and adoc["applied"]["ledger_commands"] > 0
    assert {k: v for k, v in adoc.items() if k != "applied"} == doc  # the same figures as the dry run
    run = up.ch.query("SELECT ran_by, reason, command, status FROM reprice_runs FINAL").result_rows
    assert run == [
        (
            "alice",
            "late price",
            f"meterline reprice --period {PERIOD} --reason late price --format json --prices {up.prices}",
            "done",
        )
    ]
    plan_rows = up.ch.query(
        "SELECT customer_id, charge, ledger_charge FROM usage_corrections WHERE kind = 'plan'"
    ).result_rows
    assert plan_rows == [
        ("acme", new["acme"]["bill"] - old["acme"]["bill"], new["acme"]["overage"] - old["acme"]["overage"])
    ]
    want = {
        "acme": (new["acme"]["payg"] - old["acme"]["payg"]) + (new["acme"]["overage"] - old["acme"]["overage"]),
        "initech": new["initech"]["payg"] - old["initech"]["payg"],
    }
    deadline = time.monotonic() + 180
    while True:
        debits = {
            str(c): Decimal(a)
            for c, a in up.ch.query(
                "SELECT customer_id, sum(amount) FROM ledger_entries FINAL WHERE kind = 'debit' "
                "AND startsWith(event_id, 'reprice:') GROUP BY customer_id"
            ).result_rows
        }
        if debits == want or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert debits == want  # the real credit agent debited exactly the re-rated difference; globex nothing

    # a second apply through up: nothing to correct
    again = up.cli("reprice", "--period", PERIOD, "--prices", str(up.prices), "--format", "json")
    assert again.returncode == 0, again.stderr
    adoc2 = json.loads(again.stdout)
    assert adoc2["applied"]["noop"] and adoc2["applied"]["correction_id"] is None
    assert all(Decimal(c["delta"]) == 0 for c in adoc2["customers"])
    assert up.ch.query("SELECT count() FROM reprice_runs FINAL").result_rows[0][0] == 1
