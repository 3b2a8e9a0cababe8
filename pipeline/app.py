"""The faust application: the pricing agent (and, as later issues land, the credit agent).

Agents are thin: they decode nothing and decide nothing themselves. The pricing agent hands each
record to :class:`pipeline.processor.PricingProcessor` and sends what it returns:

1. the ``PricedBatch`` record to ``usage-priced`` on the SAME partition as its source record
   (explicit partition: downstream tables keyed by customer stay co-partitioned whatever
   partitioner a producer used);
2. dead letters to ``usage-dead-letter`` (same key);
3. the record's dedupe entry into the ``pricing-dedupe`` table (changelog on the source partition).

Commit contract (faust ``at_least_once``; the dev broker has no transactions): a source record's
offset is committed only after the agent moved past it AND faust flushed its producer
(``Consumer._commit_offsets`` awaits ``producer.flush()`` first), so sends made while handling a
record are acknowledged before its offset commits. A crash before the commit replays the record;
the processor re-emits it (first-seen-position dedupe), and every downstream consumer drops the
repeat by ``(customer_id, event_id)``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import faust

from meterline.config import Settings
from meterline.pricing import PricingEngine
from pipeline.credits.agent import register_credit_agent
from pipeline.pricefeed import PriceFeed
from pipeline.watchdog import StallWatchdog
from pipeline.processor import PricingProcessor, iter_table_entries

log = logging.getLogger(__name__)

EXPIRE_EVERY_RECORDS = 1000


def faust_broker_options(settings: Settings) -> dict[str, Any]:
    """faust settings that depend on the broker; see shared/notes/broker.md for the why."""
    options: dict[str, Any] = {
        "broker_session_timeout": 6.0,
        "broker_heartbeat_interval": 0.5,
        "broker_commit_interval": 1.0,
        "consumer_auto_offset_reset": "earliest",
    }
    if settings.broker_flavor == "tansu":
        # Tansu reports the high watermark as the base offset of the last batch + 1, so faust's
        # table recovery would skip the last changelog batch: one record per batch avoids that.
        options["producer_max_batch_size"] = 1
        _short_fetch_wait(20)
    return options


def _short_fetch_wait(max_wait_ms: int) -> None:
    """faust hard-codes ``fetch_max_wait_ms=1500`` for its aiokafka consumer. The dev broker (Tansu)
    does not answer a waiting fetch when data arrives, so every hop would wait up to 1.5 s; this
    caps the wait for the dev profile only (real Kafka answers long polls as soon as data lands)."""
    from faust.transport.drivers import aiokafka as driver

    original = driver.aiokafka.AIOKafkaConsumer
    if getattr(original, "_meterline_short_wait", False):
        return

    class ShortWaitConsumer(original):  # type: ignore[misc, valid-type]
        _meterline_short_wait = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["fetch_max_wait_ms"] = min(int(kwargs.get("fetch_max_wait_ms", max_wait_ms)), max_wait_ms)
            super().__init__(*args, **kwargs)

    driver.aiokafka.AIOKafkaConsumer = ShortWaitConsumer


def create_app(settings: Settings) -> faust.App:
    if not settings.kafka_bootstrap:
        raise ValueError("create_app needs settings.kafka_bootstrap (meterline up fills it in)")
    app_id = f"{settings.topic_prefix}pricing"
    datadir = settings.data_dir.resolve() / "faust" / app_id
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        app_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        processing_guarantee="at_least_once",
        topic_partitions=settings.partitions,
        web_enabled=False,
        # faust's default datadir is "<app id>-data" in the working directory; keep it under data_dir.
        datadir=str(datadir),
        **faust_broker_options(settings),
    )
    usage_topic = app.topic(settings.topic("usage-events"), key_serializer="raw", value_serializer="raw")
    priced_topic = app.topic(settings.topic("usage-priced"), key_serializer="raw", value_serializer="raw")
    dead_topic = app.topic(settings.topic("usage-dead-letter"), key_serializer="raw", value_serializer="raw")
    dedupe_table = app.Table("pricing-dedupe", default=None, partitions=settings.partitions)

    engine = PricingEngine()
    feed = PriceFeed(settings.kafka_bootstrap, settings.topic("prices"))
    processor = PricingProcessor(
        engine,
        source_topic=settings.topic("usage-events"),
        dedupe_window_days=settings.dedupe_window_days,
        max_future_ms=settings.max_future_skew_seconds * 1000,
    )
    indexed: set[int] = set()
    since_expiry: dict[int, int] = {}
    app.meterline_processor = processor  # type: ignore[attr-defined]  # for introspection in tests
    app.meterline_feed = feed  # type: ignore[attr-defined]
    credit = register_credit_agent(app, settings, engine=engine, feed=feed)
    handled = [0]  # usage-events records the pricing agent finished
    watchdog = StallWatchdog(
        app, lambda: (handled[0], credit.records, credit.redelivered),
        {settings.topic("usage-events"), settings.topic("usage-priced"), settings.topic("ledger-commands")},
    )
    app.meterline_watchdog = watchdog  # type: ignore[attr-defined]

    @app.task
    async def _start_watchdog() -> None:
        watchdog.start(asyncio.get_running_loop())

    @app.on_partitions_revoked.connect
    async def _forget(app: faust.App, revoked: set[Any], **_: Any) -> None:
        for tp in revoked:
            if tp.topic == usage_topic.get_topic_name():
                processor.dedupe.forget_partition(tp.partition)
                indexed.discard(tp.partition)

    # The feed is a plain thread started with the app, not a faust task: faust starts app tasks
    # only once the worker is up, and a restarted worker (after a SIGKILL) could sit waiting for
    # its first rebalance with both agents blocked on a feed that had not even started.
    feed.start()

    def _index_partition(partition: int) -> None:
        prefix = f"{partition}:"
        for key, value in iter_table_entries(dedupe_table.items()):
            if key.startswith(prefix):
                processor.dedupe.load(key, value)
        indexed.add(partition)

    @app.agent(usage_topic)
    async def price_usage(stream: faust.StreamT) -> None:
        await feed.until_ready("pricing agent")
        async for event in stream.events():
            message = event.message
            partition = message.partition
            if partition not in indexed:
                _index_partition(partition)
            feed.drain_into(engine)
            result = processor.process_record(partition, message.offset, message.key, message.value)
            if result.priced_value is not None:
                await priced_topic.send(key=message.key, value=result.priced_value, partition=partition)
            for key, dead in result.dead_letters:
                await dead_topic.send(key=key, value=dead, partition=partition)
            if result.dedupe_key is not None:
                dedupe_table[result.dedupe_key] = result.dedupe_value
            handled[0] += 1
            since_expiry[partition] = since_expiry.get(partition, 0) + 1
            if since_expiry[partition] >= EXPIRE_EVERY_RECORDS:
                since_expiry[partition] = 0
                for key in processor.dedupe.expired(partition, int(time.time() * 1000)):
                    del dedupe_table[key]
                    processor.dedupe.load(key, None)

    return app
