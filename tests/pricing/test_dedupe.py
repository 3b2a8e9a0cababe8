"""The compact dedupe index (pipeline/dedupe.py) answers exactly as the dict it replaced.

Random histories of table entries (loads, replacements, deletions, partition drops, expiry) are
applied to both; every lookup (seen and unseen events) must agree. A second run forces digest
collisions (a digest with 3 bits), so the exact confirmation and the overflow dict carry the
answers: a collision must never make a new event look seen.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pipeline.dedupe as dedupe
from pipeline.dedupe import DedupeIndex, DigestTable


class DictIndex:
    """The pre-#15 index, verbatim in behaviour: the oracle."""

    def __init__(self, window_ms: int) -> None:
        self.window_ms = window_ms
        self._first_seen: dict[tuple[str, str], tuple[int, int]] = {}
        self._entries: dict[int, dict[str, tuple[str, list[str], int]]] = {}

    def __len__(self) -> int:
        return len(self._first_seen)

    def load(self, key: str, value: dict[str, Any] | None) -> None:
        partition_s, _, offset_s = key.partition(":")
        partition, offset = int(partition_s), int(offset_s)
        per_partition = self._entries.setdefault(partition, {})
        old = per_partition.pop(key, None)
        if old is not None:
            customer, ids, _ = old
            for event_id in ids:
                if self._first_seen.get((customer, event_id)) == (partition, offset):
                    del self._first_seen[(customer, event_id)]
        if value is None:
            return
        customer, ids, seen_at = value["c"], list(value["ids"]), int(value["t"])
        per_partition[key] = (customer, ids, seen_at)
        for event_id in ids:
            self._first_seen.setdefault((customer, event_id), (partition, offset))

    def forget_partition(self, partition: int) -> None:
        for key in list(self._entries.get(partition, {})):
            self.load(key, None)
        self._entries.pop(partition, None)

    def first_seen(self, customer_id: str, event_id: str) -> tuple[int, int] | None:
        return self._first_seen.get((customer_id, event_id))

    def expired(self, partition: int, now_ms: int) -> list[str]:
        cutoff = now_ms - self.window_ms
        return [k for k, (_, _, t) in self._entries.get(partition, {}).items() if t < cutoff]


CUSTOMERS = ["c1", "c2", "c3"]
EVENTS = [f"e{i}" for i in range(40)]

op = st.one_of(
    st.tuples(
        st.just("load"),
        st.integers(0, 2),  # partition
        st.integers(0, 6),  # offset
        st.sampled_from(CUSTOMERS),
        st.lists(st.sampled_from(EVENTS), max_size=12),  # repeats inside one value on purpose
        st.integers(0, 100),  # seen at
    ),
    st.tuples(st.just("delete"), st.integers(0, 2), st.integers(0, 6)),
    st.tuples(st.just("forget"), st.integers(0, 2)),
)


def _run(ops: list[tuple[Any, ...]]) -> None:
    new, old = DedupeIndex(50), DictIndex(50)
    for o in ops:
        if o[0] == "load":
            _, p, off, c, ids, t = o
            value = {"c": c, "ids": ids, "t": t}
            new.load(f"{p}:{off}", value)
            old.load(f"{p}:{off}", value)
        elif o[0] == "delete":
            new.load(f"{o[1]}:{o[2]}", None)
            old.load(f"{o[1]}:{o[2]}", None)
        else:
            new.forget_partition(o[1])
            old.forget_partition(o[1])
        idents = [(c, e) for c in CUSTOMERS for e in EVENTS]
        assert new.first_seen_many(idents) == [old.first_seen(c, e) for c, e in idents]
        assert [new.first_seen(c, e) for c, e in idents[:5]] == [old.first_seen(c, e) for c, e in idents[:5]]
        assert len(new) == len(old)
        for p in range(3):
            assert sorted(new.expired(p, 120)) == sorted(old.expired(p, 120))


@settings(max_examples=150, deadline=None)
@given(st.lists(op, max_size=30))
def test_same_answers_as_the_dict(ops: list[tuple[Any, ...]]) -> None:
    _run(ops)


def _weak(pairs: Any) -> Any:
    """A 3-bit digest (values 2..9): nearly every event collides with another."""
    return np.fromiter((2 + (hash(p) & 7) for p in pairs), dtype=np.uint64, count=len(pairs))


@settings(max_examples=150, deadline=None)
@given(st.lists(op, max_size=30))
def test_same_answers_when_digests_collide(ops: list[tuple[Any, ...]]) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dedupe, "digests", lambda customer, ids: _weak([(customer, e) for e in ids]))
        mp.setattr(dedupe, "digests_of", _weak)
        _run(ops)


def test_a_colliding_new_event_is_never_seen() -> None:
    """Every digest equal: the one cell belongs to the first event; all others are exact."""
    with pytest.MonkeyPatch.context() as mp:
        same = lambda n: np.full(n, 7, dtype=np.uint64)  # noqa: E731
        mp.setattr(dedupe, "digests", lambda customer, ids: same(len(ids)))
        mp.setattr(dedupe, "digests_of", lambda pairs: same(len(pairs)))
        index = DedupeIndex(10)
        index.load("0:1", {"c": "c1", "ids": ["a", "b"], "t": 0})
        index.load("0:2", {"c": "c2", "ids": ["a"], "t": 0})
        assert index.first_seen_many([("c1", "a"), ("c1", "b"), ("c2", "a"), ("c2", "b"), ("c1", "z")]) == [
            (0, 1),
            (0, 1),
            (0, 2),
            None,
            None,
        ]
        index.load("0:1", None)  # the cell's owner goes; the overflow entries stay exact
        assert index.first_seen_many([("c1", "a"), ("c1", "b"), ("c2", "a")]) == [None, None, (0, 2)]
        assert len(index) == 1


def test_digest_table_grows_and_shrinks() -> None:
    table = DigestTable()
    d = np.arange(1, 50_001, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    d = np.where(d < 2, d + np.uint64(2), d)
    slots = np.arange(d.shape[0], dtype=np.int32)
    table.put_new(d, slots)
    assert len(table) == 50_000 and table.capacity >= 50_000 / 0.75
    assert (table.get(d) == slots).all()
    table.delete(d[:1000], -1)  # cells of another slot: nothing is removed
    assert len(table) == 50_000
    big = table.capacity
    for s in range(48_000):
        if s % 4_000 == 0:
            table.delete(d[s : s + 4_000], -1)
        table.delete(d[s : s + 1], s)
    assert len(table) == 2_000 and table.capacity < big  # shrank after most entries went
    assert (table.get(d[48_000:]) == slots[48_000:]).all()
    assert (table.get(d[:48_000]) == -1).all()


def test_a_record_that_carries_an_event_another_record_owns_never_answers_for_it() -> None:
    """Found by the collision run: R3 carries e2 (owned by R2) and takes the digest's cell for e15;
    once R2 is gone, e2 is unknown (as with the dict), not "first seen in R3"."""
    ops: list[tuple[Any, ...]] = [
        ("load", 1, 3, "c2", ["e16"], 77),
        ("load", 0, 2, "c2", ["e2"], 58),
        ("delete", 1, 3),
        ("load", 2, 0, "c2", ["e15", "e2"], 17),
        ("load", 0, 2, "c1", [], 78),
    ]
    with pytest.MonkeyPatch.context() as mp:
        same = lambda n: np.full(n, 9, dtype=np.uint64)  # noqa: E731
        mp.setattr(dedupe, "digests", lambda customer, ids: same(len(ids)))
        mp.setattr(dedupe, "digests_of", lambda pairs: same(len(pairs)))
        _run(ops)
    _run(ops)  # and with the real digest
