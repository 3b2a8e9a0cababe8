"""Benchmark 8: Stripe sync — priced usage in ClickHouse aggregated and pushed to LocalStripe.

Set-up per run: a fresh database of the stack's chDB engine, a fresh in-memory
:class:`devtools.stripe_local.LocalStripe` (the real stripe SDK talks to it over 127.0.0.1),
``jobs.stripe.provision`` of the customers (timed apart: a one-off), then N priced rows generated
inside ClickHouse (``INSERT … SELECT … FROM numbers()``: C customers, the last H whole hours, exact
Decimal money) and ONE ``jobs.stripe.sync`` run with the shipped ``infra/stripe/billing.yaml``
(cost mode, 1-hour windows; ``settle_seconds`` 0 so every window is due).

Two runs: the **default** config (more windows than ``stream_threshold`` = 1,000 → the v2 meter
event stream, ≤ 100 events per call) and **v1 forced** (``stream_threshold`` raised: one
``POST /v1/billing/meter_events`` per window) on fewer windows.

Figures: events aggregated per second and windows (meter events) pushed per second of the sync run;
the HTTP calls the Stripe server RECEIVED during the sync (counted in the server's request handler),
by endpoint, and the same scaled to 1M events. Calls depend on windows (customers × active hours),
not on events: with 1-hour windows, 1M events over C customers × H hours cost C × H events to Stripe,
i.e. C × H calls (v1) or ⌈C × H / 100⌉ + sessions (v2).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

from bench import BenchConfig, Result
from bench._stack import Stack

NAME = "stripe-sync"
HOUR = 3600

_INSERT = """
INSERT INTO usage_priced (event_id, occurred_at, customer_id, api_key_id, project, feature, user_id, session_id,
    gateway, provider, model, model_version, input_tokens, output_tokens, cached_input_tokens, cache_write_tokens,
    reasoning_tokens, requests, cost, charge, currency, price_version, rate_card, priced_at, source_partition,
    source_offset)
SELECT
    concat('s', toString(number)) AS event_id,
    fromUnixTimestamp64Milli(toInt64({start:Int64} + intDiv(number * {span:Int64}, {n:Int64})), 'UTC') AS occurred_at,
    concat('cust-', leftPad(toString(cityHash64(number, 1) % {customers:UInt64}), 4, '0')) AS customer_id,
    '' AS api_key_id, 'bench' AS project, '' AS feature, '' AS user_id, '' AS session_id, 'bench' AS gateway,
    'bench' AS provider, concat('model-', leftPad(toString(cityHash64(number, 3) % 20), 2, '0')) AS model,
    '' AS model_version, 1 + cityHash64(number, 4) % 8000 AS input_tokens, 1 + cityHash64(number, 5) % 1000 AS output_tokens,
    0 AS cached_input_tokens, 0 AS cache_write_tokens, 0 AS reasoning_tokens, 1 AS requests,
    toDecimal128(input_tokens * 2500000 + output_tokens * 10000000, 12) / 1000000000000 AS cost,
    cost * toDecimal128('1.2', 1) AS charge,
    'usd' AS currency, 'bench' AS price_version, '*#bench' AS rate_card,
    occurred_at AS priced_at, 0 AS source_partition, number AS source_offset
FROM numbers({n:UInt64})
"""


def _endpoint(path: str) -> str:
    if path.startswith("/v1/billing/meter_events"):
        return "v1 meter_events"
    if path.startswith("/v2/billing/meter_event_stream"):
        return "v2 meter_event_stream"
    if path.startswith("/v2/billing/meter_event_session"):
        return "v2 meter_event_session"
    return "other " + "/".join(path.split("/")[:3])


def counting(ls: Any) -> Counter[str]:
    """Count every request the LocalStripe server receives, by endpoint (swaps its handler class
    for a counting subclass; bench only)."""
    from devtools.stripe_local._server import _Handler

    counts: Counter[str] = Counter()

    class Counting(_Handler):
        def _dispatch(self, method: str) -> None:
            path = urlsplit(self.path).path
            if not path.startswith("/_test/"):  # the bench's own clock reads are not API calls
                counts[_endpoint(path)] += 1
            super()._dispatch(method)

    ls._server._httpd.RequestHandlerClass = Counting
    return counts


def _one(stack: Stack, events: int, customers: int, hours: int, *, force_v1: bool) -> dict[str, Any]:
    from devtools.stripe_local import LocalStripe
    from jobs.stripe import StripeTarget, load_billing_config, provision, sync

    name, ch = stack.database("bench_stripe")
    try:
        with LocalStripe() as ls:
            counts = counting(ls)
            target = StripeTarget.local(ls.url, max_network_retries=2)
            cfg = load_billing_config().with_sync(settle_seconds=0)
            if force_v1:
                cfg = cfg.with_sync(stream_threshold=10**9)
            custs = [f"cust-{i:04d}" for i in range(customers)]
            t = time.perf_counter()
            provision(target.client(), ch, cfg, customers=custs)
            provision_s = time.perf_counter() - t
            provision_calls = sum(counts.values())
            counts.clear()
            end = ls.now() // HOUR * HOUR
            t = time.perf_counter()
            ch.command(
                _INSERT,
                parameters={
                    "start": (end - hours * HOUR) * 1000,
                    "span": hours * HOUR * 1000,
                    "n": events,
                    "customers": customers,
                },
            )
            insert_s = time.perf_counter() - t
            t = time.perf_counter()
            summary = sync(target, ch, cfg, now=ls.now())
            sync_s = time.perf_counter() - t
            calls = dict(counts)
    finally:
        ch.database = "default"
        ch.command(f"DROP DATABASE IF EXISTS `{name}` SYNC")
        ch.close()
    n_calls = sum(calls.values())
    return {
        "events": events,
        "customers": customers,
        "hours": hours,
        "windows": summary.windows,
        "sent": summary.sent,
        "acked": summary.acked,
        "ok": summary.ok,
        "transport": summary.transport,
        "retries": summary.retries,
        "sync_s": round(sync_s, 2),
        "insert_s": round(insert_s, 2),
        "provision_s": round(provision_s, 2),
        "provision_calls": provision_calls,
        "calls": calls,
        "n_calls": n_calls,
        "events_per_s": events / sync_s,
        "windows_per_s": summary.sent / sync_s,
        "calls_per_1m_events": n_calls * 1_000_000 / events,
    }


def run(cfg: BenchConfig, stack: Stack) -> list[Result]:
    out: list[Result] = []
    for force_v1, (events, customers, hours) in ((False, cfg.stripe_default), (True, cfg.stripe_v1)):
        r = _one(stack, events, customers, hours, force_v1=force_v1)
        label = "v1 forced" if force_v1 else "default config"
        check = "" if r["ok"] and r["acked"] == r["windows"] else f"; NOT ALL ACKED: {r['acked']} of {r['windows']}"
        note = (
            f"{r['events']:,} events, {customers:,} customers x {hours} h = {r['windows']:,} windows, transport "
            f"{r['transport']}, sync {r['sync_s']} s (insert {r['insert_s']} s and provision {r['provision_s']} s / "
            f"{r['provision_calls']:,} calls not counted){check}"
        )
        out += [
            Result(
                NAME,
                f"events aggregated + pushed per second ({label})",
                round(r["events_per_s"]),
                "events/s",
                note=note,
                details=r,
            ),
            Result(
                NAME,
                f"windows pushed per second ({label})",
                round(r["windows_per_s"], 1),
                "meter events/s",
                note=f"{r['sent']:,} meter events sent, {r['retries']} retries",
            ),
            Result(
                NAME,
                f"Stripe API calls per 1M events ({label})",
                round(r["calls_per_1m_events"]),
                "calls",
                note=f"received by the server: {r['n_calls']:,} calls {r['calls']} for {r['events']:,} events; "
                f"= windows x 1e6 / events at this density",
            ),
        ]
    return out
