"""Benchmarks 3 and 6: sustained end-to-end throughput on the real local broker, and worker memory.

For each worker count (1, then 2): fresh topics and database; the bench price book (20 models) is
published to the prices topic; N pre-encoded events (500 per ``UsageBatch`` record, keyed by
customer, murmur2) are produced to ``usage-events`` BEFORE anything consumes, so the producer
is not part of the figure; then the ClickHouse sink (a thread here) and the faust worker
processes start, and we wait until all N priced rows are in ``usage_priced`` — or until the
time budget (``e2e_budget_s`` per worker count) is spent; then the figures are computed over the
rows that got through and the report says so.

Figures:

* **sustained events/s** = 80 % of N / (time the 90th-percentile row was inserted − time the
  10th-percentile row was), from ``inserted_at`` in ClickHouse: the steady state, without start-up
  and the tail. records/s = the same / 500.
* **wall events/s** = N / (last row visible − worker start), start-up (faust group join) included.
* CPU seconds per component over the run (workers, sink thread, broker) from /proc: where the time
  goes across processes. The in-process cProfile of the processor is benchmark 2's.
* **peak RSS** (VmHWM) of each worker process at the end of the run.
"""

from __future__ import annotations

import time
from typing import Any

from bench import BenchConfig, Result
from bench._events import BATCH_EVENTS, bench_price_book, usage_records
from bench._stack import PipelineRun, Stack, cpu_seconds, produce_raw, vm_hwm_kib

NAME = "e2e"
TARGET_EPS = 50_000


def _one(
    stack: Stack, records: list[tuple[bytes, bytes, int]], n_events: int, workers: int, budget_s: float
) -> dict[str, Any]:
    import os

    run = PipelineRun(stack, f"e2e{workers}w", price_book=bench_price_book())
    try:
        t_prod = time.monotonic()
        n_rec, _ = produce_raw(stack.bootstrap, run.usage_topic, records)
        produce_s = time.monotonic() - t_prod
        broker_cpu0 = cpu_seconds(stack.broker.pid) if stack.broker.pid else float("nan")
        t0 = time.monotonic()
        run.start(workers)
        sink_tid = None
        deadline = time.monotonic() + 10
        while sink_tid is None and time.monotonic() < deadline:
            sink_tid = run.sink_thread.native_id
            time.sleep(0.01)
        t_first = run.wait_for("the first priced row", lambda: run.count() > 0, timeout=120)
        complete = True
        try:
            t_end = run.wait_for(
                f"{n_events} priced rows", lambda: run.count() >= n_events, timeout=budget_s, every=0.5
            )
        except TimeoutError:  # time budget spent: measure what got through, and say so
            complete, t_end = False, time.monotonic()
        balances = _wait_balances(stack, run, t0, budget_s) if complete else {"caught_up": False, "reason": "rows"}
        hwm = [vm_hwm_kib(w.pid) for w in run.workers if w.pid]
        worker_cpu = [cpu_seconds(w.pid) for w in run.workers if w.pid]
        sink_cpu = cpu_seconds(os.getpid(), sink_tid) if sink_tid else float("nan")
        broker_cpu = cpu_seconds(stack.broker.pid) - broker_cpu0 if stack.broker.pid else float("nan")
        q = run.ch.query(
            "SELECT count(), uniqExact(customer_id, event_id),"
            " toUnixTimestamp64Milli(quantileExact(0.1)(inserted_at)),"
            " toUnixTimestamp64Milli(quantileExact(0.9)(inserted_at)),"
            " toUnixTimestamp64Milli(min(inserted_at)), toUnixTimestamp64Milli(max(inserted_at))"
            " FROM usage_priced"
        ).result_rows[0]
        rows, unique, q10, q90, first_ms, last_ms = (int(v) for v in q)
        rejected = int(run.ch.query("SELECT count() FROM usage_rejected").result_rows[0][0])
        span = max(q90 - q10, 1) / 1000
        # Rows AND balances: from the first output (row or status) to the later of the last row
        # and the status that brought the last customer's balance up to its priced total.
        done_ms = max(last_ms, balances.get("caught_up_ms") or 0)
        start_ms = min(first_ms, balances.get("first_status_ms") or first_ms)
        both_eps = rows / max((done_ms - start_ms) / 1000, 0.001) if balances.get("caught_up") else None
        return {
            "workers": workers,
            "events": n_events,
            "records": n_rec,
            "rows": rows,
            "unique_rows": unique,
            "rejected": rejected,
            "produce_s": round(produce_s, 2),
            "sustained_eps": 0.8 * rows / span,
            "sustained_rps": 0.8 * rows / span / BATCH_EVENTS,
            "rows_and_balances_eps": both_eps,
            "balances": balances,
            "complete": complete,
            "budget_s": budget_s,
            "wall_eps": rows / (t_end - t0),
            "startup_s": round(t_first - t0, 2),
            "insert_span_s": round((last_ms - first_ms) / 1000, 2),
            "worker_peak_rss_mib": [round(h / 1024, 1) for h in hwm if h],
            "cpu_s": {
                "workers": [round(c, 1) for c in worker_cpu],
                "sink_thread": round(sink_cpu, 1),
                "broker": round(broker_cpu, 1),
            },
            "sink": run.sink.stats(),
        }
    finally:
        run.close()


def _wait_balances(stack: Stack, run: PipelineRun, t0: float, budget_s: float) -> dict[str, Any]:
    """Wait until every customer's balance has caught up with its priced rows, then say when.

    Caught up = the credit agent's latest ``customer-status`` of the customer shows ``overage``
    (the bench customers have no grant and the default ``allow`` policy, so every charge is
    overage) equal to the exact sum of ``charge`` of its rows in ClickHouse. The time of a
    customer is the producer timestamp of the first status that reached the total; the run's is
    the latest over the customers. Bounded by what is left of the time budget (at least 30 s).
    """
    import json

    from bench._stack import read_topic
    from meterline.core.ledger import parse_amount

    totals = {
        str(c): parse_amount(str(v))
        for c, v in run.ch.query(
            "SELECT customer_id, toString(sum(charge)) FROM usage_priced GROUP BY customer_id"
        ).result_rows
    }
    topic = run.settings.topic("customer-status")
    deadline = max(t0 + budget_s, time.monotonic() + 30)
    while True:
        reached: dict[str, int] = {}
        first_ms: int | None = None
        for key, value, ts in read_topic(stack.bootstrap, topic):
            if not key or not value:
                continue
            first_ms = ts if first_ms is None else min(first_ms, ts)
            c = key.decode()
            if c in totals and c not in reached and parse_amount(json.loads(value)["balance"]["overage"]) >= totals[c]:
                reached[c] = ts
        behind = len(totals) - len(reached)
        if behind == 0 or time.monotonic() > deadline:
            return {
                "caught_up": behind == 0,
                "customers": len(totals),
                "customers_behind": behind,
                "first_status_ms": first_ms,
                "caught_up_ms": max(reached.values()) if reached and behind == 0 else None,
            }
        time.sleep(1.0)


def run(cfg: BenchConfig, stack: Stack) -> list[Result]:
    now = int(time.time() * 1000)
    t = time.monotonic()
    records = list(usage_records(cfg.e2e_events, cfg.e2e_customers, start_ms=now - 3_600_000, span_ms=3_000_000))
    encode_s = time.monotonic() - t
    scaled = "" if cfg.e2e_events >= 1_000_000 else f" (SCALED DOWN from 1,000,000: {cfg.e2e_events:,} events)"
    out: list[Result] = []
    for workers in cfg.e2e_workers:
        r = _one(stack, records, cfg.e2e_events, workers, cfg.e2e_budget_s)
        r["encode_s"] = round(encode_s, 2)
        complete = r["unique_rows"] == cfg.e2e_events and r["rows"] == cfg.e2e_events and r["rejected"] == 0
        if not r["complete"]:
            scaled += (
                f"; TIME BUDGET ({cfg.e2e_budget_s:.0f} s) SPENT: measured on the {r['rows']:,} rows that got through"
            )
        note = (
            f"{cfg.e2e_events:,} events, {cfg.e2e_customers:,} customers, 20 models{scaled}; "
            f"CPU s workers {r['cpu_s']['workers']}, sink {r['cpu_s']['sink_thread']}, "
            f"broker {r['cpu_s']['broker']}"
        )
        if not complete and r["complete"]:
            note += f"; ROWS {r['rows']} UNIQUE {r['unique_rows']} REJECTED {r['rejected']}"
        bal = r["balances"]
        both = r["rows_and_balances_eps"]
        out += [
            Result(
                NAME,
                f"rows in ClickHouse AND balances caught up, {workers} worker(s)",
                round(both) if both is not None else None,
                "events/s",
                f">= {TARGET_EPS:,}",
                (both >= TARGET_EPS) if both is not None else False,
                "all events / (later of last row and last balance caught up - first row or status out); "
                + (
                    f"{bal.get('customers', 0):,} customers' overage = their rows' charge"
                    if bal.get("caught_up")
                    else f"NOT CAUGHT UP: {bal.get('customers_behind', '?')} customers behind at the budget's end"
                ),
                details={"balances": bal},
            ),
            Result(
                NAME,
                f"sustained throughput, {workers} worker(s)",
                round(r["sustained_eps"]),
                "events/s",
                f">= {TARGET_EPS:,}",
                r["sustained_eps"] >= TARGET_EPS,
                note,
                details=r,
            ),
            Result(
                NAME,
                f"sustained throughput, {workers} worker(s)",
                round(r["sustained_rps"]),
                "records/s",
                note=f"{BATCH_EVENTS}-event UsageBatch records",
            ),
            Result(
                NAME,
                f"wall throughput incl. start-up, {workers} worker(s)",
                round(r["wall_eps"]),
                "events/s",
                note=f"start-up to first row {r['startup_s']} s",
            ),
            Result(
                "memory",
                f"worker peak RSS (VmHWM), {workers} worker(s)",
                max(r["worker_peak_rss_mib"]) if r["worker_peak_rss_mib"] else None,
                "MiB",
                note=f"per worker: {r['worker_peak_rss_mib']} at the end of the e2e run",
            ),
        ]
    sink = profile_sink(stack, records[: max(1, 20_000 // BATCH_EVENTS)])
    out.append(
        Result(
            NAME,
            "sink step, in process (decode + row mapping + chDB insert)",
            round(1e6 / (sink["decode_and_rows_us_per_event"] + sink["insert_us_per_event"])),
            "events/s",
            note=f"{sink['decode_and_rows_us_per_event']} us/event decode+rows, "
            f"{sink['insert_us_per_event']} us/event insert, one thread",
            details=sink,
        )
    )
    return out


def profile_sink(stack: Stack, records: list[tuple[bytes, bytes, int]], top: int = 10) -> dict[str, Any]:
    """In-process cProfile of the sink's per-event work on real PricedBatch bytes: decode, row mapping,
    one chDB insert (what ``ClickHouseSink.flush`` does besides its dedupe query and commit)."""
    import cProfile
    import pstats

    from meterline.core.pricing import PricingEngine, load_price_book
    from pipeline.processor import PricingProcessor
    from pipeline.sink import PRICED_COLUMNS, priced_row
    from schemas.codec import decode_priced_batch

    proc = PricingProcessor(PricingEngine.from_book(load_price_book(bench_price_book())), source_topic="b")
    priced = [proc.process_record(0, i, k, v).priced_value for i, (k, v, _) in enumerate(records)]
    name, client = stack.database("bench_sinkprof")
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    rows = [
        priced_row(item, partition=0, offset=i)
        for i, value in enumerate(priced)
        if value
        for item in decode_priced_batch(value)
    ]
    t_rows = time.perf_counter()
    client.insert("usage_priced", rows, column_names=PRICED_COLUMNS)
    prof.disable()
    t_end = time.perf_counter()
    client.database = "default"
    client.command(f"DROP DATABASE IF EXISTS `{name}` SYNC")
    client.close()
    stats = pstats.Stats(prof)
    total = sum(v[2] for v in stats.stats.values()) or 1.0  # type: ignore[attr-defined]
    tops = []
    for (filename, line, func), (_, nc, tt, _ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        short = filename.split("site-packages/")[-1].replace("/work/main/", "")
        tops.append(
            {
                "function": f"{short}:{line}({func})",
                "calls": nc,
                "tottime_s": round(tt, 4),
                "share_pct": round(100 * tt / total, 1),
            }
        )
    tops.sort(key=lambda r: r["tottime_s"], reverse=True)
    n = len(rows)
    return {
        "events": n,
        "decode_and_rows_us_per_event": round((t_rows - t0) / n * 1e6, 1),
        "insert_us_per_event": round((t_end - t_rows) / n * 1e6, 1),
        "profile_top": tops[:top],
    }
