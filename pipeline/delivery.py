"""The delivery contract meterline builds on faust: what faust gives, what meterline adds, and why.

This module is the only place that touches faust's private API. Every such use is a named
function here, and ``tests/ordered/test_faust_contract.py`` pins each one (the faust version, the
attribute, its signature), so a faust upgrade fails that test loudly instead of breaking
ordering or recovery quietly.

What faust gives meterline (and is used as is):
    * consumer-group membership and partition assignment (co-partitioned sources: a customer's
      usage and commands reach one worker);
    * the agents' event loop, streams and the hand-over of fetched records;
    * tables as a changelog transport (``send_changelog`` writes a table entry to its changelog
      partition; recovery replays the changelog into ``table.data``).

What faust does NOT give, as measured here (docs/invariants.md, "Finding: liveness and ordering";
shared/notes/faust-recovery.md), and what meterline adds instead:
    * **Each record once, in order.** After a restart or a rebalance faust was seen handing an agent
      records out of order and dropping records it had read (a stream queue cleared by a rebalance).
      :mod:`pipeline.ordered` keeps a cursor per source partition and reads gaps from the broker
      itself (:class:`~pipeline.ordered.OrderedSource`).
    * **Crash-exact state.** A table plus committed offsets was measured not crash-exact. The credit
      agent stores its applied source offsets in the table value itself, writes the value before any
      effect leaves, and resumes from the table (:mod:`pipeline.credits.agent`).
    * **Resume position.** faust resumes from the group's committed offset; the credit agent commits
      the table's own resume offsets during recovery (:func:`commit_offsets`) so the usual restart
      needs no gap read.
    * **Liveness.** :mod:`pipeline.watchdog` reports a stall with every agent task's stack, using
      faust's read position (:func:`read_offsets`), which faust does not expose publicly.
    * **Dev broker latency.** faust hard-codes ``fetch_max_wait_ms=1500``; Tansu does not answer a
      waiting fetch when data arrives, so the dev profile caps it (:func:`cap_fetch_wait`).

faust's commit order is relied upon and pinned too: ``Consumer._commit_offsets`` awaits
``producer.flush()`` before it commits, so sends made while handling a record are acknowledged
before its offset commits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

FAUST_VERSION = "0.15.3"  # the version whose private API this module was written against


def read_offsets(consumer: Any) -> dict[Any, int]:
    """faust's read position per partition: the last offset it handed over or dropped.

    Private: ``Consumer._read_offset`` (a ``defaultdict`` of TP -> offset). Read-only use.
    """
    return dict(consumer._read_offset)


async def commit_offsets(consumer: Any, offsets: Mapping[Any, int]) -> bool:
    """Commit ``offsets`` for the group now, without faust's own bookkeeping of acked offsets.

    Private: ``Consumer._commit(offsets)``. The credit agent calls it from ``on_recover`` to make
    the table's resume offsets the group's, right before faust seeks to the committed offsets.
    """
    ok: bool = await consumer._commit(dict(offsets))
    return ok


def send_changelog(table: Any, partition: int, key: Any, value: Any, **serializers: Any) -> Any:
    """Write one table entry to the table's changelog partition and return its pending send.

    ``Collection.send_changelog`` is public but undocumented; with :func:`table_data` it lets an
    agent write the changelog for a partition it chooses (the source record's), and await the
    write before any effect of that record leaves.
    """
    return table.send_changelog(partition, key, value, **serializers)


def table_data(table: Any) -> Any:
    """The table's in-memory store (``Collection.data``), written beside :func:`send_changelog`."""
    return table.data


def cap_fetch_wait(max_wait_ms: int) -> None:
    """Cap the ``fetch_max_wait_ms`` faust passes to aiokafka (dev broker only).

    faust builds its consumer as ``faust.transport.drivers.aiokafka.aiokafka.AIOKafkaConsumer``
    with ``fetch_max_wait_ms=1500`` hard-coded; this replaces that class, in that module only, by a
    subclass that caps the value. Idempotent.
    """
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
