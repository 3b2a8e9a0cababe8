"""The credit agent: the single writer of every customer's credit state (faust).

One agent consumes ``usage-priced``, ``ledger-commands`` and ``subscriptions`` (one faust topic
with three names; all ``partitions: default``, keyed by customer_id, so a customer's records of
every topic arrive on the same partition number, in one stream task per partition; subscription
facts are folded into the customer's value, the plan catalog comes from the compacted ``plans``
topic, read whole by every worker like prices: docs/plans.md, "Live enforcement") and keeps the table ``ledgers``
(key customer_id, value ``CustomerLedger.to_dict()`` + ``"x"``: agent bookkeeping). Per record it
hands the bytes to :class:`pipeline.credits.processor.CreditProcessor`, then:

1. sends the new value (state + applied source offsets + a low watermark + an *outbox*: this
   record's effects and every earlier effect of the customer not yet delivered) to the changelog,
   and puts it in the in-memory table at once, so the next record builds on it;
2. only once that write is acknowledged, sends the effects (ledger entries, customer status,
   alerts, authorize replies, dead letters), in record order per partition. Effects-first would
   not be exact with two source topics: a replay may interleave the topics differently and re-use
   entry ids for different entries (docs/credits.md).

Pipelining: step 2 runs in a per-partition drainer task, so the agent does not wait one broker
round trip per record (up to ``max_in_flight`` records per partition are between processing and
delivery). A record is *in flight* until its write is acknowledged and its effects delivered;
each value stores, per source partition, the low watermark ``lw`` = (lowest offset in flight) - 1:
every record at or below it was done when the value was written. A failed write or send exits the
worker (the in-memory table no longer matches the changelog); a revocation waits until nothing of
the revoked partitions is in flight.

Crash exactness — progress comes from the table, never from faust's committed offsets (which are
not atomic with the changelog, see shared/notes/faust-recovery.md):

* ``ledgers.on_recover`` runs after the changelog is restored and BEFORE faust seeks the stream
  partitions to their committed offsets. It computes, per assigned source partition, the resume
  offset = max low watermark over the table's values + 1 (0 when the table knows nothing), and
  COMMITS exactly those offsets for the group, so faust's own ``perform_seek`` lands there.
  Records between that and a customer's applied offset are skipped for that customer.
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
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import faust
from faust.types import TP

from meterline.core.config import Settings
from meterline.core.pricing import PricingEngine
from meterline.stack import metrics
from pipeline.credits.plans import PlanBook
from pipeline.credits.processor import ALERTS, DEAD, ENTRIES, REPLIES, STATUS, CreditProcessor
from pipeline.delivery import commit_offsets, send_changelog, table_data
from pipeline.ordered import GapReader, OrderedSource, SourceRecord
from pipeline.pricefeed import PriceFeed

log = logging.getLogger(__name__)

TABLE = "ledgers"
#: Undelivered effects one customer's value may carry in its outbox (bytes of the messages). Past
#: it, the agent waits for that customer's oldest deliveries before writing the next value: the
#: outbox (and so the changelog message) never grows with the customer's activity.
OUTBOX_MAX_BYTES = 100_000
#: Largest table value written (JSON bytes). Kafka's default message limit is 1 MB; the state's
#: parts are bounded (packed dedupe ids, open holds, the outbox), this is the last line.
MAX_VALUE_BYTES = 900_000


@dataclass(slots=True, eq=False)
class _Pending:
    """A processed record between its changelog write and the delivery of its effects."""

    offset: int
    key: tuple[str, int]
    customer: str | None
    sends: list[Any]
    done: asyncio.Future[None]
    changelog: Any = None  # the changelog write's FutureMessage (None: nothing persisted)


class CreditAgent:
    """State of the registered agent (for introspection and tests): ``records``, ``ordered`` (its
    ``OrderedSource``: gap fills, sweeps, re-deliveries)."""

    def __init__(self, app: faust.App, settings: Settings, engine: PricingEngine, feed: PriceFeed) -> None:
        self.app = app
        self._delivering: set[asyncio.Future[None]] = set()
        self.settings = settings
        self.engine = engine
        self.feed = feed
        self.priced_name = settings.topic("usage-priced")
        self.commands_name = settings.topic("ledger-commands")
        self.subscriptions_name = settings.topic("subscriptions")
        self.plans = PlanBook()
        self.plan_feed = PriceFeed(settings.kafka_bootstrap or "", settings.topic("plans"))
        self.processor = CreditProcessor(
            engine,
            priced_topic=self.priced_name,
            commands_topic=self.commands_name,
            subscriptions_topic=self.subscriptions_name,
            plans=self.plans,
        )
        self.source = app.topic(
            self.priced_name, self.commands_name, self.subscriptions_name, key_serializer="raw", value_serializer="raw"
        )
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
        self.max_in_flight = 256  # records per source partition between processing and delivery
        self._inflight: dict[tuple[str, int], dict[int, _Pending]] = {}  # offset order (insertion)
        self._undelivered: dict[str, dict[tuple[tuple[str, int], int], list[Any]]] = {}  # customer -> effects
        self._undelivered_bytes: dict[str, int] = {}
        self.outbox_waits = 0  # times a customer's outbox was full and the agent waited for deliveries
        self.trimmed = 0  # values whose dedupe ids had to be trimmed to fit MAX_VALUE_BYTES
        self.max_value_bytes = 0  # largest value written (introspection, tests)
        self._queues: dict[int, asyncio.Queue[_Pending]] = {}
        self._drainers: dict[int, asyncio.Future[Any]] = {}

    # ------------------------------------------------------------------ recovery

    def source_tps(self) -> set[TP]:
        names = {self.priced_name, self.commands_name, self.subscriptions_name}
        return {tp for tp in self.app.consumer.assignment() if tp.topic in names}

    def table_resume_offsets(self, tps: set[TP]) -> dict[TP, int]:
        """Per source partition, the first offset not known to be done: max over the table's values
        of the *low watermark* ``x.lw`` + 1 (every record at or below a value's watermark had its
        state persisted and its effects delivered when that value was written; see apply). 0 if
        the table knows nothing."""
        best: dict[str, int] = {}
        for _key, value in self.table.items():
            if not value:
                continue
            lw = (value.get("x") or {}).get("lw")
            # A value written before watermarks existed: its applied offsets (then every record
            # was persisted and its effects sent before the next one was processed).
            marks = lw if lw is not None else (value.get("offsets") or {})
            for k, off in marks.items():
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
            ok = await commit_offsets(self.app.consumer, self.resume)
            log.info(
                "credit agent: resume offsets from the table %s (committed=%s)",
                {f"{tp.topic}:{tp.partition}": o for tp, o in sorted(self.resume.items())},
                ok,
            )

    async def on_revoked(self, revoked: set[TP]) -> None:
        async with self.ordered.lock:
            # Everything of these partitions reaches the changelog and the effect topics before
            # another worker may recover them (one writer per customer, even across a handover).
            await self.settle({tp.partition for tp in revoked})
            self.ordered.forget((tp.topic, tp.partition) for tp in revoked)

    async def _start_offset(self, topic: str, partition: int) -> int:
        """A partition assigned without a recovery callback: ask the table."""
        tp = TP(topic, partition)
        return self.table_resume_offsets({tp})[tp]

    # ------------------------------------------------------------------ processing

    async def handle(self, event: Any) -> None:
        msg = event.message
        ts_ms = round(msg.timestamp * 1000) if msg.timestamp is not None else 0
        await self.ordered.deliver(SourceRecord(msg.topic, msg.partition, msg.offset, ts_ms, msg.key, msg.value))

    async def apply(self, rec: SourceRecord) -> None:
        """Apply one source record; a priced record of more than ``CHUNK_EVENTS`` events is applied
        in parts, each persisted with its effects before the next is processed (only the last
        marks the offset applied; a replay skips the parts done by event-id dedupe)."""
        parts = self.processor.split_record(rec.topic, rec.value)
        for i, part in enumerate(parts):
            final = i == len(parts) - 1
            pending = await self._apply(rec, part, final)
            if not final and pending is not None:
                await pending.done

    async def _apply(self, rec: SourceRecord, value: bytes | None, final: bool) -> _Pending | None:
        """Process one source record without waiting for the broker (module docstring, "Pipelining").

        The new value (state + progress + outbox + low watermark) goes to the changelog at once
        and into the in-memory table, so the next record builds on it. The record's effects wait
        in its partition's queue until that changelog write is acknowledged; the queue's drainer
        sends them in record order. The record stays *in flight* until its write is acknowledged
        and its effects are delivered."""
        partition = rec.partition
        key = (rec.topic, partition)
        tp_name = f"{rec.topic}:{partition}"
        flight = self._inflight.setdefault(key, {})
        if len(flight) >= self.max_in_flight:  # backpressure: wait for the oldest
            await next(iter(flight.values())).done
        self.feed.drain_into(self.engine)
        self.plan_feed.drain_into(self.plans)
        outcome = self.processor.process(
            rec.topic, partition, rec.offset, rec.timestamp_ms, rec.key, value, self.table.get, final=final
        )
        self.records += final
        if final and rec.topic == self.priced_name and not outcome.skipped:
            metrics.observe_stage_ms("balance", rec.timestamp_ms)  # priced (record time) -> applied
        if outcome.skipped or (outcome.state is None and not outcome.sends):
            return None  # nothing to persist, nothing to send
        pending = _Pending(
            rec.offset, key, outcome.customer_id, outcome.sends, asyncio.get_running_loop().create_future()
        )
        flight[rec.offset] = pending
        if outcome.state is not None and outcome.customer_id is not None:
            customer = outcome.customer_id
            await self._bound_outbox(customer)
            earlier = self._undelivered.get(customer, {})
            # Outbox = this record's effects AND every earlier effect of this customer not yet
            # delivered: whichever of its values survives a crash re-sends all of them.
            outbox = [s for sends in earlier.values() for s in sends] + list(outcome.sends)
            state = dict(outcome.state)
            x = dict(state.get("x") or {})
            # Every record of this partition below the lowest one in flight is done (persisted
            # and delivered); that includes none of the in-flight ones, this one included.
            x["lw"] = {**(x.get("lw") or {}), tp_name: min(flight) - 1}
            x["p"] = partition
            x["ob"] = [[n, k.decode(), base64.b64encode(v).decode(), same] for n, k, v, same in outbox]
            state["x"] = x
            state = self._fit(customer, state)
            if state is None:  # cannot be stored (never seen): dead-letter the record, keep the old value
                pending.sends = [self._too_large(rec, customer)]
                self._queue(partition).put_nowait(pending)
                return pending
            if outcome.sends:
                self._undelivered.setdefault(customer, {})[(key, rec.offset)] = outcome.sends
                self._undelivered_bytes[customer] = self._undelivered_bytes.get(customer, 0) + _size(outcome.sends)
            pending.changelog = send_changelog(self.table, partition, customer, state)
            table_data(self.table)[customer] = state
        self._queue(partition).put_nowait(pending)
        return pending

    async def _bound_outbox(self, customer: str) -> None:
        """Wait for this customer's oldest deliveries while its undelivered effects exceed
        OUTBOX_MAX_BYTES (they are delivered in record order by the drainers, which never wait
        for the agent, so this always ends)."""
        while self._undelivered_bytes.get(customer, 0) > OUTBOX_MAX_BYTES:
            key, offset = next(iter(self._undelivered[customer]))
            pending = self._inflight.get(key, {}).get(offset)
            if pending is None:  # no longer in flight (cannot happen: _delivered drops it first)
                sends = self._undelivered[customer].pop((key, offset))
                self._undelivered_bytes[customer] -= _size(sends)
                if not self._undelivered[customer]:
                    del self._undelivered[customer]
                    self._undelivered_bytes.pop(customer, None)
                continue
            self.outbox_waits += 1
            await pending.done

    def _fit(self, customer: str, state: dict[str, Any]) -> dict[str, Any] | None:
        """The value, within MAX_VALUE_BYTES. Its parts are bounded by construction; should they
        still add up past the limit, the oldest remembered event / command ids (dedupe only: no
        money) are dropped, halving, until it fits. None: it cannot fit even without them."""
        size = len(json.dumps(state))
        self.max_value_bytes = max(self.max_value_bytes, size)
        if size <= MAX_VALUE_BYTES:
            return state
        from meterline.core.ledger import pack_recent, unpack_recent

        state = dict(state)
        x = state["x"] = dict(state["x"])
        while size > MAX_VALUE_BYTES:
            recent = unpack_recent(state.get("recent") or [])
            cmds = unpack_recent(x.get("cmds") or []) if x.get("cmds") else {}
            if not recent and not cmds:
                log.error("credit agent: the value of %r is %d bytes even without dedupe ids", customer, size)
                return None
            state["recent"] = pack_recent(dict(list(recent.items())[len(recent) // 2 :]))
            x["cmds"] = pack_recent(dict(sorted(cmds.items(), key=lambda kv: kv[1])[len(cmds) // 2 :])) if cmds else ""
            size = len(json.dumps(state))
        self.trimmed += 1
        log.warning(
            "credit agent: trimmed the oldest dedupe ids of %r to keep its value under %d bytes",
            customer,
            MAX_VALUE_BYTES,
        )
        return state

    def _too_large(self, rec: SourceRecord, customer: str) -> tuple[str, bytes, bytes, bool]:
        from pipeline.processor import unforeseen_dead_letter

        err = RuntimeError(f"the state of {customer!r} would exceed {MAX_VALUE_BYTES} bytes")
        fmt = "priced_batch" if rec.topic == self.priced_name else "json"
        dead = unforeseen_dead_letter(
            rec.topic, rec.partition, rec.offset, rec.key, rec.value, err, rec.timestamp_ms, fmt
        )
        return DEAD, customer.encode(), dead, True

    def _queue(self, partition: int) -> asyncio.Queue[_Pending]:
        queue = self._queues.get(partition)
        if queue is None:
            queue = self._queues[partition] = asyncio.Queue()
            self._drainers[partition] = asyncio.ensure_future(self._drain(partition, queue))
        return queue

    async def _drain(self, partition: int, queue: asyncio.Queue[_Pending]) -> None:
        """Send each record's effects once its changelog write is acknowledged, in record order."""
        while True:
            pending = await queue.get()
            try:
                if pending.changelog is not None:
                    await pending.changelog
                deliveries = [
                    await self.out[name].send(key=k, value=v, partition=partition if same else None)
                    for name, k, v, same in pending.sends
                ]
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                log.critical(
                    "credit agent: changelog write or effect send failed (%r); exiting so that a restart "
                    "recovers from the changelog",
                    exc,
                )
                logging.shutdown()
                os._exit(70)
            task = asyncio.ensure_future(self._delivered(pending, deliveries))
            self._delivering.add(task)  # keep a reference: the loop holds tasks only weakly
            task.add_done_callback(self._delivering.discard)

    async def _delivered(self, pending: _Pending, deliveries: list[Any]) -> None:
        try:
            for fut in deliveries:
                await fut
        except BaseException as exc:
            log.critical("credit agent: effect delivery failed (%r); exiting", exc)
            logging.shutdown()
            os._exit(70)
        flight = self._inflight.get(pending.key)
        if flight is not None:
            flight.pop(pending.offset, None)
        if pending.customer is not None:
            undelivered = self._undelivered.get(pending.customer)
            if undelivered is not None:
                sends = undelivered.pop((pending.key, pending.offset), None)
                if sends is not None:
                    self._undelivered_bytes[pending.customer] -= _size(sends)
                if not undelivered:
                    del self._undelivered[pending.customer]
                    self._undelivered_bytes.pop(pending.customer, None)
        pending.done.set_result(None)

    async def settle(self, partitions: set[int] | None = None) -> None:
        """Wait until nothing of these source partitions (all: None) is in flight."""
        while True:
            waiting = [
                p.done
                for key, flight in self._inflight.items()
                if partitions is None or key[1] in partitions
                for p in flight.values()
            ]
            if not waiting:
                return
            await asyncio.wait(waiting)

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
                pending.append(
                    await self.out[name].send(
                        key=key.encode(), value=base64.b64decode(b64), partition=x["p"] if same else None
                    )
                )
        for fut in pending:
            await fut
        return len(pending)


def _size(sends: list[Any]) -> int:
    """Bytes an outbox entry takes in the value (base64 of the message + key + framing)."""
    return sum(len(v) * 4 // 3 + len(k) + 24 for _n, k, v, _same in sends)


def register_credit_agent(app: faust.App, settings: Settings, *, engine: PricingEngine, feed: PriceFeed) -> CreditAgent:
    """Add the credit agent and its ``ledgers`` table to ``app`` (``create_app`` calls this)."""
    credit = CreditAgent(app, settings, engine, feed)
    credit.table.on_recover(credit.on_recover)
    credit.plan_feed.start()  # a plain thread started with the app, like the price feed (pipeline/app.py)
    app.meterline_credit = credit  # type: ignore[attr-defined]  # for introspection in tests

    @app.on_partitions_revoked.connect
    async def _credit_revoked(app: faust.App, revoked: set[Any], **_: Any) -> None:
        await credit.on_revoked(set(revoked))

    @app.on_before_shutdown.connect
    async def _close_credit_agent(app: faust.App, **_: Any) -> None:
        try:  # deliver what is in flight; whatever is not is re-sent from the outboxes at recovery
            await asyncio.wait_for(credit.settle(), timeout=10)
        except TimeoutError:
            log.warning("credit agent: records still in flight at shutdown (the outboxes re-send their effects)")
        for drainer in credit._drainers.values():
            drainer.cancel()
        credit.gaps.close()
        credit.plan_feed.stop()

    @app.agent(credit.source)
    async def credit_ledger(stream: faust.StreamT) -> None:
        await feed.until_ready("credit agent")
        await credit.plan_feed.until_ready("credit agent (plans)")
        async for event in stream.events():
            await credit.handle(event)

    return credit
