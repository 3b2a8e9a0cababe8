"""Inputs of a chaos session: valid usage events of the oracle's customers and models, and hostile
records that must each end in one ``usage_rejected`` row."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from devtools.verify.oracle import CUSTOMERS, RATES

# --------------------------------------------------------------------------- inputs


def make_events(rng: random.Random, n: int, *, now: datetime | None = None, prefix: str = "") -> list[Any]:
    """``n`` valid UsageEvents over :data:`CUSTOMERS` and :data:`RATES`, occurred in the last ~3 hours."""
    from schemas.models import UsageEvent

    now = now or datetime.now(UTC)
    models = list(RATES)
    out = []
    for _ in range(n):
        provider, model, version = rng.choice(models)
        rates = RATES[(provider, model, version)]
        out.append(
            UsageEvent(
                event_id=f"{prefix}{uuid.UUID(int=rng.getrandbits(128))}",
                occurred_at=now - timedelta(seconds=rng.randint(60, 3 * 3600), milliseconds=rng.randint(0, 999)),
                customer_id=rng.choice(CUSTOMERS),
                project=rng.choice(["alpha", "beta", None]),
                feature="chat",
                provider=provider,
                model=model,
                model_version=version,
                input_tokens=rng.randint(0, 200_000),
                output_tokens=rng.randint(1, 8_000),
                reasoning_tokens=rng.randint(0, 4_000) if model == "o1" else 0,
                cached_input_tokens=rng.randint(0, 50_000) if "cached_input" in rates else 0,
                cache_write_tokens=rng.randint(0, 9_999) if "cache_write" in rates else 0,
            )
        )
    return out


def hostile_records(rng: random.Random, now_ms: int, *, tag: str = "") -> list[tuple[bytes | None, bytes, str, int]]:
    """Raw ``usage-events`` records a broken or hostile producer could send.

    Each item is ``(key, value, expected_reason_code, dead_letters)``: the record must end as that
    many ``usage_rejected`` rows carrying that reason (the reason of the first, for mixed records).
    """
    from schemas.codec import MAGIC, encode_usage_batch
    from schemas.registry import default_registry

    def ev(i: int, **over: Any) -> dict[str, Any]:
        d: dict[str, Any] = {
            "event_id": f"hostile-{tag}{i}",
            "occurred_at": now_ms - 60_000,
            "customer_id": "hooli",
            "provider": "openai",
            "model": "gpt-4o",
            "input_tokens": 10,
            "output_tokens": 5,
        }
        d.update(over)
        return d

    good = encode_usage_batch([ev(0)])
    unknown_fp = next(
        fp
        for fp in (bytes(rng.getrandbits(8) for _ in range(8)) for _ in range(100))
        if not _known(default_registry(), fp)
    )
    return [
        (b"hooli", good[: len(good) // 2], "undecodable", 1),  # truncated
        (None, b"\x00" + bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64))), "not_single_object", 1),
        (b"hooli", MAGIC + unknown_fp + good[10:], "unknown_schema", 1),  # wrong fingerprint
        (b"hooli", good + b"\x00", "undecodable", 1),  # trailing bytes
        (b"hooli", b"", "not_single_object", 1),  # Kafka hands an empty value over as b""
        (b"hooli", encode_usage_batch([ev(1, input_tokens=-5)]), "negative_count", 1),
        (b"hooli", encode_usage_batch([ev(2, output_tokens=2**62)]), "absurd_count", 1),
        (b"hooli", encode_usage_batch([ev(3, input_tokens=0, output_tokens=0, requests=0)]), "empty_usage", 1),
        (b"hooli", encode_usage_batch([ev(4, occurred_at=0)]), "timestamp_too_old", 1),  # 1970
        (b"hooli", encode_usage_batch([ev(5, occurred_at=32_503_680_000_000)]), "timestamp_in_future", 1),  # 2999
        (b"hooli", encode_usage_batch([ev(6, model="gpt-7-preview")]), "unknown_model", 1),
        (b"hooli", encode_usage_batch([ev(7, labels={f"k{i}": "v" for i in range(5000)})]), "too_many_labels", 1),
        (b"hooli", encode_usage_batch([ev(8, event_id="")]), "missing_event_id", 1),
        (b"hooli", encode_usage_batch([ev(9, customer_id="x" * 4000)]), "id_too_long", 1),
        (b"hooli", encode_usage_batch([ev(10, model="NaN", provider="nan")]), "unknown_model", 1),
    ]


def _known(registry: Any, fp: bytes) -> bool:
    from meterline.core.errors import SchemaError

    try:
        registry.get(fp)
    except SchemaError:
        return False
    return True
