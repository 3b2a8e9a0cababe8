"""meterline's benchmark suite: ``python -m bench`` (or ``make bench``); ``--quick`` for a smoke run.

Each benchmark module exposes ``run(cfg: BenchConfig) -> list[Result]``; :mod:`bench.__main__`
runs them in order, prints one table (figure beside target) and writes
``bench/results/<timestamp>.json``. Figures are measurements, never assertions: nothing here
fails because a number is low. What each benchmark measures is documented in
``docs/benchmarks.md``.

Ground rules the modules keep: loopback only (the embedded Tansu broker on 127.0.0.1 and an
embedded chDB engine in a temporary directory), bounded load (fixed event counts and rates),
money compared exactly (Decimal / integer picos; peers' floats are only *judged*, never summed).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["BenchConfig", "Result", "median"]


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """Sizes of one run. ``quick`` shrinks everything so the whole suite ends in < 2 minutes."""

    quick: bool = False
    pricing_events: int = 200_000  # events per run of the pricing-core benchmark
    litellm_events: int = 20_000  # litellm is ~50x slower: priced on a prefix of the same events
    runs: int = 5  # repeats; medians are reported
    processor_records: int = 200  # 500-event UsageBatch records through PricingProcessor
    e2e_events: int = 200_000  # 1M does not fit the 10-minute budget here: see docs/benchmarks.md
    e2e_customers: int = 1_000
    e2e_workers: tuple[int, ...] = (1, 2)
    e2e_budget_s: float = 100.0  # per worker count, from worker start; then measured on what got through
    latency_rate: int = 10_000  # events/s offered during the latency run
    latency_seconds: float = 20.0
    latency_drain_s: float = 60.0  # wait this long after the last send for the rows to land
    latency_customers: tuple[int, ...] = (100, 1_000)  # one latency run per count (issue #15 asks both)
    analytics_rows: int = 10_000_000
    analytics_repeats: int = 5
    analytics_load_budget_s: float = 100.0  # stop loading more rows after this (the report says so)
    reprice_rows: int = 10_000_000  # a month of events re-rated by `meterline reprice`
    reprice_load_budget_s: float = 600.0  # bounded: 10M rows load in ~2-10 min on 2 shared cores
    simulate_rows: int = 10_000_000  # priced rows under the plan simulator (issue #13)
    simulate_load_budget_s: float = 420.0  # ~26 s per million rows here: 10M fit
    authorize_concurrency: int = 32  # concurrent clients of POST /v1/authorize
    authorize_seconds: float = 20.0  # loaded phase; bounded by authorize_max_requests too
    authorize_max_requests: int = 50_000
    authorize_single_seconds: float = 5.0  # 1 sequential client first (unloaded latency)
    stripe_default: tuple[int, int, int] = (1_000_000, 500, 8)  # (events, customers, hours): > 1,000 windows -> v2
    stripe_v1: tuple[int, int, int] = (200_000, 200, 3)  # v1 forced: one call per window
    dedupe_events: tuple[int, ...] = (1_000_000, 5_000_000)  # distinct events in the dedupe window (#15)

    @classmethod
    def quick_config(cls) -> BenchConfig:
        return cls(
            quick=True,
            pricing_events=50_000,
            litellm_events=5_000,
            runs=3,
            processor_records=60,
            e2e_events=100_000,
            e2e_customers=200,
            e2e_workers=(1,),
            e2e_budget_s=30.0,
            latency_rate=5_000,
            latency_seconds=5.0,
            latency_drain_s=30.0,
            latency_customers=(100,),
            analytics_rows=500_000,
            analytics_repeats=3,
            analytics_load_budget_s=10.0,
            reprice_rows=500_000,
            reprice_load_budget_s=10.0,
            simulate_rows=500_000,
            simulate_load_budget_s=15.0,
            authorize_concurrency=16,
            authorize_seconds=5.0,
            authorize_max_requests=5_000,
            authorize_single_seconds=2.0,
            stripe_default=(100_000, 300, 4),
            stripe_v1=(20_000, 50, 2),
            dedupe_events=(1_000_000,),
        )


@dataclass(slots=True)
class Result:
    """One row of the report: ``figure`` in ``unit`` against ``target`` (``met`` None = no target)."""

    benchmark: str
    name: str
    figure: float | int | str | None
    unit: str = ""
    target: str = ""
    met: bool | None = None
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def median(values: list[float]) -> float:
    return float(statistics.median(values))
