"""High (issue #20): POST /v1/sql is read-only in the engine, one statement, no INTO OUTFILE, and
bounded in time, memory and result size (METERLINE_SQL_* limits) — on the real `up` stack."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.security.conftest import SQL_MAX_RESULT_ROWS, Stack

pytestmark = pytest.mark.broker


def _sql(stack: Stack, query: str, **kw: Any) -> httpx.Response:
    return stack.http.post("/v1/sql", headers=stack.admin, json={"query": query, **kw}, timeout=120)


def _refused(r: httpx.Response, code: str) -> str:
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == code, r.text
    return str(r.json()["error"]["message"])


def test_dollar_quoted_into_outfile_and_multi_statements_are_refused(stack: Stack, tmp_path: Path) -> None:
    target = tmp_path / "evil.pth"
    pth = (
        "SELECT l FROM (SELECT $$'$$ AS z, $$\nimport os; os.system('true')\n$$ AS l) INTO OUTFILE '"
        + str(target)
        + "' --'"
    )
    assert "INTO OUTFILE" in _refused(_sql(stack, pth), "sql_not_readonly")
    assert not target.exists()
    for variant in (
        f"SELECT 1 INTO OUTFILE '{target}'",
        f"(SELECT 1) INTO OUTFILE '{target}' FORMAT CSV",
        f"WITH 1 AS x SELECT x INTO OUTFILE '{target}' APPEND",
        f"EXPLAIN SELECT 1 INTO OUTFILE '{target}'",
    ):
        _refused(_sql(stack, variant), "sql_not_readonly")
    assert not target.exists()

    # Two statements hidden behind a $$ string: ClickHouse's own parser sees both, and refuses.
    _refused(_sql(stack, "SELECT $$'$$ AS a; SELECT 2 AS b --'"), "sql_not_readonly")
    _refused(_sql(stack, "SELECT 1; SELECT 2"), "sql_not_readonly")
    # Not a read statement, or a query trying to lift its limits.
    _refused(_sql(stack, "KILL QUERY WHERE 1"), "sql_not_readonly")
    _refused(_sql(stack, "SELECT 1 SETTINGS max_execution_time = 0"), "sql_not_readonly")
    _refused(_sql(stack, "SELECT * FROM file('/etc/hostname', 'LineAsString')"), "sql_not_readonly")

    # Reads still work, $$ strings and parameters included.
    r = _sql(stack, "SELECT $$a;b$$ AS s, {n:UInt8} + 1 AS n", parameters={"n": 41})
    assert r.status_code == 200, r.text
    assert r.json() == {"columns": ["s", "n"], "rows": [["a;b", 42]]}


def test_time_memory_and_result_limits_stop_a_query_and_free_the_engine(stack: Stack) -> None:
    # Far more than the limit of 2 s of work: stopped by the engine, and the engine is free after.
    msg = _refused(_sql(stack, "SELECT count() FROM numbers(100000000000)"), "sql_limit_exceeded")
    assert "max_execution_time" in msg
    r = _sql(stack, "SELECT count() FROM usage_priced")
    assert r.status_code == 200, r.text

    msg = _refused(_sql(stack, "SELECT length(groupArray(number)) FROM numbers(30000000)"), "sql_limit_exceeded")
    assert "max_memory_usage" in msg
    msg = _refused(_sql(stack, f"SELECT number FROM numbers({SQL_MAX_RESULT_ROWS * 100})"), "sql_limit_exceeded")
    assert "max_result_rows" in msg
    r = _sql(stack, f"SELECT number FROM numbers({SQL_MAX_RESULT_ROWS // 2})")
    assert r.status_code == 200 and len(r.json()["rows"]) == SQL_MAX_RESULT_ROWS // 2
