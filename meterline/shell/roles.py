"""The pipeline's roles, each runnable alone: ``meterline worker``, ``meterline sink``, ``meterline api``.

``meterline up`` (meterline/shell/runtime.py) runs every role in one process tree on one box, with
an embedded broker when none is configured. A role started alone is the production shape: it runs
on its own hosts, scales on its own, and never starts a broker. Each role takes its configuration
from the same :class:`~meterline.core.config.Settings` (``METERLINE_*`` environment variables) and
refuses to start, with one line saying what is missing, when what it needs is not configured:

=========  ==================================  ========================================================
role       needs                               scales by
=========  ==================================  ========================================================
worker     METERLINE_KAFKA_BOOTSTRAP           more processes in faust's consumer group (one group:
                                               ``<prefix>pricing``); at most one busy worker per
                                               partition of usage-events
sink       METERLINE_KAFKA_BOOTSTRAP,          more processes in the sinks' consumer groups
           METERLINE_CLICKHOUSE_DSN (migrated)  (``<prefix>sink``, ``<prefix>ledger-sink``, ...)
api        METERLINE_KAFKA_BOOTSTRAP,          more replicas behind a load balancer (stateless: the
           METERLINE_CLICKHOUSE_DSN (migrated)  balances come from the customer-status topic)
=========  ==================================  ========================================================

Scaling uses only Kafka's consumer groups and partitions (faust's own assignment): no home-made
layer. The one-box extras of ``up`` stay there: the embedded broker, the restore of an empty
broker from ClickHouse (pipeline/restore.py; real Kafka keeps its state) and the periodic Stripe
sync (a CronJob running ``meterline stripe sync`` in a deployment: infra/k8s/).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

from meterline.core.config import Settings
from meterline.core.errors import ConfigError

log = logging.getLogger(__name__)

# faust's app id, hence its consumer group and the prefix of its changelog topics (pipeline/app.py).
WORKER_GROUP_SUFFIX = "pricing"


def require_broker(settings: Settings, role: str) -> str:
    """The configured Kafka bootstrap; ConfigError (one line) when there is none."""
    if not settings.kafka_bootstrap:
        raise ConfigError(
            f"`meterline {role}` needs an external Kafka broker: set METERLINE_KAFKA_BOOTSTRAP "
            "(host:port[,host:port]); `meterline up` is the one-box bundle with an embedded broker"
        )
    return settings.kafka_bootstrap


def require_clickhouse(settings: Settings, role: str) -> str:
    """The configured ClickHouse DSN; ConfigError (one line) when there is none.

    A role never falls back to the embedded engine under ``data_dir``: chDB allows one process per
    engine path, so two roles on one default path would refuse each other. Production runs a
    ClickHouse server (``http(s)://``); ``chdb:///path`` is accepted for a role that owns its path.
    """
    if not settings.clickhouse_dsn:
        raise ConfigError(
            f"`meterline {role}` needs ClickHouse: set METERLINE_CLICKHOUSE_DSN "
            "(http(s)://user:pass@host:port/db for a server, or chdb:///abs/path owned by this process alone)"
        )
    return settings.clickhouse_dsn


def require_migrated(client: Any, role: str) -> None:
    """ConfigError when the database misses migrations: the roles never migrate (``meterline migrate``
    does, once, as a deployment Job), so two replicas never race on DDL."""
    from meterline.stack.clickhouse import pending_migrations

    pending = pending_migrations(client)
    if pending:
        raise ConfigError(
            f"`meterline {role}`: ClickHouse database {client.database!r} misses {len(pending)} migration(s) "
            f"({pending[0]}{', …' if len(pending) > 1 else ''}): run `meterline migrate` first"
        )


# -- worker -------------------------------------------------------------------------------------


def run_worker(settings: Settings, *, name: str, metrics_port: int, metrics_host: str, loglevel: str) -> None:
    """One faust worker in this process, until SIGTERM/SIGINT (faust's own handlers stop it cleanly:
    it commits what it acknowledged). The same app as ``meterline up``'s workers (pipeline/app.py):
    both agents, one consumer group; more workers take more partitions."""
    import faust

    from meterline.stack.metrics import serve_worker_metrics
    from meterline.stack.topics import ensure_topics
    from pipeline.app import create_app

    bootstrap = require_broker(settings, "worker")
    ensure_topics(bootstrap, settings.topic_prefix, settings.partitions)
    app = create_app(settings)
    serve_worker_metrics(settings.data_dir, name, metrics_port, host=metrics_host)
    logging.getLogger("faust").setLevel(loglevel)
    faust.Worker(app, loglevel=loglevel, quiet=True).execute_from_commandline()


# -- sink ---------------------------------------------------------------------------------------


class SinkService:
    """Every sink and mirror of ``meterline up`` (pipeline/assembly.py), each on its own ClickHouse
    client, in this process: usage-priced / usage-dead-letter, ledger-entries, plans,
    subscriptions, and the catalog mirrors."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dsn = require_clickhouse(settings, "sink")
        require_broker(settings, "sink")
        self.clients: list[Any] = []
        self.assembly: Any = None

    def _client(self) -> Any:
        from meterline.stack.clickhouse import connect

        client = connect(self.dsn, create_database=False)
        self.clients.append(client)
        return client

    def start(self) -> SinkService:
        from meterline.stack.topics import ensure_topics
        from pipeline.assembly import Assembly

        try:
            require_migrated(self._client(), "sink")
            ensure_topics(self.settings.kafka_bootstrap or "", self.settings.topic_prefix, self.settings.partitions)
            self.assembly = Assembly(
                self.settings, self._client, log_dir=self.settings.data_dir / "logs", capture_errors=True
            )
            self.assembly.start_usage_sink()
            self.assembly.start_ledger_sink()
            self.assembly.start_plan_sinks()
            self.assembly.start_mirrors()
        except BaseException:
            self.stop()
            raise
        return self

    def failed(self) -> list[str]:
        """Names of the pieces that stopped by themselves (an error ended their loop)."""
        if self.assembly is None:
            return []
        return [name for name, piece in self.assembly.pieces.items() if not piece.alive()]

    @property
    def errors(self) -> list[BaseException]:
        return list(self.assembly.errors) if self.assembly is not None else []

    def stop(self) -> None:
        if self.assembly is not None:
            self.assembly.stop()
        for client in self.clients:
            try:
                client.close()
            except Exception:
                pass
        self.clients.clear()


# -- api ----------------------------------------------------------------------------------------


@dataclass
class ApiService:
    """The HTTP API of ``meterline up``: ingest, read-only SQL, credits (authorize, balance, grants),
    simulate, admin run and, with a signing secret, the Stripe webhook. ``meterline up`` builds it
    through :meth:`start` too, so the API is wired in one place.

    ``query_client`` is a context manager factory yielding the ClickHouse client for reads;
    ``seen_client`` the client the Stripe webhook records handled events with.
    """

    settings: Settings
    query_client: Callable[[], AbstractContextManager[Any]]
    seen_client: Any
    cli_runner: Any
    host: str | None = None
    port: int | None = None
    server: Any = None
    admin_key: str | None = None
    producer: Any = None
    control_producers: list[Any] = field(default_factory=list)
    credits: list[Any] = field(default_factory=list)

    def start(self) -> ApiService:
        from meterline.shell.api.admin import admin_routes
        from meterline.shell.api.app import create_api
        from meterline.shell.api.credits import credit_routes
        from meterline.shell.api.keys import KeyStore
        from meterline.shell.api.server import ApiServer
        from meterline.shell.api.simulate import simulate_routes
        from meterline.stack.private import write_private
        from meterline.stack.producer import UsageProducer
        from pipeline.credits.client import CommandPublisher, ReplyWaiter, StatusView

        settings = self.settings
        bootstrap = require_broker(settings, "api")
        keys = KeyStore(settings.data_dir / "api_keys.json")
        admin_file = settings.data_dir / "admin.key"
        if admin_file.exists():
            self.admin_key = admin_file.read_text().strip()
        else:
            _, self.admin_key = keys.create(None, role="admin")
            write_private(admin_file, self.admin_key + "\n")  # 0600 from creation, never briefly wider
        try:
            self.producer = UsageProducer(
                bootstrap, settings.topic("usage-events"), schema_store_topic=settings.topic("schemas")
            )
            self.credits = [
                CommandPublisher(bootstrap, settings.topic("ledger-commands")),
                ReplyWaiter(bootstrap, settings.topic("ledger-replies")).start(),
                StatusView(bootstrap, settings.topic("customer-status")).start(),
            ]
            app = create_api(
                settings,
                producer=self.producer,
                clickhouse=self.query_client,
                key_store=keys,
                extra_routes=credit_routes(*self.credits)
                + self._stripe_routes()
                + admin_routes(self.cli_runner)
                + simulate_routes(),
            )
            host = self.host if self.host is not None else settings.api_host
            port = self.port if self.port is not None else settings.api_port
            self.server = ApiServer(app, host, port).start()
        except BaseException:
            self.stop()
            raise
        return self

    def _stripe_routes(self) -> list[Any]:
        """POST /v1/stripe/webhook (paid top-ups → ledger commands) when a signing secret is set."""
        secret = self.settings.stripe_webhook_secret
        if secret is None:
            return []
        from jobs.stripe import ClickHouseSeen, kafka_publisher
        from meterline.shell.api.stripe_webhook import webhook_route
        from pipeline.publish import control_producer

        bootstrap = self.settings.kafka_bootstrap or ""
        producer = control_producer(bootstrap)
        self.control_producers.append(producer)
        return [
            webhook_route(
                endpoint_secret=secret.get_secret_value(),
                publish=kafka_publisher(bootstrap, self.settings.topic("ledger-commands"), producer=producer),
                seen=ClickHouseSeen(self.seen_client),
            )
        ]

    @property
    def url(self) -> str | None:
        return self.server.url if self.server is not None else None

    def stop(self) -> None:
        """The server, then every Kafka client (closed, not only flushed)."""
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.producer is not None:
            self.producer.close()
            self.producer = None
        for producer in self.control_producers:
            if producer.flush(10) > 0:
                producer.purge()  # unacknowledged: the webhook that sent it answered 503
            producer.close()
        self.control_producers.clear()
        for part in self.credits:
            part.close()
        self.credits.clear()


class ApiRole:
    """``meterline api``: :class:`ApiService` on its own ClickHouse client (one lock serialises it,
    as in ``up``), with the admin command runner, advertised in ``data_dir/runtime.json``."""

    def __init__(self, settings: Settings, *, host: str, port: int) -> None:
        self.settings = settings
        self.dsn = require_clickhouse(settings, "api")
        require_broker(settings, "api")
        self.host, self.port = host, port
        self.lock = threading.RLock()
        self.clickhouse: Any = None
        self.service: ApiService | None = None

    @contextmanager
    def query_client(self) -> Iterator[Any]:
        with self.lock:
            yield self.clickhouse

    def start(self) -> ApiRole:
        from meterline.shell.api.admin import CommandRunner
        from meterline.shell.cli_stripe import run_captured, stripe_subcommands
        from meterline.shell.discovery import RuntimeInfo, write_runtime_info
        from meterline.stack.clickhouse import connect
        from meterline.stack.private import private_dir
        from meterline.stack.topics import ensure_topics

        private_dir(self.settings.data_dir)
        try:
            self.clickhouse = connect(self.dsn, create_database=False)
            require_migrated(self.clickhouse, "api")
            ensure_topics(self.settings.kafka_bootstrap or "", self.settings.topic_prefix, self.settings.partitions)
            runner = CommandRunner(self.settings, run=run_captured, stripe_commands=stripe_subcommands())
            self.service = ApiService(
                self.settings,
                query_client=self.query_client,
                seen_client=LockedClient(self.clickhouse, self.lock),
                cli_runner=runner,
                host=self.host,
                port=self.port,
            ).start()
            write_runtime_info(
                self.settings.data_dir,
                RuntimeInfo(
                    pid=os.getpid(),
                    kafka_bootstrap=self.settings.kafka_bootstrap,
                    topic_prefix=self.settings.topic_prefix,
                    api_url=self.service.url,
                    metrics_url=f"{self.service.url}/metrics",
                ),
            )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        from meterline.shell.discovery import remove_runtime_info

        if self.service is not None:
            self.service.stop()
            self.service = None
        with self.lock:
            if self.clickhouse is not None:
                try:
                    self.clickhouse.close()
                except Exception:
                    pass
                self.clickhouse = None
        remove_runtime_info(self.settings.data_dir, only_if_pid=os.getpid())


class LockedClient:
    """A clickhouse-connect client whose calls are serialised by one lock (embedded chDB)."""

    def __init__(self, client: Any, lock: threading.RLock) -> None:
        self._client = client
        self._lock = lock

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)

        return call
