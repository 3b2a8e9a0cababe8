"""The usage-event wire contract: Avro schemas (``schemas/avro/*.avsc``, the source of truth),
single-object codecs, the writer-schema registry, fast validation and the canonical JSON form.

Public surface::

    UsageEvent                                  pydantic model (schemas.models)
    AvroCodec, encode_/decode_usage_batch, encode_/decode_priced_batch,
    encode_/decode_dead_letter, event_to_record, record_to_event      (schemas.codec)
    SchemaRegistry, default_registry, fingerprint   (schemas.registry)
    validate_record                                                   (schemas.validation)
    parse_json_event, event_to_json, iter_jsonl                       (schemas.jsonio)
"""

from __future__ import annotations

from schemas.codec import (
    AvroCodec,
    decode_dead_letter,
    decode_priced_batch,
    decode_usage_batch,
    encode_dead_letter,
    encode_priced_batch,
    encode_usage_batch,
    event_to_record,
    record_to_event,
)
from schemas.jsonio import event_to_json, iter_jsonl, parse_json_event
from schemas.models import UsageEvent
from schemas.registry import SchemaRegistry, default_registry, fingerprint
from schemas.validation import validate_record

__all__ = [
    "AvroCodec",
    "SchemaRegistry",
    "UsageEvent",
    "decode_dead_letter",
    "decode_priced_batch",
    "decode_usage_batch",
    "default_registry",
    "encode_dead_letter",
    "encode_priced_batch",
    "encode_usage_batch",
    "event_to_json",
    "event_to_record",
    "fingerprint",
    "iter_jsonl",
    "parse_json_event",
    "record_to_event",
    "validate_record",
]
