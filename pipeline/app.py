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

from meterline.core.config import Settings
from meterline.core.pricing import PricingEngine
from meterline.stack import metrics
from pipeline.credits.agent import register_credit_agent
from pipeline.delivery import cap_fetch_wait, send_changelog, table_data
from pipeline.ordered import GapReader, OrderedSource, SourceRecord
from pipeline.pricefeed import PriceFeed
from pipeline.processor import PricingProcessor, ProcessResult, iter_table_entries, unforeseen_dead_letter
from pipeline.watchdog import StallWatchdog, source_positions

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
        cap_fetch_wait(20)  # see pipeline.delivery
    return options


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
    usage_name = usage_topic.get_topic_name()
    reader = GapReader(settings.kafka_bootstrap, name=f"{app_id}-pricing")

    async def _start_offset(topic: str, partition: int) -> int:
        # Where faust starts the partition: the group's committed offset (faust commits an offset
        # only after the records below it were handed to this agent and their sends flushed).
        return await asyncio.get_running_loop().run_in_executor(
            None, reader.committed_or_earliest, app_id, topic, partition
        )

    async def _apply(rec: SourceRecord) -> None:
        partition = rec.partition
        if partition not in indexed:
            _index_partition(partition)
        feed.drain_into(engine)
        try:
            result = processor.process_record(partition, rec.offset, rec.key, rec.value)
        except Exception as exc:
            # Processing is pure (the dedupe index is updated only at the end of a successful
            # record), so nothing was priced or remembered: the whole record goes to the dead
            # letter with its bytes and the reason, and nothing is charged for it.
            log.exception(
                "pricing agent: unforeseen error on %s:%s@%s; dead-lettered", rec.topic, partition, rec.offset
            )
            dead = unforeseen_dead_letter(
                rec.topic, partition, rec.offset, rec.key, rec.value, exc, int(time.time() * 1000)
            )
            await dead_topic.send(key=rec.key, value=dead, partition=partition)
            return
        _record_metrics(result)
        if result.priced_value is not None:
            await priced_topic.send(key=rec.key, value=result.priced_value, partition=partition)
        for part in result.priced_extra:
            await priced_topic.send(key=rec.key, value=part, partition=partition)
        for key, dead in result.dead_letters:
            await dead_topic.send(key=key, value=dead, partition=partition)
        # Table writes name their changelog partition (= the source partition): a record may be
        # applied outside faust's stream iteration (gap reads, sweeps), where ``table[k] = v``
        # cannot tell which partition it belongs to.
        if result.dedupe_key is not None:
            send_changelog(dedupe_table, partition, result.dedupe_key, result.dedupe_value)
            table_data(dedupe_table)[result.dedupe_key] = result.dedupe_value
        since_expiry[partition] = since_expiry.get(partition, 0) + 1
        if since_expiry[partition] >= EXPIRE_EVERY_RECORDS:
            since_expiry[partition] = 0
            for key in processor.dedupe.expired(partition, int(time.time() * 1000)):
                send_changelog(dedupe_table, partition, key, None, value_serializer="raw")
                table_data(dedupe_table).pop(key, None)
                processor.dedupe.load(key, None)

    # Every usage-events record once, in offset order, whatever faust hands over (pipeline/ordered.py).
    ordered = OrderedSource("pricing agent", reader, _start_offset, _apply)
    app.meterline_pricing_source = ordered  # type: ignore[attr-defined]
    sources = {
        usage_name: ordered,
        credit.priced_name: credit.ordered,
        credit.commands_name: credit.ordered,
        credit.subscriptions_name: credit.ordered,
    }
    watchdog = StallWatchdog(
        app, lambda: (ordered.applied, ordered.redelivered, credit.records, credit.ordered.redelivered), set(sources)
    )
    app.meterline_watchdog = watchdog  # type: ignore[attr-defined]

    def _lag() -> dict[str, int]:
        """Records behind per assigned source partition (0 included), for meterline_consumer_lag_records."""
        out: dict[str, int] = {}
        for tp, (position, high) in source_positions(app.consumer, set(sources)).items():
            if high is not None:
                out[f"{tp.topic}:{tp.partition}"] = max(0, high - (position + 1 if position is not None else 0))
        return out

    metrics.set_lag_source(_lag)

    @app.task
    async def _start_watchdog() -> None:
        watchdog.start(asyncio.get_running_loop())

    @app.timer(interval=1.0)
    async def _sweep_stalled() -> None:
        """Partitions whose records stopped arriving although some are due (faust lost them)."""
        if not feed.ready:
            return
        for tp, (read, high) in sorted(source_positions(app.consumer, set(sources)).items()):
            source = sources[tp.topic]
            if source.stalled((tp.topic, tp.partition), read, high):
                await source.sweep((tp.topic, tp.partition))

    @app.on_partitions_assigned.connect
    async def _assigned(app: faust.App, assigned: set[Any], **_: Any) -> None:
        ordered.assigned((tp.topic, tp.partition) for tp in assigned if tp.topic == usage_name)

    @app.on_partitions_revoked.connect
    async def _forget(app: faust.App, revoked: set[Any], **_: Any) -> None:
        mine = [tp for tp in revoked if tp.topic == usage_name]
        async with ordered.lock:
            ordered.forget((tp.topic, tp.partition) for tp in mine)
        for tp in mine:
            processor.dedupe.forget_partition(tp.partition)
            indexed.discard(tp.partition)

    @app.on_before_shutdown.connect
    async def _close_reader(app: faust.App, **_: Any) -> None:
        reader.close()

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
            m = event.message
            ts_ms = round(m.timestamp * 1000) if m.timestamp is not None else 0
            await ordered.deliver(SourceRecord(m.topic, m.partition, m.offset, ts_ms, m.key, m.value))

    return app


def _record_metrics(result: ProcessResult) -> None:
    """Count one usage-events record's outcome (meterline_events_*_total) and the priced events'
    occurred -> priced delay."""
    metrics.EVENTS_RECEIVED.inc(result.priced + result.rejected + result.duplicates)
    if result.priced:
        metrics.EVENTS_PRICED.inc(result.priced)
        for occurred in result.occurred_ms:
            metrics.observe_stage_ms("priced", occurred, result.priced_at_ms)
    if result.duplicates:
        metrics.EVENTS_DUPLICATE.inc(result.duplicates)
    for reason in result.reasons:
        metrics.EVENTS_REJECTED.labels(reason).inc()
