"""One builder for a running pipeline: faust worker processes plus the sink threads around them.

``meterline up`` (meterline/shell/runtime.py), ``meterline verify`` (devtools/verify/stack.py),
the benchmarks (bench/_stack.py) and the test fixtures all run the same pieces: N faust workers
(:class:`~pipeline.workers.WorkerProcess`), the usage sink (usage-priced / usage-dead-letter →
ClickHouse), the ledger sink (ledger-entries → ClickHouse, undecodable entries dead-lettered),
the plan sinks and the catalog mirrors. They are started here, in one way, so a fix to how a
piece is wired or stopped reaches every caller; each piece is optional.

Every sink runs ``sink.run(stop)`` on its own daemon thread with its own stop event, so a caller
can stop (and restart) one sink alone, as the chaos tool does. An exception that ends a sink's
``run`` is recorded in :attr:`Assembly.errors` and re-raised in its thread (the thread's
excepthook reports it) unless ``capture_errors`` is set.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meterline.core.config import Settings
from pipeline.workers import WorkerProcess


@dataclass
class Piece:
    """One sink (or mirror) and the thread that runs it."""

    name: str
    sink: Any
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def halt(self, timeout: float) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout)


class Assembly:
    """Workers and sinks for ``settings`` (which must carry ``kafka_bootstrap``).

    ``client`` is called once per piece and its result handed to that piece as its ClickHouse
    client: a function returning one shared (locked) client, a fresh client, or a client factory
    (:class:`~pipeline.sink.ClickHouseSink` accepts either a client or a zero-argument factory).
    """

    def __init__(
        self,
        settings: Settings,
        client: Callable[[], Any],
        *,
        log_dir: Path,
        capture_errors: bool = False,
        join_timeout: float = 20.0,
    ) -> None:
        assert settings.kafka_bootstrap, "Assembly needs settings.kafka_bootstrap"
        self.settings = settings
        self.bootstrap: str = settings.kafka_bootstrap
        self.client = client
        self.log_dir = Path(log_dir)
        self.capture_errors = capture_errors
        self.join_timeout = join_timeout
        self.workers: list[WorkerProcess] = []
        self.pieces: dict[str, Piece] = {}
        self.errors: list[BaseException] = []
        self._n = 0

    # -- workers --------------------------------------------------------------------------------

    def start_worker(self) -> WorkerProcess:
        """One more faust worker process, named ``worker-<n>`` (n counts every worker started)."""
        w = WorkerProcess(self.settings, name=f"worker-{self._n}", log_dir=self.log_dir).start()
        self._n += 1
        self.workers.append(w)
        return w

    def start_workers(self, n: int, on_start: Callable[[int], None] | None = None) -> list[WorkerProcess]:
        started = []
        for i in range(n):
            if on_start is not None:
                on_start(i)
            started.append(self.start_worker())
        return started

    def stop_workers(self, timeout: float = 10.0) -> None:
        for w in self.workers:
            w.stop(timeout=timeout)

    # -- sinks ----------------------------------------------------------------------------------

    def run_piece(self, name: str, sink: Any, thread_name: str | None = None) -> Any:
        """Run ``sink.run(stop)`` on a daemon thread under ``name`` (replacing a stopped piece)."""
        old = self.pieces.get(name)
        if old is not None and old.alive():
            raise RuntimeError(f"{name} is already running")
        piece = Piece(name, sink)

        def run() -> None:
            try:
                sink.run(piece.stop)
            except BaseException as exc:
                self.errors.append(exc)
                if not self.capture_errors:
                    raise

        piece.thread = threading.Thread(target=run, name=thread_name or name, daemon=True)
        self.pieces[name] = piece
        piece.thread.start()
        return sink

    def start_usage_sink(self, sink_cls: Any = None, *, thread_name: str = "meterline-sink", **opts: Any) -> Any:
        """usage-priced / usage-dead-letter → ClickHouse. ``sink_cls`` may be a ClickHouseSink subclass."""
        from pipeline.sink import ClickHouseSink

        cls = sink_cls or ClickHouseSink
        sink = cls(
            self.bootstrap,
            f"{self.settings.topic_prefix}sink",
            self.settings.topic("usage-priced"),
            self.settings.topic("usage-dead-letter"),
            self.client(),
            **opts,
        )
        return self.run_piece("sink", sink, thread_name)

    def start_ledger_sink(self, *, thread_name: str = "meterline-ledger-sink", **opts: Any) -> Any:
        """ledger-entries → ClickHouse; an undecodable entry goes to usage-dead-letter."""
        from pipeline.credits.sink import LedgerEntrySink

        sink = LedgerEntrySink(
            self.bootstrap,
            f"{self.settings.topic_prefix}ledger-sink",
            self.settings.topic("ledger-entries"),
            self.client(),
            dead_letter_topic_out=self.settings.topic("usage-dead-letter"),
            **opts,
        )
        return self.run_piece("ledger-sink", sink, thread_name)

    def start_plan_sinks(self) -> list[Any]:
        """plans → plan catalog table, subscriptions → subscriptions table."""
        from pipeline.plans_sink import PlanCatalogSink, SubscriptionSink

        prefix = self.settings.topic_prefix
        return [
            self.run_piece(
                "plans-sink",
                PlanCatalogSink(self.bootstrap, f"{prefix}plans-sink", self.settings.topic("plans"), self.client()),
                "meterline-plans-sink",
            ),
            self.run_piece(
                "subscriptions-sink",
                SubscriptionSink(
                    self.bootstrap, f"{prefix}subscriptions-sink", self.settings.topic("subscriptions"), self.client()
                ),
                "meterline-subscriptions-sink",
            ),
        ]

    def start_mirrors(
        self, topics: Iterable[str] | None = None, *, group: str = "mirror", clickhouse: Any = None
    ) -> list[Any]:
        """Catalog topics → ClickHouse ``price_records`` (pipeline/restore.py); every declared
        catalog topic unless ``topics`` names some. Pieces are named ``<topic>-mirror``. A mirror
        needs a client, not a factory: ``clickhouse`` overrides ``client()`` for it."""
        from pipeline.restore import PriceMirror, catalog_topics

        mirrors = []
        for t in catalog_topics() if topics is None else topics:
            mirror = PriceMirror(
                self.bootstrap,
                self.settings.topic(t),
                f"{self.settings.topic_prefix}{group}",
                clickhouse if clickhouse is not None else self.client(),
                name=t,
            )
            mirrors.append(self.run_piece(f"{t}-mirror", mirror, f"meterline-{t}-mirror"))
        return mirrors

    def sink(self, name: str) -> Any:
        piece = self.pieces.get(name)
        return piece.sink if piece is not None else None

    def alive(self, name: str) -> bool:
        piece = self.pieces.get(name)
        return piece is not None and piece.alive()

    def stop_piece(self, name: str, timeout: float | None = None) -> None:
        piece = self.pieces.get(name)
        if piece is not None:
            piece.halt(self.join_timeout if timeout is None else timeout)

    def signal(self) -> None:
        """Ask every sink to stop, without waiting (they finish while the workers stop)."""
        for piece in self.pieces.values():
            piece.stop.set()

    # -- lifecycle ------------------------------------------------------------------------------

    def stop(self, worker_timeout: float = 10.0) -> None:
        """Workers first (SIGTERM, then SIGKILL after ``worker_timeout``), then every sink."""
        self.stop_workers(worker_timeout)
        self.signal()
        for piece in self.pieces.values():
            piece.halt(self.join_timeout)
