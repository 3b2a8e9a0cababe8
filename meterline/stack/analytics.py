"""Read-only SQL over the analytics tables, and exact formatting of the result.

Backs ``meterline sql`` and the HTTP API's SQL endpoint. Contract of :func:`run_readonly`:

* **Enforced by the engine, not by a hand parser.** (a) The query runs on a connection with
  ``readonly=1``: INSERT, ALTER, DROP, CREATE, TRUNCATE, OPTIMIZE, SET, SYSTEM and the
  file/url/executable/remote table functions fail in the engine. (b) chDB under ``readonly=1``
  still runs ``SELECT … INTO OUTFILE`` (it writes a file), ``KILL QUERY`` and several
  ``;``-separated statements, so before running, ClickHouse itself parses the text
  (``formatQuery``: one statement only, every quoting form including ``$$…$$``) and the canonical
  text's ``EXPLAIN AST`` must have a read statement at its root and no output file
  (:func:`check_readonly_sql`). The canonical text is what runs.
* **Resource limits** (:class:`SqlLimits`, from ``METERLINE_SQL_MAX_EXECUTION_TIME_S``,
  ``METERLINE_SQL_MAX_MEMORY_USAGE_BYTES``, ``METERLINE_SQL_MAX_RESULT_ROWS``,
  ``METERLINE_SQL_MAX_RESULT_BYTES``): ``max_execution_time``, ``max_memory_usage``,
  ``max_result_rows`` and ``max_result_bytes`` (overflow mode ``throw``) are set on the read-only
  connection before ``readonly=1``, so a query cannot lift them. A query over a limit fails with
  ``sql_limit_exceeded``; in particular no query holds the embedded engine (and the sinks
  waiting for it) longer than ``max_execution_time``.
* **chDB detail.** A per-query ``readonly`` setting sticks to a chDB connection handle (it cannot be
  reset afterwards), which would make the caller's client read-only forever. So for a chDB client the
  query runs on a sibling client over the same engine path and database, created once per limits
  with the limits and ``readonly=1`` and cached per caller client. Other clients (HTTP) get the
  limits and ``readonly=1`` per query.
* Rejections raise :class:`~meterline.core.errors.InputError` (``reason_code='sql_not_readonly'``,
  ``'sql_limit_exceeded'``, or ``'sql_error'`` for an engine error such as a syntax error or a write the engine refused).
* Returns ``(columns, rows)``; Decimals stay :class:`~decimal.Decimal` (exact), and naive datetimes
  that chDB returns for ``DateTime64(3, 'UTC')`` columns are made timezone-aware UTC.

:func:`format_result` renders ``table``, ``csv`` or ``json``; Decimals are printed in plain
fixed-point notation with every stored digit (``json``: as strings), datetimes in ISO 8601 UTC,
bytes as hex, NULL as empty (``table``/``csv``) or ``null`` (``json``).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Literal
from uuid import UUID

from meterline.core.errors import InputError

__all__ = ["ALLOWED_STATEMENTS", "DEFAULT_LIMITS", "SqlLimits", "check_readonly_sql", "format_result", "run_readonly"]

# Root nodes of ClickHouse's AST (``EXPLAIN AST``) that may run: the read statements.
ALLOWED_STATEMENTS: frozenset[str] = frozenset(
    {
        "SelectWithUnionQuery",
        "SelectIntersectExceptQuery",
        "Explain",
        "ShowTables",
        "ShowColumns",
        "ShowIndexes",
        "DescribeQuery",
        "ExistsTableQuery",
        "ExistsDatabaseQuery",
        "ExistsDictionaryQuery",
        "ExistsViewQuery",
        "ShowCreateTableQuery",
        "ShowCreateViewQuery",
        "ShowCreateDatabaseQuery",
        "ShowCreateDictionaryQuery",
    }
)
# Table functions that reach outside the database (read or write); refused even though readonly=1
# already blocks them in the engine (defence in depth, and a clearer error).
_EXTERNAL_FUNCTIONS: frozenset[str] = frozenset(
    {
        "file",
        "url",
        "urlcluster",
        "s3",
        "s3cluster",
        "gcs",
        "hdfs",
        "hdfscluster",
        "azureblobstorage",
        "azureblobstoragecluster",
        "remote",
        "remotesecure",
        "cluster",
        "clusterallreplicas",
        "mysql",
        "postgresql",
        "sqlite",
        "mongodb",
        "redis",
        "jdbc",
        "odbc",
        "executable",
        "input",
        "iceberg",
        "deltalake",
        "hudi",
        "fuzzjson",
        "fuzzquery",
        "filecluster",
        "ytsaurus",
        "arrowflight",
    }
)
# ClickHouse error codes of the resource limits below.
_LIMIT_CODES = {159: "max_execution_time", 241: "max_memory_usage", 396: "max_result_rows/max_result_bytes"}

_readonly_siblings: weakref.WeakKeyDictionary[Any, dict[SqlLimits, Any]] = weakref.WeakKeyDictionary()
_siblings_lock = threading.Lock()

Format = Literal["table", "csv", "json"]


@dataclass(frozen=True)
class SqlLimits:
    """Resource limits of one read-only query, enforced by the engine (``METERLINE_SQL_*`` settings).

    They are set on the read-only connection *before* ``readonly=1``, so a query cannot lift them
    (``SETTINGS max_execution_time=0`` inside the query is refused by the engine in readonly mode).
    """

    max_execution_time_s: int = 30
    max_memory_usage_bytes: int = 1024**3
    max_result_rows: int = 100_000
    max_result_bytes: int = 64 * 1024**2

    @classmethod
    def from_settings(cls, settings: Any) -> SqlLimits:
        return cls(
            settings.sql_max_execution_time_s,
            settings.sql_max_memory_usage_bytes,
            settings.sql_max_result_rows,
            settings.sql_max_result_bytes,
        )

    def engine_settings(self) -> dict[str, Any]:
        """Engine settings, ``readonly`` LAST (once it is 1 no other setting may change)."""
        return {
            "max_execution_time": self.max_execution_time_s,
            "timeout_overflow_mode": "throw",
            "max_memory_usage": self.max_memory_usage_bytes,
            "max_result_rows": self.max_result_rows,
            "max_result_bytes": self.max_result_bytes,
            "result_overflow_mode": "throw",
            "readonly": 1,
        }


DEFAULT_LIMITS = SqlLimits()


def _reject(message: str) -> InputError:
    return InputError(message, reason_code="sql_not_readonly")


def _first_line(exc: BaseException) -> str:
    return str(exc).split("\n", 1)[0]


def check_readonly_sql(
    runner: Any, sql: str, parameters: Mapping[str, Any] | None = None, settings: Mapping[str, Any] | None = None
) -> str:
    """The statement to run, as ClickHouse itself formats it, if ``sql`` is ONE read-only statement
    without ``INTO OUTFILE``; else InputError ``sql_not_readonly``.

    No hand parser: ClickHouse parses the text (``formatQuery``, which refuses multi-statements and
    understands every quoting form, ``$$…$$`` included), and the structure of the canonical text is
    read from ``EXPLAIN AST``: the root must be a read statement (:data:`ALLOWED_STATEMENTS`), none
    of the root's direct children may be a literal (that is the ``INTO OUTFILE`` path and its
    compression), and no table function may reach outside the database. ``runner`` should be the
    read-only client: neither step executes the statement.
    """
    if not sql.strip():
        raise _reject("empty SQL statement")
    from clickhouse_connect.driver.exceptions import DatabaseError

    params = dict(parameters or {})
    try:
        canonical = runner.query(
            "SELECT formatQuery({q:String})", parameters={"q": sql}, settings=dict(settings or {}) or None
        ).result_rows[0][0]
    except DatabaseError as exc:
        raise _reject(f"not one parseable SQL statement: {_first_line(exc)}") from exc
    try:
        lines = [
            str(r[0])
            for r in runner.query(
                f"EXPLAIN AST {canonical}", parameters=params, settings=dict(settings or {}) or None
            ).result_rows
        ]
    except DatabaseError as exc:
        raise _reject(f"cannot analyse the statement: {_first_line(exc)}") from exc
    nodes = [(len(line) - len(line.lstrip(" ")), line.strip()) for line in lines if line.strip()]
    if not nodes:
        raise _reject("empty SQL statement")
    root = nodes[0][1].split(" ", 1)[0]
    if root not in ALLOWED_STATEMENTS:
        raise _reject(f"only read statements (SELECT, WITH, SHOW, DESCRIBE, EXPLAIN, EXISTS) are allowed, got {root}")
    for depth, node in nodes[1:]:
        if depth == 1 and node.startswith("Literal "):
            raise _reject("INTO OUTFILE is not allowed")
    for (depth, node), (next_depth, child) in itertools.pairwise(nodes):
        if node.startswith("TableExpression") and next_depth == depth + 1 and child.startswith("Function "):
            name = child.split(" ")[1]
            if name.lower() in _EXTERNAL_FUNCTIONS:
                raise _reject(f"table function {name}() is not allowed")
    return str(canonical)


def _readonly_client(client: Any, limits: SqlLimits) -> tuple[Any, dict[str, Any]]:
    """The client to run on and the per-query settings to pass (see the module docstring)."""
    if type(client).__name__ != "ChdbClient":
        return client, limits.engine_settings()
    with _siblings_lock:
        siblings = _readonly_siblings.setdefault(client, {})
        sibling = siblings.get(limits)
        if sibling is None:
            import clickhouse_connect

            sibling = clickhouse_connect.get_client(
                interface="chdb", path=client.path, database=client.database, settings=limits.engine_settings()
            )
            siblings[limits] = sibling
    if sibling.database != client.database:  # the caller switched databases since
        sibling.database = client.database
    return sibling, {}


def run_readonly(
    client: Any, sql: str, parameters: Mapping[str, Any] | None = None, *, limits: SqlLimits = DEFAULT_LIMITS
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run one read-only statement; return ``(columns, rows)`` with exact Decimals.

    ``parameters`` bind ClickHouse server-side placeholders (``{name:Type}``). Raises InputError
    (``sql_not_readonly`` / ``sql_limit_exceeded`` / ``sql_error``) for refused or failing SQL.
    """
    runner, settings = _readonly_client(client, limits)
    statement = check_readonly_sql(runner, sql, parameters, settings)
    try:
        result = runner.query(statement, parameters=dict(parameters or {}), settings=settings or None)
    except Exception as exc:
        from clickhouse_connect.driver.exceptions import DatabaseError

        if isinstance(exc, DatabaseError):
            code = _error_code(exc)
            if code == 164:
                raise InputError(_first_line(exc), reason_code="sql_not_readonly") from exc
            if code in _LIMIT_CODES:
                raise InputError(
                    f"query stopped by the {_LIMIT_CODES[code]} limit: {_first_line(exc)}",
                    reason_code="sql_limit_exceeded",
                ) from exc
            raise InputError(_first_line(exc), reason_code="sql_error") from exc
        raise
    rows = [tuple(_aware(v) for v in row) for row in result.result_rows]
    return list(result.column_names), rows


def _error_code(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    m = re.search(r"Code: (\d+)\.", str(exc))
    return int(m.group(1)) if m else None


def _aware(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


# --------------------------------------------------------------------------- formatting


def _text(value: Any) -> str:
    """One value as exact text; NULL as ''."""
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, datetime):
        value = _aware(value).astimezone(UTC)
        text = value.isoformat(timespec="milliseconds" if value.microsecond else "seconds")
        return text.replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(_jsonable(value), ensure_ascii=False)
    return str(value)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {_text(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (Decimal, datetime, date, bytes, bytearray, UUID, IPv4Address, IPv6Address)):
        return _text(value)
    return str(value)


def format_result(columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: Format = "table") -> str:
    """Render a result. ``json`` is a list of objects (Decimals as strings); ``csv`` has a header row."""
    if fmt == "json":
        return json.dumps([{c: _jsonable(v) for c, v in zip(columns, row)} for row in rows], ensure_ascii=False)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_text(v) for v in row])
        return buf.getvalue()
    if fmt == "table":
        cells = [[_text(v) for v in row] for row in rows]
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
        numeric = [
            bool(rows) and all(isinstance(r[i], (int, Decimal)) or r[i] is None for r in rows)
            for i in range(len(columns))
        ]

        def line(values: Sequence[str]) -> str:
            return " | ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()

        out = [line(list(columns)), "-+-".join("-" * w for w in widths)]
        out.extend(line(r) for r in cells)
        out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
        return "\n".join(out) + "\n"
    raise ValueError(f"unknown format {fmt!r}: expected table, csv or json")
