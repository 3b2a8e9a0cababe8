"""Embedded ClickHouse access: the migration runner, the engine lock and the shared fixtures."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from meterline.core.config import Settings
from meterline.core.errors import ConfigError
from meterline.stack.clickhouse import (
    apply_migrations,
    connect,
    dsn_database,
    load_migrations,
    split_statements,
    with_database,
)

if TYPE_CHECKING:
    from clickhouse_connect.driver import Client

M1 = """-- two statements; a ';' inside a string and a comment must not split them
CREATE TABLE IF NOT EXISTS accounts
(
    id   String,
    note String DEFAULT 'a;b'
)
ENGINE = MergeTree ORDER BY id;

/* a block comment ; */
INSERT INTO accounts (id) VALUES ('seed');
"""
M2 = "CREATE TABLE IF NOT EXISTS grants (id String, amount Decimal(38, 9)) ENGINE = MergeTree ORDER BY id;\n"
M3 = "ALTER TABLE grants ADD COLUMN IF NOT EXISTS currency LowCardinality(String) DEFAULT 'usd'"


@pytest.fixture
def db(chdb_dsn: str) -> Iterator[tuple[Client, str]]:
    name = f"mig_{uuid.uuid4().hex[:10]}"
    client = connect(chdb_dsn)
    try:
        yield client, name
    finally:
        client.database = "default"
        client.command(f"DROP DATABASE IF EXISTS `{name}` SYNC")
        client.close()


def _tables(client: Client, database: str) -> set[str]:
    rows = client.query("SELECT name FROM system.tables WHERE database = {d:String}", parameters={"d": database})
    return {r[0] for r in rows.result_rows}


def test_split_statements() -> None:
    assert split_statements(M1) == [
        "-- two statements; a ';' inside a string and a comment must not split them\n"
        "CREATE TABLE IF NOT EXISTS accounts\n(\n    id   String,\n    note String DEFAULT 'a;b'\n)\n"
        "ENGINE = MergeTree ORDER BY id",
        "/* a block comment ; */\nINSERT INTO accounts (id) VALUES ('seed')",
    ]
    assert split_statements("SELECT 'it''s;' ; SELECT `a;b`;;\n-- only a comment;\n") == [
        "SELECT 'it''s;'",
        "SELECT `a;b`",
    ]
    with pytest.raises(ConfigError, match="unterminated"):
        split_statements("SELECT 'open")


def test_migrations_apply_once_in_order(tmp_path: Path, db: tuple[Client, str]) -> None:
    client, name = db
    (tmp_path / "0002_grants.sql").write_text(M2)
    (tmp_path / "0001_accounts.sql").write_text(M1)
    (tmp_path / "README.md").write_text("not a migration")

    assert apply_migrations(client, tmp_path, database=name) == ["0001_accounts", "0002_grants"]
    assert client.database != name  # the client's own database is restored
    assert _tables(client, name) == {"schema_migrations", "accounts", "grants"}
    assert apply_migrations(client, tmp_path, database=name) == []
    # the data statement ran exactly once
    assert client.query(f"SELECT count() FROM `{name}`.accounts").result_rows == [(1,)]

    (tmp_path / "0003_currency.sql").write_text(M3)
    assert apply_migrations(client, tmp_path, database=name) == ["0003_currency"]
    rows = client.query(f"SELECT version, name, checksum FROM `{name}`.schema_migrations ORDER BY version").result_rows
    expected = [(m.version, m.name, m.checksum) for m in load_migrations(tmp_path)]
    assert rows == expected
    cols = client.query(
        "SELECT name FROM system.columns WHERE database = {d:String} AND table = 'grants'", parameters={"d": name}
    ).result_rows
    assert ("currency",) in cols


def test_changed_migration_is_refused(tmp_path: Path, db: tuple[Client, str]) -> None:
    client, name = db
    (tmp_path / "0001_accounts.sql").write_text(M1)
    apply_migrations(client, tmp_path, database=name)
    (tmp_path / "0001_accounts.sql").write_text(M1 + "\n-- edited\n")
    (tmp_path / "0002_grants.sql").write_text(M2)
    with pytest.raises(ConfigError, match="0001 was applied"):
        apply_migrations(client, tmp_path, database=name)
    assert "grants" not in _tables(client, name)  # nothing ran after the mismatch


def test_bad_migration_files(tmp_path: Path, db: tuple[Client, str]) -> None:
    client, name = db
    (tmp_path / "1_bad-name.sql").write_text(M2)
    with pytest.raises(ConfigError, match="NNNN"):
        load_migrations(tmp_path)
    (tmp_path / "1_bad-name.sql").unlink()
    (tmp_path / "0001_broken.sql").write_text("CREATE TABLE nope (x Nonsense) ENGINE = MergeTree ORDER BY x")
    with pytest.raises(ConfigError, match=r"0001_broken\.sql statement 1"):
        apply_migrations(client, tmp_path, database=name)
    rows = client.query(f"SELECT count() FROM `{name}`.schema_migrations").result_rows
    assert rows == [(0,)]


def test_second_process_gets_a_clear_error(clickhouse: Client, chdb_dsn: str) -> None:
    """This pytest process owns the engine (the fixture connected); another process must be refused."""
    code = textwrap.dedent(
        f"""
        from meterline.core.errors import ConfigError
        from meterline.stack.clickhouse import connect
        try:
            connect({chdb_dsn!r})
        except ConfigError as exc:
            print("CONFIG_ERROR", exc)
        else:
            print("CONNECTED")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "CONFIG_ERROR" in out.stdout, out.stdout + out.stderr
    assert f"owned by process {__import__('os').getpid()}" in out.stdout
    assert "meterline sql" in out.stdout


def test_second_engine_path_in_one_process(clickhouse: Client, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="one engine path per process"):
        connect(f"chdb://{tmp_path / 'other'}")
    # the failed attempt did not keep the other path's lock
    lock = tmp_path / "other.meterline.lock"
    code = f"import fcntl,os; fd=os.open({str(lock)!r}, os.O_RDWR); fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)"
    assert subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0


def test_dsn_helpers() -> None:
    assert dsn_database(with_database("chdb:///var/x", "db1")) == "db1"
    assert with_database("http://u:p@h:8123/old", "new") == "http://u:p@h:8123/new"
    assert dsn_database("http://h:8123") is None
    with pytest.raises(ConfigError):
        with_database("chdb:///var/x", "bad-name; DROP")
    with pytest.raises(ConfigError, match="absolute"):
        connect("chdb://relative/path")
    with pytest.raises(ConfigError):
        connect("mysql://h")


def test_clickhouse_fixtures(
    clickhouse: Client, clickhouse_dsn: str, clickhouse_database: str, settings_factory: object, topic_prefix: str
) -> None:
    assert clickhouse.query("SELECT currentDatabase()").result_rows == [(clickhouse_database,)]
    assert "schema_migrations" in _tables(clickhouse, clickhouse_database)
    other = connect(clickhouse_dsn)  # the DSN carries the database
    try:
        assert other.database == clickhouse_database
    finally:
        other.close()
    settings = settings_factory(kafka_bootstrap=None)  # type: ignore[operator]
    assert isinstance(settings, Settings)
    assert settings.clickhouse_dsn == clickhouse_dsn
    assert settings.topic_prefix == topic_prefix
    assert settings.kafka_bootstrap is None
