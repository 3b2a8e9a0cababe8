"""Writer-schema registry for Avro single-object encoding, keyed by CRC-64-AVRO fingerprint.

A record on the wire is ``0xC3 0x01`` + the 8-byte little-endian CRC-64-AVRO (Rabin) fingerprint
of the writer schema's Parsing Canonical Form + the Avro binary body. A reader therefore needs to
turn a fingerprint back into the writer's schema:

- :class:`SchemaRegistry` maps fingerprint (``bytes``, 8 bytes, as on the wire) -> writer schema
  (a fully expanded JSON-like ``dict``: named types inlined at first use). For a fingerprint it
  does not know, it asks an optional ``resolver`` (any ``Callable[[bytes], dict | None]``) once
  and remembers the answer.
- :func:`default_registry` returns a new registry preloaded with the bundled ``schemas/avro/*.avsc``.
- :class:`meterline.stack.schema_store.KafkaSchemaStore` (not here: this module is pure) publishes
  schemas to a compacted Kafka topic and looks them up from it; its ``lookup`` is a resolver. This
  is how a v1 reader learns a v2 writer's schema without a Confluent Schema Registry.

The ``.avsc`` files are the source of truth. A file holds one named record; it may refer to a
record of another file in the same directory by full name (``"meterline.v1.UsageEvent"``), which
:func:`load_schemas` inlines.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fastavro.schema import fingerprint as _fastavro_fingerprint
from fastavro.schema import to_parsing_canonical_form

from meterline.core.errors import SchemaError

NAMESPACE = "meterline.v1"
AVRO_DIR = Path(__file__).resolve().parent / "avro"
#: Earlier versions of the bundled schemas (``UsageEvent.v1.avsc``...). Every reader knows them, so
#: bytes an older producer wrote keep decoding (to the current reader schema, new fields defaulted).
HISTORY_DIR = AVRO_DIR / "history"

Resolver = Callable[[bytes], "dict[str, Any] | None"]

_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})

__all__ = [
    "AVRO_DIR",
    "NAMESPACE",
    "Resolver",
    "SchemaRegistry",
    "bundled_schemas",
    "canonical_json",
    "default_registry",
    "fingerprint",
    "full_name",
    "load_schemas",
]


def full_name(name: str, namespace: str | None = NAMESPACE) -> str:
    """``"UsageBatch"`` -> ``"meterline.v1.UsageBatch"``; dotted names are returned unchanged."""
    if "." in name or not namespace:
        return name
    return f"{namespace}.{name}"


def fingerprint(schema: Mapping[str, Any] | str) -> bytes:
    """The 8-byte little-endian CRC-64-AVRO fingerprint of ``schema``'s Parsing Canonical Form.

    ``schema`` must be self-contained (every named type defined where first used).
    """
    pcf = to_parsing_canonical_form(dict(schema) if isinstance(schema, Mapping) else schema)
    return bytes.fromhex(_fastavro_fingerprint(pcf, "CRC-64-AVRO"))


def canonical_json(schema: Mapping[str, Any]) -> str:
    """Deterministic compact JSON of the full schema (sorted keys; docs and defaults kept)."""
    return json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _expand(node: Any, defs: Mapping[str, dict[str, Any]], seen: set[str], namespace: str | None) -> Any:
    """Inline named-type references (first use only), as Parsing Canonical Form requires."""
    if isinstance(node, str):
        if node in _PRIMITIVES:
            return node
        name = full_name(node, namespace)
        if name in seen:
            return name
        if name not in defs:
            raise SchemaError(f"schema refers to unknown named type {node!r}", reason_code="unknown_schema")
        return _expand(defs[name], defs, seen, namespace)
    if isinstance(node, list):
        return [_expand(b, defs, seen, namespace) for b in node]
    if isinstance(node, dict):
        kind = node.get("type")
        out = dict(node)
        if kind in ("record", "error", "enum", "fixed"):
            ns = node.get("namespace", namespace)
            seen.add(full_name(node["name"], ns))
            if kind in ("record", "error"):
                out["fields"] = [{**f, "type": _expand(f["type"], defs, seen, ns)} for f in node["fields"]]
            return out
        if kind == "array":
            out["items"] = _expand(node["items"], defs, seen, namespace)
        elif kind == "map":
            out["values"] = _expand(node["values"], defs, seen, namespace)
        elif isinstance(kind, (dict, list)) or (isinstance(kind, str) and kind not in _PRIMITIVES):
            out["type"] = _expand(kind, defs, seen, namespace)
        return out
    return node


def load_schemas(directory: str | Path = AVRO_DIR) -> dict[str, dict[str, Any]]:
    """Read every ``*.avsc`` in ``directory``; return full name -> expanded, self-contained schema."""
    raw: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(directory).glob("*.avsc")):
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SchemaError(f"cannot read schema file {path}: {exc}", reason_code="unknown_schema") from exc
        raw[full_name(schema["name"], schema.get("namespace"))] = schema
    return {name: _expand(schema, raw, set(), schema.get("namespace")) for name, schema in raw.items()}


class SchemaRegistry:
    """Fingerprint -> writer schema, plus full name -> the first schema registered under it.

    ``get`` consults ``resolver`` for unknown fingerprints; a resolved schema is checked against
    the fingerprint, cached, and NOT bound to its name (so learning a newer writer schema never
    changes which schema :meth:`named` returns to readers). Thread-safe for concurrent use.
    """

    def __init__(self, resolver: Resolver | None = None) -> None:
        self.resolver = resolver
        self._by_fp: dict[bytes, dict[str, Any]] = {}
        self._by_name: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def register(self, schema: Mapping[str, Any] | str) -> bytes:
        """Add a self-contained writer schema (dict or JSON text); return its 8-byte fingerprint.

        Idempotent. The first schema registered under a full name becomes :meth:`named`'s answer.
        """
        parsed: dict[str, Any] = json.loads(schema) if isinstance(schema, str) else dict(schema)
        try:
            fp = fingerprint(parsed)
        except Exception as exc:  # fastavro raises several types for a malformed schema
            raise SchemaError(f"not a valid Avro schema: {exc}", reason_code="unknown_schema") from exc
        with self._lock:
            self._by_fp.setdefault(fp, parsed)
            if isinstance(parsed, dict) and "name" in parsed:
                self._by_name.setdefault(full_name(parsed["name"], parsed.get("namespace")), fp)
        return fp

    def get(self, fp: bytes) -> dict[str, Any]:
        """The writer schema with fingerprint ``fp``; asks the resolver if unknown.

        Raises SchemaError(reason_code="unknown_schema") when neither knows it.
        """
        schema = self._by_fp.get(fp)
        if schema is not None:
            return schema
        if self.resolver is not None:
            try:
                found = self.resolver(bytes(fp))
            except SchemaError:
                raise
            except Exception as exc:  # a resolver failure must not escape as a random type
                raise SchemaError(
                    f"schema resolver failed for fingerprint {bytes(fp).hex()}: {exc}",
                    reason_code="unknown_schema",
                ) from exc
            if found is not None:
                try:
                    actual = fingerprint(found)
                except Exception as exc:
                    raise SchemaError(
                        f"resolver returned an invalid schema for {bytes(fp).hex()}: {exc}",
                        reason_code="unknown_schema",
                    ) from exc
                if actual == fp:
                    with self._lock:
                        return self._by_fp.setdefault(fp, dict(found))
                raise SchemaError(
                    f"resolver returned a schema with fingerprint {actual.hex()} for {bytes(fp).hex()}",
                    reason_code="unknown_schema",
                )
        raise SchemaError(f"unknown writer schema fingerprint {bytes(fp).hex()}", reason_code="unknown_schema")

    def named(self, name: str) -> dict[str, Any]:
        """The schema registered first under ``name`` (short names get the ``meterline.v1`` namespace)."""
        fp = self._by_name.get(full_name(name))
        if fp is None:
            raise SchemaError(f"no schema named {name!r} in the registry", reason_code="unknown_schema")
        return self._by_fp[fp]

    def fingerprint_of(self, name: str) -> bytes:
        """Fingerprint of :meth:`named` ``(name)``."""
        fp = self._by_name.get(full_name(name))
        if fp is None:
            raise SchemaError(f"no schema named {name!r} in the registry", reason_code="unknown_schema")
        return fp

    def __contains__(self, fp: object) -> bool:
        return fp in self._by_fp

    def __len__(self) -> int:
        return len(self._by_fp)

    def schemas(self) -> dict[bytes, dict[str, Any]]:
        """A snapshot copy of fingerprint -> schema."""
        return dict(self._by_fp)


_BUNDLED: dict[str, dict[str, Any]] | None = None


def bundled_schemas() -> dict[str, dict[str, Any]]:
    """Full name -> expanded schema for the bundled ``schemas/avro/*.avsc`` (read once per process)."""
    global _BUNDLED
    if _BUNDLED is None:
        _BUNDLED = load_schemas(AVRO_DIR)
    return _BUNDLED


_HISTORY: list[dict[str, Any]] | None = None


def historical_schemas() -> list[dict[str, Any]]:
    """Expanded earlier versions of the bundled schemas (``schemas/avro/history``), oldest first.

    Files are named ``<Name>.v<N>.avsc``; each version N is one directory-like group expanded on
    its own, so ``UsageBatch.v1`` inlines ``UsageEvent.v1``.
    """
    global _HISTORY
    if _HISTORY is None:
        groups: dict[str, dict[str, dict[str, Any]]] = {}
        for path in sorted(HISTORY_DIR.glob("*.v*.avsc")):
            version = path.name.split(".")[1]
            schema = json.loads(path.read_text(encoding="utf-8"))
            groups.setdefault(version, {})[full_name(schema["name"], schema.get("namespace"))] = schema
        out: list[dict[str, Any]] = []
        for version in sorted(groups, key=lambda v: int(v.lstrip("v") or 0)):
            raw = groups[version]
            out.extend(_expand(s, raw, set(), s.get("namespace")) for s in raw.values())
        _HISTORY = out
    return _HISTORY


def default_registry(resolver: Resolver | None = None) -> SchemaRegistry:
    """A new registry preloaded with the bundled schemas (cheap: the files are read once).

    The current schemas are registered first (they are what :meth:`SchemaRegistry.named` returns);
    then the historical ones, so readers decode records of older writers too.
    """
    registry = SchemaRegistry(resolver)
    for schema in bundled_schemas().values():
        registry.register(schema)
    for schema in historical_schemas():
        registry.register(schema)
    return registry
