"""A running pipeline on real parts for end-to-end tests: Tansu broker, faust worker processes,
the ClickHouse sink on chDB, and the seed prices published to the prices topic."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meterline.core.config import Settings
from meterline.core.pricing import load_price_book
from meterline.stack.producer import UsageProducer
from pipeline.assembly import Assembly
from pipeline.publish import publish_records
from pipeline.sink import ClickHouseSink
from pipeline.workers import WorkerProcess
from schemas.models import UsageEvent

REPO = Path(__file__).resolve().parents[2]
SEED = REPO / "infra" / "prices" / "seed.yaml"


class Pipeline:
    def __init__(self, settings: Settings, clickhouse: Any, log_dir: Path) -> None:
        self.settings = settings
        self.ch = clickhouse
        self.log_dir = log_dir
        # The pipeline builder of `meterline up` (pipeline/assembly.py): workers + the usage sink.
        self.assembly = Assembly(settings, lambda: clickhouse, log_dir=log_dir)
        self.workers: list[WorkerProcess] = self.assembly.workers
        self.sink: ClickHouseSink | None = None
        self.producer = UsageProducer(settings.kafka_bootstrap, settings.topic("usage-events"), linger_ms=5)

    def start_sink(self) -> ClickHouseSink:
        self.sink = self.assembly.start_usage_sink(max_interval_ms=200)
        return self.sink

    def publish_prices(self, source: Any = SEED) -> None:
        publish_records(
            self.settings.kafka_bootstrap, self.settings.topic("prices"), load_price_book(source).to_records()
        )

    def start_worker(self) -> WorkerProcess:
        return self.assembly.start_worker()

    def produce(self, events: list[UsageEvent]) -> None:
        for e in events:
            self.producer.send(e)
        self.producer.flush(30)

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        return list(self.ch.query(sql, parameters=parameters).result_rows)

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            for w in self.workers:
                if w.proc is not None and w.proc.poll() not in (None, -9):
                    pytest.fail(f"{w.name} exited with {w.proc.returncode}:\n{w.log_tail()}")
            time.sleep(0.2)
        tails = "\n".join(f"--- {w.name}\n{w.log_tail()}" for w in self.workers)
        pytest.fail(f"timed out waiting for {what}\n{tails}")

    def priced_count(self) -> int:
        return int(self.query("SELECT count() FROM usage_priced FINAL")[0][0])

    def wait_priced(self, n: int, timeout: float = 90.0) -> None:
        self.wait_for(f"{n} priced rows", lambda: self.priced_count() >= n, timeout)

    def close(self) -> None:
        self.assembly.stop(worker_timeout=5)
        self.producer.close()


@pytest.fixture
def pipeline(
    kafka_bootstrap: str, topics: dict[str, str], topic_prefix: str, clickhouse: Any, tmp_path: Path
) -> Iterator[Pipeline]:
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        partitions=4,
        broker_flavor="tansu",
        data_dir=tmp_path,
    )
    p = Pipeline(settings, clickhouse, tmp_path / "logs")
    try:
        p.start_sink()
        yield p
    finally:
        p.close()
