"""Scenarios 1 and 2: faust workers SIGKILLed mid-stream; the totals survive exactly.

What a kill can do here: records processed but not committed are replayed (commit interval 1 s),
the dedupe table's changelog may be behind or ahead of the committed offsets (faust-recovery.md),
and priced records may be re-sent. The invariant says none of it shows in ClickHouse.
"""

from __future__ import annotations

import random
import time

from devtools.verify import ChaosStack, Expected, make_events
from tests.invariants.helpers import Traffic, assert_invariant

KILLS = 3


def test_sigkill_worker_repeatedly_while_stream_flows(chaos: ChaosStack, rng: random.Random, seed: int) -> None:
    expected = Expected()
    chaos.start_sink()
    worker = chaos.start_worker()
    traffic = Traffic(chaos, expected, rng, burst=15, pause=0.04, limit=9000).start()
    seen = 0
    for _ in range(KILLS):
        seen = chaos.wait_progress(seen, timeout=90)  # the (re)started worker is pricing
        time.sleep(rng.uniform(0.0, 1.5))  # a random point in the stream
        chaos.kill_worker(worker)
        assert not worker.alive()
        worker = chaos.start_worker()
    traffic.stop()
    assert chaos.kills == KILLS and traffic.duplicates > 0
    assert_invariant(chaos, expected, seed)
    assert worker.alive()


def test_two_workers_kill_one_survivor_takes_its_partitions(chaos: ChaosStack, rng: random.Random, seed: int) -> None:
    expected = Expected()
    chaos.start_sink()
    victim, survivor = chaos.start_worker(), chaos.start_worker()
    warmup = make_events(rng, 400, prefix="warm-")
    chaos.produce(warmup)
    expected.add_priced(warmup)
    assert_invariant(chaos, expected, seed)  # both workers joined and priced

    traffic = Traffic(chaos, expected, rng, burst=15, pause=0.04, limit=4000).start()
    chaos.wait_progress(len(warmup), timeout=60)
    time.sleep(rng.uniform(0.0, 1.0))
    chaos.kill_worker(victim)
    post = make_events(rng, 400, prefix="post-")  # produced after the kill: only the survivor is left
    chaos.produce(post)
    expected.add_priced(post)
    traffic.stop()
    assert_invariant(chaos, expected, seed)

    assert survivor.alive() and not victim.alive()
    partitions = {
        p
        for (p,) in chaos.query(
            "SELECT DISTINCT source_partition FROM usage_priced WHERE startsWith(event_id, 'post-')"
        )
    }
    assert partitions == {0, 1, 2, 3}, f"the survivor did not take over every partition (seed={seed})"
