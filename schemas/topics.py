"""One codec per topic: which encoding each topic's values use and the one encoder and decoder
every producer and consumer of that topic goes through.

``infra/topics.yaml`` declares the topics; this table says how their values are written and read.
``tests/schemas/test_topic_codecs.py`` checks the two agree (same topics, same encoding) and that
every named function exists. Codecs are named ``"module:attribute"`` so this table imports nothing:
the price and plan records are the pure domain's own canonical JSON (their decoders validate them as
strictly as a price or plan file), and the schema store reads the ``schemas`` topic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["TOPIC_CODECS", "TopicCodec", "decode_epoch", "encode_epoch"]


def encode_epoch(epoch: str) -> bytes:
    """The ``epoch`` topic's value: the broker epoch id as UTF-8 text (docs/restore.md)."""
    return epoch.encode("utf-8")


def decode_epoch(value: bytes) -> str:
    return bytes(value).decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class TopicCodec:
    encoding: Literal["avro", "json", "text"]
    encoder: str  # "module:attribute" that turns a value into the record's bytes (or its message)
    decoder: str  # "module:attribute" that turns the record's bytes back


TOPIC_CODECS: dict[str, TopicCodec] = {
    "usage-events": TopicCodec("avro", "schemas.codec:encode_usage_batch", "schemas.codec:decode_usage_batch"),
    "usage-priced": TopicCodec("avro", "schemas.codec:encode_priced_batch", "schemas.codec:decode_priced_batch"),
    "usage-dead-letter": TopicCodec("avro", "schemas.codec:encode_dead_letter", "schemas.codec:decode_dead_letter"),
    "prices": TopicCodec(
        "json", "meterline.core.pricing._book:PriceBook.to_records", "meterline.core.pricing._book:decode_record"
    ),
    "epoch": TopicCodec("text", "schemas.topics:encode_epoch", "schemas.topics:decode_epoch"),
    "schemas": TopicCodec(
        "json", "schemas.registry:canonical_json", "meterline.stack.schema_store:KafkaSchemaStore._parse_entry"
    ),
    "customer-status": TopicCodec("json", "schemas.credits:encode_message", "schemas.credits:decode_json"),
    "ledger-commands": TopicCodec("json", "schemas.credits:encode_message", "schemas.credits:decode_command"),
    "alerts": TopicCodec("json", "schemas.credits:encode_message", "schemas.credits:decode_json"),
    "ledger-replies": TopicCodec("json", "schemas.credits:encode_message", "schemas.credits:decode_json"),
    "ledger-entries": TopicCodec("json", "schemas.credits:encode_message", "schemas.credits:entry_from_message"),
    "plans": TopicCodec(
        "json",
        "meterline.core.plans._catalog:PlanCatalog.to_records",
        "meterline.core.plans._catalog:decode_plan_record",
    ),
    "subscriptions": TopicCodec(
        "json",
        "meterline.core.plans._timeline:SubscriptionEvent.to_record",
        "meterline.core.plans._timeline:parse_event",
    ),
}
