"""Scenario 5: the credit agent (in the same worker as pricing) under SIGKILLs, resent usage, a full
replay and re-sent ledger commands. Per customer, exactly:

    Σ debits against grants + Σ overage debits = Σ charge of usage_priced = the oracle's Σ charge

with the split, the final status (block / credit_limit / allow / default policies) and the
``ledger_balances`` view all equal to what the plan implies, and the final ``customer-status``
records agreeing with ``ledger_entries`` (FINAL)."""

from __future__ import annotations

import random
import time

from devtools.verify import ChaosStack, Expected, make_events, plan_credits
from tests.invariants.helpers import assert_credit_invariant

DAY_MS = 86_400_000


def test_ledger_exact_after_sigkills_replays_and_resent_commands(
    chaos: ChaosStack, rng: random.Random, seed: int
) -> None:
    expected = Expected()
    chaos.start_sink()
    chaos.start_ledger_sink()
    worker = chaos.start_worker()
    events = make_events(rng, 600)
    whole = Expected()
    whole.add_priced(events)
    plans = plan_credits(rng, {c: t[2] for c, t in whole.per_customer().items()})
    expected.credit_plans = {p.customer_id: p for p in plans}
    commands = [m for p in plans for m in p.commands(time.time_ns() // 1_000_000 - DAY_MS)]
    chaos.send_commands(commands)
    assert chaos.wait_ledger(0, sum(1 for p in plans if p.grant), timeout=90, quiet=0.2), f"grants (seed={seed})"

    chunks = [events[i::3] for i in range(3)]
    sent: list = []
    for i, chunk in enumerate(chunks):
        dups = rng.sample(sent + chunk, 20)  # producer retries, some of earlier chunks
        chaos.produce(chunk + dups)
        expected.add_priced(chunk)
        sent += chunk
        if i < 2:  # SIGKILL while this chunk is being priced and debited
            chaos.wait_progress(chaos.counts()[0], timeout=90)
            time.sleep(rng.uniform(0.0, 0.5))
            chaos.kill_worker(worker)
            worker = chaos.start_worker()
    chaos.produce(chunks[0])  # a full replay of the first chunk
    chaos.send_commands(commands)  # every policy and grant command again (a client retry)
    statuses = assert_credit_invariant(chaos, expected, seed)

    assert chaos.kills == 2 and worker.alive()
    outcomes = {c: p.outcome(expected.per_customer()[c][2]) for c, p in expected.credit_plans.items()}
    reasons = {o.reason for o in outcomes.values()}
    assert {"credit_exhausted", "credit_limit_reached", None} <= reasons, f"scenario not covered (seed={seed})"
    assert any(o.overage > 0 and o.status == "active" for o in outcomes.values())  # allow / limit not reached
    assert {statuses[c]["status"] for c in outcomes} == {"active", "blocked"}
