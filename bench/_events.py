"""Deterministic synthetic workload: a 20-model bench price book and usage-event records.

Records are plain dicts in the codec's form (``occurred_at`` as int epoch ms), ready for
:func:`schemas.codec.encode_usage_batch`. The same seed always gives the same events, so runs are
comparable. Token counts are drawn from a skewed distribution (most prompts short, some long).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from schemas.codec import encode_usage_batch

BENCH_PROVIDER = "bench"
N_MODELS = 20
BATCH_EVENTS = 500  # events per UsageBatch record (the producer SDK's default max_batch_events)
EFFECTIVE_FROM = "2024-01-01T00:00:00Z"


def bench_models(n: int = N_MODELS) -> list[str]:
    return [f"model-{i:02d}" for i in range(n)]


def bench_price_book(n_models: int = N_MODELS) -> dict[str, Any]:
    """A price-file mapping (see docs/pricing.md) for ``n_models`` models with cache rates, plus
    rate cards: ``*`` at list price and every 10th customer (``cust-0000``, ``cust-0010``, …) at +20 %."""
    prices = []
    for i, model in enumerate(bench_models(n_models)):
        inp = f"{0.15 + 0.35 * i:.2f}"
        out = f"{0.60 + 1.40 * i:.2f}"
        prices.append(
            {
                "provider": BENCH_PROVIDER,
                "model": model,
                "effective_from": EFFECTIVE_FROM,
                "per_million": {
                    "input": inp,
                    "output": out,
                    "cached_input": f"{0.075 + 0.175 * i:.4f}",
                    "cache_write": f"{0.1875 + 0.4375 * i:.5f}",
                },
            }
        )
    cards: list[dict[str, Any]] = [{"customer_id": "*", "markup_pct": "0"}]
    cards += [{"customer_id": customer_id(c), "markup_pct": "20"} for c in range(0, 1000, 10)]
    return {"currency": "USD", "prices": prices, "rate_cards": cards}


def customer_id(i: int) -> str:
    return f"cust-{i:04d}"


def tokens(rng: random.Random) -> tuple[int, int, int, int]:
    """(input, output, cached_input, cache_write) token counts of one plausible request."""
    inp = int(rng.lognormvariate(6.5, 1.2)) + 1
    out = int(rng.lognormvariate(5.0, 1.0)) + 1
    r = rng.random()
    cached = int(inp * rng.random() * 2) if r < 0.3 else 0
    write = int(rng.lognormvariate(6.0, 1.0)) if r > 0.95 else 0
    return inp, out, cached, write


def event(
    rng: random.Random,
    *,
    event_id: str,
    customer: str,
    occurred_at_ms: int,
    models: list[str],
    project: str = "default",
) -> dict[str, Any]:
    inp, out, cached, write = tokens(rng)
    return {
        "event_id": event_id,
        "occurred_at": occurred_at_ms,
        "customer_id": customer,
        "api_key_id": f"key-{customer}",
        "project": project,
        "feature": None,
        "user_id": None,
        "session_id": None,
        "gateway": "bench",
        "provider": BENCH_PROVIDER,
        "model": models[rng.randrange(len(models))],
        "model_version": None,
        "request_id": None,
        "input_tokens": inp,
        "output_tokens": out,
        "cached_input_tokens": cached,
        "cache_write_tokens": write,
        "reasoning_tokens": 0,
        "requests": 1,
        "labels": {},
    }


def usage_records(
    n_events: int, n_customers: int, *, start_ms: int, span_ms: int, seed: int = 7, batch: int = BATCH_EVENTS
) -> Iterator[tuple[bytes, bytes, int]]:
    """``(key, UsageBatch bytes, n_events)`` records: ``n_events`` spread evenly over the customers,
    ``batch`` events per record, occurred_at increasing through ``[start_ms, start_ms + span_ms)``."""
    rng = random.Random(seed)
    models = bench_models()
    per_customer = [n_events // n_customers + (1 if c < n_events % n_customers else 0) for c in range(n_customers)]
    step = max(1, span_ms // max(1, n_events))
    seq = 0
    done = [0] * n_customers
    while seq < n_events:
        for c in range(n_customers):
            k = min(batch, per_customer[c] - done[c])
            if k <= 0:
                continue
            cust = customer_id(c)
            evs = []
            for _ in range(k):
                evs.append(
                    event(
                        rng, event_id=f"e{seq:09d}", customer=cust, occurred_at_ms=start_ms + seq * step, models=models
                    )
                )
                seq += 1
            done[c] += k
            yield cust.encode(), encode_usage_batch(evs), k
