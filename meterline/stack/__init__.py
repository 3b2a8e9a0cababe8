"""The local stack: the embedded Tansu broker, topic definitions and ClickHouse access.

Dev/demo/CI run Tansu (memory-only Kafka protocol) and embedded chDB on 127.0.0.1; production
points ``METERLINE_KAFKA_BOOTSTRAP`` / ``METERLINE_CLICKHOUSE_DSN`` at real Kafka and ClickHouse
(see ``infra/compose.yaml``).
"""

from __future__ import annotations

from meterline.stack.broker import TansuBroker, die_with_parent_preexec, free_port, wait_for_port
from meterline.stack.clickhouse import apply_migrations, connect, dsn_database, with_database
from meterline.stack.topics import TopicSpec, delete_topics, ensure_topics, load_topic_specs

__all__ = [
    "TansuBroker",
    "TopicSpec",
    "apply_migrations",
    "connect",
    "delete_topics",
    "die_with_parent_preexec",
    "dsn_database",
    "ensure_topics",
    "free_port",
    "load_topic_specs",
    "wait_for_port",
    "with_database",
]
