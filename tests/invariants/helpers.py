"""Helpers of the invariant suite: a background traffic generator and the one assertion.

The oracle, the checks and the stack live in :mod:`meterline.verify` so ``meterline verify`` and
these tests prove the same thing. :func:`assert_credit_invariant` adds the ledger part
(``meterline.verify.credit_checks``); the Stripe part is ``meterline.verify.StripeSession.run``.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from meterline.verify import (
    PRICING_CHECKS,
    ChaosStack,
    Expected,
    InvariantCheck,
    check_invariants,
    credit_checks,
    make_events,
)


def assert_invariant(
    stack: ChaosStack,
    expected: Expected,
    seed: int,
    *,
    checks: Sequence[InvariantCheck] = PRICING_CHECKS,
    timeout: float = 120.0,
) -> None:
    """Wait for the stores to settle, then fail with every Δ (and the seed, and worker logs) if any."""
    settled = stack.wait_settled(expected, timeout=timeout)
    deltas = check_invariants(stack.query, expected, checks)
    if settled and not deltas:
        return
    logs = "\n".join(f"--- {w.name}\n{w.log_tail(1500)}" for w in stack.workers)
    counts = stack.counts()
    pytest.fail(
        f"invariant broken (seed={seed}, settled={settled}, priced/rejected rows={counts}, "
        f"expected {len(expected.priced)}/{expected.rejected}, sink={stack.sink.stats() if stack.sink else None}):\n"
        + "\n".join(str(d) for d in deltas)
        + f"\n{logs}"
    )


class Traffic:
    """Produce events in small bursts from a background thread until stopped (or ``limit`` reached).

    Every ``dup_every``-th burst also resends a few earlier events (producer retries). ``expected``
    learns each event as it is handed to the producer; :meth:`stop` flushes (a failed delivery raises).
    """

    def __init__(self, stack: ChaosStack, expected: Expected, rng: random.Random, *, burst: int = 20,
                 pause: float = 0.05, limit: int = 8000, dup_every: int = 5, prefix: str = "") -> None:  # fmt: skip
        self.stack, self.expected, self.rng = stack, expected, rng
        self.burst, self.pause, self.limit, self.dup_every, self.prefix = burst, pause, limit, dup_every, prefix
        self.sent: list[Any] = []
        self.duplicates = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def _run(self) -> None:
        n = 0
        try:
            while not self._stop.is_set() and len(self.sent) < self.limit:
                events = make_events(self.rng, self.burst, prefix=self.prefix)
                with self._lock:
                    self.expected.add_priced(events)
                    self.sent.extend(events)
                n += 1
                if n % self.dup_every == 0:
                    events = events + [self.rng.choice(self.sent) for _ in range(3)]
                    self.duplicates += 3
                self.stack.produce(events, flush=False)
                time.sleep(self.pause)
        except BaseException as exc:  # noqa: BLE001 - surfaced by stop()
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        if self.error is not None:
            raise self.error
        self.stack.producer.flush(30)


def assert_credit_invariant(stack: ChaosStack, expected: Expected, seed: int, *, timeout: float = 120.0) -> dict[str, Any]:
    """The pricing invariant, then the ledger part (entries in ClickHouse, final statuses); returns
    the final statuses. Fails with every Δ, the seed and the worker logs."""
    assert_invariant(stack, expected, seed, timeout=timeout)
    grants = sum(1 for p in expected.credit_plans.values() if p.grant)
    settled = stack.wait_ledger(len(expected.priced), grants, timeout=timeout)
    statuses = stack.settled_statuses(expected)
    deltas = check_invariants(stack.query, expected, credit_checks(statuses))
    if settled and not deltas:
        return statuses
    logs = "\n".join(f"--- {w.name}\n{w.log_tail(1500)}" for w in stack.workers)
    pytest.fail(
        f"credit invariant broken (seed={seed}, settled={settled}, ledger counts={stack.ledger_counts()}, "
        f"expected {len(expected.priced)} debited events / {grants} grants, "
        f"ledger sink={stack.ledger_sink.stats() if stack.ledger_sink else None}):\n"
        + "\n".join(str(d) for d in deltas)
        + f"\n{logs}"
    )
