"""meterline.stack.analytics: read-only SQL against the real embedded engine, exact formatting."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from meterline.core.errors import InputError
from meterline.stack.analytics import check_readonly_sql, format_result, run_readonly
from pipeline.sink import PRICED_COLUMNS, priced_row
from tests.sink.helpers import make_events, picos, scalar


@pytest.fixture
def seeded(clickhouse):
    events = make_events(40, seed=1)
    clickhouse.insert(
        "usage_priced", [priced_row(e, partition=0, offset=0) for e in events], column_names=PRICED_COLUMNS
    )
    return events


REFUSED = [
    "INSERT INTO usage_priced (event_id, customer_id) VALUES ('x', 'y')",
    "DROP TABLE usage_priced",
    "ALTER TABLE usage_priced DELETE WHERE 1",
    "CREATE TABLE evil (a Int8) ENGINE = Memory",
    "TRUNCATE TABLE usage_priced",
    "OPTIMIZE TABLE usage_priced FINAL",
    "SET readonly = 0",
    "KILL QUERY WHERE 1",
    "SYSTEM FLUSH LOGS",
    "SELECT 1; DROP TABLE usage_priced",
    "SELECT 1; SELECT 2",
    "SELECT * FROM usage_priced INTO OUTFILE '/tmp/meterline-outfile-test.csv'",
    "SELECT * FROM file('/etc/hostname', 'LineAsString')",
    "SELECT * FROM url('http://127.0.0.1:9/x', 'CSV', 'a String')",
    "INSERT INTO FUNCTION file('/tmp/meterline-w.csv', 'CSV') SELECT 1",
    "SELECT 'unterminated",
    "",
    "   -- only a comment",
]
ENGINE_REFUSED = [
    "INSERT INTO usage_priced (event_id, customer_id) VALUES ('x', 'y')",
    "DROP TABLE usage_priced",
    "ALTER TABLE usage_priced DELETE WHERE 1",
    "CREATE TABLE evil (a Int8) ENGINE = Memory",
    "SELECT * FROM file('/etc/hostname', 'LineAsString')",
]


def test_writes_and_multi_statements_are_refused(clickhouse, seeded):
    before = scalar(clickhouse, "SELECT count() FROM usage_priced")
    for sql in REFUSED:
        with pytest.raises(InputError) as info:
            run_readonly(clickhouse, sql)
        assert info.value.reason_code == "sql_not_readonly", sql
    assert scalar(clickhouse, "SELECT count() FROM usage_priced") == before
    assert not Path("/tmp/meterline-outfile-test.csv").exists()


def test_the_engine_itself_refuses_writes_on_the_readonly_path(clickhouse, seeded, monkeypatch):
    """Second lock: with the text guard switched off, readonly=1 in the engine still refuses."""
    import meterline.stack.analytics as analytics

    monkeypatch.setattr(analytics, "check_readonly_sql", lambda runner, s, *a: s)
    before = scalar(clickhouse, "SELECT count() FROM usage_priced")
    for sql in ENGINE_REFUSED:
        with pytest.raises(InputError) as info:
            run_readonly(clickhouse, sql)
        assert info.value.reason_code == "sql_not_readonly", sql
    assert scalar(clickhouse, "SELECT count() FROM usage_priced") == before
    assert "evil" not in {r[0] for r in clickhouse.query("SHOW TABLES").result_rows}


def test_callers_client_stays_writable(clickhouse, seeded):
    run_readonly(clickhouse, "SELECT count() FROM usage_priced")
    clickhouse.command("CREATE TABLE scratch (a UInt8) ENGINE = Memory")
    clickhouse.command("INSERT INTO scratch VALUES (1)")
    assert scalar(clickhouse, "SELECT count() FROM scratch") == 1


def test_reads_are_exact_and_parameterised(clickhouse, seeded):
    events = seeded
    customer = events[0]["customer_id"]
    cols, rows = run_readonly(
        clickhouse,
        "-- spend of one customer\nSELECT customer_id, sum(cost) AS cost, sum(charge) AS charge, min(occurred_at) AS first"
        " FROM usage_priced WHERE customer_id = {c:String} GROUP BY customer_id;",
        {"c": customer},
    )
    assert cols == ["customer_id", "cost", "charge", "first"]
    mine = [e for e in events if e["customer_id"] == customer]
    assert rows == [
        (
            customer,
            picos(sum(e["cost_picos"] for e in mine)),
            picos(sum(e["charge_picos"] for e in mine)),
            datetime(1970, 1, 1, tzinfo=UTC).fromtimestamp(min(e["occurred_at"] for e in mine) / 1000, UTC),
        )
    ]
    assert isinstance(rows[0][1], Decimal) and rows[0][3].tzinfo is not None
    for sql in (
        "SHOW TABLES",
        "DESCRIBE TABLE usage_priced",
        "EXPLAIN SELECT 1",
        "WITH 2 AS x SELECT x",
        "(SELECT 1)",
        "SELECT 'a;b' AS s",
        "SELECT 1 -- trailing ; comment",
    ):
        run_readonly(clickhouse, sql)


def test_engine_errors_become_input_errors(clickhouse):
    with pytest.raises(InputError) as info:
        run_readonly(clickhouse, "SELECT no_such_column FROM usage_priced")
    assert info.value.reason_code == "sql_error"


def test_check_readonly_sql_strips_one_trailing_semicolon(clickhouse):
    assert check_readonly_sql(clickhouse, "SELECT 1;  ") == "SELECT 1"
    assert check_readonly_sql(clickhouse, "select 'x; y'") == "SELECT 'x; y'"
    with pytest.raises(InputError):
        check_readonly_sql(clickhouse, "SELECT 1; SELECT 2")
    with pytest.raises(InputError):
        check_readonly_sql(clickhouse, "SELECT 1 /* unterminated")


def test_format_result_prints_decimals_exactly():
    cols = ["customer_id", "cost", "zero", "at", "day", "payload", "missing"]
    rows = [
        (
            "c1",
            Decimal("12345678901234.123456789012"),
            Decimal(0).scaleb(-12),
            datetime(2026, 1, 2, 3, 4, 5, 678000),
            datetime(2026, 1, 2).date(),
            b"\xc3\x01",
            None,
        )
    ]
    as_json = json.loads(format_result(cols, rows, "json"))
    assert as_json == [
        {
            "customer_id": "c1",
            "cost": "12345678901234.123456789012",
            "zero": "0.000000000000",
            "at": "2026-01-02T03:04:05.678Z",
            "day": "2026-01-02",
            "payload": "c301",
            "missing": None,
        }
    ]
    parsed = list(csv.reader(io.StringIO(format_result(cols, rows, "csv"))))
    assert parsed[0] == cols
    assert parsed[1][1:3] == ["12345678901234.123456789012", "0.000000000000"] and parsed[1][6] == ""
    table = format_result(cols, rows, "table")
    assert "12345678901234.123456789012" in table and "(1 row)" in table and "E-12" not in table
    with pytest.raises(ValueError):
        format_result(cols, rows, "xml")  # type: ignore[arg-type]


def test_format_result_round_trips_engine_output(clickhouse, seeded):
    cols, rows = run_readonly(clickhouse, "SELECT sum(cost) AS total FROM usage_priced")
    text = json.loads(format_result(cols, rows, "json"))[0]["total"]
    assert Decimal(text) == picos(sum(e["cost_picos"] for e in seeded))
