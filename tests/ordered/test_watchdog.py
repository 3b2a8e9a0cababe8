"""The worker's stall watchdog: one report, with the stuck task's stack, when records wait and no
counter moves; nothing while the pipeline is idle or moving."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from faust.types import TP

from pipeline.watchdog import StallWatchdog

SOURCE = "t.usage-events"


class _Consumer:
    def __init__(self, high: int | None, read: int | None) -> None:
        self.tp = TP(SOURCE, 0)
        self._read_offset = {self.tp: read}
        self.high = high

    def assignment(self) -> set[TP]:
        return {self.tp, TP("t.other", 0)}

    def highwater(self, tp: TP) -> int | None:
        return self.high if tp == self.tp else 99


class _App:
    def __init__(self, consumer: _Consumer) -> None:
        self.consumer = consumer


def _run_watchdog(
    caplog: pytest.LogCaptureFixture, consumer: _Consumer, progress: list[int], seconds: float
) -> StallWatchdog:
    async def stuck_agent(gate: asyncio.Event) -> None:
        await gate.wait()  # what a stalled agent looks like: awaiting something that never comes

    async def main() -> StallWatchdog:
        gate = asyncio.Event()
        task = asyncio.create_task(stuck_agent(gate), name="agent-under-test")
        dog = StallWatchdog(_App(consumer), lambda: (progress[0],), {SOURCE}, every_s=0.05, stall_after_s=0.2)
        dog.start(asyncio.get_running_loop())
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        dog.stop()
        gate.set()
        await task
        return dog

    with caplog.at_level(logging.WARNING, logger="pipeline.watchdog"):
        return asyncio.run(main())


def test_reports_once_with_the_stuck_task(caplog: pytest.LogCaptureFixture) -> None:
    dog = _run_watchdog(caplog, _Consumer(high=10, read=3), [7], 1.0)
    assert dog.reports == 1  # once per stall, not every tick
    (record,) = [r for r in caplog.records if "stall" in r.getMessage()]
    text = record.getMessage()
    assert "t.usage-events:0': 6" in text  # highwater 10, read up to offset 3: 6 records wait
    assert "agent-under-test" in text and "gate.wait()" in text


def test_unknown_highwater_counts_as_waiting(caplog: pytest.LogCaptureFixture) -> None:
    assert _run_watchdog(caplog, _Consumer(high=None, read=None), [0], 0.8).reports == 1


def test_quiet_when_idle(caplog: pytest.LogCaptureFixture) -> None:
    assert _run_watchdog(caplog, _Consumer(high=4, read=3), [0], 0.8).reports == 0
    assert not [r for r in caplog.records if "stall" in r.getMessage()]
