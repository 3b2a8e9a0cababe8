"""Benchmark 7: ``POST /v1/authorize`` under concurrent load, answered by the real credit agent.

The production stack (:class:`bench._stack.RuntimeRun`: Runtime with 1 faust worker running the
pricing and credit agents, the API with the credits routes: CommandPublisher → ``ledger-commands``
→ credit agent → ``ledger-replies`` → ReplyWaiter). ``CUSTOMERS`` customers, each with a large grant
(so every answer is an ``allow`` that places a hold) and its own customer API key. A separate
process (``bench/_loadgen.py authorize``) runs first 1 client (unloaded latency), then
``authorize_concurrency`` concurrent asyncio clients (httpx, keep-alive) for ``authorize_seconds``
s or ``authorize_max_requests`` requests, whichever comes first, each request for the next customer
round-robin. Figures: answered requests/s, p50/p99 latency at the client, status and decision
counts, and CPU seconds per component over the loaded phase.
"""

from __future__ import annotations

import time
from typing import Any

from bench import BenchConfig, Result
from bench._events import bench_price_book, customer_id
from bench._stack import RuntimeRun, Stack, cpu_delta, cpu_seconds, loadgen_result, read_topic, run_loadgen, thread_cpu
from bench.latency import grant_and_wait, quantile

NAME = "authorize"
CUSTOMERS = 20
BODY = {"provider": "bench", "model": "model-03", "input_tokens_estimate": 1000, "max_output_tokens": 500}


def _load(
    rr: RuntimeRun, stack: Stack, keys: dict[str, str], concurrency: int, seconds: float, max_requests: int
) -> dict[str, Any]:
    cpu0 = (thread_cpu(), [cpu_seconds(p) for p in rr.worker_pids()], cpu_seconds(stack.broker.pid or 0))
    proc = run_loadgen(
        "authorize",
        {
            "url": rr.url,
            "keys": keys,
            "body": BODY,
            "concurrency": concurrency,
            "seconds": seconds,
            "max_requests": max_requests,
        },
        stack.root / "loadgen",
        timeout=seconds + 120,
    )
    res = loadgen_result(proc)
    cpu1 = (thread_cpu(), [cpu_seconds(p) for p in rr.worker_pids()], cpu_seconds(stack.broker.pid or 0))
    lat = sorted(res["latencies_ms"])
    ok = res["statuses"].get("200", 0)
    return {
        "concurrency": concurrency,
        "requests": len(lat),
        "answered_200": ok,
        "statuses": res["statuses"],
        "decisions": res["decisions"],
        "elapsed_s": round(res["elapsed_s"], 2),
        "rps": ok / res["elapsed_s"],
        "p50_ms": round(quantile(lat, 0.5), 1) if lat else None,
        "p99_ms": round(quantile(lat, 0.99), 1) if lat else None,
        "max_ms": round(lat[-1], 1) if lat else None,
        "cpu_s": {
            "worker": [round(b - a, 1) for a, b in zip(cpu0[1], cpu1[1])],
            "broker": round(cpu1[2] - cpu0[2], 1),
            "load generator": round(res["cpu_s"], 1),
            "bench process threads": cpu_delta(cpu0[0], cpu1[0]),
        },
    }


def agent_hop_ms(rr: RuntimeRun) -> list[int]:
    """Per request: reply record's timestamp − command record's timestamp (both producers' create
    times): how long the command took from the API's publish to the credit agent's reply."""
    import json

    sent = {}
    for _k, v, ts in read_topic(rr.stack.bootstrap, rr.settings.topic("ledger-commands")):
        doc = json.loads(v) if v else {}
        if doc.get("type") == "authorize":
            sent[doc["request_id"]] = ts
    return sorted(
        ts - sent[k.decode()]
        for k, _v, ts in read_topic(rr.stack.bootstrap, rr.settings.topic("ledger-replies"))
        if k and k.decode() in sent
    )


def run(cfg: BenchConfig, stack: Stack) -> list[Result]:
    from meterline.shell.api.keys import KeyStore

    customers = [customer_id(c) for c in range(CUSTOMERS)]
    with RuntimeRun(stack, "auth", price_book=bench_price_book()) as rr:
        grant_and_wait(rr, customers, "1000000.00")
        store = KeyStore.for_data_dir(rr.settings.data_dir)
        keys = {c: store.create(c)[1] for c in customers}
        t = time.monotonic()
        single = _load(rr, stack, keys, 1, cfg.authorize_single_seconds, 10_000)
        loaded = _load(rr, stack, keys, cfg.authorize_concurrency, cfg.authorize_seconds, cfg.authorize_max_requests)
        total_s = time.monotonic() - t
        agent = agent_hop_ms(rr)
    c = loaded["cpu_s"]
    cpu_note = (
        f"CPU s over {loaded['elapsed_s']} s: worker {c['worker']}, broker {c['broker']}, load generator "
        f"{c['load generator']}, bench-process threads {c['bench process threads']}"
    )
    bad = {k: v for k, v in loaded["statuses"].items() if k != "200"}
    note = (
        f"{loaded['concurrency']} concurrent clients for {loaded['elapsed_s']} s, {CUSTOMERS} customers with own "
        f"keys; decisions {loaded['decisions']}" + (f"; NON-200: {bad}" if bad else "")
    )
    return [
        Result(
            NAME,
            f"answered requests/s, {loaded['concurrency']} concurrent clients",
            round(loaded["rps"], 1),
            "req/s",
            note=note,
            details={"single": single, "loaded": loaded, "seconds": round(total_s, 1)},
        ),
        Result(
            NAME,
            f"latency p50, {loaded['concurrency']} concurrent clients",
            loaded["p50_ms"],
            "ms",
            note=f"p99 below; max {loaded['max_ms']} ms",
        ),
        Result(NAME, f"latency p99, {loaded['concurrency']} concurrent clients", loaded["p99_ms"], "ms", note=cpu_note),
        Result(
            NAME,
            "latency p50 / p99, 1 client (unloaded)",
            f"{single['p50_ms']} / {single['p99_ms']}",
            "ms",
            note=f"{single['requests']} sequential requests, {round(single['rps'], 1)} req/s",
        ),
        Result(
            NAME,
            "of which command publish -> agent reply (p50 / p99)",
            f"{quantile(agent, 0.5):,} / {quantile(agent, 0.99):,}" if agent else None,
            "ms",
            note=f"{len(agent):,} requests, both phases: timestamps of ledger-commands and ledger-replies records; "
            "the rest of the client latency is the API, the publish ack and the ReplyWaiter's pick-up",
        ),
    ]
