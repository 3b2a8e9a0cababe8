"""The chaos stack: broker topics, faust worker processes and sink threads on one chDB database,
with a ClickHouse client factory that can be switched off (an outage)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from devtools.verify.credits import status_check
from devtools.verify.oracle import Expected, price_file
from meterline.core.config import Settings

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- the stack


class _Outage(ConnectionError):
    pass


class FlakyClickHouse:
    """A zero-argument client factory for :class:`~pipeline.sink.ClickHouseSink` with an outage switch.

    Every client it hands out is a view of ONE real client, serialised by one lock (embedded chDB
    must not be driven from two threads at once). While :meth:`go_down` is in force the factory and
    every call on a handed-out view raise :class:`ConnectionError`; :meth:`restore` ends the outage.
    :meth:`down_after_next_insert` lets exactly one insert land and then fails everything (the
    "insert done, crash before commit" path). :meth:`query` is the observer's own path: never down.
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self.lock = threading.RLock()
        self._down = threading.Event()
        self._arm_after_insert = False
        self.refused = 0
        self.outages = 0

    def __call__(self) -> _GuardedClient:
        self._check()
        return _GuardedClient(self)

    @property
    def down(self) -> bool:
        return self._down.is_set()

    def go_down(self) -> None:
        if not self._down.is_set():
            self.outages += 1
        self._down.set()

    def down_after_next_insert(self) -> None:
        self._arm_after_insert = True

    def restore(self) -> None:
        self._arm_after_insert = False
        self._down.clear()

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        with self.lock:
            return list(self.client.query(sql, parameters=parameters).result_rows)

    def _check(self) -> None:
        if self._down.is_set():
            self.refused += 1
            raise _Outage("injected ClickHouse outage")


class _GuardedClient:
    def __init__(self, owner: FlakyClickHouse) -> None:
        self._owner = owner

    def query(self, *args: Any, **kwargs: Any) -> Any:
        with self._owner.lock:
            self._owner._check()
            return self._owner.client.query(*args, **kwargs)

    def insert(self, *args: Any, **kwargs: Any) -> Any:
        with self._owner.lock:
            self._owner._check()
            result = self._owner.client.insert(*args, **kwargs)
            if self._owner._arm_after_insert:
                self._owner._arm_after_insert = False
                self._owner.go_down()
            return result

    def command(self, *args: Any, **kwargs: Any) -> Any:
        with self._owner.lock:
            self._owner._check()
            return self._owner.client.command(*args, **kwargs)

    def close(self) -> None:  # the shared client belongs to the FlakyClickHouse owner
        pass


_SINK_OPTS: dict[str, Any] = {"max_interval_ms": 200, "backoff_initial_ms": 50, "backoff_max_ms": 500}


class ChaosStack:
    """Workers, a sink and a producer around one broker + one migrated ClickHouse database.

    ``settings`` must carry ``kafka_bootstrap`` and a ``topic_prefix`` whose topics exist.
    ``sink_cls`` may be a :class:`~pipeline.sink.ClickHouseSink` subclass (crash hooks).
    """

    def __init__(self, settings: Settings, client: Any, log_dir: Path) -> None:
        from meterline.stack.producer import UsageProducer
        from pipeline.assembly import Assembly
        from pipeline.publish import control_producer

        assert settings.kafka_bootstrap, "ChaosStack needs settings.kafka_bootstrap"
        self.settings = settings
        self.bootstrap: str = settings.kafka_bootstrap
        self.ch = FlakyClickHouse(client)
        self.log_dir = log_dir
        # The pipeline builder of `meterline up` (pipeline/assembly.py); every sink gets the
        # outage-switchable factory. A sink's exception is collected in sink_errors, not raised.
        self.assembly = Assembly(settings, lambda: self.ch, log_dir=log_dir, capture_errors=True)
        self.workers: list[Any] = self.assembly.workers
        self.sink_errors: list[BaseException] = self.assembly.errors
        self.producer = UsageProducer(self.bootstrap, settings.topic("usage-events"), linger_ms=5)
        self.raw_producer = control_producer(self.bootstrap)
        self.kills = 0

    # -- pieces
    def publish_prices(self, source: Any = None) -> None:
        from meterline.core.pricing import load_price_book
        from pipeline.publish import publish_records

        book = load_price_book(source if source is not None else price_file())
        publish_records(self.bootstrap, self.settings.topic("prices"), book.to_records())

    def start_sink(self, sink_cls: Any = None, **kwargs: Any) -> Any:
        opts: dict[str, Any] = dict(_SINK_OPTS)
        opts.update(kwargs)
        return self.assembly.start_usage_sink(sink_cls, thread_name="chaos-sink", **opts)

    @property
    def sink(self) -> Any:
        return self.assembly.sink("sink")

    @property
    def ledger_sink(self) -> Any:
        return self.assembly.sink("ledger-sink")

    @property
    def price_mirror(self) -> Any:
        return self.assembly.sink("prices-mirror")

    def price_mirror_start(self) -> Any:
        """``meterline up``'s price mirror (prices topic → ClickHouse ``price_records``), so a
        restart on an empty broker can republish the prices (pipeline/restore.py)."""
        return self.assembly.start_mirrors(["prices"], group="price-mirror", clickhouse=self.ch())[0]

    def start_ledger_sink(self, **kwargs: Any) -> Any:
        """The ``ledger-entries`` → ``ledger_entries`` sink, on the same outage-switchable client."""
        opts: dict[str, Any] = dict(_SINK_OPTS)
        opts.update(kwargs)
        return self.assembly.start_ledger_sink(thread_name="chaos-ledger-sink", **opts)

    def send_commands(self, messages: Iterable[Mapping[str, Any]]) -> int:
        """Publish ``ledger-commands`` messages keyed by customer; waits for every acknowledgement."""
        from pipeline.publish import publish_records
        from schemas.credits import encode_message

        records = [(str(m["customer_id"]), encode_message(m)) for m in messages]
        return publish_records(
            self.bootstrap, self.settings.topic("ledger-commands"), records, producer=self.raw_producer
        )

    def latest(self, topic: str, timeout: float = 20.0) -> dict[str, dict[str, Any]]:
        """The last JSON value per key of a (customer-keyed) topic, read from offset 0 to its end."""
        import json

        from meterline.stack.kafka import read_topic

        return {
            (m.key() or b"").decode("utf-8", "replace"): json.loads(m.value() or b"null")
            for m in read_topic(self.bootstrap, self.settings.topic(topic), timeout=timeout)
        }

    def ledger_counts(self) -> tuple[int, int]:
        """(distinct debited (customer, event) pairs, grant entries) in ledger_entries."""
        debited, grants = self.query(
            "SELECT uniqExactIf((customer_id, event_id), kind = 'debit'), "
            "uniqExactIf(entry_id, kind = 'grant') FROM ledger_entries"
        )[0]
        return int(debited), int(grants)

    def wait_ledger(self, debited: int, grants: int, timeout: float = 120.0, quiet: float = 1.0) -> bool:
        """Wait until ledger_entries holds ``debited`` debited events and ``grants`` grants, unchanged
        for ``quiet`` s, with the ledger sink drained."""
        deadline, last, since = time.monotonic() + timeout, None, time.monotonic()
        while time.monotonic() < deadline:
            dead = self.dead_workers()
            if dead:
                raise RuntimeError("a worker crashed: " + "\n".join(dead))
            now = self.ledger_counts()
            if now != last:
                last, since = now, time.monotonic()
            elif now[0] >= debited and now[1] >= grants and time.monotonic() - since >= quiet:
                sink = self.ledger_sink
                if sink is None or (sink.buffered == 0 and not sink.degraded):
                    return True
            time.sleep(0.2)
        return False

    def settled_statuses(self, expected: Expected, timeout: float = 30.0) -> dict[str, dict[str, Any]]:
        """The latest ``customer-status`` per customer, re-read until it agrees with the ledger (the
        status is produced with the entries of the same record, so it may trail them briefly)."""
        deadline = time.monotonic() + timeout
        while True:
            statuses = self.latest("customer-status")
            if not status_check(statuses)(self.query, expected) or time.monotonic() > deadline:
                return statuses
            time.sleep(0.5)

    def sink_alive(self) -> bool:
        return self.assembly.alive("sink")

    def stop_sink(self, timeout: float = 20.0) -> None:
        self.assembly.stop_piece("sink", timeout)

    def start_worker(self) -> Any:
        return self.assembly.start_worker()

    def kill_worker(self, worker: Any) -> None:
        worker.kill()
        self.kills += 1

    def produce(self, events: Sequence[Any], flush: bool = True) -> None:
        for e in events:
            self.producer.send(e)
        if flush:
            self.producer.flush(30)

    def produce_raw(self, records: Iterable[tuple[bytes | None, bytes]]) -> None:
        topic = self.settings.topic("usage-events")
        failures: list[str] = []

        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None:
                failures.append(str(err))

        for key, value in records:
            self.raw_producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
        if self.raw_producer.flush(30) or failures:
            raise RuntimeError(f"raw produce failed: {failures[:3]}")

    # -- observing
    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        return self.ch.query(sql, parameters)

    def counts(self) -> tuple[int, int]:
        priced = self.query("SELECT count() FROM usage_priced")[0][0]
        rejected = self.query("SELECT count() FROM usage_rejected")[0][0]
        return int(priced), int(rejected)

    def dead_workers(self) -> list[str]:
        """Workers that exited by themselves (not by our SIGKILL), with their log tails."""
        return [
            f"{w.name} exited {w.proc.returncode}:\n{w.log_tail()}"
            for w in self.workers
            if w.proc is not None and w.proc.poll() not in (None, -9)
        ]

    def wait_settled(self, expected: Expected, timeout: float = 120.0, quiet: float = 1.0) -> bool:
        """Wait until both tables hold at least what ``expected`` says and stayed unchanged ``quiet`` s."""
        deadline = time.monotonic() + timeout
        want = (len(expected.priced), expected.rejected)
        last: tuple[int, int] | None = None
        stable_since = time.monotonic()
        while time.monotonic() < deadline:
            dead = self.dead_workers()
            if dead:
                raise RuntimeError("a worker crashed: " + "\n".join(dead))
            now = self.counts()
            if now != last:
                last, stable_since = now, time.monotonic()
            elif now[0] >= want[0] and now[1] >= want[1] and time.monotonic() - stable_since >= quiet:
                if self.sink is None or (self.sink.buffered == 0 and not self.sink.degraded):
                    return True
            time.sleep(0.2)
        return False

    def wait_progress(self, above: int, timeout: float = 90.0) -> int:
        """Wait until usage_priced holds more than ``above`` rows; return the count."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            n = self.counts()[0]
            if n > above:
                return n
            dead = self.dead_workers()
            if dead:
                raise RuntimeError("a worker crashed: " + "\n".join(dead))
            time.sleep(0.1)
        raise TimeoutError(f"no progress past {above} priced rows in {timeout}s")

    def close(self) -> None:
        self.assembly.stop(worker_timeout=5)
        try:
            self.producer.close(10)
        except Exception as exc:
            log.warning("producer close: %s", exc)
        self.raw_producer.flush(5)
