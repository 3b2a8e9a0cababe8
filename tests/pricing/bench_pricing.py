"""Single-core throughput of PricingEngine.price on the seed price book (not a test; no assertions).

Run: .venv/bin/python tests/pricing/bench_pricing.py [N]
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

from meterline.core.pricing import PricingEngine, load_price_book

SEED = Path(__file__).resolve().parents[2] / "infra" / "prices" / "seed.yaml"


def make_records(n: int) -> list[dict[str, object]]:
    rng = random.Random(7)
    models = [
        ("openai", "gpt-4o", None),
        ("openai", "gpt-4o-2024-05-13", None),
        ("openai", "o1", None),
        ("anthropic", "claude-3-5-sonnet", "20241022"),
        ("google", "gemini-1.5-pro", None),
        ("meta", "llama-3.1-405b", None),
        ("mistral", "mixtral-8x22b", None),
        ("meta", "llama-3-70b", None),
    ]
    customers = [f"cust-{i}" for i in range(200)] + ["acme"]
    out = []
    for _ in range(n):
        p, m, v = rng.choice(models)
        cached = rng.randrange(0, 2000) if m not in ("llama-3.1-405b", "mixtral-8x22b", "llama-3-70b") else 0
        out.append(
            {
                "provider": p,
                "model": m,
                "model_version": v,
                "occurred_at": 1_717_200_000_000 + rng.randrange(0, 90 * 86_400_000),
                "customer_id": rng.choice(customers),
                "input_tokens": rng.randrange(0, 20_000),
                "output_tokens": rng.randrange(0, 4_000),
                "cached_input_tokens": cached,
                "cache_write_tokens": rng.randrange(0, 500) if p == "anthropic" else 0,
                "reasoning_tokens": rng.randrange(0, 3_000) if m == "o1" else 0,
                "requests": 1,
            }
        )
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 500_000
    engine = PricingEngine.from_book(load_price_book(SEED))
    records = make_records(n)
    price = engine.price
    for r in records[:10_000]:  # warm the rate cache
        price(r)
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for r in records:
            price(r)
        best = max(best, n / (time.perf_counter() - t0))
    print(f"{n} events, best of 3: {best:,.0f} events/s ({sys.version.split()[0]})")


if __name__ == "__main__":
    main()
