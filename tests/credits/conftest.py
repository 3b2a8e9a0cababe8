"""A running credit pipeline on real parts: Tansu broker, faust worker processes (pricing + credit
agents), the ledger-entries sink on chDB. Records are produced straight to ``usage-priced`` and
``ledger-commands`` with explicit broker timestamps, so an independent pure replay of the same
records (tests/credits/helpers.Replay) is the exact expectation."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meterline.core.config import Settings
from meterline.core.pricing import load_price_book
from meterline.stack.kafka import make_producer, read_topic
from pipeline.assembly import Assembly
from pipeline.credits.sink import LedgerEntrySink
from pipeline.publish import publish_records
from pipeline.workers import WorkerProcess

REPO = Path(__file__).resolve().parents[2]
SEED = REPO / "infra" / "prices" / "seed.yaml"


class CreditPipeline:
    def __init__(self, settings: Settings, clickhouse: Any, log_dir: Path) -> None:
        self.settings = settings
        self.ch = clickhouse
        self.log_dir = log_dir
        # The pipeline builder of `meterline up` (pipeline/assembly.py): workers + the ledger sink.
        self.assembly = Assembly(settings, lambda: clickhouse, log_dir=log_dir)
        self.workers: list[WorkerProcess] = self.assembly.workers
        self.sink: LedgerEntrySink | None = None
        self.producer = make_producer(settings.kafka_bootstrap, {"linger.ms": 2})

    def start_sink(self) -> LedgerEntrySink:
        self.sink = self.assembly.start_ledger_sink(max_interval_ms=200)
        return self.sink

    def publish_prices(self) -> None:
        publish_records(
            self.settings.kafka_bootstrap or "", self.settings.topic("prices"), load_price_book(SEED).to_records()
        )

    def start_worker(self) -> WorkerProcess:
        return self.assembly.start_worker()

    def send(self, topic: str, key: str, value: bytes, ts_ms: int) -> None:
        self.producer.produce(self.settings.topic(topic), key=key.encode(), value=value, timestamp=ts_ms)
        self.producer.poll(0)

    def flush(self) -> None:
        assert self.producer.flush(30) == 0

    def read(self, topic: str, timeout: float = 1.0) -> list[tuple[str, bytes, int, int]]:
        """Every record of a topic now: (key, value, partition, offset), per-partition order."""
        return [
            ((m.key() or b"").decode(), m.value(), m.partition(), m.offset())
            for m in read_topic(self.settings.kafka_bootstrap, self.settings.topic(topic), timeout=timeout + 10)
        ]

    def latest_json(self, topic: str) -> dict[str, dict[str, Any]]:
        latest: dict[str, dict[str, Any]] = {}
        for k, v, _p, _o in self.read(topic):
            latest[k] = json.loads(v)
        return latest

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

    def entry_count(self) -> int:
        return int(self.query("SELECT count() FROM ledger_entries FINAL")[0][0])

    def close(self) -> None:
        self.assembly.stop(worker_timeout=5)
        self.producer.flush(5)


@pytest.fixture
def credit_pipeline(
    kafka_bootstrap: str, topics: dict[str, str], topic_prefix: str, clickhouse: Any, tmp_path: Path
) -> Iterator[CreditPipeline]:
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        partitions=4,
        broker_flavor="tansu",
        data_dir=tmp_path,
    )
    p = CreditPipeline(settings, clickhouse, tmp_path / "logs")
    try:
        p.start_sink()
        yield p
    finally:
        p.close()
