"""The credit agent: the single writer of every customer's credit state (faust).

One agent consumes ``usage-priced`` and ``ledger-commands`` (one faust topic with two names; both
``partitions: default``, keyed by customer_id, so a customer's records of both topics arrive on
the same partition number, in one stream task per partition) and keeps the table ``ledgers``
(key customer_id, value ``CustomerLedger.to_dict()`` + ``"x"``: agent bookkeeping). Per record it
hands the bytes to :class:`pipeline.credits.processor.CreditProcessor`, then:

1. sends the new value (state + applied source offsets + this record's effects as an *outbox*) to
   the changelog and **awaits its acknowledgement** (``table.send_changelog``);
2. only then sends the effects (ledger entries, customer status, alerts, authorize replies, dead
   letters). Effects-first would not be exact with two source topics: a replay may interleave the
   topics differently and re-use entry ids for different entries (docs/credits.md).

Crash exactness — progress comes from the table, never from faust's committed offsets (which are
not atomic with the changelog, see shared/notes/faust-recovery.md):

* ``ledgers.on_recover`` runs after the changelog is restored and BEFORE faust seeks the stream
  partitions to their committed offsets. It computes, per assigned source partition, the resume
  offset = max applied offset over the table's customers + 1 (0 when the table knows nothing),
  and COMMITS exactly those offsets for the group, so faust's own ``perform_seek`` lands there.
* Order from the table, not from faust (``pipeline/ordered.py``): an ``OrderedSource`` keeps the
  next offset due per source partition (from that resume offset, then one past every record
  applied) and hands the agent each record once, in offset order. Re-deliveries are dropped;
  records faust skipped or lost are read from the broker by the source's own consumer. The agent
  never seeks faust's consumer (that raced faust's fetch loop and could stall a partition for
  good, docs/invariants.md).

* On every recovery the outboxes of the assigned customers are re-sent (deterministic ids:
  consumers dedupe), repairing effects lost between step 1 and 2.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any

import faust
from faust.types import TP

from meterline.config import Settings
from meterline.pricing import PricingEngine
from pipeline.ordered import GapReader, OrderedSource, SourceRecord
from pipeline.credits.processor import ALERTS, DEAD, ENTRIES, REPLIES, STATUS, CreditProcessor
from pipeline.pricefeed import PriceFeed

log = logging.getLogger(__name__)

TABLE = "ledgers"


class CreditAgent:
    """State of the registered agent (for introspection and tests): ``records``, ``ordered`` (its
    ``OrderedSource``: gap fills, sweeps, re-deliveries)."""

    def __init__(self, app: faust.App, settings: Settings, engine: PricingEngine, feed: PriceFeed) -> None:
        self.app = app
        self.settings = settings
        self.engine = engine
        self.feed = feed
        self.priced_name = settings.topic("usage-priced")
        self.commands_name = settings.topic("ledger-commands")
        self.processor = CreditProcessor(engine, priced_topic=self.priced_name, commands_topic=self.commands_name)
        self.source = app.topic(self.priced_name, self.commands_name, key_serializer="raw", value_serializer="raw")
        self.out = {
            name: app.topic(settings.topic(name), key_serializer="raw", value_serializer="raw")
            for name in (ENTRIES, STATUS, ALERTS, REPLIES, DEAD)
        }
        self.table = app.Table(TABLE, default=None, key_type=str, partitions=settings.partitions)
        self.resume: dict[TP, int] = {}  # from the table, at the last recovery
        self.gaps = GapReader(settings.kafka_bootstrap or "", name=f"{settings.topic_prefix}credit-agent")
        self.ordered = OrderedSource("credit agent", self.gaps, self._start_offset, self.apply)
        self.resent = 0
        self.records = 0

    # ------------------------------------------------------------------ recovery

    def source_tps(self) -> set[TP]:
        names = {self.priced_name, self.commands_name}
        return {tp for tp in self.app.consumer.assignment() if tp.topic in names}

    def table_resume_offsets(self, tps: set[TP]) -> dict[TP, int]:
        """Max applied offset + 1 per source partition over every customer in the table (0 if none)."""
        best: dict[str, int] = {}
        for _key, value in self.table.items():
            if not value:
                continue
            for k, off in (value.get("offsets") or {}).items():
                if int(off) + 1 > best.get(k, 0):
                    best[k] = int(off) + 1
        return {tp: best.get(f"{tp.topic}:{tp.partition}", 0) for tp in tps}

    async def on_recover(self) -> None:
        tps = self.source_tps()
        self.resume = self.table_resume_offsets(tps)
        self.ordered.reset({(tp.topic, tp.partition): offset for tp, offset in self.resume.items()})
        self.resent = await self.resend_outboxes(tps)
        if self.resume:
            # faust seeks every stream partition to its committed offset right after this callback
            # (tables/recovery.py: on_recovery_completed -> perform_seek): make that the table's,
            # so the usual restart needs no gap read. Records faust fetched from its previous
            # committed offset before that seek are handled by ``self.ordered``.
            ok = await self.app.consumer._commit(dict(self.resume))  # noqa: SLF001 - see docstring
            log.info("credit agent: resume offsets from the table %s (committed=%s)",
                     {f"{tp.topic}:{tp.partition}": o for tp, o in sorted(self.resume.items())}, ok)  # fmt: skip

    async def on_revoked(self, revoked: set[TP]) -> None:
        async with self.ordered.lock:
            self.ordered.forget((tp.topic, tp.partition) for tp in revoked)

    async def _start_offset(self, topic: str, partition: int) -> int:
        """A partition assigned without a recovery callback: ask the table."""
        tp = TP(topic, partition)
        return self.table_resume_offsets({tp})[tp]

    # ------------------------------------------------------------------ processing

    async def handle(self, event: Any) -> None:
        msg = event.message
        ts_ms = int(round(msg.timestamp * 1000)) if msg.timestamp is not None else 0
        await self.ordered.deliver(SourceRecord(msg.topic, msg.partition, msg.offset, ts_ms, msg.key, msg.value))

    async def apply(self, rec: SourceRecord) -> None:
        """Process one source record: (1) state + outbox to the changelog, acknowledged; (2) effects."""
        partition = rec.partition
        self.feed.drain_into(self.engine)
        outcome = self.processor.process(rec.topic, partition, rec.offset, rec.timestamp_ms, rec.key, rec.value,
                                         self.table.get)  # fmt: skip
        if outcome.state is not None and outcome.customer_id is not None:
            # (1) state + progress + this record's effects (the outbox): one changelog record,
            # acknowledged before anything else leaves. Same as ``table[k] = v``, but awaited.
            state = dict(outcome.state)
            state["x"] = {**state.get("x", {}), "p": partition,
                          "ob": [[n, k.decode(), base64.b64encode(v).decode(), same] for n, k, v, same in outcome.sends]}
            fut = self.table.send_changelog(partition, outcome.customer_id, state)
            self.table.data[outcome.customer_id] = state
            await fut
        # (2) the effects; faust's commit flushes the producer before it commits this offset, and
        # a crash before they are delivered is repaired from the outbox at the next recovery.
        for name, k, v, same_partition in outcome.sends:
            await self.out[name].send(key=k, value=v, partition=partition if same_partition else None)
        self.records += 1

    async def resend_outboxes(self, tps: set[TP]) -> int:
        """Re-send the last record's effects of every customer of these partitions (ids are
        deterministic: consumers drop what they already have). Returns the number of messages."""
        parts = {tp.partition for tp in tps}
        pending = []
        for _key, value in list(self.table.items()):
            x = (value or {}).get("x") or {}
            if x.get("p") not in parts:
                continue
            for name, key, b64, same in x.get("ob") or []:
                pending.append(await self.out[name].send(key=key.encode(), value=base64.b64decode(b64),
                                                         partition=x["p"] if same else None))  # fmt: skip
        for fut in pending:
            await fut
        return len(pending)


def register_credit_agent(app: faust.App, settings: Settings, *, engine: PricingEngine, feed: PriceFeed) -> CreditAgent:
    """Add the credit agent and its ``ledgers`` table to ``app`` (``create_app`` calls this)."""
    credit = CreditAgent(app, settings, engine, feed)
    credit.table.on_recover(credit.on_recover)
    app.meterline_credit = credit  # type: ignore[attr-defined]  # for introspection in tests

    @app.on_partitions_revoked.connect
    async def _credit_revoked(app: faust.App, revoked: set[Any], **_: Any) -> None:
        await credit.on_revoked(set(revoked))

    @app.on_before_shutdown.connect
    async def _close_gap_reader(app: faust.App, **_: Any) -> None:
        credit.gaps.close()

    @app.agent(credit.source)
    async def credit_ledger(stream: faust.StreamT) -> None:
        await feed.until_ready("credit agent")
        async for event in stream.events():
            await credit.handle(event)

    return credit
