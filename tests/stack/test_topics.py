"""infra/topics.yaml and ensure_topics against the real broker."""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from meterline.core.errors import ConfigError
from meterline.stack.topics import TopicSpec, delete_topics, ensure_topics, load_topic_specs

EXPECTED = {
    "usage-events",
    "usage-priced",
    "usage-dead-letter",
    "prices",
    "schemas",
    "epoch",
    "customer-status",
    "ledger-commands",
    "alerts",
    "ledger-replies",
    "ledger-entries",
    "plans",
    "subscriptions",
}


def test_topic_file_declares_every_topic() -> None:
    specs = {s.name: s for s in load_topic_specs()}
    assert set(specs) == EXPECTED
    # co-partitioned topics share settings.partitions
    for name in ("usage-events", "usage-priced", "usage-dead-letter", "customer-status", "ledger-commands"):
        assert specs[name].partitions is None
    for name in ("prices", "schemas", "customer-status", "plans"):
        assert specs[name].cleanup_policy == "compact"
    # subscription facts share a key per customer and every one counts: never compacted, kept forever
    assert specs["subscriptions"].cleanup_policy == "delete" and specs["subscriptions"].retention_ms == -1
    assert specs["subscriptions"].partitions is None
    day = 24 * 3600 * 1000
    assert specs["usage-events"].retention_ms == 7 * day
    assert specs["usage-dead-letter"].retention_ms == 30 * day


@pytest.mark.parametrize(
    "body, needle",
    [
        ("topics: nope", "topics"),
        (
            "topics:\n  - {name: a, partitions: 0, retention_ms: 1, cleanup_policy: delete, key: k, value: v, encoding: json}",
            "partitions",
        ),
        (
            "topics:\n  - {name: a, partitions: 1, retention_ms: 1, cleanup_policy: zap, key: k, value: v, encoding: json}",
            "cleanup_policy",
        ),
        ("topics:\n  - {name: a, partitions: 1, retention_ms: 1, cleanup_policy: delete, key: k}", "missing"),
        (
            "topics:\n  - {name: a, partitions: 1, retention_ms: 1, cleanup_policy: delete, key: k, value: v, encoding: json}\n"
            "  - {name: a, partitions: 1, retention_ms: 1, cleanup_policy: delete, key: k, value: v, encoding: json}",
            "twice",
        ),
        ("topics: [", "YAML"),
    ],
)
def test_bad_topic_file_is_a_config_error(tmp_path: Path, body: str, needle: str) -> None:
    path = tmp_path / "topics.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=needle):
        load_topic_specs(path)


def _partitions(bootstrap: str) -> dict[str, int]:
    md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10)
    return {name: len(t.partitions) for name, t in md.topics.items()}


def test_ensure_topics_is_idempotent(kafka_bootstrap: str, topic_prefix: str) -> None:
    first = ensure_topics(kafka_bootstrap, topic_prefix, 3)
    assert first == {name: topic_prefix + name for name in EXPECTED}
    second = ensure_topics(kafka_bootstrap, topic_prefix, 3)
    assert second == first
    counts = _partitions(kafka_bootstrap)
    assert counts[topic_prefix + "usage-events"] == 3
    assert counts[topic_prefix + "ledger-commands"] == 3
    assert counts[topic_prefix + "prices"] == 1
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    fut = admin.describe_configs([ConfigResource("topic", topic_prefix + "prices")])
    configs = next(iter(fut.values())).result()
    assert configs["cleanup.policy"].value == "compact"
    delete_topics(kafka_bootstrap, first.values())
    assert not any(name.startswith(topic_prefix) for name in _partitions(kafka_bootstrap))


def test_partition_mismatch_is_a_config_error(kafka_bootstrap: str, topic_prefix: str) -> None:
    spec = TopicSpec("solo", None, 60_000, "delete", "k", "v", "json")
    ensure_topics(kafka_bootstrap, topic_prefix, 2, [spec])
    with pytest.raises(ConfigError, match="exists with 2 partitions but 5"):
        ensure_topics(kafka_bootstrap, topic_prefix, 5, [spec])
    delete_topics(kafka_bootstrap, [topic_prefix + "solo", topic_prefix + "never-created"])


def test_topics_fixture(topics: dict[str, str], topic_prefix: str, kafka_bootstrap: str) -> None:
    assert set(topics) == EXPECTED
    counts = _partitions(kafka_bootstrap)
    assert counts[topics["usage-priced"]] == 4
    assert all(full.startswith(topic_prefix) for full in topics.values())
