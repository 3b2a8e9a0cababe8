"""Benchmark 8: the plan simulator over 10M priced rows: 1,000 customers x 12 months x 5 candidates.

Rows are generated inside ClickHouse (``INSERT ... SELECT ... FROM numbers(N)`` in chunks of 1M, as
``bench/analytics.py`` does) across the 12 months of 2026: 1,000 customers, 20 models, exact
Decimal(38, 12) charges. Half the customers are subscribed to a plan (``pro``, from 1 January, so
they also get the ``current`` candidate, rated per segment with billing's own code); three more
plans are simulated for everyone (a flat fee, graduated tiers, a commitment): payg + current + 3 =
5 candidates. One run of :func:`jobs.plans.simulate.simulate` over ``2026-01..2026-12`` with
``--all`` is timed (it aggregates in ClickHouse; Python folds the aggregates), after one warm-up
run on one customer. Target (issue #13): under 10 s.

The rollup materialized views are dropped in this throw-away database before loading: the
simulator never reads the rollups, and feeding them would double the load time on this machine.
"""

from __future__ import annotations

import time

from bench import BenchConfig, Result
from bench._stack import Stack

NAME = "simulate"
CHUNK = 1_000_000
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
SPAN_MS = 365 * 86_400_000

_INSERT = """
INSERT INTO usage_priced (event_id, occurred_at, customer_id, provider, model, input_tokens, output_tokens,
    cached_input_tokens, requests, cost, charge, currency, price_version, rate_card, priced_at)
SELECT
    concat('s', toString(number)) AS event_id,
    fromUnixTimestamp64Milli(toInt64({start:Int64} + intDiv(number * {span:Int64}, {n:Int64})), 'UTC') AS occurred_at,
    concat('cust-', leftPad(toString(cityHash64(number, 1) % 1000), 4, '0')) AS customer_id,
    'bench' AS provider,
    concat('model-', leftPad(toString(cityHash64(number, 3) % 20), 2, '0')) AS model,
    1 + cityHash64(number, 4) % 8000 AS input_tokens,
    1 + cityHash64(number, 5) % 1000 AS output_tokens,
    if(cityHash64(number, 6) % 10 < 3, cityHash64(number, 7) % 4000, 0) AS cached_input_tokens,
    1 AS requests,
    toDecimal128(input_tokens * 2500000 + output_tokens * 10000000 + cached_input_tokens * 1250000, 12)
        / 1000000000000 AS cost,
    cost * toDecimal128('1.2', 1) AS charge,
    'USD' AS currency, 'bench' AS price_version, '*#bench' AS rate_card, occurred_at AS priced_at
FROM numbers({first:UInt64}, {count:UInt64})
"""

PLANS = {
    "currency": "USD",
    "plans": [
        {
            "id": "pro",
            "version": 1,
            "effective_from": "2025-01-01T00:00:00Z",
            "interval": "month",
            "fee": "200",
            "allowances": [{"id": "tokens", "tokens": 50_000_000}],
            "overage": {"per_million": "4"},
        },
        {
            "id": "flat",
            "version": 1,
            "effective_from": "2025-01-01T00:00:00Z",
            "interval": "month",
            "fee": "250",
            "overage": {"per_million": "0"},
        },
        {
            "id": "tiered",
            "version": 1,
            "effective_from": "2025-01-01T00:00:00Z",
            "interval": "month",
            "fee": "20",
            "overage": {
                "tiers": {
                    "mode": "graduated",
                    "unit": "tokens",
                    "steps": [{"up_to": 20_000_000, "per_million": "6"}, {"up_to": None, "per_million": "3"}],
                }
            },
        },
        {
            "id": "commit",
            "version": 1,
            "effective_from": "2025-01-01T00:00:00Z",
            "interval": "month",
            "fee": "0",
            "overage": {"rate_card": {"multiplier": "0.9"}},
            "minimum_commitment": "150",
        },
    ],
}


def run(cfg: BenchConfig, stack: Stack) -> list[Result]:
    from jobs.plans.simulate import simulate
    from meterline.core.plans import SubscriptionEvent, load_plan_catalog
    from pipeline.plans_sink import PLAN_COLUMNS, SUBSCRIPTION_COLUMNS, plan_row, subscription_row

    name, client = stack.database("bench_simulate")
    n = cfg.simulate_rows
    try:
        client.command("DROP VIEW IF EXISTS usage_hourly_mv")
        client.command("DROP VIEW IF EXISTS usage_daily_mv")
        t0 = time.monotonic()
        for first in range(0, n, CHUNK):
            if time.monotonic() - t0 > cfg.simulate_load_budget_s:
                break  # scaled down to fit the time budget: reported below
            client.command(
                _INSERT,
                parameters={"start": START_MS, "span": SPAN_MS, "n": n, "first": first, "count": min(CHUNK, n - first)},
            )
        load_s = time.monotonic() - t0
        stored = int(client.query("SELECT count() FROM usage_priced").result_rows[0][0])
        catalog = load_plan_catalog(PLANS)
        client.insert("plans", [plan_row(v) for v in catalog.versions], column_names=PLAN_COLUMNS)
        subs = [SubscriptionEvent("subscribed", f"cust-{i:04d}", START_MS // 1000, "pro", 1) for i in range(0, 1000, 2)]
        client.insert("subscription_events", [subscription_row(e) for e in subs], column_names=SUBSCRIPTION_COLUMNS)
        candidates = [v for v in catalog.versions if v.plan_id in ("flat", "tiered", "commit")]
        simulate(client, "2026-01..2026-12", candidates, customer="cust-0000")  # warm-up
        phases: dict[str, float] = {}
        t = time.perf_counter()
        doc = simulate(client, "2026-01..2026-12", candidates, timings=phases)
        took = time.perf_counter() - t
        customers = len(doc["customers"])
        cands = sum(len(c["candidates"]) for c in doc["customers"])
        scaled = "" if stored >= 10_000_000 else f" (SCALED DOWN from 10,000,000: {stored:,} rows)"
        return [
            Result(
                NAME,
                "load: INSERT ... SELECT into usage_priced",
                round(stored / load_s),
                "rows/s",
                note=f"{stored:,} rows in {load_s:.1f} s{scaled}",
            ),
            Result(
                NAME,
                "simulate --all, 12 months, payg + current + 3 plans",
                round(took, 2),
                "s",
                target="< 10 s",
                met=took < 10 and stored >= 10_000_000,
                note=f"{customers:,} customers, {cands:,} candidate bills x 12 months, break-even included, over {stored:,} rows"
                f"{scaled}; the usage GROUP BY took {phases['usage_query_s']:.2f} s, the rest is the fold in Python",
                details={"rows": stored, "customers": customers, "candidate_bills": cands, "seconds": took, **phases},
            ),
        ]
    finally:
        client.database = "default"
        client.command(f"DROP DATABASE IF EXISTS `{name}` SYNC")
        client.close()
