"""The cluster form of the ONE migration source (infra/clickhouse): every statement of every
migration is rendered, ClickHouse's own parser accepts each rendering (``formatQuery`` on chDB),
every table gets its Replicated engine and its Distributed twin, and nothing is left unrendered.

chDB cannot run the cluster itself, even a one-node one declared in a config file: it refuses
ON CLUSTER (no DDL worker) and Replicated tables (no Keeper), and cannot read a Distributed table
(no TCP server). So the DDL is executed for real only against a ClickHouse server cluster;
docs/scaling.md says so.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from meterline.core.errors import ConfigError
from meterline.stack.clickhouse import (
    ClusterDdl,
    _ledger_ddl,
    apply_migrations,
    cluster_statements,
    load_migrations,
    migration_tables,
    render_cluster,
)

DDL = ClusterDdl("meterline_prod", "billing")


def _format(clickhouse: Any, sql: str) -> str:
    """ClickHouse's parser on ``sql`` (raises if it does not parse): its canonical text."""
    return str(clickhouse.query("SELECT formatQuery({q:String})", parameters={"q": sql}).result_rows[0][0])


def test_every_rendered_statement_parses_and_runs_on_cluster(clickhouse: Any) -> None:
    migrations = load_migrations()
    tables = migration_tables(migrations)
    rendered = 0
    for mig in migrations:
        for stmt in cluster_statements(mig, DDL, tables):
            formatted = _format(clickhouse, stmt)
            assert "ON CLUSTER meterline_prod" in formatted, (mig.name, formatted)
            rendered += 1
    assert rendered > sum(len(m.statements) for m in migrations)  # each table became two statements
    assert "ON CLUSTER meterline_prod" in _format(clickhouse, _ledger_ddl(DDL))


def test_every_table_is_replicated_with_a_distributed_twin(clickhouse: Any) -> None:
    migrations = load_migrations()
    tables = migration_tables(migrations)
    assert {"usage_priced", "usage_hourly", "ledger_entries", "price_records"} <= tables
    formatted = [_format(clickhouse, s) for m in migrations for s in cluster_statements(m, DDL, tables)]
    for table in tables:
        local = [
            f for f in formatted if re.match(rf"CREATE TABLE IF NOT EXISTS {table}_local ON CLUSTER meterline_prod", f)
        ]
        assert len(local) == 1, table
        engine = re.search(r"ENGINE = (\w+)\('([^']*)', '([^']*)'", local[0])
        assert engine is not None, local[0]
        assert engine.group(1).startswith("Replicated") and engine.group(1).endswith("MergeTree"), local[0]
        assert engine.groups()[1:] == (f"/clickhouse/tables/{{shard}}/{{database}}/{table}_local", "{replica}")
        dist = [f for f in formatted if re.match(rf"CREATE TABLE IF NOT EXISTS {table} ON CLUSTER", f)]
        assert len(dist) == 1, table
        assert f"AS {table}_local" in dist[0]
        assert f"ENGINE = Distributed('meterline_prod', 'billing', '{table}_local', cityHash64(" in dist[0], dist[0]
    # A customer's rows (and a replay of them) share one shard: the Replacing merge can collapse them.
    usage = next(f for f in formatted if f.startswith("CREATE TABLE IF NOT EXISTS usage_priced ON"))
    assert "cityHash64(customer_id)" in usage


def test_engine_arguments_and_table_settings_survive(clickhouse: Any) -> None:
    sql = (
        "-- a comment; with a semicolon\nCREATE TABLE IF NOT EXISTS t (k String, ver UInt64)\n"
        "ENGINE = ReplacingMergeTree(ver)\nORDER BY (k, ver)\nSETTINGS index_granularity = 1024"
    )
    local, dist = render_cluster(sql, DDL, {"t"})
    f = _format(clickhouse, local)
    assert (
        "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/t_local', '{replica}', ver)" in f
    )
    assert "ORDER BY (k, ver)" in f and "SETTINGS index_granularity = 1024" in f
    assert "cityHash64(k, ver)" in _format(clickhouse, dist)  # no customer_id: the sorting key shards


def test_materialized_views_read_and_write_the_local_tables(clickhouse: Any) -> None:
    migrations = load_migrations()
    tables = migration_tables(migrations)
    mvs = [
        _format(clickhouse, s)
        for m in migrations
        for s in cluster_statements(m, DDL, tables)
        if s.startswith("CREATE MATERIALIZED VIEW")
    ]
    assert len(mvs) == 4
    for mv in mvs:
        targets = re.findall(r"\b(?:TO|FROM|JOIN) (\w+)", mv)
        assert targets and all(t.endswith("_local") for t in targets if t.removesuffix("_local") in tables), mv
    # Plain views read the Distributed tables (every shard), unchanged.
    view = render_cluster("CREATE VIEW IF NOT EXISTS v AS SELECT * FROM usage_priced", DDL, tables)
    assert view == ["CREATE VIEW IF NOT EXISTS `v` ON CLUSTER `meterline_prod` AS SELECT * FROM usage_priced"]


def test_alter_reaches_the_local_and_the_distributed_table(clickhouse: Any) -> None:
    out = render_cluster("ALTER TABLE usage_priced ADD COLUMN IF NOT EXISTS x UInt8 DEFAULT 0 AFTER requests", DDL)
    assert [_format(clickhouse, s).splitlines()[0].strip() for s in out] == [
        "ALTER TABLE usage_priced_local ON CLUSTER meterline_prod",
        "ALTER TABLE usage_priced ON CLUSTER meterline_prod",
    ]


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO usage_priced SELECT * FROM usage_priced",
        "CREATE TABLE t (k String) ENGINE = Log",
        "ALTER TABLE usage_priced DELETE WHERE 1",
        "ALTER TABLE usage_priced ADD COLUMN y UInt8, MODIFY TTL toDate(occurred_at) + 1",
        "DROP TABLE usage_priced",
    ],
)
def test_a_statement_without_a_cluster_form_is_refused(sql: str) -> None:
    with pytest.raises(ConfigError, match="cluster form"):
        render_cluster(sql, DDL, {"usage_priced"})


def test_cluster_name_is_checked() -> None:
    with pytest.raises(ConfigError):
        ClusterDdl("prod; DROP", "billing")


def test_apply_migrations_on_a_server_without_that_cluster_fails_before_recording(clickhouse: Any) -> None:
    """chDB has no remote_servers: the first ON CLUSTER statement is refused by the server itself,
    nothing is recorded as applied."""
    with pytest.raises(ConfigError):
        apply_migrations(clickhouse, database=f"{clickhouse.database}_c", cluster="meterline_prod")
    clickhouse.command(f"DROP DATABASE IF EXISTS `{clickhouse.database}_c`")
