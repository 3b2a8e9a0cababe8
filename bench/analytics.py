"""Benchmark 5: the example queries of ``docs/analytics.md`` over N priced rows (embedded chDB).

Rows are generated inside ClickHouse (``INSERT … SELECT … FROM numbers(N)`` in chunks of 1M, so
the materialized views fill ``usage_hourly``/``usage_daily`` exactly as the sink's inserts would):
1,000 customers, 20 models, 5 projects, 7 days, exact Decimal(38, 12) money. Each query is run
``repeats`` times after one warm-up; p50 of the wall time is reported. Queries are read from the
doc's ```sql blocks, so the benchmark follows the doc; ``{customer:String}`` gets ``cust-0001``.
Loading stops early (and the report says so) once it has taken ``analytics_load_budget_s``; the
rows are laid out for 7 days, so a load cut short covers only the first part of that week.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from bench import BenchConfig, Result, median
from bench._stack import Stack

NAME = "analytics"
DOC = Path(__file__).resolve().parents[1] / "docs" / "analytics.md"
CHUNK = 1_000_000

FALLBACK = {
    "Spend per customer per day": "SELECT day, customer_id, currency, events, cost, charge, margin FROM v_spend_daily "
    "ORDER BY day, customer_id, currency",
    "Margin per model": "SELECT provider, model, currency, sum(cost) AS c, sum(charge) AS ch, ch - c AS margin "
    "FROM usage_daily GROUP BY provider, model, currency ORDER BY margin DESC",
}

_INSERT = """
INSERT INTO usage_priced (event_id, occurred_at, customer_id, api_key_id, project, feature, user_id, session_id,
    gateway, provider, model, model_version, input_tokens, output_tokens, cached_input_tokens, cache_write_tokens,
    reasoning_tokens, requests, cost, charge, currency, price_version, rate_card, priced_at, source_partition,
    source_offset)
SELECT
    concat('a', toString(number)) AS event_id,
    fromUnixTimestamp64Milli(toInt64({start:Int64} + intDiv(number * {span:Int64}, {n:Int64})), 'UTC') AS occurred_at,
    concat('cust-', leftPad(toString(cityHash64(number, 1) % 1000), 4, '0')) AS customer_id,
    '' AS api_key_id,
    concat('proj-', toString(cityHash64(number, 2) % 5)) AS project,
    '' AS feature, '' AS user_id, '' AS session_id, 'bench' AS gateway, 'bench' AS provider,
    concat('model-', leftPad(toString(cityHash64(number, 3) % 20), 2, '0')) AS model, '' AS model_version,
    1 + cityHash64(number, 4) % 8000 AS input_tokens,
    1 + cityHash64(number, 5) % 1000 AS output_tokens,
    if(cityHash64(number, 6) % 10 < 3, cityHash64(number, 7) % 4000, 0) AS cached_input_tokens,
    0 AS cache_write_tokens, 0 AS reasoning_tokens, 1 AS requests,
    toDecimal128(input_tokens * 2500000 + output_tokens * 10000000 + cached_input_tokens * 1250000, 12)
        / 1000000000000 AS cost,
    cost * toDecimal128('1.2', 1) AS charge,
    'usd' AS currency, 'bench' AS price_version, '*#bench' AS rate_card,
    occurred_at AS priced_at, 0 AS source_partition, number AS source_offset
FROM numbers({first:UInt64}, {count:UInt64})
"""


def doc_queries() -> dict[str, str]:
    """``### title`` → its first ```sql block, from docs/analytics.md (empty if the doc is absent)."""
    if not DOC.exists():
        return {}
    text = DOC.read_text(encoding="utf-8")
    out: dict[str, str] = {}
    for m in re.finditer(r"^### ([^\n]+)\n((?:(?!\n#)[^`])*?)```sql\n(.*?)```", text, flags=re.S | re.M):
        out[m.group(1).strip()] = m.group(3).strip()
    return out


def run(cfg: BenchConfig, stack: Stack) -> list[Result]:
    name, client = stack.database("bench_analytics")
    n = cfg.analytics_rows
    start_ms = int(time.time() * 1000) // 86_400_000 * 86_400_000 - 7 * 86_400_000
    try:
        t0 = time.monotonic()
        for first in range(0, n, CHUNK):
            if time.monotonic() - t0 > cfg.analytics_load_budget_s:
                break  # scaled down to fit the time budget: reported below
            client.command(
                _INSERT,
                parameters={
                    "start": start_ms,
                    "span": 7 * 86_400_000,
                    "n": n,
                    "first": first,
                    "count": min(CHUNK, n - first),
                },
            )
        load_s = time.monotonic() - t0
        stored = int(client.query("SELECT count() FROM usage_priced").result_rows[0][0])
        n = stored
        queries = doc_queries()
        source = "docs/analytics.md"
        if not queries:
            queries, source = FALLBACK, "built-in (docs/analytics.md not found)"
        scaled = "" if n >= 10_000_000 else f" (SCALED DOWN from 10,000,000: {n:,} rows)"
        out = [
            Result(
                NAME,
                "load: INSERT ... SELECT into usage_priced (+2 MVs)",
                round(stored / load_s),
                "rows/s",
                note=f"{stored:,} rows in {load_s:.1f} s{scaled}",
                details={"rows": stored, "load_s": load_s, "queries_from": source},
            )
        ]
        for title, sql in queries.items():
            params = {"customer": "cust-0001"} if "{customer:String}" in sql else None
            client.query(sql, parameters=params)  # warm-up
            times = []
            rows = 0
            for _ in range(cfg.analytics_repeats):
                t = time.perf_counter()
                rows = len(client.query(sql, parameters=params).result_rows)
                times.append((time.perf_counter() - t) * 1000)
            out.append(
                Result(
                    NAME,
                    f"p50: {title}",
                    round(median(times), 1),
                    "ms",
                    note=f"{rows:,} result rows, {cfg.analytics_repeats} runs over {stored:,} rows",
                    details={"sql": sql, "times_ms": times},
                )
            )
        return out
    finally:
        client.database = "default"
        client.command(f"DROP DATABASE IF EXISTS `{name}` SYNC")
        client.close()
