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
    "Migration",
    "apply_migrations",
    "connect",
    "default_migrations_dir",
    "dsn_database",
    "load_migrations",
    "pending_migrations",
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


def apply_migrations(client: Client, migrations_dir: Path | None = None, *, database: str | None = None) -> list[str]:
    """Apply pending migrations in version order; return the names applied (empty when current).

    ``database`` (else ``client.database``) is where statements run and where
    ``schema_migrations`` lives; it is created if missing, and the client's own database is
    restored afterwards. Every applied
    migration is verified first: a changed checksum or name raises ConfigError before anything
    runs. A failing statement raises ConfigError naming the file and statement number.
    """
    from clickhouse_connect.driver.exceptions import ClickHouseError, OperationalError

    migrations = load_migrations(migrations_dir)
    previous = client.database
    if database is not None:
        _check_db_name(database)
        client.command(f"CREATE DATABASE IF NOT EXISTS `{database}`")
        client.database = database
    try:
        client.command(_LEDGER_DDL)
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
            for idx, stmt in enumerate(mig.statements, 1):
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
