"""Benchmark 2: ``PricingProcessor.process_record`` on 500-event ``UsageBatch`` records.

This is the whole per-record step a faust worker runs — decode, validate, dedupe, price,
encode the ``PricedBatch`` — without Kafka, in this process. Records are pre-encoded (the
producer's cost is not counted), each run uses a fresh processor (empty dedupe index). A final
pass under cProfile says where the time goes; its top functions go into the report.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time
from typing import Any

from bench import BenchConfig, Result, median
from bench._events import BATCH_EVENTS, bench_price_book, usage_records

NAME = "codec+processor"
TOP_FUNCTIONS = 12


def _records(cfg: BenchConfig) -> list[tuple[bytes, bytes, int]]:
    n_events = cfg.processor_records * BATCH_EVENTS
    now = int(time.time() * 1000)
    customers = max(1, cfg.processor_records // 2)
    return list(usage_records(n_events, customers, start_ms=now - 3_600_000, span_ms=3_000_000, seed=3))


def _pass(engine: Any, records: list[tuple[bytes, bytes, int]]) -> tuple[float, int]:
    from pipeline.processor import PricingProcessor

    proc = PricingProcessor(engine, source_topic="bench.usage-events")
    priced = 0
    t0 = time.perf_counter()
    for offset, (key, value, _) in enumerate(records):
        priced += proc.process_record(offset % 4, offset, key, value).priced
    return time.perf_counter() - t0, priced


def profile_top(engine: Any, records: list[tuple[bytes, bytes, int]], top: int = TOP_FUNCTIONS) -> list[dict[str, Any]]:
    """cProfile one pass; the ``top`` functions by own time (tottime), with share of the total."""
    prof = cProfile.Profile()
    prof.enable()
    _pass(engine, records)
    prof.disable()
    stats = pstats.Stats(prof, stream=io.StringIO())
    total = sum(v[2] for v in stats.stats.values()) or 1.0  # type: ignore[attr-defined]
    rows = []
    for (filename, line, func), (_cc, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        short = filename.split("site-packages/")[-1].replace("/work/main/", "")
        rows.append(
            {
                "function": f"{short}:{line}({func})",
                "calls": nc,
                "tottime_s": round(tt, 4),
                "cumtime_s": round(ct, 4),
                "share_pct": round(100 * tt / total, 1),
            }
        )
    rows.sort(key=lambda r: r["tottime_s"], reverse=True)
    return rows[:top]


def run(cfg: BenchConfig) -> list[Result]:
    from meterline.core.pricing import PricingEngine, load_price_book

    engine = PricingEngine.from_book(load_price_book(bench_price_book()))
    records = _records(cfg)
    n_events = sum(n for _, _, n in records)
    rates, rec_rates = [], []
    priced = 0
    for _ in range(cfg.runs):
        dt, priced = _pass(engine, records)
        rates.append(n_events / dt)
        rec_rates.append(len(records) / dt)
    top = profile_top(engine, records)
    ok = priced == n_events
    return [
        Result(
            NAME,
            "PricingProcessor.process_record",
            round(median(rates)),
            "events/s",
            note=f"median of {cfg.runs} runs x {len(records)} records x {BATCH_EVENTS} events, one core"
            + ("" if ok else f"; ONLY {priced}/{n_events} PRICED"),
            details={"rates_per_run": rates, "events": n_events, "records": len(records), "profile_top": top},
        ),
        Result(
            NAME,
            "PricingProcessor.process_record",
            round(median(rec_rates)),
            "records/s",
            note=f"{BATCH_EVENTS}-event UsageBatch records",
        ),
    ]
