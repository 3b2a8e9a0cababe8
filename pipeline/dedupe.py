"""The pricing agent's dedupe index in ~20 bytes per event: 64-bit digests in numpy arrays, exact.

The index answers "which usage-events record first carried (customer_id, event_id)?" for every
event of the 35-day window (issue #15: at production volume that is millions of entries). A dict
``{(customer, event_id): (partition, offset)}`` costs ~170 bytes per entry in CPython (two tuples,
two ints and the dict slot; measured by ``python -m bench --only dedupe``). Here:

* each record the table names (``"<partition>:<offset>"`` -> ``{"c", "ids", "t"}``) gets a small
  integer *slot*; the slot keeps the record's position, customer, time and a reference to its id
  list (the list the dedupe table's value already holds: no copy);
* an open-addressing hash table of two numpy arrays maps ``digest(customer, event_id)`` (uint64)
  -> slot (int32), linear probing, load factor <= 0.75, lookups and inserts vectorised per record;
* **exactness**: a digest hit is only a *candidate*. It is confirmed by looking the event id up in
  the slot's own id list with the customer compared; a hit whose record does not carry the event
  is a digest collision, never a duplicate. Two different events with the same digest cannot share
  a table cell, so the later one goes to a small exact dict (``_overflow``, keyed by the event
  itself), which is consulted first. So the index never reports a new event as seen, and never
  misses a seen one: the same answers as the dict, entry for entry (tests/pricing/test_dedupe.py
  checks it against the dict on random histories, with a digest forced to collide).

The digest is Python's ``hash((customer_id, event_id))``: strings hash with SipHash under the
process's random key, so a producer cannot aim collisions at it; and if one did, collisions only
cost the exact dict, never correctness. The digests live only in this process (rebuilt from the
table after every assignment), so the per-process key is no problem.

Semantics kept from the dict version: the first record loaded for an event owns it (later records
carrying it again do not move it); deleting a record forgets only the events it owns.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

_EMPTY = np.uint64(0)
_TOMB = np.uint64(1)  # a deleted cell: probing goes on past it, an insert may reuse it
_MAX_LOAD = 0.75
_MIN_CAPACITY = 1 << 10
# Probing runs vectorised over a batch for a few rounds; the few long probes left (linear probing
# has a tail) finish one by one, which costs less than more rounds over the whole arrays.
_VECTOR_ROUNDS = 3
_SCALAR_TAIL = 64

U64 = npt.NDArray[np.uint64]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]


def digests(customer: str, event_ids: Sequence[str]) -> U64:
    """The 64-bit digests of ``(customer, event_id)`` for each id (never 0 or 1: those mark cells)."""
    d = np.fromiter((hash((customer, e)) for e in event_ids), dtype=np.int64, count=len(event_ids)).view(np.uint64)
    return np.where(d < 2, d + np.uint64(2), d)


def digests_of(pairs: Sequence[tuple[str, str]]) -> U64:
    d = np.fromiter((hash(p) for p in pairs), dtype=np.int64, count=len(pairs)).view(np.uint64)
    return np.where(d < 2, d + np.uint64(2), d)


class DigestTable:
    """uint64 digest -> int32 slot, open addressing with linear probing; one cell per digest."""

    def __init__(self, capacity: int = _MIN_CAPACITY) -> None:
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        self.keys: U64 = np.zeros(capacity, dtype=np.uint64)
        self.vals: I32 = np.zeros(capacity, dtype=np.int32)
        self.mask = np.uint64(capacity - 1)
        self.live = 0
        self.used = 0  # live + tombstones

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[0])

    def __len__(self) -> int:
        return self.live

    def _cells(self, d: U64) -> I64:
        """The cell of each digest (its position in ``keys``), -1 if absent."""
        out = np.full(d.shape[0], -1, dtype=np.int64)
        active = np.arange(d.shape[0])
        pos = d & self.mask
        rounds = 0
        while active.shape[0]:
            if active.shape[0] <= _SCALAR_TAIL and rounds >= _VECTOR_ROUNDS:
                self._cells_tail(d, out, active.tolist(), pos.tolist())
                break
            rounds += 1
            k = self.keys[pos]
            hit = k == d[active]
            out[active[hit]] = pos[hit].astype(np.int64)
            go_on = ~hit & (k != _EMPTY)
            active, pos = active[go_on], (pos[go_on] + np.uint64(1)) & self.mask
        return out

    def _cells_tail(self, d: U64, out: I64, active: list[int], pos: list[int]) -> None:
        """The few long probes left after the vectorised rounds, one by one (cheaper than rounds)."""
        keys, mask = self.keys, int(self.mask)
        for i, p in zip(active, pos):
            want = int(d[i])
            while True:
                k = int(keys[p])
                if k == want:
                    out[i] = p
                    break
                if k == 0:
                    break
                p = (p + 1) & mask

    def get(self, d: U64) -> I32:
        """The slot of each digest, -1 where absent."""
        cells = self._cells(d)
        out = np.full(d.shape[0], -1, dtype=np.int32)
        found = cells >= 0
        out[found] = self.vals[cells[found]]
        return out

    def put_new(self, d: U64, slots: I32) -> None:
        """Insert digests known to be absent and distinct from each other."""
        if not d.shape[0]:
            return
        if (self.used + d.shape[0]) > _MAX_LOAD * self.capacity:
            self._resize(self.live + d.shape[0])
        pos = d & self.mask
        todo = np.arange(d.shape[0])
        rounds = 0
        while todo.shape[0]:
            if todo.shape[0] <= _SCALAR_TAIL and rounds >= _VECTOR_ROUNDS:
                self._put_tail(d, slots, todo.tolist(), pos.tolist())
                break
            rounds += 1
            k = self.keys[pos]
            free = (k == _EMPTY) | (k == _TOMB)
            cand = np.nonzero(free)[0]
            cells = pos[cand]
            was_empty = k[cand] == _EMPTY
            # Several digests of this batch may want the same free cell: scatter them all, and the
            # one whose digest the cell holds afterwards has it (digests are distinct: one per cell).
            self.keys[cells] = d[todo[cand]]
            won = self.keys[cells] == d[todo[cand]]
            win = cand[won]
            self.vals[pos[win]] = slots[todo[win]]
            self.used += int(np.count_nonzero(was_empty[won]))
            self.live += win.shape[0]
            lose = np.ones(todo.shape[0], dtype=bool)
            lose[win] = False
            todo, pos = todo[lose], (pos[lose] + np.uint64(1)) & self.mask

    def _put_tail(self, d: U64, slots: I32, todo: list[int], pos: list[int]) -> None:
        keys, vals, mask = self.keys, self.vals, int(self.mask)
        for i, p in zip(todo, pos):
            while True:
                k = int(keys[p])
                if k <= 1:  # empty or deleted
                    self.used += k == 0
                    keys[p] = d[i]
                    vals[p] = slots[i]
                    self.live += 1
                    break
                p = (p + 1) & mask

    def delete(self, d: U64, slot: int) -> None:
        """Remove the cells of these digests that map to ``slot`` (others are left alone)."""
        cells = self._cells(d)
        cells = cells[cells >= 0]
        cells = cells[self.vals[cells] == slot]
        if cells.shape[0]:
            cells = np.unique(cells)
            self.keys[cells] = _TOMB
            self.live -= cells.shape[0]
        if self.capacity > _MIN_CAPACITY and self.live < self.capacity // 8:
            self._resize(self.live)

    def _resize(self, need: int) -> None:
        """Rehash the live cells into a table sized for ``need`` entries (drops the tombstones)."""
        live = (self.keys != _EMPTY) & (self.keys != _TOMB)
        keys, vals = self.keys[live], self.vals[live]
        capacity = _MIN_CAPACITY
        while need > _MAX_LOAD * capacity * 0.8:  # leave room: not one resize per record
            capacity <<= 1
        self._alloc(capacity)
        self.put_new(keys, vals)


class DedupeIndex:
    """In-memory index over the dedupe table: (customer_id, event_id) -> first-seen (partition, offset).

    The faust table is the durable copy (one entry per source record, written through its
    changelog); this index is rebuilt from it per partition after an assignment.
    Table key ``"<partition>:<offset>"``, value ``{"c": customer_id, "ids": [event_id, ...],
    "t": seen_at_ms}``. The value's id list is kept by reference, never modified.
    """

    def __init__(self, window_ms: int) -> None:
        self.window_ms = window_ms
        self._table = DigestTable()
        self._overflow: dict[tuple[str, str], int] = {}  # events whose digest's cell another event owns
        # per slot: (partition, offset, customer, ids, seen_at); None = free
        self._slots: list[tuple[int, int, str, Sequence[str], int] | None] = []
        self._free: list[int] = []
        self._by_key: dict[int, dict[str, int]] = {}  # partition -> table key -> slot
        # slot -> events its record carries but does NOT own (an earlier record did when it was
        # loaded); such a record must not answer for them once that owner is gone. Rare: only a
        # table that holds one event in two records (a dedupe state that fell behind) fills it.
        self._not_owned: dict[int, set[str]] = {}

    def __len__(self) -> int:
        return len(self._table) + len(self._overflow)

    @staticmethod
    def table_key(partition: int, offset: int) -> str:
        return f"{partition}:{offset}"

    def _carries(self, slot: int, customer: str, event_id: str) -> bool:
        """Whether the slot's record carries AND owns this event (the exact confirmation)."""
        rec = self._slots[slot]
        if rec is None or rec[2] != customer or event_id not in rec[3]:
            return False
        not_owned = self._not_owned.get(slot)
        return not_owned is None or event_id not in not_owned

    def load(self, key: str, value: dict[str, Any] | None) -> None:
        """Apply one table entry (from recovery or from our own writes). ``None`` = deleted."""
        partition_s, _, offset_s = key.partition(":")
        partition, offset = int(partition_s), int(offset_s)
        per_partition = self._by_key.setdefault(partition, {})
        old = per_partition.pop(key, None)
        if old is not None:
            self._drop(old)
        if value is None:
            return
        customer, ids, seen_at = str(value["c"]), value["ids"], int(value["t"])
        if not isinstance(ids, list | tuple):
            ids = list(ids)
        slot = self._free.pop() if self._free else len(self._slots)
        if slot == len(self._slots):
            self._slots.append(None)
        self._slots[slot] = (partition, offset, customer, ids, seen_at)
        per_partition[key] = slot
        if not ids:
            return
        d = digests(customer, ids)
        have = self._table.get(d)
        overflow = self._overflow
        # Events already indexed keep their first record; a digest owned by ANOTHER event is a
        # collision: this event goes to the exact dict. Within the record, first occurrence wins.
        _, first = np.unique(d, return_index=True)
        first_mask = np.zeros(d.shape[0], dtype=bool)
        first_mask[first] = True
        fresh = (have < 0) & first_mask
        if overflow:  # an event the exact dict owns keeps its owner there
            fresh &= np.fromiter(((customer, e) not in overflow for e in ids), dtype=bool, count=len(ids))
        new = np.nonzero(fresh)[0]
        self._table.put_new(d[new], np.full(new.shape[0], slot, dtype=np.int32))
        for i in np.nonzero(~fresh)[0].tolist():
            event_id = ids[i]
            owner = int(have[i])
            o = overflow.get((customer, event_id))
            if o is not None:
                if o != slot:
                    self._not_owned.setdefault(slot, set()).add(event_id)
                continue  # owned by its record in the exact dict
            if owner < 0:  # a repeat of a digest of this same record
                if ids[_first_index(d, i)] == event_id:
                    continue  # the same event twice in one value: owned already
            elif self._carries(owner, customer, event_id):
                if owner != slot:
                    self._not_owned.setdefault(slot, set()).add(event_id)
                continue  # seen in an earlier record: that record keeps it
            overflow[(customer, event_id)] = slot

    def _drop(self, slot: int) -> None:
        rec = self._slots[slot]
        assert rec is not None
        _, _, customer, ids, _ = rec
        if ids:
            if self._overflow:
                for event_id in ids:
                    if self._overflow.get((customer, event_id)) == slot:
                        del self._overflow[(customer, event_id)]
            self._table.delete(digests(customer, ids), slot)
        self._slots[slot] = None
        self._not_owned.pop(slot, None)
        self._free.append(slot)

    def forget_partition(self, partition: int) -> None:
        for slot in self._by_key.pop(partition, {}).values():
            self._drop(slot)

    def first_seen(self, customer_id: str, event_id: str) -> tuple[int, int] | None:
        return self.first_seen_many([(customer_id, event_id)])[0]

    def first_seen_many(self, idents: Sequence[tuple[str, str]]) -> list[tuple[int, int] | None]:
        """:meth:`first_seen` of each ``(customer_id, event_id)``, in one vectorised probe."""
        if not idents:
            return []
        owners = self._table.get(digests_of(idents)).tolist()
        out: list[tuple[int, int] | None] = []
        overflow, slots = self._overflow, self._slots
        carried: dict[int, tuple[str, set[str]]] = {}  # owner slot -> its ids as a set, built once per call
        for ident, owner in zip(idents, owners):
            if overflow and ident in overflow:
                owner = overflow[ident]
            elif owner >= 0:  # a candidate: confirmed only if the owner's record carries this event
                ids = carried.get(owner)
                if ids is None:
                    rec = slots[owner]
                    owned = set(rec[3]) - self._not_owned.get(owner, set()) if rec is not None else set()
                    ids = carried[owner] = (rec[2] if rec is not None else "", owned)
                if ident[0] != ids[0] or ident[1] not in ids[1]:
                    owner = -1  # a digest collision: not this event
            rec = slots[owner] if owner >= 0 else None
            out.append((rec[0], rec[1]) if rec is not None else None)
        return out

    def expired(self, partition: int, now_ms: int) -> list[str]:
        """Table keys of this partition whose records were seen longer ago than the window."""
        cutoff = now_ms - self.window_ms
        slots = self._slots
        out = []
        for k, s in self._by_key.get(partition, {}).items():
            rec = slots[s]
            if rec is not None and rec[4] < cutoff:
                out.append(k)
        return out

    def keys(self) -> Iterable[str]:
        for per_partition in self._by_key.values():
            yield from per_partition


def _first_index(d: U64, i: int) -> int:
    """Index of the first element of ``d`` equal to ``d[i]``."""
    return int(np.nonzero(d[: i + 1] == d[i])[0][0])
