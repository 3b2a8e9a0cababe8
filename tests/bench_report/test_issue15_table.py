"""bench/issue15.py: the #15 table takes each figure from this run's results, beside its target."""

from __future__ import annotations

from bench import Result
from bench.issue15 import summary


def _by_measure(rows: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    return {str(r["measure"]): r for r in rows}


def test_figures_are_placed_beside_their_targets() -> None:
    results = [
        Result("e2e", "rows in ClickHouse AND balances caught up, 1 worker(s)", 12_000, "events/s", note="n1"),
        Result("e2e", "rows in ClickHouse AND balances caught up, 2 worker(s)", None, "events/s", note="behind"),
        Result("latency", "occurred_at -> balance visible over API, p99", 180, "ms"),
        Result("latency", "occurred_at -> balance visible over API, p99, 1,000 customers", 900, "ms"),
        Result("authorize", "answered requests/s, 32 concurrent clients", 1_500.0, "req/s"),
        Result("authorize", "latency p99, 32 concurrent clients", 60.0, "ms"),
        Result("pricing-core", "batch (price_many) speed-up vs tokencost", 5.5, "x", met=True),
        Result("pricing-core", "meterline events wrong vs exact", 0),
        Result(
            "dedupe-memory",
            "worker dedupe state, 5,000,000 distinct events in the window: process RSS",
            290,
            "MiB",
            "<= 300 MiB",
            True,
        ),
    ]
    rows = _by_measure(summary(results))
    one = rows["end to end, 1 worker (rows in ClickHouse AND every balance caught up)"]
    assert (one["measured"], one["met"]) == ("12,000 events/s", False)
    two = rows["2 workers on these cores"]
    assert (two["measured"], two["met"]) == ("incomplete", False)
    p99 = rows["occurred -> balance visible over the API, p99 (100 customers)"]
    assert (p99["measured"], p99["met"]) == ("180 ms", True)
    assert rows["occurred -> balance visible over the API, p99 (1,000 customers)"]["met"] is False
    assert rows["authorize: 32 concurrent clients"]["met"] is True
    assert rows["authorize: p99, 32 concurrent clients"]["met"] is False
    batch = rows["pricing core vs tokencost, 500-event batches (price_many, the agent's path)"]
    assert (batch["measured"], batch["met"]) == ("5.50x", True)
    assert rows["pricing core exactness (events off by any amount)"]["met"] is True
    rss = rows["worker RSS, dedupe state: 5,000,000 distinct events in the window: process RSS"]
    assert (rss["measured"], rss["target"], rss["met"]) == ("290 MiB", "<= 300 MiB", True)


def test_a_benchmark_that_did_not_run_says_so() -> None:
    rows = summary([])
    assert rows and all(r["measured"] == "not run" and r["met"] is None for r in rows)
