"""Issue #19.1 without a broker: the credit agent's table value does not grow with a customer's
activity, big records apply in parts that replay exactly, and an unforeseen error dead-letters
the record instead of raising."""

from __future__ import annotations

import json
import time
from typing import Any

from meterline.core.ledger import CustomerLedger, dedupe_digest, pack_recent, unpack_recent
from pipeline.credits.processor import CHUNK_EVENTS, DEAD, ENTRIES, CreditProcessor
from schemas.codec import decode_dead_letter
from tests.credits.helpers import COMMANDS, PRICED, Replay, enc, grant_msg, priced_event, priced_record

T0 = int(time.time() * 1000) - 86_400_000
LONG = 128  # MAX_ID_LEN of the event contract


def _debits(entries: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {e["event_id"]: e["amount"] for e in entries.values() if e["kind"] == "debit"}


def test_value_stays_bounded_for_a_busy_customer(monkeypatch: Any) -> None:
    """12,000 events with 128-character ids (10k remembered) and more commands with long ids than
    are remembered: the value stays far below Kafka's 1 MB (it used to be 1.5 MB after 15,000
    events). Command ids are bounded like event ids (2,000 here for speed; 10,000 in production
    take 10,000 × 27 bytes, checked below)."""
    import pipeline.credits.processor as processor

    monkeypatch.setattr(processor, "MAX_COMMAND_IDS", 2_000)
    r = Replay()
    r.feed(COMMANDS, 0, "c", enc(grant_msg("c", "g", "1000.00", T0)), T0)
    sizes = []
    for b in range(24):
        evs = [priced_event("c", f"{b:03d}-{i:04d}".ljust(LONG, "x"), "0.001", T0 + b * 1000 + i) for i in range(500)]
        r.feed(PRICED, 0, "c", priced_record(evs), T0 + b * 1000 + 600)
        sizes.append(len(json.dumps(r.table["c"])))
    for i in range(2_200):  # authorize-like traffic: many distinct long command ids
        msg = {
            "type": "set_block",
            "command_id": f"cmd-{i}".ljust(LONG, "c"),
            "customer_id": "c",
            "at_ms": T0 + 90_000 + i,
            "scope": "customer",
            "blocked": False,
            "reason": "manual",
        }
        r.feed(COMMANDS, 0, "c", enc(msg), T0 + 90_000 + i)
    sizes.append(len(json.dumps(r.table["c"])))
    assert max(sizes) < 600_000, sizes[-3:]
    assert len(r.ledger("c").recent_ids) == 10_000
    assert len(unpack_recent(r.table["c"]["x"]["cmds"])) == 2_000
    assert len(pack_recent({dedupe_digest(f"c{i}".ljust(LONG)): T0 + i for i in range(10_000)})) < 270_000
    # Still a dedupe: the newest event again is skipped (no debit), the oldest-but-remembered too.
    before = len(r.entries)
    last = priced_event("c", "023-0499".ljust(LONG, "x"), "0.001", T0 + 23 * 1000 + 499)
    r.feed(PRICED, 1, "c", priced_record([last]), T0 + 100_000_000)
    assert len(r.entries) == before


def test_recent_ids_pack_round_trip_and_old_format() -> None:
    ids = {dedupe_digest(f"e:{i}"): 1_700_000_000_000 + i for i in range(100)}
    assert unpack_recent(pack_recent(ids)) == ids
    assert list(unpack_recent(pack_recent(ids))) == list(ids)  # order kept (trimmed from the front)
    old = [["e:abc", 5], ["a:adj-1", 6]]  # the list form values written before
    assert unpack_recent(old) == {dedupe_digest("e:abc"): 5, dedupe_digest("a:adj-1"): 6}
    r = Replay()
    r.feed(COMMANDS, 0, "c", enc(grant_msg("c", "g", "10.00", T0)), T0)
    r.feed(PRICED, 0, "c", priced_record([priced_event("c", "abc", "1.00", T0 + 1)]), T0 + 1)
    value = dict(r.table["c"])
    value["recent"] = [["e:abc", T0 + 1]]  # as an older worker stored it
    r.table["c"] = value
    assert CustomerLedger.from_dict(value).recent_ids == {dedupe_digest("e:abc"): T0 + 1}
    before = len(r.entries)
    r.feed(PRICED, 0, "c", priced_record([priced_event("c", "abc", "1.00", T0 + 1)]), T0 + 2)
    assert len(r.entries) == before  # still recognised as a duplicate


def test_big_record_applies_in_parts_and_a_crash_between_parts_replays_exactly() -> None:
    events = [priced_event("c", f"big-{i}", "0.01", T0 + i) for i in range(5 * CHUNK_EVENTS + 7)]
    value = priced_record(events)
    whole = Replay()
    whole.feed(COMMANDS, 0, "c", enc(grant_msg("c", "g", "5.00", T0)), T0)
    whole.feed(PRICED, 0, "c", value, T0 + 10_000)

    proc = CreditProcessor(None, priced_topic=PRICED, commands_topic=COMMANDS)
    parts = proc.split_record(PRICED, value)
    assert len(parts) == 6 and proc.split_record(COMMANDS, b"x") == [b"x"]
    table: dict[str, Any] = {}
    entries: dict[str, dict[str, Any]] = {}

    def run(offset: int, topic: str, v: bytes, ts: int, final: bool = True) -> Any:
        out = proc.process(topic, 0, offset, ts, b"c", v, table.get, final=final)
        for name, _k, msg, _same in out.sends:
            if name == ENTRIES:
                for e in json.loads(msg)["entries"]:
                    assert entries.setdefault(e["entry_id"], e) == e  # a re-sent id repeats its content
        if out.state is not None:
            table["c"] = out.state
        return out

    run(0, COMMANDS, enc(grant_msg("c", "g", "5.00", T0)), T0)
    for part in parts[:3]:  # crash after three parts were persisted: the record is replayed whole
        run(0, PRICED, part, T0 + 10_000, final=False)
    assert CustomerLedger.from_dict(table["c"]).applied_offsets.get(f"{PRICED}:0", -1) < 0
    for i, part in enumerate(parts):
        run(0, PRICED, part, T0 + 10_000, final=i == len(parts) - 1)
    assert CustomerLedger.from_dict(table["c"]).applied_offsets[f"{PRICED}:0"] == 0
    assert _debits(entries) == _debits(whole.entries)
    got, want = CustomerLedger.from_dict(table["c"]), whole.ledger("c")
    assert (got.overage_picos, got.grants["g"].remaining, got.seq) == (
        want.overage_picos,
        want.grants["g"].remaining,
        want.seq,
    )
    assert run(0, PRICED, value, T0 + 10_000).skipped  # the whole record again: skipped by offset


def test_unforeseen_error_dead_letters_the_record_and_changes_no_money() -> None:
    class Exploding:
        def price(self, record: Any) -> Any:
            raise ZeroDivisionError("a bug")

    r = Replay(Exploding())
    r.feed(COMMANDS, 0, "c", enc(grant_msg("c", "g", "5.00", T0)), T0)
    before = json.dumps(r.table["c"]["grants"])
    authorize = {
        "type": "authorize",
        "command_id": "auth-1",
        "customer_id": "c",
        "at_ms": T0 + 1,
        "request_id": "req-1",
        "provider": "openai",
        "model": "gpt-4o",
        "input_tokens_estimate": 10,
        "max_output_tokens": 10,
    }
    out = r.feed(COMMANDS, 0, "c", enc(authorize), T0 + 1)
    dead = [decode_dead_letter(v) for n, _k, v, _s in out.sends if n == DEAD]
    assert [d["reason_code"] for d in dead] == ["internal_error"] and "ZeroDivisionError" in dead[0]["reason"]
    assert dead[0]["payload"] == enc(authorize) and dead[0]["source_offset"] == 1
    assert json.dumps(r.table["c"]["grants"]) == before and not r.table["c"]["holds"]
    assert CustomerLedger.from_dict(r.table["c"]).applied_offsets[f"{COMMANDS}:0"] == 1  # and carries on
