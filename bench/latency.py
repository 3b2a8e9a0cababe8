"""Benchmark 4: end-to-end latency at a steady offered rate, producer SDK to ClickHouse row.

One pipeline (1 faust worker + the sink thread, sink flush interval 500 ms as in ``meterline
up``). Warm-up: one event is sent and awaited, so start-up is not measured. Then events are sent
through the real gateway SDK (:class:`schemas.producer.UsageProducer`, linger 100 ms) at
``rate`` events/s for ``seconds`` s, paced every 10 ms, each with ``occurred_at`` = the moment it is
sent. Latency of an event = ``inserted_at − occurred_at`` of its row (the sink's insert time, same
clock). p50/p99 over every event of the run. The offered load is spread over 100 customers so
records carry ~10 events at 10k events/s (a gateway with 1,000 customers at 10 events/s each, or
the SDK's default 20 ms linger, gives one- or two-event records, which measures faust's
per-record cost instead: with 20 ms linger and 5k events/s the worker saturated and p50 was 3.4 s).
"""

from __future__ import annotations

import random
import time

from bench import BenchConfig, Result
from bench._events import bench_models, bench_price_book, customer_id, event
from bench._stack import PipelineRun, Stack

NAME = "latency"
CUSTOMERS = 100
TICK_S = 0.01
LINGER_MS = 100


def run(cfg: BenchConfig, stack: Stack) -> list[Result]:
    from schemas.producer import UsageProducer

    pipeline = PipelineRun(stack, "lat", price_book=bench_price_book())
    rng = random.Random(5)
    models = bench_models()
    try:
        pipeline.start(1)
        producer = UsageProducer(stack.bootstrap, pipeline.usage_topic, linger_ms=LINGER_MS)
        try:
            producer.send(event(rng, event_id="warmup", customer="cust-warm", project="warmup",
                                occurred_at_ms=int(time.time() * 1000), models=models))
            producer.flush(30)
            pipeline.wait_for("the warm-up event", lambda: pipeline.count() > 0, timeout=120)

            total = int(cfg.latency_rate * cfg.latency_seconds)
            per_tick = cfg.latency_rate * TICK_S
            sent = 0
            owed = 0.0
            t0 = time.monotonic()
            next_tick = t0
            behind_ticks = 0
            while sent < total:
                owed += per_tick
                k = min(int(owed), total - sent)
                owed -= k
                now_ms = int(time.time() * 1000)
                for _ in range(k):
                    producer.send(event(rng, event_id=f"l{sent:08d}", customer=customer_id(sent % CUSTOMERS),
                                        project="latency", occurred_at_ms=now_ms, models=models))
                    sent += 1
                next_tick += TICK_S
                delay = next_tick - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                else:
                    behind_ticks += 1
            offered_s = time.monotonic() - t0
            producer.flush(30)
        finally:
            producer.close()
        drained = True
        try:
            pipeline.wait_for(f"{total} latency rows",
                              lambda: pipeline.count("WHERE project = 'latency'") >= total, timeout=cfg.latency_drain_s)
        except TimeoutError:  # the pipeline fell far behind the offered rate: report what arrived
            drained = False
        p50, p99, pmax, n = pipeline.ch.query(
            "SELECT quantileExact(0.5)(d), quantileExact(0.99)(d), max(d), count() FROM"
            " (SELECT toUnixTimestamp64Milli(inserted_at) - toUnixTimestamp64Milli(occurred_at) AS d"
            "  FROM usage_priced WHERE project = 'latency')"
        ).result_rows[0]
    finally:
        pipeline.close()
    achieved = total / offered_s
    note = (f"{total:,} events at {cfg.latency_rate:,}/s offered for {cfg.latency_seconds:g} s "
            f"(achieved {achieved:,.0f}/s), {CUSTOMERS} customers, linger {LINGER_MS} ms, 1 worker")  # fmt: skip
    if not drained:
        note += f"; NOT DRAINED within {cfg.latency_drain_s:.0f} s: {int(n):,} of {total:,} rows measured"
    details = {"events": int(n), "offered_rate": cfg.latency_rate, "achieved_rate": achieved,
               "seconds": cfg.latency_seconds, "max_ms": int(pmax), "ticks_behind": behind_ticks}  # fmt: skip
    return [
        Result(NAME, "occurred_at -> row in ClickHouse, p50", int(p50), "ms", note=note, details=details),
        Result(NAME, "occurred_at -> row in ClickHouse, p99", int(p99), "ms", note=f"max {int(pmax)} ms"),
        Result(NAME, "occurred_at -> balance visible over API", "n/a", "", note="n/a (credits not built)"),
    ]
