"""Topic definitions (``infra/topics.yaml``) and their idempotent creation on a Kafka cluster.

``load_topic_specs()`` parses and validates the YAML; ``ensure_topics()`` makes every topic exist
with the partition count the file asks for, creating the missing ones with their
``retention.ms`` / ``cleanup.policy``. It never alters an existing topic: an existing topic with a
different partition count raises :class:`~meterline.core.errors.ConfigError` (partitions cannot be
changed safely — Tansu has no CreatePartitions, and on Kafka adding partitions re-maps keys and
breaks faust's co-partitioning). Configs of existing topics are left as the operator set them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from meterline.core.errors import BrokerUnavailable, ConfigError

__all__ = ["TopicSpec", "default_topics_path", "delete_topics", "ensure_topics", "load_topic_specs"]

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_FIELDS = {"name", "partitions", "retention_ms", "cleanup_policy", "key", "value", "encoding", "description"}


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """One logical topic. ``partitions=None`` means "settings.partitions"."""

    name: str
    partitions: int | None
    retention_ms: int
    cleanup_policy: Literal["delete", "compact"]
    key: str
    value: str
    encoding: Literal["avro", "json", "text"]
    description: str = ""

    def full_name(self, prefix: str) -> str:
        return f"{prefix}{self.name}"

    def partition_count(self, default_partitions: int) -> int:
        return self.partitions if self.partitions is not None else default_partitions

    def kafka_config(self) -> dict[str, str]:
        return {"retention.ms": str(self.retention_ms), "cleanup.policy": self.cleanup_policy}


def default_topics_path() -> Path:
    """``infra/topics.yaml`` of the repository this package lives in."""
    return Path(__file__).resolve().parents[2] / "infra" / "topics.yaml"


def load_topic_specs(path: Path | None = None) -> list[TopicSpec]:
    """Parse and validate the topic file; raise ConfigError naming the bad entry."""
    path = path or default_topics_path()
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read topic definitions {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("topics"), list):
        raise ConfigError(f"{path}: expected a mapping with a `topics` list")
    specs = [_parse_entry(path, i, entry) for i, entry in enumerate(doc["topics"])]
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ConfigError(f"{path}: topic {spec.name!r} is defined twice")
        seen.add(spec.name)
    return specs


def _parse_entry(path: Path, index: int, entry: Any) -> TopicSpec:
    where = f"{path}: topics[{index}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be a mapping")
    unknown = set(entry) - _FIELDS
    missing = (_FIELDS - {"description"}) - set(entry)
    if unknown or missing:
        raise ConfigError(f"{where}: unknown fields {sorted(unknown)}, missing fields {sorted(missing)}")
    name = entry["name"]
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"{where}: bad topic name {name!r}")
    parts = entry["partitions"]
    if parts == "default":
        partitions: int | None = None
    elif isinstance(parts, int) and not isinstance(parts, bool) and parts >= 1:
        partitions = parts
    else:
        raise ConfigError(f"{where} ({name}): partitions must be a positive integer or `default`, got {parts!r}")
    retention = entry["retention_ms"]
    if not isinstance(retention, int) or isinstance(retention, bool) or (retention < 1 and retention != -1):
        raise ConfigError(f"{where} ({name}): retention_ms must be a positive integer or -1, got {retention!r}")
    encoding = entry.get("encoding")
    if encoding not in ("avro", "json", "text"):
        raise ConfigError(f"{where} ({name}): encoding must be `avro`, `json` or `text`, got {encoding!r}")
    policy = entry["cleanup_policy"]
    if policy not in ("delete", "compact"):
        raise ConfigError(f"{where} ({name}): cleanup_policy must be `delete` or `compact`, got {policy!r}")
    return TopicSpec(
        name=name,
        partitions=partitions,
        retention_ms=retention,
        cleanup_policy=policy,
        key=str(entry["key"]),
        value=str(entry["value"]),
        encoding=encoding,
        description=str(entry.get("description") or "").strip(),
    )


def _admin(bootstrap: str) -> Any:
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})


def _existing_partitions(admin: Any, bootstrap: str, timeout: float) -> dict[str, int]:
    try:
        md = admin.list_topics(timeout=timeout)
    except Exception as exc:
        raise BrokerUnavailable(f"cannot list topics on {bootstrap}: {exc}") from exc
    return {name: len(t.partitions) for name, t in md.topics.items() if t.error is None}


def ensure_topics(
    bootstrap: str,
    prefix: str,
    default_partitions: int,
    specs: Sequence[TopicSpec] | None = None,
    *,
    timeout: float = 15.0,
    replication_factor: int = -1,
) -> dict[str, str]:
    """Make every topic of ``specs`` (default: infra/topics.yaml) exist; return logical -> full name.

    Idempotent: existing topics with the right partition count are accepted as they are, and a
    concurrent creator winning the race is fine. ``replication_factor=-1`` takes the broker's
    default (``default.replication.factor``). Raises ConfigError on a partition-count mismatch,
    BrokerUnavailable when the cluster cannot be reached or the topics do not appear in time.
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

    specs = list(specs) if specs is not None else load_topic_specs()
    if default_partitions < 1:
        raise ConfigError(f"default_partitions must be >= 1, got {default_partitions}")
    deadline = time.monotonic() + timeout
    admin = _admin(bootstrap)
    existing = _existing_partitions(admin, bootstrap, timeout)
    wanted = {spec.full_name(prefix): spec for spec in specs}
    _check_counts(wanted, existing, default_partitions)

    missing = [
        NewTopic(full, spec.partition_count(default_partitions), replication_factor, config=spec.kafka_config())
        for full, spec in wanted.items()
        if full not in existing
    ]
    if missing:
        remaining = max(1.0, deadline - time.monotonic())
        futures = admin.create_topics(missing, operation_timeout=remaining, request_timeout=remaining)
        for full, fut in futures.items():
            try:
                fut.result()
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    continue  # created concurrently; its partition count is checked below
                if isinstance(err, KafkaError) and err.code() in (
                    KafkaError.INVALID_PARTITIONS,
                    KafkaError.INVALID_REPLICATION_FACTOR,
                    KafkaError.INVALID_CONFIG,
                    KafkaError.POLICY_VIOLATION,
                    KafkaError.TOPIC_AUTHORIZATION_FAILED,
                ):
                    raise ConfigError(f"cannot create topic {full!r}: {err.str()}") from exc
                raise BrokerUnavailable(f"cannot create topic {full!r} on {bootstrap}: {exc}") from exc

        # Wait until metadata shows every topic (immediate on Tansu, eventual on a Kafka cluster).
        while True:
            existing = _existing_partitions(admin, bootstrap, max(1.0, deadline - time.monotonic()))
            absent = [full for full in wanted if full not in existing]
            if not absent:
                break
            if time.monotonic() >= deadline:
                raise BrokerUnavailable(f"topics not visible in metadata after {timeout:g}s: {absent}")
            time.sleep(0.05)
        _check_counts(wanted, existing, default_partitions)
    return {spec.name: full for full, spec in wanted.items()}


def _check_counts(wanted: dict[str, TopicSpec], existing: dict[str, int], default_partitions: int) -> None:
    for full, spec in wanted.items():
        have = existing.get(full)
        want = spec.partition_count(default_partitions)
        if have is not None and have != want:
            raise ConfigError(
                f"topic {full!r} exists with {have} partitions but {want} are configured "
                f"(infra/topics.yaml `{spec.name}`, settings.partitions={default_partitions}). "
                "Partition counts cannot be changed in place (Tansu has no CreatePartitions; on Kafka "
                "it re-maps keys and breaks co-partitioning): use a new topic_prefix or set "
                f"METERLINE_PARTITIONS={have}."
            )


def delete_topics(bootstrap: str, names: Iterable[str], *, timeout: float = 15.0) -> None:
    """Delete the given full topic names; unknown topics are ignored. For tests and teardown."""
    from confluent_kafka import KafkaError, KafkaException

    names = list(names)
    if not names:
        return
    admin = _admin(bootstrap)
    futures = admin.delete_topics(names, operation_timeout=timeout, request_timeout=timeout)
    for name, fut in futures.items():
        try:
            fut.result()
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                continue
            raise BrokerUnavailable(f"cannot delete topic {name!r} on {bootstrap}: {exc}") from exc
