"""Benchmark 4: end-to-end latency at a steady offered rate — to the ClickHouse row, and to the
balance visible over the API.

The production stack (:class:`bench._stack.RuntimeRun` = :class:`meterline.shell.runtime.Runtime`: 1 faust
worker running the pricing AND credit agents, the ClickHouse and ledger-entries sinks, the HTTP API
with the credits routes and its StatusView) on the bench broker. Set-up: each watched customer gets
a large grant through ``POST /v1/credits/grants``; a warm-up event is sent and awaited in the
balance, so start-up is not measured.

Then two separate processes (``bench/_loadgen.py``): the **sender** sends events through the real
gateway SDK (``UsageProducer``, linger 100 ms) at ``latency_rate`` events/s for ``latency_seconds``
s, paced every 10 ms, ``occurred_at`` = send time, over 100 customers (records carry ~10 events at
10k events/s); the first ``WATCHED`` customers send a fixed request, so every one of their events
costs the same exact charge. The **poller** reads ``GET /v1/customers/{id}/balance`` of the watched
customers round-robin and notes when the number of events the balance reflects,
``(granted − credit_remaining) / charge`` (exact integers), changed.

Figures:

* **occurred_at → balance visible over the API**: per watched event, the first poll answer that
  reflects it minus its ``occurred_at``; p50/p99 over all watched events. Resolution = one poll
  sweep (reported; an upper bound: the value may have been visible up to one sweep earlier).
* **occurred_at → row in ClickHouse**: ``inserted_at − occurred_at`` of every event's row.
* CPU seconds per component over the send + drain period (worker, broker, the bench process's
  threads: sinks, API, status view …, sender, poller): what bounds the figure when it is missed.
"""

from __future__ import annotations

import random
import time
from typing import Any

import httpx

from bench import BenchConfig, Result
from bench._events import bench_models, bench_price_book, customer_id, event
from bench._stack import RuntimeRun, Stack, cpu_delta, cpu_seconds, loadgen_result, read_topic, run_loadgen, thread_cpu
from meterline.core.ledger import parse_amount

NAME = "latency"
CUSTOMERS = 100
WATCHED = 5
SWEEP_S = 0.025  # poller pacing: at most one sweep of the watched customers per 25 ms
LINGER_MS = 100
GRANT = "1000000.00"
WATCHED_MODEL = "model-05"
WATCHED_TOKENS = {"input_tokens": 1000, "output_tokens": 200, "cached_input_tokens": 0, "cache_write_tokens": 0}
TARGET_P99_MS = 250


def api(client: httpx.Client, method: str, path: str, key: str, **kw: Any) -> httpx.Response:
    return client.request(method, path, headers={"Authorization": f"Bearer {key}"}, **kw)


def grant_and_wait(rr: RuntimeRun, customers: list[str], amount: str, *, timeout: float = 120) -> None:
    """Grant ``amount`` to each customer over the API; wait until every balance shows it."""
    want = parse_amount(amount)
    with httpx.Client(base_url=rr.url, timeout=30) as c:
        for cust in customers:
            r = api(
                c,
                "POST",
                "/v1/credits/grants",
                rr.admin_key,
                json={"customer_id": cust, "amount": amount, "grant_id": f"bench-{cust}"},
            )
            r.raise_for_status()
        deadline = time.monotonic() + timeout
        pending = set(customers)
        while pending:
            for cust in list(pending):
                r = api(c, "GET", f"/v1/customers/{cust}/balance", rr.admin_key)
                if r.status_code == 200 and parse_amount(r.json()["credit_remaining"]) == want:
                    pending.discard(cust)
            if pending and time.monotonic() > deadline:
                tails = "\n".join(w.log_tail() for w in rr.runtime.workers)
                raise TimeoutError(f"grants not visible after {timeout:.0f} s for {sorted(pending)[:5]}\n{tails}")
            time.sleep(0.1)


def warm_up(rr: RuntimeRun, customer: str, *, timeout: float = 120) -> None:
    """One usage event for ``customer`` (granted) through the SDK, awaited in its balance."""
    from meterline.stack.producer import UsageProducer

    producer = UsageProducer(rr.stack.bootstrap, rr.settings.topic("usage-events"), linger_ms=5)
    try:
        producer.send(
            event(
                random.Random(1),
                event_id="warmup",
                customer=customer,
                project="warmup",
                occurred_at_ms=int(time.time() * 1000),
                models=bench_models(),
            )
        )
    finally:
        producer.close()
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=rr.url, timeout=30) as c:
        while parse_amount(
            api(c, "GET", f"/v1/customers/{customer}/balance", rr.admin_key).json()["credit_remaining"]
        ) == parse_amount(GRANT):
            if time.monotonic() > deadline:
                raise TimeoutError("the warm-up event never reached the balance")
            time.sleep(0.05)


def watched_charges(customers: list[str]) -> dict[str, int]:
    """Exact charge (picos) of one watched event per customer (rate cards differ per customer)."""
    from meterline.core.pricing import PricingEngine, load_price_book

    engine = PricingEngine.from_book(load_price_book(bench_price_book()))
    out = {}
    for cust in customers:
        ev = event(
            random.Random(0), event_id="x", customer=cust, occurred_at_ms=int(time.time() * 1000), models=bench_models()
        )
        ev.update(model=WATCHED_MODEL, **WATCHED_TOKENS)
        out[cust] = int(engine.price(ev).charge_picos)
    return out


def quantile(sorted_values: list[int], q: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def api_latencies(sent: dict[str, list[int]], seen: dict[str, list[list[int]]]) -> tuple[list[int], int]:
    """Per watched event: first poll time whose count covers it − occurred_at. Returns (latencies, missing)."""
    out: list[int] = []
    missing = 0
    for cust, occurred in sent.items():
        changes = seen.get(cust, [])
        k = 0
        for j, occ in enumerate(occurred):
            while k < len(changes) and changes[k][1] < j + 1:
                k += 1
            if k == len(changes):
                missing += len(occurred) - j
                break
            out.append(changes[k][0] - occ)
    return sorted(out), missing


def hop_series(rr: RuntimeRun, watched: list[str], charges: dict[str, int]) -> dict[str, dict[str, list[list[int]]]]:
    """Per watched customer, ``[[timestamp_ms, events reflected so far], ...]`` as seen on the two
    intermediate topics: ``usage-priced`` (pricing agent's output, cumulative event count) and
    ``customer-status`` (credit agent's output, count from ``credit_remaining``). Timestamps are the
    producers' create times, so they say when each agent emitted its result."""
    import json

    from schemas.codec import decode_priced_batch

    want = {c.encode() for c in watched}
    priced: dict[str, list[list[int]]] = {c: [] for c in watched}
    for key, value, ts in read_topic(rr.stack.bootstrap, rr.settings.topic("usage-priced")):
        if key in want and value:
            c = key.decode()
            n = (priced[c][-1][1] if priced[c] else 0) + len(decode_priced_batch(value))
            priced[c].append([ts, n])
    status: dict[str, list[list[int]]] = {c: [] for c in watched}
    granted = parse_amount(GRANT)
    for key, value, ts in read_topic(rr.stack.bootstrap, rr.settings.topic("customer-status")):
        if key in want and value:
            c = key.decode()
            n = (granted - parse_amount(json.loads(value)["balance"]["credit_remaining"])) // charges[c]
            if not status[c] or status[c][-1][1] != n:
                status[c].append([ts, n])
    return {"priced": priced, "status": status}


def run(cfg: BenchConfig, stack: Stack) -> list[Result]:
    """One run per customer count of ``cfg.latency_customers`` (issue #15: 100, and 1,000 too)."""
    out: list[Result] = []
    for customers in cfg.latency_customers:
        out += run_one(cfg, stack, customers)
    return out


def run_one(cfg: BenchConfig, stack: Stack, customers: int = CUSTOMERS) -> list[Result]:
    # Figures of the 100-customer run keep their historical names; others name their count.
    suffix = "" if customers == CUSTOMERS else f", {customers:,} customers"
    watched = [customer_id(c) for c in range(WATCHED)]
    charges = watched_charges(watched)
    total = int(cfg.latency_rate * cfg.latency_seconds)
    with RuntimeRun(stack, f"lat{customers}", price_book=bench_price_book()) as rr:
        grant_and_wait(rr, [*watched, "cust-warm"], GRANT)
        warm_up(rr, "cust-warm")
        work = stack.root / "loadgen"
        expect = {c: sum(1 for i in range(total) if i % customers == n) for n, c in enumerate(watched)}
        poller = run_loadgen(
            "poll",
            {
                "url": rr.url,
                "key": rr.admin_key,
                "customers": watched,
                "expect": expect,
                "granted_picos": parse_amount(GRANT),
                "charge_picos": charges,
                "sweep_s": SWEEP_S,
                "deadline_s": cfg.latency_seconds + cfg.latency_drain_s + 5,
            },
            work,
            timeout=cfg.latency_seconds + cfg.latency_drain_s + 60,
        )
        cpu0 = (thread_cpu(), [cpu_seconds(p) for p in rr.worker_pids()], cpu_seconds(stack.broker.pid or 0))
        t0 = time.monotonic()
        sender = run_loadgen(
            "send",
            {
                "bootstrap": stack.bootstrap,
                "topic": rr.settings.topic("usage-events"),
                "rate": cfg.latency_rate,
                "seconds": cfg.latency_seconds,
                "customers": customers,
                "watched": WATCHED,
                "models": bench_models(),
                "watched_model": WATCHED_MODEL,
                "watched_tokens": WATCHED_TOKENS,
                "linger_ms": LINGER_MS,
                "tag": "l",
            },
            work,
            timeout=cfg.latency_seconds * 3 + 60,
        )
        sent = loadgen_result(sender)
        deadline = time.monotonic() + cfg.latency_drain_s
        drained = True
        while rr.query("SELECT count() FROM usage_priced WHERE project = 'latency'")[0][0] < total:
            if time.monotonic() > deadline:
                drained = False  # the pipeline fell far behind the offered rate: report what arrived
                break
            time.sleep(0.25)
        polled = loadgen_result(poller)
        busy_s = time.monotonic() - t0
        cpu1 = (thread_cpu(), [cpu_seconds(p) for p in rr.worker_pids()], cpu_seconds(stack.broker.pid or 0))
        hops = hop_series(rr, watched, charges)
        p50, p99, pmax, n_rows = rr.query(
            "SELECT quantileExact(0.5)(d), quantileExact(0.99)(d), max(d), count() FROM"
            " (SELECT toUnixTimestamp64Milli(inserted_at) - toUnixTimestamp64Milli(occurred_at) AS d"
            "  FROM usage_priced WHERE project = 'latency')"
        )[0]
    lats, missing = api_latencies(sent["watched"], polled["seen"])
    hop_p: dict[str, list[int]] = {}
    for hop in ("priced", "status"):
        h, _ = api_latencies(sent["watched"], hops[hop])
        hop_p[hop] = [quantile(h, 0.5), quantile(h, 0.99)] if h else []
    hop_p["visible"] = [quantile(lats, 0.5), quantile(lats, 0.99)] if lats else []
    cpu = {
        "worker": [round(b - a, 1) for a, b in zip(cpu0[1], cpu1[1])],
        "broker": round(cpu1[2] - cpu0[2], 1),
        "bench process threads": cpu_delta(cpu0[0], cpu1[0]),
        "sender": round(sent["cpu_s"], 1),
        "poller": round(polled["cpu_s"], 1),
        "wall_s": round(busy_s, 1),
    }
    cpu_note = (
        f"CPU s over {busy_s:.0f} s: worker {cpu['worker']}, broker {cpu['broker']}, sender {cpu['sender']}, "
        f"poller {cpu['poller']}, bench-process threads {cpu['bench process threads']}"
    )
    achieved = sent["achieved_rate"]
    note = (
        f"{total:,} events at {cfg.latency_rate:,}/s offered for {cfg.latency_seconds:g} s "
        f"(sender achieved {achieved:,.0f}/s), {customers:,} customers, linger {LINGER_MS} ms, 1 worker"
    )
    if not drained:
        note += f"; NOT DRAINED within {cfg.latency_drain_s:.0f} s: {int(n_rows):,} of {total:,} rows measured"
    details = {
        "events": int(n_rows),
        "offered_rate": cfg.latency_rate,
        "achieved_rate": achieved,
        "seconds": cfg.latency_seconds,
        "max_ms": int(pmax),
        "ticks_behind": sent["ticks_behind"],
        "cpu_s": cpu,
    }
    out = [
        Result(NAME, "occurred_at -> row in ClickHouse, p50" + suffix, int(p50), "ms", note=note, details=details),
        Result(NAME, "occurred_at -> row in ClickHouse, p99" + suffix, int(p99), "ms", note=f"max {int(pmax)} ms"),
    ]
    if lats:
        a50, a99 = quantile(lats, 0.5), quantile(lats, 0.99)
        api_note = (
            f"{len(lats):,} events of {WATCHED} watched customers, poll sweep ~{polled['sweep_ms']:.0f} ms "
            f"({polled['polls']:,} GETs, {polled['errors']} errors, {polled['inexact']} inexact)"
        )
        if missing:
            api_note += f"; {missing:,} watched events NOT visible by the end of the drain"
        out += [
            Result(
                NAME,
                "occurred_at -> balance visible over API, p50" + suffix,
                a50,
                "ms",
                note=api_note,
                details={
                    "events": len(lats),
                    "missing": missing,
                    "sweep_ms": polled["sweep_ms"],
                    "hops_p50_p99": hop_p,
                },
            ),
            Result(
                NAME,
                "occurred_at -> balance visible over API, p99" + suffix,
                a99,
                "ms",
                f"< {TARGET_P99_MS}",
                a99 < TARGET_P99_MS and not missing,
                note=f"max {lats[-1]} ms; {cpu_note}",
                details={"cpu_s": cpu},
            ),
            Result(
                NAME,
                "where the API latency accrues: p50 / p99 from occurred_at to" + suffix,
                " | ".join(f"{k} {v[0]:,}/{v[1]:,}" for k, v in hop_p.items() if v),
                "ms",
                note="priced = pricing agent emitted the usage-priced record (SDK linger + usage-events hop + "
                "pricing); status = credit agent emitted customer-status; visible = the poller's GET saw it "
                "(StatusView hop + API). Producer timestamps of the topics, same clock",
            ),
        ]
    else:
        out.append(
            Result(
                NAME,
                "occurred_at -> balance visible over API, p99" + suffix,
                None,
                "ms",
                f"< {TARGET_P99_MS}",
                False,
                note=f"no watched event became visible; {cpu_note}",
            )
        )
    return out
