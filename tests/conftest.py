"""Shared fixtures for the whole suite: the real Tansu broker, per-test topics, embedded ClickHouse.

Fixture map (names are a contract other test packages rely on):

=====================  =========  ===========================================================
fixture                scope      gives
=====================  =========  ===========================================================
``broker``             session    the running :class:`TansuBroker` (memory-only, 127.0.0.1)
``kafka_bootstrap``    session    ``"127.0.0.1:PORT"`` of that broker
``topic_prefix``       function   a unique prefix like ``"t1a2b3c4d."`` (own topics per test)
``topics``             function   logical name -> full name; every topic of infra/topics.yaml
                                  created under ``topic_prefix`` (``default`` = 4 partitions)
``chdb_dsn``           session    ``chdb:///<tmp>/engine``: the ONE embedded engine of this
                                  pytest process (chDB allows one engine path per process)
``clickhouse_database``function   a fresh DATABASE in that engine with every migration of
                                  infra/clickhouse applied; dropped after the test
``clickhouse``         function   a clickhouse-connect client bound to that database
``clickhouse_dsn``     function   ``chdb:///<tmp>/engine?database=<db>`` for code that takes a
                                  DSN (``meterline.stack.clickhouse.connect`` and
                                  clickhouse-connect's ``get_client(dsn=...)`` both honour
                                  ``?database=``)
``settings_factory``   function   ``make(**overrides) -> Settings`` filled for this test
=====================  =========  ===========================================================

Any test that uses ``broker`` (directly or through ``kafka_bootstrap``/``topics``) is marked
``broker`` automatically, so ``pytest -m "not broker"`` skips them. Other servers take a port from
``meterline.stack.broker.free_port()``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from meterline.core.config import Settings
from meterline.stack.broker import TansuBroker, free_port  # noqa: F401  (re-exported for tests)
from meterline.stack.clickhouse import apply_migrations, connect, default_migrations_dir, with_database
from meterline.stack.topics import delete_topics, ensure_topics

if TYPE_CHECKING:
    from clickhouse_connect.driver import Client

TEST_PARTITIONS = 4
_BROKER_FIXTURES = {"broker", "kafka_bootstrap", "topics"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _BROKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.broker)


# -- Kafka ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuBroker]:
    """One Tansu broker for the session; its log is under the session's tmp dir."""
    with TansuBroker(log_dir=tmp_path_factory.mktemp("tansu")) as b:
        yield b


@pytest.fixture(scope="session")
def kafka_bootstrap(broker: TansuBroker) -> str:
    return broker.bootstrap


@pytest.fixture
def topic_prefix() -> str:
    """A prefix no other test uses (Tansu keeps every topic until the session ends)."""
    return f"t{uuid.uuid4().hex[:8]}."


@pytest.fixture
def topics(kafka_bootstrap: str, topic_prefix: str) -> Iterator[dict[str, str]]:
    """Every topic of infra/topics.yaml under ``topic_prefix``; deleted after the test.

    ``partitions: default`` topics get 4 partitions; topics with a fixed count keep it.
    """
    names = ensure_topics(kafka_bootstrap, topic_prefix, TEST_PARTITIONS)
    yield names
    try:
        delete_topics(kafka_bootstrap, names.values())
    except Exception:  # best effort: the broker is memory-only and dies with the session
        pass


# -- ClickHouse -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chdb_dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The session's embedded engine path as a DSN (no database)."""
    return f"chdb://{tmp_path_factory.mktemp('chdb').resolve() / 'engine'}"


@pytest.fixture
def clickhouse_database(chdb_dsn: str) -> Iterator[str]:
    """A fresh database with all infra/clickhouse migrations applied; dropped after the test."""
    database = f"test_{uuid.uuid4().hex[:12]}"
    admin = connect(chdb_dsn, database=database)
    try:
        apply_migrations(admin, default_migrations_dir())
        yield database
    finally:
        admin.database = "default"
        admin.command(f"DROP DATABASE IF EXISTS `{database}` SYNC")
        admin.close()


@pytest.fixture
def clickhouse(chdb_dsn: str, clickhouse_database: str) -> Iterator[Client]:
    """A clickhouse-connect client whose current database is this test's migrated database.

    Values of ``DateTime64(p, 'UTC')`` columns come back as naive datetimes holding UTC.
    """
    client = connect(chdb_dsn, database=clickhouse_database, create_database=False)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def clickhouse_dsn(chdb_dsn: str, clickhouse_database: str) -> str:
    """``chdb:///…/engine?database=<this test's db>`` (same database as ``clickhouse``)."""
    return with_database(chdb_dsn, clickhouse_database)


# -- Settings -------------------------------------------------------------------------------------


@pytest.fixture
def settings_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., Settings]:
    """``make(**overrides)`` -> Settings with this test's broker, prefix, data dir and database.

    The broker and the migrated ClickHouse database are only set up when a field is not given
    in ``overrides`` (pass ``kafka_bootstrap=None`` / ``clickhouse_dsn=...`` to avoid them).
    """

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"data_dir": tmp_path, "partitions": TEST_PARTITIONS}
        if "topic_prefix" not in overrides:
            values["topic_prefix"] = request.getfixturevalue("topic_prefix")
        if "kafka_bootstrap" not in overrides:
            values["kafka_bootstrap"] = request.getfixturevalue("kafka_bootstrap")
        if "clickhouse_dsn" not in overrides:
            values["clickhouse_dsn"] = request.getfixturevalue("clickhouse_dsn")
        values.update(overrides)
        return Settings(**values)

    return make
