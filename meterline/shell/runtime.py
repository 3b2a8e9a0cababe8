"""``meterline up``: bring the whole pipeline up on one machine, and take it down cleanly.

Start order (each step needs the one before)::

    broker  (embedded Tansu unless METERLINE_KAFKA_BOOTSTRAP is set)
    topics  (infra/topics.yaml, idempotent)
    ClickHouse (connect: this process owns an embedded chDB path; migrations, idempotent)
    faust workers (child processes: pricing agent)
    sink    (thread: usage-priced / usage-dead-letter → ClickHouse)
    HTTP API (thread: ingest, SQL, credits, POST /v1/admin/run, …) + data_dir/runtime.json so
            CLI commands find it
    stripe sync (thread, only when METERLINE_STRIPE_SYNC_EVERY_S > 0)

Stop is the reverse. Ctrl-C (SIGINT) and SIGTERM both lead to :meth:`Runtime.stop`; every Kafka
client of this process is closed (not only flushed) before the broker stops, so none reconnects to
it; every child process also dies with this one (``PR_SET_PDEATHSIG``), so nothing is left running.

Who owns what: this process is the single owner of the embedded ClickHouse engine; everything
that reads or writes it while ``up`` runs goes through the sink (writes) or the API (reads),
guarded by ``clickhouse_lock``. The Stripe jobs and ``meterline statement`` run inside this process
too: the CLI forwards them to ``POST /v1/admin/run`` (:mod:`meterline.shell.api.admin`), whose
:class:`~meterline.shell.api.admin.CommandRunner` runs them one at a time with this runtime's settings on
their own client of the same engine.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from meterline.core.config import Settings
from meterline.shell.discovery import RuntimeInfo, remove_runtime_info, write_runtime_info
from meterline.shell.roles import ApiService
from meterline.shell.roles import LockedClient as _LockedClient
from meterline.stack.broker import TansuBroker
from meterline.stack.clickhouse import apply_migrations, connect
from meterline.stack.metrics import STRIPE_SYNC_RUNS
from meterline.stack.private import PRIVATE_UMASK, private_dir
from meterline.stack.topics import ensure_topics
from pipeline.assembly import Assembly
from pipeline.workers import WorkerProcess

log = logging.getLogger(__name__)
sync_log = logging.getLogger("meterline.stripe_sync")  # `meterline up` shows it at INFO


class Runtime:
    def __init__(self, settings: Settings, *, workers: int | None = None, api: bool = True) -> None:
        self.settings = settings
        self.n_workers = workers or settings.workers
        self.with_api = api
        self.broker: TansuBroker | None = None
        self.clickhouse: Any = None
        self.clickhouse_lock = threading.RLock()
        self.workers: list[WorkerProcess] = []
        self.assembly: Assembly | None = None
        self.sink: Any = None
        self.ledger_sink: Any = None
        self.api: Any = None  # meterline.shell.roles.ApiService
        self.api_server: Any = None
        self.admin_key: str | None = None
        self.cli_runner: Any = None  # meterline.shell.api.admin.CommandRunner, once started
        self._producer: Any = None
        self._control_producers: list[Any] = []  # confluent Producers the API's routes publish with
        self._credits: list[Any] = []
        self.webhooks: Any = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.log_dir = settings.data_dir / "logs"
        self._umask: int | None = None
        self.restore_report: Any = None
        self.price_mirror: Any = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, *, on_step: Callable[[str], None] | None = None) -> Runtime:
        step = on_step or (lambda s: log.info(s))
        # Billing data is private to this user (meterline.stack.private): everything `up` and its child
        # processes create from here on is 0600/0700.
        self._umask = os.umask(PRIVATE_UMASK)
        private_dir(self.settings.data_dir)
        private_dir(self.log_dir)
        try:
            if not self.settings.kafka_bootstrap:
                step("starting the embedded Kafka-protocol broker (Tansu, memory only)")
                self.broker = TansuBroker(log_dir=self.log_dir).start()
                self.settings = self.settings.model_copy(
                    update={"kafka_bootstrap": self.broker.bootstrap, "broker_flavor": "tansu"}
                )
            step(f"ensuring topics on {self.settings.kafka_bootstrap}")
            ensure_topics(self.settings.kafka_bootstrap, self.settings.topic_prefix, self.settings.partitions)
            step(f"opening ClickHouse at {self.settings.resolved_clickhouse_dsn}")
            self.clickhouse = connect(self.settings.resolved_clickhouse_dsn)
            applied = apply_migrations(self.clickhouse, cluster=self.settings.clickhouse_cluster)
            step(f"migrations: {len(applied)} applied" if applied else "migrations: up to date")
            from pipeline.restore import restore_if_lost

            # Before any worker: an empty broker gets its money state back from ClickHouse; a
            # broker that kept its state (real Kafka) is left alone (pipeline/restore.py).
            self.restore_report = restore_if_lost(
                self.settings.kafka_bootstrap,
                self.settings.topic,
                _LockedClient(self.clickhouse, self.clickhouse_lock),
                step,
                partitions=self.settings.partitions,
                dedupe_window_days=self.settings.dedupe_window_days,
            )
            step(self.restore_report.line())
            self.assembly = Assembly(
                self.settings,
                lambda: _LockedClient(self.clickhouse, self.clickhouse_lock),
                log_dir=self.log_dir,
                join_timeout=15,
            )
            self.workers = self.assembly.workers
            self.assembly.start_workers(
                self.n_workers, on_start=lambda i: step(f"starting faust worker {i + 1}/{self.n_workers}")
            )
            step("starting the ClickHouse sink")
            self._start_sink()
            if self.restore_report.customers:
                step(
                    f"waiting for the credit agent to take the {len(self.restore_report.customers)} restored ledger(s)"
                )
                self._await_restored(self.restore_report.customers)
            from meterline.shell.api.admin import CommandRunner
            from meterline.shell.cli_stripe import run_captured, stripe_subcommands

            self.cli_runner = CommandRunner(self.settings, run=run_captured, stripe_commands=stripe_subcommands())
            if self.with_api:
                self._start_api()
                step(f"API listening on {self.api_server.url}")
            if self.settings.alert_webhook_urls:
                from pipeline.alerts import WebhookDispatcher

                secret = self.settings.alert_webhook_secret
                self.webhooks = WebhookDispatcher(
                    self.settings.kafka_bootstrap,
                    self.settings.topic("alerts"),
                    f"{self.settings.topic_prefix}webhooks",
                    urls=self.settings.alert_webhook_urls,
                    secret=secret.get_secret_value() if secret else "",  # empty -> ConfigError at start
                    store_path=self.settings.data_dir / "webhooks.sqlite3",
                ).start()
                step(f"delivering alerts to {len(self.settings.alert_webhook_urls)} webhook(s)")
            if self.settings.stripe_sync_every_s > 0:
                t = threading.Thread(target=self._stripe_sync_loop, name="meterline-stripe-sync", daemon=True)
                t.start()
                self._threads.append(t)
                step(f"running `meterline stripe sync` every {self.settings.stripe_sync_every_s:g} s")
            self._write_runtime_file()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self._stop.set()
        if self.assembly is not None:
            self.assembly.signal()  # the sinks finish while the workers stop, as before
            self.assembly.stop(worker_timeout=10)
        for t in self._threads:
            t.join(timeout=15)
        if self.api_server is not None:
            self.api_server.stop()
        # Every Kafka client closes before the broker stops: a client left open reconnects to the
        # stopped broker and logs "Connect ... failed: Connection refused" until the process exits.
        if self._producer is not None:
            self._producer.close()
        for producer in self._control_producers:
            if producer.flush(10) > 0:
                producer.purge()  # unacknowledged: the webhook that sent it answered 503
            producer.close()
        for part in self._credits:
            part.close()
        if self.webhooks is not None:
            self.webhooks.stop()
        if self.broker is not None:
            self.broker.stop()
        with self.clickhouse_lock:
            if self.clickhouse is not None:
                try:
                    self.clickhouse.close()
                except Exception:
                    pass
        remove_runtime_info(self.settings.data_dir, only_if_pid=os.getpid())
        if self._umask is not None:
            os.umask(self._umask)
            self._umask = None

    @property
    def commands(self) -> Any:
        """The ledger-command publisher (CommandPublisher) of the API's credits routes."""
        return self._credits[0] if self._credits else None

    @property
    def status_view(self) -> Any:
        """The live customer-status view (StatusView) the API answers from."""
        return self._credits[2] if self._credits else None

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stop.wait(timeout)

    # -- pieces ---------------------------------------------------------------------------------

    def _start_sink(self) -> None:
        """The sinks and mirrors, on the pipeline builder (pipeline/assembly.py)."""
        self.assembly.start_usage_sink()
        self.assembly.start_ledger_sink()
        self.assembly.start_plan_sinks()
        mirrors = self.assembly.start_mirrors()
        self.sink = self.assembly.sink("sink")
        self.ledger_sink = self.assembly.sink("ledger-sink")
        self.price_mirror = mirrors[0] if mirrors else None

    def _await_restored(self, customers: tuple[str, ...], timeout: float = 300.0) -> None:
        """Until the credit agent published a status for every restored customer: new usage must
        not reach a customer before its restored state does (the API starts after this)."""
        from meterline.core.errors import BrokerUnavailable
        from meterline.stack.kafka import read_topic

        want, deadline = set(customers), time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = {
                (m.key() or b"").decode("utf-8", "replace")
                for m in read_topic(self.settings.kafka_bootstrap, self.settings.topic("customer-status"), timeout=15)
            }
            if want <= seen:
                return
            if any(not w.alive() for w in self.workers):
                raise BrokerUnavailable("a worker exited while restoring the ledgers")
            time.sleep(0.5)
        raise BrokerUnavailable(f"the credit agent did not take the restored ledgers within {timeout:.0f} s")

    @property
    def durability_line(self) -> str:
        """What this mode can lose, said at start-up (issue #19.2)."""
        if self.broker is None:
            return (
                "broker: external Kafka (durable; state kept by the broker, nothing restored unless the broker lost it)"
            )
        return (
            "one-box mode: the embedded broker keeps nothing on disk; balances, grants and prices are "
            "restored from ClickHouse at the next start, but events accepted and not yet processed "
            "when everything is killed are lost (use real Kafka for zero loss: see README)"
        )

    def _start_api(self) -> None:
        """The API as ``meterline api`` builds it (meterline/shell/roles.py), on this process's engine."""
        self.api = ApiService(
            self.settings,
            query_client=self.query_client,
            seen_client=_LockedClient(self.clickhouse, self.clickhouse_lock),
            cli_runner=self.cli_runner,
        )
        try:
            self.api.start()
        finally:  # stop() closes what was opened, even when start() failed midway
            self.api_server = self.api.server
            self.admin_key = self.api.admin_key
            self._producer = self.api.producer
            self._control_producers = self.api.control_producers
            self._credits = self.api.credits

    def _stripe_sync_loop(self) -> None:
        every = self.settings.stripe_sync_every_s
        while not self._stop.wait(every):
            self.stripe_sync_once()

    def stripe_sync_once(self) -> Any:
        """One periodic ``meterline stripe sync`` through :attr:`cli_runner` (the code path of
        ``POST /v1/admin/run``), logged as one line on ``meterline.stripe_sync``; skipped when
        another command is running. Never raises: errors are logged. Returns the RunResult or None."""
        from meterline.shell.api.admin import RunnerBusy

        started = time.monotonic()
        try:
            result = self.cli_runner.run(["stripe", "sync", "--no-progress"], wait_s=0, width=1000)
        except RunnerBusy as exc:
            STRIPE_SYNC_RUNS.labels("skipped").inc()
            sync_log.info("stripe sync: skipped, `meterline %s` is running", exc.running)
            return None
        except Exception as exc:
            STRIPE_SYNC_RUNS.labels("failed").inc()
            sync_log.error("stripe sync: failed: %s: %s", type(exc).__name__, exc, exc_info=True)
            return None
        STRIPE_SYNC_RUNS.labels("ok" if result.exit_code == 0 else "failed").inc()
        sync_log.log(
            logging.INFO if result.exit_code == 0 else logging.WARNING,
            "%s",
            sync_summary_line(result, time.monotonic() - started),
        )
        return result

    def _write_runtime_file(self) -> None:
        write_runtime_info(
            self.settings.data_dir,
            RuntimeInfo(
                pid=os.getpid(),
                kafka_bootstrap=self.settings.kafka_bootstrap,
                topic_prefix=self.settings.topic_prefix,
                api_url=self.api_server.url if self.api_server else None,
                metrics_url=f"{self.api_server.url}/metrics" if self.api_server else None,
                worker_metrics_dir=str(self.settings.data_dir / "metrics"),
            ),
        )

    @contextmanager
    def query_client(self) -> Iterator[Any]:
        with self.clickhouse_lock:
            yield self.clickhouse


def sync_summary_line(result: Any, seconds: float) -> str:
    """One line about a ``stripe sync`` run (a RunResult): its figures, or why it failed."""
    from jobs.stripe.sync import SyncSummary

    summary = next((r for r in result.results if isinstance(r, SyncSummary)), None)
    line = f"stripe sync: exit {result.exit_code} in {seconds:.1f} s"
    if summary is not None:
        line += (
            f": windows {summary.windows}, planned {summary.planned}, resent {summary.resent}, "
            f"sent {summary.sent}, acked {summary.acked}, carried {summary.carried}, "
            f"too old {len(summary.too_old)}, failed {len(summary.failed)}"
        )
        if summary.credited or summary.corrections or summary.corrections_failed:
            # re-rated money Stripe takes as invoice items (jobs/stripe/corrective.py): say so
            cents = sum(c.cents for c in summary.corrections)
            line += (
                f", credited windows {summary.credited}, corrective amounts {len(summary.corrections)} "
                f"({cents} minor units)"
            )
            if summary.corrections_failed:
                line += f", corrective amounts failed {len(summary.corrections_failed)}"
    if result.exit_code != 0:
        problems = [
            ln.strip() for ln in result.stderr.splitlines() if ln.strip() and not ln.startswith("no Stripe key")
        ]
        line += f" ({'; '.join(problems[-3:]) or 'no error output'})"
    return line
