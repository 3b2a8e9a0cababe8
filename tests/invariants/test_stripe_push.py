"""Scenario 6: usage priced by the pipeline, pushed to (local) Stripe by the real sync job while Stripe
drops responses, answers 5xx and 429, and the sync dies after a random push before its cursor write;
then late usage lands in windows already pushed, together with replays, and the sync runs again.

Per customer and closed window: Stripe's meter event summary = the sync's unit rule recomputed from
the oracle (micro-dollars, floored per window, remainder carried); every stored meter event is one
acknowledged cursor row (no identifier twice); a run after the re-run plans and sends nothing."""

from __future__ import annotations

import random

from devtools.verify import ChaosStack, Expected, StripeSession, make_events
from jobs.stripe._store import load_pushes
from tests.invariants.helpers import assert_invariant


def test_stripe_push_exact_through_faults_crash_and_late_usage(
    chaos: ChaosStack, rng: random.Random, seed: int
) -> None:
    expected = Expected()
    chaos.start_sink()
    chaos.start_worker()
    events = make_events(rng, 300)
    chaos.produce(events)
    expected.add_priced(events)
    assert_invariant(chaos, expected, seed)

    session = StripeSession(chaos.ch())
    try:
        first = session.run(expected, rng)
        assert not first.deltas, f"seed={seed}\n" + "\n".join(map(str, first.deltas))
        assert first.crashed_after is not None and first.runs == 3
        assert sum(first.faults.values()) >= 3 and first.retries >= 1
        assert sum(u for u, _ in first.per_customer.values()) > 0

        late = make_events(rng, 60, prefix="late-")  # ~2/3 of them fall in windows pushed above
        chaos.produce(late + rng.sample(events, 40))  # with replays of pushed usage
        expected.add_priced(late)
        assert_invariant(chaos, expected, seed)
        second = session.run(expected, rng)
        assert not second.deltas, f"seed={seed}\n" + "\n".join(map(str, second.deltas))
        assert any(p.revision >= 1 for p in load_pushes(chaos.ch())), "late usage made no delta revision"
    finally:
        session.close()
