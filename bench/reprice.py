"""Benchmark 10: ``meterline reprice`` over a month of N priced events (embedded chDB).

Rows are generated inside ClickHouse with the analytics benchmark's ``INSERT … SELECT`` (1,000
customers, 20 models, 5 projects), spread over 30 days. The catalog "as it stands now" has two
versions of every model (the second from mid-month) and a +20 % card for 100 customers, so every
customer × model group is split at a price change and many are re-carded. Timed: the dry run (rate
segments from the pricing engine + the aggregate report in ClickHouse) and the write of an apply
(the per-correction-key deltas inserted by ClickHouse), each once (bounded: one month, one run).
"""

from __future__ import annotations

import time
from datetime import UTC

from bench import BenchConfig, Result
from bench._stack import Stack
from bench.analytics import _INSERT, CHUNK

NAME = "reprice"
MONTH_MS = 30 * 86_400_000


def _book(mid_iso: str) -> dict:
    prices = []
    for i in range(20):
        for eff, scale in (("2020-01-01T00:00:00Z", 1), (mid_iso, 2)):
            prices.append(
                {
                    "provider": "bench",
                    "model": f"model-{i:02d}",
                    "effective_from": eff,
                    "per_million": {
                        "input": f"{(i + 1) * scale}.25",
                        "output": f"{(i + 3) * scale}.5",
                        "cached_input": f"0.{i + 1:02d}",
                    },
                }
            )
    cards = [{"customer_id": "*", "markup_pct": "0"}]
    cards += [{"customer_id": f"cust-{c:04d}", "markup_pct": "20"} for c in range(0, 1000, 10)]
    return {"currency": "USD", "prices": prices, "rate_cards": cards}


def run(cfg: BenchConfig, stack: Stack) -> list[Result]:
    from datetime import datetime

    from jobs.reprice.compute import Filters, open_reprice
    from meterline.core.pricing import PricingEngine, load_price_book

    name, client = stack.database("bench_reprice")
    n = cfg.reprice_rows
    start_s = 1_764_547_200  # 2025-12-01T00:00:00Z
    try:
        t0 = time.monotonic()
        for first in range(0, n, CHUNK):
            if time.monotonic() - t0 > cfg.reprice_load_budget_s:
                break
            client.command(
                _INSERT,
                parameters={
                    "start": start_s * 1000,
                    "span": MONTH_MS,
                    "n": n,
                    "first": first,
                    "count": min(CHUNK, n - first),
                },
            )
        stored = int(client.query("SELECT count() FROM usage_priced").result_rows[0][0])
        mid = datetime.fromtimestamp(start_s + 15 * 86400, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        engine = PricingEngine.from_book(load_price_book(_book(mid)))
        filters = Filters(start_s, start_s + 31 * 86400)
        scaled = "" if stored >= 10_000_000 else f" (SCALED DOWN from 10,000,000: {stored:,} rows)"
        t = time.perf_counter()
        with open_reprice(client, engine, filters) as rp:
            seg_s = time.perf_counter() - t
            t = time.perf_counter()
            plan = rp.report()
            report_s = time.perf_counter() - t
            t = time.perf_counter()
            n_rows, _ = rp.delta_summary()
            rp.insert_corrections("bench", datetime.now(UTC))
            write_s = time.perf_counter() - t
        written = int(client.query("SELECT count() FROM usage_corrections").result_rows[0][0])
        dry_s = seg_s + report_s
        return [
            Result(
                NAME,
                "dry run: re-rate a month (segments + ClickHouse aggregate)",
                round(dry_s, 2),
                "s",
                note=f"{stored:,} events: {len(plan.segments):,} rate segments from the engine in {seg_s:.1f} s, "
                f"report ({len(plan.lines):,} lines) in ClickHouse in {report_s:.1f} s{scaled}",
                details={"rows": stored, "segments": len(plan.segments), "segments_s": seg_s, "report_s": report_s},
            ),
            Result(
                NAME,
                "apply: deltas + INSERT ... SELECT of the corrections",
                round(write_s, 2),
                "s",
                note=f"{written:,} correction rows (of {n_rows:,} keys) over {stored:,} events{scaled}",
                details={"rows": stored, "corrections": written},
            ),
        ]
    finally:
        client.database = "default"
        client.command(f"DROP DATABASE IF EXISTS `{name}` SYNC")
        client.close()
