"""ClickHouse connections (embedded chDB or a server) and the versioned DDL migration runner.

DSNs
----
* ``chdb:///abs/path[?database=NAME]`` — the embedded engine (chdb-core) inside this process,
  driven through clickhouse-connect's chDB backend (never chdb's own Python API).
* ``http(s)://user:pass@host:port[/NAME]`` — a ClickHouse server.

What chDB allows inside ONE process (measured with chdb-core 26.9 / clickhouse-connect 1.12)
-----------------------------------------------------------------------------------------
* **One engine path at a time.** Opening ``chdb:///b`` while any client on ``chdb:///a`` is open
  fails (``EmbeddedServer already initialized with path '/a'``); once every client is closed a
  different path can be opened. :func:`connect` turns that into a ConfigError. Design rule: one
  engine path per process (``settings.resolved_clickhouse_dsn``); isolate tenants/tests by
  ClickHouse DATABASE inside it, never by path.
* **Many clients on the same path** share the engine's data; each has its own handle, so
  ``USE``/``SET`` state (``client.database``, session settings) is per client.
* **Threads:** a client serialises its own calls with a lock, so sharing one client across
  threads is safe but sequential; one client per thread runs concurrently. Both were exercised
  with concurrent inserts + queries without errors.
* **A second process on the same path** is refused by chdb with an opaque
  ``Error initializing EmbeddedServer``. :func:`connect` therefore takes an exclusive,
  non-blocking POSIX lock on ``<path>.meterline.lock`` (it records the owner's PID) and raises a
  clear ConfigError naming the owner. The lock is held for the rest of the process's life (it is
  per process: not inherited by forked children, released by the kernel when the process dies).
* **Time zones:** ``DateTime64(p, 'UTC')`` values read back through chDB arrive as *naive*
  ``datetime`` objects holding UTC wall time (the HTTP backend returns aware ones). Readers must
  treat a naive value from ClickHouse as UTC (``value.replace(tzinfo=timezone.utc)``). The engine's
  reported server time zone is the host process's (``Etc/UTC`` here).

Migrations
----------
``infra/clickhouse/NNNN_name.sql`` files, applied in version order by :func:`apply_migrations`.
A file may hold several statements separated by ``;`` (semicolons inside quotes, backticks and
comments are not separators). Statements must not name a database: they run in the client's
(or the given) database, so the same files build a per-test database. Each applied file is
recorded as ``(version, name, checksum, applied_at)`` in ``schema_migrations``; a re-run applies
nothing, and an applied file whose name or sha256 changed raises ConfigError (add a new
migration instead of editing one). DDL is not transactional: if a statement fails midway the
file is not recorded, so write statements with ``IF NOT EXISTS`` to make a retry safe. Running
the migrator from two processes against one server at once is not supported.

Cluster form (``METERLINE_CLICKHOUSE_CLUSTER=name``)
---------------------------------------------------
The same files, rendered statement by statement by :func:`render_cluster` (there is no second DDL
tree): every ``CREATE TABLE t ... ENGINE = XMergeTree[(args)]`` becomes

* ``t_local ON CLUSTER name`` with ``ReplicatedXMergeTree('/clickhouse/tables/{shard}/{database}/t_local',
  '{replica}'[, args])`` (``{shard}``, ``{replica}`` are the servers' macros), and
* ``t ON CLUSTER name AS t_local ENGINE = Distributed('name', 'db', 't_local', key)``, so every reader
  and writer of the application (sink, API, jobs, views) keeps using ``t`` unchanged and is sharded.
  The sharding key is ``cityHash64(customer_id)`` when the table has that column (a customer's rows,
  hence a replay and its original, share a shard: the Replacing/Summing merges stay exact), else
  ``cityHash64`` of the table's sorting key;

``CREATE MATERIALIZED VIEW ... TO t AS SELECT ... FROM u`` runs ON CLUSTER against ``t_local`` /
``u_local`` (an MV fires on the shard that received the rows and writes there); a plain ``CREATE
VIEW`` runs ON CLUSTER unchanged (it reads the Distributed tables, across shards); ``ALTER TABLE t``
column changes run ON CLUSTER on ``t_local`` and then on ``t``. Any other statement raises
ConfigError: nothing is left unrendered. ``schema_migrations`` becomes one ReplicatedMergeTree
shared by every shard (path without ``{shard}``), so the cluster has one migration record.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

from meterline.core.errors import ClickHouseUnavailable, ConfigError
from meterline.stack.private import private_dir

if TYPE_CHECKING:
    from clickhouse_connect.driver import Client

__all__ = [
    "ClusterDdl",
    "Migration",
    "apply_migrations",
    "connect",
    "default_migrations_dir",
    "dsn_database",
    "load_migrations",
    "pending_migrations",
    "render_cluster",
    "split_statements",
    "with_database",
]

_UNKNOWN_DATABASE = 81
_UNKNOWN_TABLE = 60
_DB_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MIGRATION_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_locks_guard = threading.Lock()
_engine_locks: dict[str, tuple[int, int]] = {}  # realpath -> (owner pid, fd)


# -- DSNs ---------------------------------------------------------------------------------------


def dsn_database(dsn: str) -> str | None:
    """The database a DSN names (``?database=`` for chdb, the path for http), or None."""
    parsed = urlparse(dsn)
    if parsed.scheme == "chdb":
        return dict(parse_qsl(parsed.query)).get("database") or None
    return parsed.path.strip("/").split("/")[0] or None


def with_database(dsn: str, database: str) -> str:
    """The same DSN pointing at ``database`` (chdb: ``?database=``; http: the URL path)."""
    _check_db_name(database)
    parsed = urlparse(dsn)
    if parsed.scheme == "chdb":
        query = dict(parse_qsl(parsed.query))
        query["database"] = database
        return urlunparse(parsed._replace(query=urlencode(query)))
    return urlunparse(parsed._replace(path=f"/{database}"))


def _check_db_name(database: str) -> None:
    if not _DB_NAME_RE.match(database):
        raise ConfigError(f"bad ClickHouse database name {database!r} (letters, digits and '_' only)")


def _chdb_path(dsn: str) -> str:
    parsed = urlparse(dsn)
    if parsed.netloc:
        raise ConfigError(f"embedded ClickHouse DSN must be chdb:///absolute/path, got {dsn!r}")
    if not parsed.path.startswith("/"):
        raise ConfigError(f"embedded ClickHouse DSN needs an absolute path: {dsn!r}")
    return os.path.realpath(parsed.path)


# -- the per-process engine lock ------------------------------------------------------------------


def _acquire_engine_lock(path: str) -> bool:
    """Lock ``<path>.meterline.lock`` for this process; True if newly taken (False: already ours)."""
    with _locks_guard:
        held = _engine_locks.get(path)
        if held is not None and held[0] == os.getpid():
            return False
        lock_path = f"{path}.meterline.lock"
        Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        private_dir(path)  # the engine's files hold billing data: owner only (docs/security.md)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            owner = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise ConfigError(f"cannot lock {lock_path}: {exc}") from exc
            raise ConfigError(
                f"embedded ClickHouse at {path} is owned by process {owner}; while `meterline up` runs, "
                "use its API (meterline sql routes through it)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        _engine_locks[path] = (os.getpid(), fd)
        return True


def _release_engine_lock(path: str) -> None:
    with _locks_guard:
        held = _engine_locks.pop(path, None)
        if held is not None and held[0] == os.getpid():
            with contextlib.suppress(OSError):
                os.close(held[1])  # closing the fd drops the POSIX lock


# -- connect ------------------------------------------------------------------------------------


def connect(dsn: str, *, database: str | None = None, create_database: bool = True) -> Client:
    """A clickhouse-connect client for ``dsn``, using ``database`` (else the DSN's, else default).

    With ``create_database`` the database is created if missing. For ``chdb://`` DSNs the
    engine lock is taken first (see the module docstring). Raises ConfigError for a bad DSN, an
    engine owned by another process, or a second engine path in this process;
    ClickHouseUnavailable when a server cannot be reached.
    """
    import clickhouse_connect
    from clickhouse_connect.driver.exceptions import ClickHouseError, OperationalError

    scheme = urlparse(dsn).scheme
    if scheme not in ("chdb", "http", "https"):
        raise ConfigError(f"ClickHouse DSN must start with chdb://, http:// or https://, got {dsn!r}")
    database = database or dsn_database(dsn)
    if database is not None:
        _check_db_name(database)

    newly_locked = False
    path = ""
    if scheme == "chdb":
        path = _chdb_path(dsn)
        newly_locked = _acquire_engine_lock(path)
        base_dsn = f"chdb://{path}"
    else:
        base_dsn = dsn

    def open_client(db: str | None) -> Client:
        return clickhouse_connect.get_client(dsn=base_dsn, database=db)

    try:
        try:
            client = open_client(database)
        except ClickHouseError as exc:
            if not (create_database and database is not None and _error_code(exc) == _UNKNOWN_DATABASE):
                raise
            client = open_client("default")
            client.command(f"CREATE DATABASE IF NOT EXISTS `{database}`")
            client.database = database
    except OperationalError as exc:
        if newly_locked:
            _release_engine_lock(path)
        raise ClickHouseUnavailable(f"cannot reach ClickHouse at {_redact(dsn)}: {exc}") from exc
    except ClickHouseError as exc:
        if newly_locked:
            _release_engine_lock(path)
        if "already initialized with path" in str(exc):
            raise ConfigError(
                f"this process already runs an embedded ClickHouse engine on another path; chDB allows one "
                f"engine path per process (wanted {path}): use one DSN and separate DATABASEs instead. ({exc})"
            ) from exc
        raise ConfigError(f"cannot open ClickHouse at {_redact(dsn)}: {exc}") from exc
    return client


def _error_code(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    m = re.search(r"Code: (\d+)", str(exc))
    return int(m.group(1)) if m else None


def _redact(dsn: str) -> str:
    parsed = urlparse(dsn)
    if parsed.password:
        netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@")
        return urlunparse(parsed._replace(netloc=netloc))
    return dsn


# -- migrations ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str  # file stem, e.g. "0001_usage"
    path: Path
    checksum: str  # sha256 hex of the file's bytes
    statements: tuple[str, ...]


def default_migrations_dir() -> Path:
    """``infra/clickhouse`` of the repository this package lives in."""
    return Path(__file__).resolve().parents[2] / "infra" / "clickhouse"


def split_statements(sql: str) -> list[str]:
    """Split SQL text on ``;`` outside quotes, backticks and comments; drop empty statements.

    Comments are kept inside the statement they belong to, except that a chunk holding only
    comments and whitespace is dropped.
    """
    out: list[str] = []
    buf: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"`":
            j = i + 1
            while j < n:
                if sql[j] == "\\":
                    j += 2
                    continue
                if sql[j] == c:
                    if j + 1 < n and sql[j + 1] == c:  # doubled quote escape
                        j += 2
                        continue
                    break
                j += 1
            if j >= n:
                raise ConfigError(f"unterminated {c} quote in SQL starting at offset {i}")
            buf.append(sql[i : j + 1])
            i = j + 1
        elif sql.startswith("--", i) or (c == "#" and _line_start(sql, i)):
            j = sql.find("\n", i)
            j = n if j < 0 else j
            buf.append(sql[i:j])
            i = j
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            if j < 0:
                raise ConfigError(f"unterminated /* comment in SQL starting at offset {i}")
            buf.append(sql[i : j + 2])
            i = j + 2
        elif c == ";":
            out.append("".join(buf))
            buf = []
            i += 1
        else:
            buf.append(c)
            i += 1
    out.append("".join(buf))
    return [s.strip() for s in out if _has_code(s)]


def _line_start(sql: str, i: int) -> bool:
    # ClickHouse also accepts '#' comments; only treat '#' as one at the start of a line.
    k = sql.rfind("\n", 0, i)
    return sql[k + 1 : i].strip() == ""


def _has_code(chunk: str) -> bool:
    text = re.sub(r"/\*.*?\*/", " ", chunk, flags=re.S)
    lines = [ln for ln in text.splitlines() if not ln.strip().startswith(("--", "#"))]
    return any(ln.strip() for ln in lines)


def load_migrations(migrations_dir: Path | None = None) -> list[Migration]:
    """Every ``NNNN_name.sql`` in the directory, ordered by version; ConfigError on bad names."""
    directory = migrations_dir or default_migrations_dir()
    if not directory.is_dir():
        raise ConfigError(f"migrations directory {directory} does not exist")
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        m = _MIGRATION_RE.match(path.name)
        if not m:
            raise ConfigError(f"migration file {path.name!r} must be named NNNN_lower_snake.sql")
        version = int(m.group(1))
        if version in found:
            raise ConfigError(f"two migrations share version {version:04d}: {found[version].path.name}, {path.name}")
        raw = path.read_bytes()
        statements = tuple(split_statements(raw.decode("utf-8")))
        if not statements:
            raise ConfigError(f"migration {path.name} holds no statement")
        found[version] = Migration(version, path.stem, path, hashlib.sha256(raw).hexdigest(), statements)
    return [found[v] for v in sorted(found)]


_LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS schema_migrations
(
    version    UInt32,
    name       String,
    checksum   String,
    applied_at DateTime64(3, 'UTC')
)
ENGINE = MergeTree
ORDER BY version
"""


def apply_migrations(
    client: Client, migrations_dir: Path | None = None, *, database: str | None = None, cluster: str | None = None
) -> list[str]:
    """Apply pending migrations in version order; return the names applied (empty when current).

    ``database`` (else ``client.database``) is where statements run and where
    ``schema_migrations`` lives; it is created if missing, and the client's own database is
    restored afterwards. Every applied
    migration is verified first: a changed checksum or name raises ConfigError before anything
    runs. A failing statement raises ConfigError naming the file and statement number.

    ``cluster`` (``METERLINE_CLICKHOUSE_CLUSTER``) applies the cluster form of the same files
    (:func:`render_cluster`): Replicated local tables, Distributed tables under the original names,
    every statement ON CLUSTER.
    """
    from clickhouse_connect.driver.exceptions import ClickHouseError, OperationalError

    migrations = load_migrations(migrations_dir)
    previous = client.database
    if database is not None:
        _check_db_name(database)
        client.command(f"CREATE DATABASE IF NOT EXISTS `{database}`")
        client.database = database
    try:
        ddl = ClusterDdl(cluster, client.database or "default") if cluster else None
        tables = migration_tables(migrations) if ddl is not None else set()
        try:
            client.command(_ledger_ddl(ddl))
        except ClickHouseError as exc:
            if isinstance(exc, OperationalError):
                raise
            where = f" on cluster {cluster!r}" if cluster else ""
            raise ConfigError(f"cannot create schema_migrations{where}: {exc}") from exc
        rows = client.query("SELECT version, name, checksum FROM schema_migrations").result_rows
        applied = {int(v): (str(name), str(checksum)) for v, name, checksum in rows}
        for mig in migrations:
            if mig.version in applied:
                name, checksum = applied[mig.version]
                if (name, checksum) != (mig.name, mig.checksum):
                    raise ConfigError(
                        f"migration {mig.version:04d} was applied as {name} (sha256 {checksum[:12]}…) but "
                        f"{mig.path.name} now has sha256 {mig.checksum[:12]}…: applied migrations must not "
                        "change; add a new migration instead"
                    )
        done: list[str] = []
        for mig in migrations:
            if mig.version in applied:
                continue
            statements = cluster_statements(mig, ddl, tables) if ddl is not None else list(mig.statements)
            for idx, stmt in enumerate(statements, 1):
                try:
                    client.command(stmt)
                except OperationalError as exc:
                    raise ClickHouseUnavailable(f"{mig.path.name} statement {idx}: {exc}") from exc
                except ClickHouseError as exc:
                    raise ConfigError(f"migration {mig.path.name} statement {idx} failed: {exc}") from exc
            client.insert(
                "schema_migrations",
                [[mig.version, mig.name, mig.checksum, dt.datetime.now(dt.UTC)]],
                column_names=["version", "name", "checksum", "applied_at"],
            )
            done.append(mig.name)
        return done
    except OperationalError as exc:
        raise ClickHouseUnavailable(f"ClickHouse failed while migrating: {exc}") from exc
    finally:
        client.database = previous


def pending_migrations(client: Client, migrations_dir: Path | None = None) -> list[str]:
    """Names of the migrations not yet applied in ``client.database`` (all of them on an empty one).

    Read-only: the long-running roles check with this and leave migrating to ``meterline migrate``.
    """
    from clickhouse_connect.driver.exceptions import ClickHouseError

    migrations = load_migrations(migrations_dir)
    try:
        rows = client.query("SELECT version FROM schema_migrations").result_rows
    except ClickHouseError as exc:
        if _error_code(exc) != _UNKNOWN_TABLE:
            raise ConfigError(f"cannot read schema_migrations: {exc}") from exc
        rows = []
    applied = {int(v) for (v,) in rows}
    return [m.name for m in migrations if m.version not in applied]


# -- the cluster form ---------------------------------------------------------------------------

_MERGE_TREES = (
    "MergeTree",
    "ReplacingMergeTree",
    "SummingMergeTree",
    "AggregatingMergeTree",
    "CollapsingMergeTree",
    "VersionedCollapsingMergeTree",
)
_CREATE_TABLE_RE = re.compile(r"^CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?`?(\w+)`?\s*(?=\()", re.I)
_CREATE_MV_RE = re.compile(r"^CREATE\s+MATERIALIZED\s+VIEW\s+(?:IF\s+NOT\s+EXISTS\s+)?`?(\w+)`?\s+(?=TO\s)", re.I)
_CREATE_VIEW_RE = re.compile(r"^CREATE\s+VIEW\s+(?:IF\s+NOT\s+EXISTS\s+)?`?(\w+)`?\s+(?=AS\b)", re.I)
_ALTER_RE = re.compile(r"^ALTER\s+TABLE\s+`?(\w+)`?\s+", re.I)
_ALTER_COLUMN_RE = re.compile(
    r"^\s*(ADD|DROP|MODIFY|RENAME|COMMENT)\s+COLUMN\b", re.I
)  # what a Distributed table takes too
_ENGINE_RE = re.compile(r"\bENGINE\s*=\s*(\w+)\s*(\(([^()]*)\))?", re.I)
_ORDER_BY_RE = re.compile(r"\bORDER\s+BY\s+(\([^()]*\)|\w+)", re.I)
_TABLE_REF_RE = re.compile(r"\b(FROM|JOIN|TO)\s+`?(\w+)`?", re.I)
_CLUSTER_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")

LOCAL_SUFFIX = "_local"


@dataclass(frozen=True, slots=True)
class ClusterDdl:
    """Where the cluster form puts things: the cluster, the database the Distributed tables point
    into, and the replication path of the local tables (ClickHouse macros left in place)."""

    cluster: str
    database: str
    zk_path: str = "/clickhouse/tables/{shard}/{database}/{table}"
    replica: str = "{replica}"

    def __post_init__(self) -> None:
        if not _CLUSTER_NAME_RE.match(self.cluster):
            raise ConfigError(f"bad ClickHouse cluster name {self.cluster!r}")
        _check_db_name(self.database)

    @property
    def on_cluster(self) -> str:
        return f"ON CLUSTER `{self.cluster}`"


def _strip_comments(stmt: str) -> str:
    """The statement without ``--``/``#`` line comments and ``/* */`` blocks (quotes respected)."""
    out: list[str] = []
    i, n = 0, len(stmt)
    while i < n:
        c = stmt[i]
        if c in "'\"`":
            j = i + 1
            while j < n and stmt[j] != c:
                j += 2 if stmt[j] == "\\" else 1
            out.append(stmt[i : j + 1])
            i = j + 1
        elif stmt.startswith("--", i) or (c == "#" and _line_start(stmt, i)):
            j = stmt.find("\n", i)
            i = n if j < 0 else j
        elif stmt.startswith("/*", i):
            j = stmt.find("*/", i + 2)
            i = n if j < 0 else j + 2
        else:
            out.append(c)
            i += 1
    return "".join(out).strip()


def _local_refs(sql: str, tables: set[str]) -> str:
    """``FROM t`` / ``JOIN t`` / ``TO t`` of a known table → ``t_local`` (materialized views)."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(2)
        return f"{m.group(1)} {name}{LOCAL_SUFFIX}" if name in tables else m.group(0)

    return _TABLE_REF_RE.sub(sub, sql)


def _sharding_key(columns: str, settings: str) -> str:
    """``cityHash64(customer_id)`` if ``columns`` declare it, else ``cityHash64`` of the ORDER BY key in
    ``settings`` (the clauses after ENGINE): equal sorting keys always meet on one shard."""
    if re.search(r"^\s*customer_id\s", columns, re.M):
        return "cityHash64(customer_id)"
    order = _ORDER_BY_RE.search(settings)
    if order is None:
        return "rand()"
    key = order.group(1).strip()
    return f"cityHash64{key}" if key.startswith("(") else f"cityHash64({key})"


def render_cluster(statement: str, ddl: ClusterDdl, tables: set[str] | None = None) -> list[str]:
    """The cluster form of one migration statement (see the module docstring), in execution order.

    ``tables`` names the MergeTree tables of every migration (the names materialized views must
    reach as ``_local``); by default those of infra/clickhouse. Raises ConfigError for a
    statement this renderer does not know, so no statement is ever applied unrendered.
    """
    sql = _strip_comments(statement)
    if tables is None:
        tables = migration_tables(load_migrations())
    if m := _CREATE_TABLE_RE.match(sql):
        name = m.group(1)
        engine = _ENGINE_RE.search(sql)
        if engine is None or engine.group(1) not in _MERGE_TREES:
            raise ConfigError(f"cluster form: table {name} has no MergeTree-family ENGINE: {sql[:120]!r}")
        args = (engine.group(3) or "").strip()
        path = ddl.zk_path.replace("{table}", name + LOCAL_SUFFIX)
        replicated = f"ENGINE = Replicated{engine.group(1)}('{path}', '{ddl.replica}'{', ' + args if args else ''})"
        local = (
            f"CREATE TABLE IF NOT EXISTS `{name}{LOCAL_SUFFIX}` {ddl.on_cluster} "
            + sql[m.end() : engine.start()]
            + replicated
            + " "
            + sql[engine.end() :].lstrip()
        )
        distributed = (
            f"CREATE TABLE IF NOT EXISTS `{name}` {ddl.on_cluster} AS `{name}{LOCAL_SUFFIX}` "
            f"ENGINE = Distributed('{ddl.cluster}', '{ddl.database}', '{name}{LOCAL_SUFFIX}', "
            f"{_sharding_key(sql[m.end() : engine.start()], sql[engine.end() :])})"
        )
        return [local, distributed]
    if m := _CREATE_MV_RE.match(sql):
        rest = _local_refs(sql[m.end() :], tables)
        return [f"CREATE MATERIALIZED VIEW IF NOT EXISTS `{m.group(1)}` {ddl.on_cluster} {rest}"]
    if m := _CREATE_VIEW_RE.match(sql):
        return [f"CREATE VIEW IF NOT EXISTS `{m.group(1)}` {ddl.on_cluster} " + sql[m.end() :]]
    if m := _ALTER_RE.match(sql):
        name, commands = m.group(1), sql[m.end() :]
        clauses = _split_top_level(commands)
        if not clauses or not all(_ALTER_COLUMN_RE.match(c) for c in clauses):
            raise ConfigError(f"cluster form: only column changes are rendered for ALTER TABLE, got {sql[:120]!r}")
        return [
            f"ALTER TABLE `{name}{LOCAL_SUFFIX}` {ddl.on_cluster} {commands}",
            f"ALTER TABLE `{name}` {ddl.on_cluster} {commands}",
        ]
    raise ConfigError(f"cluster form: no rendering for statement {sql[:120]!r}")


def _split_top_level(sql: str) -> list[str]:
    """``sql`` split on commas outside parentheses and quotes."""
    parts: list[str] = []
    depth, start, i, n = 0, 0, 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"`":
            j = i + 1
            while j < n and sql[j] != c:
                j += 2 if sql[j] == "\\" else 1
            i = j
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(sql[start:i].strip())
            start = i + 1
        i += 1
    parts.append(sql[start:].strip())
    return [p for p in parts if p]


def migration_tables(migrations: list[Migration]) -> set[str]:
    """Every table a CREATE TABLE of ``migrations`` makes (the cluster form's ``_local`` names)."""
    out = set()
    for mig in migrations:
        for stmt in mig.statements:
            if m := _CREATE_TABLE_RE.match(_strip_comments(stmt)):
                out.add(m.group(1))
    return out


def cluster_statements(mig: Migration, ddl: ClusterDdl, tables: set[str]) -> list[str]:
    """Every statement of ``mig`` in its cluster form, in order."""
    return [out for stmt in mig.statements for out in render_cluster(stmt, ddl, tables)]


def _ledger_ddl(ddl: ClusterDdl | None) -> str:
    if ddl is None:
        return _LEDGER_DDL
    path = ddl.zk_path.replace("{shard}/", "").replace("{table}", "schema_migrations")
    return _LEDGER_DDL.replace("schema_migrations\n", f"schema_migrations {ddl.on_cluster}\n", 1).replace(
        "ENGINE = MergeTree", f"ENGINE = ReplicatedMergeTree('{path}', '{ddl.replica}')"
    )
