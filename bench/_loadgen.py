"""Load generators the credit benchmarks run as SEPARATE processes (``python -m bench._loadgen MODE SPEC OUT``).

They run outside the bench process on purpose: the bench process hosts the :class:`meterline.shell.runtime.Runtime`
(API server, sinks, status view — as ``meterline up`` does), and a generator in the same process would
take the GIL from the very code it measures. Each mode reads a JSON spec, writes a JSON result (with
its own CPU seconds), talks only to 127.0.0.1, and is bounded in time and count.

Modes
-----
``send``       paced usage events through the gateway SDK (:class:`meterline.stack.producer.UsageProducer`):
               ``rate`` events/s for ``seconds`` s, ticks of 10 ms, ``occurred_at`` = send time; event
               ``i`` goes to customer ``i % customers``. The first ``watched`` customers get a FIXED
               request (one model, fixed token counts) so each of their events costs the same exact
               charge; the others get the skewed random workload. Writes every watched event's
               ``occurred_at`` in send order.
``poll``       watches ``GET /v1/customers/{id}/balance`` of the watched customers round-robin (a fresh
               connection per GET) and records, per customer, each time the number of events
               reflected in the balance changed: ``n = (granted − credit_remaining) / charge``, exact.
``authorize``  ``concurrency`` asyncio tasks POST ``/v1/authorize`` (each customer with its own key)
               for ``seconds`` s or ``max_requests`` requests; per-request latency and status.
"""

from __future__ import annotations

import json
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

TICK_S = 0.01


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def send(spec: dict[str, Any]) -> dict[str, Any]:
    from bench._events import customer_id, event
    from meterline.stack.producer import UsageProducer

    rng = random.Random(spec.get("seed", 5))
    models: list[str] = spec["models"]
    n_cust, n_watched, rate = int(spec["customers"]), int(spec["watched"]), int(spec["rate"])
    total = int(rate * float(spec["seconds"]))
    fixed = spec["watched_tokens"]
    producer = UsageProducer(spec["bootstrap"], spec["topic"], linger_ms=int(spec["linger_ms"]))
    watched: dict[str, list[int]] = {customer_id(c): [] for c in range(n_watched)}
    sent = behind = 0
    owed = 0.0
    per_tick = rate * TICK_S
    t0 = time.monotonic()
    next_tick = t0
    try:
        while sent < total:
            owed += per_tick
            k = min(int(owed), total - sent)
            owed -= k
            now_ms = time.time_ns() // 1_000_000
            for _ in range(k):
                c = sent % n_cust
                cust = customer_id(c)
                ev = event(
                    rng,
                    event_id=f"{spec['tag']}{sent:08d}",
                    customer=cust,
                    project="latency",
                    occurred_at_ms=now_ms,
                    models=models,
                )
                if c < n_watched:
                    ev.update(model=spec["watched_model"], **fixed)
                    watched[cust].append(now_ms)
                producer.send(ev)
                sent += 1
            next_tick += TICK_S
            delay = next_tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                behind += 1
        offered_s = time.monotonic() - t0
        producer.flush(60)
    finally:
        producer.close()
    return {
        "sent": sent,
        "offered_s": offered_s,
        "achieved_rate": sent / offered_s,
        "ticks_behind": behind,
        "watched": watched,
        "cpu_s": _cpu_s(),
    }


def poll(spec: dict[str, Any]) -> dict[str, Any]:
    import http.client
    from urllib.parse import urlsplit

    from meterline.core.ledger import parse_amount

    customers: list[str] = spec["customers"]
    expect: dict[str, int] = spec["expect"]
    granted = int(spec["granted_picos"])
    charges: dict[str, int] = {c: int(v) for c, v in spec["charge_picos"].items()}
    url = urlsplit(spec["url"])
    headers = {"Authorization": f"Bearer {spec['key']}"}
    seen: dict[str, list[list[int]]] = {c: [] for c in customers}
    last = {c: -1 for c in customers}
    polls = errors = inexact = 0
    deadline = time.monotonic() + float(spec["deadline_s"])
    t0 = time.monotonic()
    sweep_s = float(spec.get("sweep_s", 0.0))
    while time.monotonic() < deadline and any(last[c] < expect[c] for c in customers):
        pause = sweep_s - (time.monotonic() - t0) % sweep_s if sweep_s else 0.0
        time.sleep(pause)  # paced: the poller must not load the API it measures
        for c in customers:
            # A fresh connection per GET: on a kept-alive connection the API answers ~40 ms late
            # (measured; see docs/benchmarks.md), which would swamp the resolution.
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
            try:
                conn.request("GET", f"/v1/customers/{c}/balance", headers=headers)
                r = conn.getresponse()
                body = r.read()
            except OSError:
                errors += 1
                continue
            finally:
                conn.close()
            t_ms = time.time_ns() // 1_000_000  # the answer is in hand: visible over the API
            polls += 1
            if r.status != 200:
                errors += 1
                continue
            used = granted - parse_amount(json.loads(body)["credit_remaining"])
            n, rest = divmod(used, charges[c])
            inexact += rest != 0
            if n != last[c]:
                last[c] = n
                seen[c].append([t_ms, n])
    elapsed = time.monotonic() - t0
    return {
        "seen": seen,
        "polls": polls,
        "errors": errors,
        "inexact": inexact,
        "sweep_ms": 1000 * elapsed / max(1, polls / max(1, len(customers))),
        "cpu_s": _cpu_s(),
    }


def authorize(spec: dict[str, Any]) -> dict[str, Any]:
    import asyncio

    import httpx

    keys: dict[str, str] = spec["keys"]
    customers = sorted(keys)
    body: dict[str, Any] = spec["body"]
    limit, seconds = int(spec["max_requests"]), float(spec["seconds"])
    lat_ms: list[float] = []
    statuses: dict[str, int] = {}
    decisions: dict[str, int] = {}
    issued = 0

    async def worker(client: httpx.AsyncClient, w: int, stop_at: float) -> None:
        nonlocal issued
        i = w
        while issued < limit and time.monotonic() < stop_at:
            issued += 1
            cust = customers[i % len(customers)]
            i += int(spec["concurrency"])
            t = time.perf_counter()
            try:
                r = await client.post(
                    "/v1/authorize",
                    json={**body, "customer_id": cust},
                    headers={"Authorization": f"Bearer {keys[cust]}"},
                )
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] = statuses.get(type(exc).__name__, 0) + 1
                continue
            lat_ms.append((time.perf_counter() - t) * 1000)
            statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
            if r.status_code == 200:
                d = r.json().get("decision", "?")
                decisions[d] = decisions.get(d, 0) + 1

    async def main() -> float:
        limits = httpx.Limits(
            max_connections=int(spec["concurrency"]), max_keepalive_connections=int(spec["concurrency"])
        )
        async with httpx.AsyncClient(base_url=spec["url"], timeout=30, limits=limits) as client:
            t0 = time.monotonic()
            stop_at = t0 + seconds
            await asyncio.gather(*(worker(client, w, stop_at) for w in range(int(spec["concurrency"]))))
            return time.monotonic() - t0

    elapsed = asyncio.run(main())
    return {
        "latencies_ms": lat_ms,
        "statuses": statuses,
        "decisions": decisions,
        "elapsed_s": elapsed,
        "cpu_s": _cpu_s(),
    }


MODES = {"send": send, "poll": poll, "authorize": authorize}


def main(argv: list[str]) -> int:
    mode, spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    result = MODES[mode](spec)
    Path(out_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
