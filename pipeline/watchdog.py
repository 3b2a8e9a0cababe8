"""A stall watchdog for the worker: says out loud when records wait and nothing moves.

Every ``every_s`` seconds (a thread, so a blocked event loop is reported too) it compares the
agents' progress counters with the previous look. When they did not move for ``stall_after_s``
while the consumer still had records to read (highwater above the read position on a source
partition), it logs one WARNING with the lag per partition and the stack of every asyncio task
of the agents and of every thread (what each is waiting on), then stays quiet until progress
resumes. Off the hot path: it reads a few counters and never touches Kafka.
"""

from __future__ import annotations

import asyncio
import io
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from pipeline.delivery import read_offsets

log = logging.getLogger(__name__)


def source_positions(consumer: Any, topics: set[str]) -> dict[Any, tuple[int | None, int | None]]:
    """Per assigned partition of ``topics``: (faust's read offset — the last offset it handed over
    or dropped, None before the first —, the highwater from the last fetch, None if not fetched
    yet). Empty while the consumer is not assigned. faust keeps no public read position."""
    try:
        assignment = consumer.assignment()
        read = read_offsets(consumer)
    except Exception:
        return {}
    out: dict[Any, tuple[int | None, int | None]] = {}
    for tp in assignment:
        if tp.topic not in topics:
            continue
        try:
            high = consumer.highwater(tp)
        except Exception:
            high = None
        out[tp] = (read.get(tp), high)
    return out


class StallWatchdog:
    def __init__(
        self,
        app: Any,
        progress: Callable[[], tuple[int, ...]],
        source_topics: set[str],
        *,
        every_s: float = 5.0,
        stall_after_s: float = 20.0,
    ) -> None:
        self.app = app
        self.progress = progress
        self.source_topics = source_topics
        self.every_s = every_s
        self.stall_after_s = stall_after_s
        self.loop: asyncio.AbstractEventLoop | None = None
        self.reports = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="meterline-watchdog", daemon=True)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def lag(self) -> dict[str, int] | None:
        """Source partitions with records not yet handed to the agents: {"topic:p": highwater - read};
        None when a source partition's highwater is not known (nothing fetched from it yet)."""
        out: dict[str, int] = {}
        for tp, (position, high) in source_positions(self.app.consumer, self.source_topics).items():
            if high is None:
                return None
            behind = high - (position + 1 if position is not None else 0)
            if behind > 0:
                out[f"{tp.topic}:{tp.partition}"] = behind
        return out

    def _run(self) -> None:
        last = self.progress()
        since = time.monotonic()
        reported = False
        while not self._stop.wait(self.every_s):
            now = self.progress()
            if now != last:
                last, since, reported = now, time.monotonic(), False
                continue
            if reported or time.monotonic() - since < self.stall_after_s:
                continue
            lag = self.lag()
            if lag == {}:
                since = time.monotonic()  # idle, not stalled
                continue
            reported = True
            self.reports += 1
            log.warning(
                "stall: no progress for %.0fs (counters %s) while records wait: %s\n%s",
                time.monotonic() - since,
                now,
                lag,
                self.stacks(),
            )

    def stacks(self) -> str:
        buf = io.StringIO()
        if self.loop is not None:
            try:
                tasks = asyncio.all_tasks(self.loop)
            except RuntimeError:  # the set changed while we iterated: try once more
                tasks = asyncio.all_tasks(self.loop)
            for task in sorted(tasks, key=lambda t: t.get_name()):
                coro = task.get_coro()
                name = getattr(coro, "__qualname__", repr(coro))
                buf.write(f"--- task {task.get_name()} {name}\n")
                for frame in task.get_stack(limit=12):
                    buf.write("".join(traceback.format_stack(frame, limit=1)))
        for ident, frame in sys._current_frames().items():
            if ident == threading.get_ident():
                continue
            thread = next((t for t in threading.enumerate() if t.ident == ident), None)
            buf.write(f"--- thread {thread.name if thread else ident}\n")
            buf.write("".join(traceback.format_stack(frame, limit=8)))
        return buf.getvalue()
