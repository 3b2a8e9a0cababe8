"""Helpers of the invariant suite: a background traffic generator and the one assertion.

The oracle, the checks and the stack live in :mod:`devtools.verify` so ``meterline verify`` and
these tests prove the same thing. :func:`assert_credit_invariant` adds the ledger part
(``devtools.verify.credit_checks``); the Stripe part is ``devtools.verify.StripeSession.run``.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from devtools.verify import (
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
    logs += "\n" + trace_missing(stack, expected)
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

    def __init__(
        self,
        stack: ChaosStack,
        expected: Expected,
        rng: random.Random,
        *,
        burst: int = 20,
        pause: float = 0.05,
        limit: int = 8000,
        dup_every: int = 5,
        prefix: str = "",
    ) -> None:
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
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        if self.error is not None:
            raise self.error
        self.stack.producer.flush(30)


def assert_credit_invariant(
    stack: ChaosStack, expected: Expected, seed: int, *, timeout: float = 120.0
) -> dict[str, Any]:
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


def trace_missing(stack: ChaosStack, expected: Expected, limit: int = 5) -> str:
    """Where the events missing from ``usage_priced`` are on the way: their usage-events records,
    any usage-priced record holding them, the pricing dedupe changelog's entries for them, and the
    faust group's committed offsets. For diagnosing a failed run; never raises."""
    try:
        import json

        from confluent_kafka import Consumer, TopicPartition

        from meterline.stack.kafka import read_topic
        from schemas.codec import decode_priced_batch, decode_usage_batch

        have = {(str(c), str(e)) for c, e in stack.query("SELECT customer_id, event_id FROM usage_priced")}
        missing = set(expected.priced) - have
        if not missing:
            return "trace: nothing missing from usage_priced"
        topic = stack.settings.topic
        where: dict[tuple[str, str], list[str]] = {k: [] for k in missing}
        for m in read_topic(stack.bootstrap, topic("usage-events")):
            try:
                events = decode_usage_batch(m.value())
            except Exception:
                continue
            for ev in events:
                k = (ev["customer_id"], ev["event_id"])
                if k in where:
                    where[k].append(f"events@{m.partition()}:{m.offset()}")
        for m in read_topic(stack.bootstrap, topic("usage-priced")):
            for ev in decode_priced_batch(m.value()):
                k = (ev["customer_id"], ev["event_id"])
                if k in where:
                    where[k].append(
                        f"priced@{m.partition()}:{m.offset()}(src {ev['source_partition']}:{ev['source_offset']})"
                    )
        changelog = f"{stack.settings.topic_prefix}pricing-pricing-dedupe-changelog"
        positions = {p.split("@")[1] for v in where.values() for p in v if p.startswith("events@")}
        dedupe = []
        for m in read_topic(stack.bootstrap, changelog):
            key = _text(m.key())
            if key in positions:
                value = json.loads(m.value()) if m.value() else None
                ids = value.get("ids") if isinstance(value, dict) else value
                dedupe.append(
                    f"{key}@{m.partition()}:{m.offset()} ids={len(ids or [])} "
                    f"missing={sum(1 for c, e in missing if ids and e in ids)}"
                )
        c = Consumer(
            {
                "bootstrap.servers": stack.bootstrap,
                "group.id": f"{stack.settings.topic_prefix}pricing",
                "enable.auto.commit": False,
                "log_level": 3,
            }
        )
        try:
            committed = c.committed(
                [TopicPartition(topic("usage-events"), p) for p in range(stack.settings.partitions)], timeout=10
            )
        finally:
            c.close()
        lines = [f"trace: {len(missing)} event(s) missing from usage_priced"]
        by_place: dict[str, int] = {}
        for places in where.values():
            by_place[" ".join(places) or "nowhere"] = by_place.get(" ".join(places) or "nowhere", 0) + 1
        lines += [f"  {n} event(s): {place}" for place, n in sorted(by_place.items())[: limit * 4]]
        lines.append("  dedupe changelog entries at those positions: " + ("; ".join(dedupe) or "none"))
        lines.append("  committed usage-events offsets: " + ", ".join(f"{t.partition}:{t.offset}" for t in committed))
        return "\n".join(lines)
    except Exception as exc:
        return f"trace failed: {exc!r}"


def _text(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    text = raw.decode("utf-8", "replace")
    return text[1:-1] if text.startswith('"') and text.endswith('"') else text
