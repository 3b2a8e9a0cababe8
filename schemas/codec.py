"""Avro single-object encoding of meterline records: the per-event hot path.

Wire format (Avro spec, "Single object encoding")::

    0xC3 0x01 | 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema's
                Parsing Canonical Form | Avro binary body

:class:`AvroCodec` writes with its own schema and reads any registered writer schema, resolving
it to its own (the reader) schema with Avro's rules — a v1 reader reads bytes of a v2 writer
that added an optional field (the field is dropped), a v2 reader reads v1 bytes (the field gets
its default).

**Timestamps stay integers.** ``occurred_at``, ``priced_at`` and ``failed_at`` (logical type
``timestamp-millis``) are NOT converted to ``datetime``: the codecs parse a copy of each schema
with every ``logicalType`` removed, so decoded dicts carry the raw wire value — UTC epoch
milliseconds as ``int`` — and ``encode`` expects the same. Stripping logical types does not
change fingerprints (the Parsing Canonical Form has no logical types). Use
:func:`event_to_record` / :func:`record_to_event` to convert to and from the pydantic model.

Errors are :class:`meterline.core.errors.SchemaError` with ``reason_code``:

- ``not_single_object``: shorter than the 10-byte header or wrong magic;
- ``unknown_schema``: the fingerprint is in neither the registry nor its resolver;
- ``undecodable``: truncated / corrupt body, trailing bytes, or the writer schema cannot be
  resolved to the reader schema;
- ``unencodable``: ``encode`` got a dict that does not fit the schema (a producer bug).

Decoding never raises any other exception type for any input bytes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer

from meterline.core.errors import InvalidEvent, SchemaError
from schemas.models import UsageEvent
from schemas.registry import SchemaRegistry, default_registry, full_name

MAGIC = b"\xc3\x01"
HEADER_LEN = 10  # magic (2) + fingerprint (8)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)

__all__ = [
    "HEADER_LEN",
    "MAGIC",
    "AvroCodec",
    "datetime_to_ms",
    "decode_dead_letter",
    "decode_priced_batch",
    "decode_usage_batch",
    "encode_dead_letter",
    "encode_priced_batch",
    "encode_usage_batch",
    "event_to_record",
    "ms_to_datetime",
    "record_to_event",
]


def _strip_logical_types(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_logical_types(v) for k, v in node.items() if k != "logicalType"}
    if isinstance(node, list):
        return [_strip_logical_types(v) for v in node]
    return node


def _parse_raw(schema: Mapping[str, Any]) -> Any:
    """fastavro-parsed copy of ``schema`` without logical types (timestamps decode as int ms)."""
    return parse_schema(_strip_logical_types(schema))


class AvroCodec:
    """Encode with, and decode into, one reader/writer schema.

    ``reader`` is a schema name (``"UsageBatch"`` or ``"meterline.v1.UsageBatch"``, looked up
    with ``registry.named``) or a self-contained schema dict (registered into ``registry``).
    ``registry`` defaults to a fresh :func:`~schemas.registry.default_registry`.

    Parsed writer schemas are cached per fingerprint; a codec is safe to share between threads.
    """

    def __init__(self, reader: str | Mapping[str, Any], registry: SchemaRegistry | None = None) -> None:
        self.registry = registry if registry is not None else default_registry()
        if isinstance(reader, str):
            schema = self.registry.named(reader)
            fp = self.registry.fingerprint_of(reader)
        else:
            schema = dict(reader)
            fp = self.registry.register(schema)
        self.schema: dict[str, Any] = schema
        self.name: str = full_name(schema["name"], schema.get("namespace"))
        self.fingerprint: bytes = fp
        self._header = MAGIC + fp
        self._parsed = _parse_raw(schema)
        # writer fingerprint -> parsed writer schema; None stands for "same as reader".
        self._writers: dict[bytes, Any] = {fp: None}

    def __repr__(self) -> str:
        return f"AvroCodec({self.name!r}, fingerprint={self.fingerprint.hex()})"

    def encode(self, obj: Mapping[str, Any]) -> bytes:
        """Single-object-encode ``obj`` (timestamps as int epoch ms; missing fields with defaults allowed)."""
        buf = io.BytesIO()
        buf.write(self._header)
        try:
            schemaless_writer(buf, self._parsed, obj)
        except Exception as exc:  # fastavro raises TypeError/ValueError/OverflowError/KeyError...
            raise SchemaError(f"record does not fit {self.name}: {exc}", reason_code="unencodable") from exc
        return buf.getvalue()

    def decode(self, data: bytes | bytearray | memoryview) -> dict[str, Any]:
        """Decode single-object bytes of any known writer schema into a reader-schema dict."""
        if len(data) < HEADER_LEN or data[:2] != MAGIC:
            raise SchemaError(
                f"not an Avro single-object record (expected magic c301 and a 10-byte header, got "
                f"{bytes(data[:2]).hex() or 'nothing'} in {len(data)} bytes)",
                reason_code="not_single_object",
            )
        fp = bytes(data[2:HEADER_LEN])
        try:
            writer = self._writers[fp]
        except KeyError:
            writer = self._learn(fp)
        buf = io.BytesIO(data)
        buf.seek(HEADER_LEN)
        try:
            if writer is None:
                record = schemaless_reader(buf, self._parsed, None)
            else:
                record = schemaless_reader(buf, writer, self._parsed)
        except Exception as exc:  # EOFError, UnicodeDecodeError, SchemaResolutionError, ValueError...
            raise SchemaError(
                f"cannot decode {len(data)}-byte {self.name} record (writer {fp.hex()}): {type(exc).__name__}: {exc}",
                reason_code="undecodable",
            ) from exc
        if buf.tell() != len(data):
            raise SchemaError(
                f"{len(data) - buf.tell()} trailing bytes after the {self.name} record (writer {fp.hex()})",
                reason_code="undecodable",
            )
        if not isinstance(record, dict):
            raise SchemaError(f"writer {fp.hex()} does not hold a record", reason_code="undecodable")
        return record

    def _learn(self, fp: bytes) -> Any:
        schema = self.registry.get(fp)  # raises SchemaError(unknown_schema)
        try:
            parsed = _parse_raw(schema)
        except Exception as exc:
            raise SchemaError(f"writer schema {fp.hex()} does not parse: {exc}", reason_code="undecodable") from exc
        self._writers[fp] = parsed
        return parsed


# ---- module-level codecs for the bundled schemas ----------------------------------------------

_CODECS: dict[str, AvroCodec] = {}


def _codec(name: str) -> AvroCodec:
    codec = _CODECS.get(name)
    if codec is None:
        codec = _CODECS[name] = AvroCodec(name)
    return codec


def encode_usage_batch(events: list[dict[str, Any]]) -> bytes:
    """One ``UsageBatch`` record (events of ONE customer, in order) as single-object bytes."""
    return _codec("UsageBatch").encode({"events": events})


def decode_usage_batch(data: bytes | bytearray | memoryview) -> list[dict[str, Any]]:
    """The events of a ``UsageBatch`` record, in array order (occurred_at as int ms)."""
    return _codec("UsageBatch").decode(data)["events"]  # type: ignore[no-any-return]


def encode_priced_batch(events: list[dict[str, Any]]) -> bytes:
    """One ``PricedBatch`` record as single-object bytes."""
    return _codec("PricedBatch").encode({"events": events})


def decode_priced_batch(data: bytes | bytearray | memoryview) -> list[dict[str, Any]]:
    """The events of a ``PricedBatch`` record (occurred_at / priced_at as int ms)."""
    return _codec("PricedBatch").decode(data)["events"]  # type: ignore[no-any-return]


def encode_dead_letter(record: dict[str, Any]) -> bytes:
    """A ``DeadLetter`` record as single-object bytes."""
    return _codec("DeadLetter").encode(record)


def decode_dead_letter(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """A ``DeadLetter`` record (failed_at / occurred_at as int ms)."""
    return _codec("DeadLetter").decode(data)


# ---- pydantic <-> record -------------------------------------------------------------------------


def datetime_to_ms(dt: datetime) -> int:
    """Aware datetime -> UTC epoch milliseconds (floor; sub-millisecond precision is dropped)."""
    return (dt - EPOCH) // _ONE_MS


def ms_to_datetime(ms: int) -> datetime:
    """UTC epoch milliseconds -> aware UTC datetime; InvalidEvent(invalid_timestamp) if out of range."""
    try:
        return EPOCH + timedelta(milliseconds=ms)
    except (OverflowError, TypeError) as exc:
        raise InvalidEvent(
            f"occurred_at {ms!r} is not a representable epoch-milliseconds timestamp",
            reason_code="invalid_timestamp",
            field="occurred_at",
        ) from exc


def event_to_record(ev: UsageEvent) -> dict[str, Any]:
    """UsageEvent -> Avro ``UsageEvent`` dict (occurred_at as int epoch ms, floored to the ms)."""
    d = ev.model_dump()
    d["occurred_at"] = datetime_to_ms(ev.occurred_at)
    d["labels"] = dict(ev.labels)
    return d


def record_to_event(d: Mapping[str, Any]) -> UsageEvent:
    """Avro ``UsageEvent`` (or ``PricedUsage``: extra fields ignored) dict -> UsageEvent.

    Raises InvalidEvent with a reason_code and field when the record breaks the model's rules.
    """
    from pydantic import ValidationError

    from schemas.validation import invalid_event_from_pydantic

    data = dict(d)
    occurred = data.get("occurred_at")
    if isinstance(occurred, int) and not isinstance(occurred, bool):
        data["occurred_at"] = ms_to_datetime(occurred)
    try:
        return UsageEvent.model_validate(data)
    except ValidationError as exc:
        raise invalid_event_from_pydantic(exc) from None
