"""Scenario 3: producers resend the same events — retries, a full replay, the same record twice,
and an event twice inside one record. No total moves; no row is stored twice."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from devtools.verify import CUSTOMERS, ChaosStack, Expected, make_events
from schemas.codec import encode_usage_batch, event_to_record
from schemas.models import UsageEvent
from tests.invariants.helpers import assert_invariant

TOTALS = "SELECT customer_id, count(), sum(cost), sum(charge) FROM usage_priced WHERE {where} GROUP BY customer_id"


def test_resent_events_change_no_total(chaos: ChaosStack, rng: random.Random, seed: int) -> None:
    expected = Expected()
    chaos.start_sink()
    chaos.start_worker()
    events = make_events(rng, 1500)
    chaos.produce(events)
    expected.add_priced(events)
    assert_invariant(chaos, expected, seed)
    before = sorted(chaos.query(TOTALS.format(where="1")))

    # producer-side retries of a random third, one by one, in a shuffled order
    retries = rng.sample(events, len(events) // 3)
    chaos.produce(retries)
    # a full replay of the whole set
    chaos.produce(events)
    # the same Kafka record twice (a retried produce without idempotence) ...
    hooli = [e for e in events if e.customer_id == "hooli"][:20]
    record = encode_usage_batch([event_to_record(e) for e in hooli])
    chaos.produce_raw([(b"hooli", record), (b"hooli", record)])
    # ... and one event twice inside one new record (first copy counts, once)
    twin = make_events(rng, 1, prefix="twin-")[0].model_copy(update={"customer_id": "hooli"})
    chaos.produce_raw([(b"hooli", encode_usage_batch([event_to_record(twin)] * 2))])
    expected.add_priced([twin])
    # one marker per customer, sent last: per-customer order means the replays were handled first
    now = datetime.now(UTC)
    markers = [
        UsageEvent(
            event_id=f"marker-{c}",
            occurred_at=now - timedelta(minutes=1),
            customer_id=c,
            provider="meta",
            model="llama-3-70b",
            input_tokens=1_000,
            output_tokens=1_000,
        )
        for c in CUSTOMERS
    ]
    chaos.produce(markers)
    expected.add_priced(markers)
    assert_invariant(chaos, expected, seed)

    after = sorted(
        chaos.query(
            TOTALS.format(where="NOT startsWith(event_id, 'marker-') AND event_id != {t:String}"), {"t": twin.event_id}
        )
    )
    assert after == before, f"a resend changed a total (seed={seed})"
