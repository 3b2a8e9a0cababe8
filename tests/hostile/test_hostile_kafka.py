"""Hostile records straight onto ``usage-events`` (a raw confluent-kafka producer, no SDK gate) while
a faust worker runs: each becomes a ``usage_rejected`` row with its reason_code, the worker stays
alive, and the good events around them are priced exactly."""

from __future__ import annotations

import random
import time
from collections import Counter

from devtools.verify import ChaosStack, Expected, hostile_records, make_events
from schemas.codec import encode_usage_batch, event_to_record
from tests.invariants.helpers import assert_invariant


def test_hostile_records_are_dead_lettered_and_the_worker_survives(
    chaos: ChaosStack, rng: random.Random, seed: int
) -> None:
    expected = Expected()
    chaos.start_sink()
    worker = chaos.start_worker()
    before = make_events(rng, 300, prefix="before-")
    chaos.produce(before)
    expected.add_priced(before)

    bad = hostile_records(rng, time.time_ns() // 1_000_000)
    # a mixed record: good, bad, good events of one customer in one UsageBatch
    good_a, good_b = make_events(rng, 2, prefix="mixed-")
    good_a, good_b = (e.model_copy(update={"customer_id": "umbrella"}) for e in (good_a, good_b))
    bad_mid = {**event_to_record(good_a), "event_id": "mixed-bad", "input_tokens": -7}
    mixed = encode_usage_batch([event_to_record(good_a), bad_mid, event_to_record(good_b)])
    chaos.produce_raw([(k, v) for k, v, _, _ in bad] + [(b"umbrella", mixed)])
    for _, _, reason, n in bad:
        expected.add_rejected(reason, n)
    expected.add_rejected("negative_count")
    expected.add_priced([good_a, good_b])

    after = make_events(rng, 300, prefix="after-")
    chaos.produce(after)
    expected.add_priced(after)
    assert_invariant(chaos, expected, seed)
    assert worker.alive(), worker.log_tail()

    got = Counter(dict(chaos.query("SELECT reason_code, count() FROM usage_rejected GROUP BY reason_code")))
    assert got == Counter(expected.rejected_reasons), f"seed={seed}"
    reasons = chaos.query("SELECT reason, source_topic FROM usage_rejected")
    assert all(reason and topic == chaos.settings.topic("usage-events") for reason, topic in reasons)
    # the unicode customer's events kept their ids byte for byte
    unicode_ids = {e.event_id for e in before + after if not e.customer_id.isascii()}
    stored = (
        {e for (e,) in chaos.query("SELECT event_id FROM usage_priced WHERE NOT isValidASCII(customer_id)")}
        if unicode_ids
        else set()
    )
    assert stored == unicode_ids
