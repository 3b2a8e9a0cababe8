"""Read-only SQL over the analytics tables, and exact formatting of the result.

Backs ``meterline sql`` and the HTTP API's SQL endpoint. Contract of :func:`run_readonly`:

* **Two locks, both always on.** (a) The engine runs the query with ``readonly=1``: INSERT, ALTER,
  DROP, CREATE, TRUNCATE, OPTIMIZE, SET, SYSTEM and the file/url/executable table functions fail in
  the engine (checked against chDB 26.9 through clickhouse-connect 1.12). (b) Before that, the text
  itself must be one statement starting with SELECT, WITH, SHOW, DESCRIBE/DESC, EXPLAIN or EXISTS,
  with no ``INTO OUTFILE`` and no external table function. (b) exists because chDB under
  ``readonly=1`` still runs ``SELECT … INTO OUTFILE`` (it writes a file), ``KILL QUERY`` and several
  ``;``-separated statements.
* **chDB detail.** A per-query ``readonly`` setting sticks to a chDB connection handle (it cannot be
  reset afterwards), which would make the caller's client read-only forever. So for a chDB client the
  query runs on a sibling client over the same engine path and database, created once with
  ``readonly=1`` and cached per caller client. Other clients (HTTP) get ``readonly=1`` per query.
* Rejections raise :class:`~meterline.errors.InputError` (``reason_code='sql_not_readonly'``, or
  ``'sql_error'`` for an engine error such as a syntax error or a write the engine refused).
* Returns ``(columns, rows)``; Decimals stay :class:`~decimal.Decimal` (exact), and naive datetimes
  that chDB returns for ``DateTime64(3, 'UTC')`` columns are made timezone-aware UTC.

:func:`format_result` renders ``table``, ``csv`` or ``json``; Decimals are printed in plain
fixed-point notation with every stored digit (``json``: as strings), datetimes in ISO 8601 UTC,
bytes as hex, NULL as empty (``table``/``csv``) or ``null`` (``json``).
"""

from __future__ import annotations

import csv
import io
import json
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from datetime import date, datetime, timezone
from decimal import Decimal
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Literal
from uuid import UUID

from meterline.errors import InputError

__all__ = ["ALLOWED_STATEMENTS", "check_readonly_sql", "format_result", "run_readonly"]

ALLOWED_STATEMENTS: frozenset[str] = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "EXISTS"})
# Table functions that reach outside the database (read or write); refused even though readonly=1
# already blocks most of them in the engine.
_EXTERNAL_FUNCTIONS: frozenset[str] = frozenset({
    "file", "url", "urlcluster", "s3", "s3cluster", "gcs", "hdfs", "hdfscluster", "azureblobstorage",
    "azureblobstoragecluster", "remote", "remotesecure", "cluster", "clusterallreplicas", "mysql",
    "postgresql", "sqlite", "mongodb", "redis", "jdbc", "odbc", "executable", "input", "iceberg",
    "deltalake", "hudi", "fuzzjson", "fuzzquery", "filecluster", "ytsaurus", "arrowflight",
})  # fmt: skip

# One scanner for the bits of SQL that matter here: comments, quoted strings/identifiers, words, ';'.
_TOKEN = re.compile(
    r"""(?P<ws>\s+)
      | (?P<line_comment>--[^\n]*)
      | (?P<block_comment>/\*.*?\*/)
      | (?P<string>'(?:[^'\\]|\\.|'')*')
      | (?P<quoted>"(?:[^"\\]|\\.|"")*"|`(?:[^`\\]|\\.|``)*`)
      | (?P<word>[A-Za-z_][A-Za-z0-9_$]*)
      | (?P<semi>;)
      | (?P<other>.)""",
    re.VERBOSE | re.DOTALL,
)

_readonly_siblings: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_siblings_lock = threading.Lock()

Format = Literal["table", "csv", "json"]


def _reject(message: str) -> InputError:
    return InputError(message, reason_code="sql_not_readonly")


def check_readonly_sql(sql: str) -> str:
    """Return ``sql`` without a trailing ``;`` if it is one read-only statement; else raise InputError."""
    words: list[str] = []
    end = len(sql)
    semicolon_at: int | None = None
    for m in _TOKEN.finditer(sql):
        kind = m.lastgroup
        if kind in ("ws", "line_comment", "block_comment"):
            continue
        if semicolon_at is not None:
            raise _reject("only one SQL statement is allowed")
        if kind == "semi":
            semicolon_at = m.start()
        elif kind == "word":
            words.append(m.group().upper())
        elif kind == "other" and m.group() == "/" and sql.startswith("/*", m.start()):
            raise _reject("unterminated comment")
        elif kind == "other" and m.group() in "'\"`":
            raise _reject("unterminated quoted string or identifier")
    if semicolon_at is not None:
        end = semicolon_at
    if not words:
        raise _reject("empty SQL statement")
    first_token = next(m for m in _TOKEN.finditer(sql) if m.lastgroup not in ("ws", "line_comment", "block_comment"))
    first = words[0] if first_token.lastgroup == "word" else "("
    if first not in ALLOWED_STATEMENTS and first != "(":
        raise _reject(f"only {', '.join(sorted(ALLOWED_STATEMENTS))} statements are allowed, got {first}")
    for a, b in zip(words, words[1:]):
        if a == "INTO" and b == "OUTFILE":
            raise _reject("INTO OUTFILE is not allowed")
    for m in re.finditer(r"\b([A-Za-z_][A-Za-z0-9_]*)\s*\(", _strip_strings(sql)):
        if m.group(1).lower() in _EXTERNAL_FUNCTIONS:
            raise _reject(f"table function {m.group(1)}() is not allowed")
    return sql[:end]


def _strip_strings(sql: str) -> str:
    """``sql`` with comments and string literals blanked (so names inside them do not match)."""
    parts = []
    for m in _TOKEN.finditer(sql):
        parts.append(" " if m.lastgroup in ("line_comment", "block_comment", "string") else m.group())
    return "".join(parts)


def _readonly_client(client: Any) -> tuple[Any, dict[str, Any]]:
    """The client to run on and the per-query settings to pass (see the module docstring)."""
    if type(client).__name__ != "ChdbClient":
        return client, {"readonly": 1}
    with _siblings_lock:
        sibling = _readonly_siblings.get(client)
        if sibling is None:
            import clickhouse_connect

            sibling = clickhouse_connect.get_client(interface="chdb", path=client.path, database=client.database,
                                                    settings={"readonly": 1})  # fmt: skip
            _readonly_siblings[client] = sibling
    if sibling.database != client.database:  # the caller switched databases since
        sibling.database = client.database
    return sibling, {}


def run_readonly(
    client: Any, sql: str, parameters: Mapping[str, Any] | None = None
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run one read-only statement; return ``(columns, rows)`` with exact Decimals.

    ``parameters`` bind ClickHouse server-side placeholders (``{name:Type}``). Raises InputError
    (``sql_not_readonly`` / ``sql_error``) for refused or failing SQL.
    """
    statement = check_readonly_sql(sql)
    runner, settings = _readonly_client(client)
    try:
        result = runner.query(statement, parameters=dict(parameters or {}), settings=settings or None)
    except Exception as exc:
        from clickhouse_connect.driver.exceptions import DatabaseError

        if isinstance(exc, DatabaseError):
            code = "sql_not_readonly" if getattr(exc, "code", None) == 164 else "sql_error"
            raise InputError(str(exc).split("\n", 1)[0], reason_code=code) from exc
        raise
    rows = [tuple(_aware(v) for v in row) for row in result.result_rows]
    return list(result.column_names), rows


def _aware(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


# --------------------------------------------------------------------------- formatting


def _text(value: Any) -> str:
    """One value as exact text; NULL as ''."""
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, datetime):
        value = _aware(value).astimezone(timezone.utc)
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
        numeric = [bool(rows) and all(isinstance(r[i], (int, Decimal)) or r[i] is None for r in rows)
                   for i in range(len(columns))]  # fmt: skip

        def line(values: Sequence[str]) -> str:
            return " | ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()

        out = [line(list(columns)), "-+-".join("-" * w for w in widths)]
        out.extend(line(r) for r in cells)
        out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
        return "\n".join(out) + "\n"
    raise ValueError(f"unknown format {fmt!r}: expected table, csv or json")
