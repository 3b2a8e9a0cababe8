"""One-box restart: rebuild the money state from ClickHouse when (and only when) the broker lost it.

The embedded broker (Tansu) keeps nothing on disk (shared/notes/durable-broker.md): after a
restart of ``meterline up`` every topic is empty, so the credit agent's table (grants, balances,
policies, budgets, dedupe) and the price records are gone, while ClickHouse still holds the usage
and the ledger. This module detects that and republishes the durable facts (docs/restore.md).

Detection — the broker epoch. The ``epoch`` topic holds one record: a random id written at the
first start on a broker. At start:

* the topic has a record → this broker kept its state (real Kafka; or the same Tansu process):
  NOTHING is restored (the id is noted in ClickHouse ``broker_epochs``);
* the topic is empty → the broker is new or lost everything: the state is restored from
  ClickHouse, THEN a new epoch id is written (a crash before that restores again at the next
  start; a restore is applied only to customers the table does not know, so that is harmless).

What is restored (before any worker starts):

* catalog records: every record ever seen on ``prices`` (and ``plans`` / ``subscriptions``
  where declared), mirrored into ``price_records`` by :class:`PriceMirror`, republished in
  first-seen order;
* per customer, one ``restore`` ledger command: the latest ``ledger_snapshots`` state (grants
  with their definitions, policy, budgets, blocks, alert tracks, guard buckets), with the grant
  balances, overage and seq replaced by the fold of the customer's ``ledger_entries`` (so the
  balances equal the stored facts to the pico-unit), and the remembered event ids rebuilt from the
  stored debits (a gateway retry after the restart is not debited twice). The credit agent applies
  a restore only to a customer it has no state for.

Not restored: open holds (minutes-long reservations: re-authorize), applied offsets (positions of
the lost broker), adjustment ids (adjustments re-sent after a restart would apply again), and
whatever was accepted but not yet processed when everything was killed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from meterline.core.ledger import (
    CustomerLedger,
    LedgerEntry,
    Policy,
    dedupe_digest,
    fold_entries,
    new_ledger,
    pack_recent,
    parse_amount,
)
from schemas.credits import encode_message
from schemas.topics import decode_epoch, encode_epoch

log = logging.getLogger(__name__)

EPOCH_KEY = b"epoch"


@dataclass(frozen=True, slots=True)
class RestoreReport:
    epoch: str
    broker_kept_state: bool
    customers: tuple[str, ...] = ()
    prices: int = 0

    def line(self) -> str:
        if self.broker_kept_state:
            return f"broker epoch {self.epoch}: the broker kept its state, nothing restored"
        if not self.customers and not self.prices:
            return f"broker epoch {self.epoch}: new broker, nothing to restore"
        return (
            f"broker epoch {self.epoch}: the broker had lost its state; restored {len(self.customers)} "
            f"customer ledger(s) and {self.prices} price record(s) from ClickHouse"
        )


def read_epoch(bootstrap: str, topic: str) -> str | None:
    from meterline.stack.kafka import read_topic

    for m in read_topic(bootstrap, topic, timeout=15):
        if m.value():
            return decode_epoch(m.value())
    return None


def restore_if_lost(
    bootstrap: str,
    topic: Callable[[str], str],
    ch: Any,
    step: Callable[[str], None] = log.info,
    *,
    partitions: int = 4,
    dedupe_window_days: int = 35,
) -> RestoreReport:
    """Detect (epoch) and, only if the broker lost its state, republish the facts. ``topic`` maps a
    logical topic name to the full one (``Settings.topic``); ``partitions`` is the partition count
    of the customer-keyed topics (for the pricing agent's dedupe changelog)."""
    from pipeline.publish import publish_records

    current = read_epoch(bootstrap, topic("epoch"))
    if current is not None:
        known = ch.query("SELECT count() FROM broker_epochs WHERE epoch = {e:String}", parameters={"e": current})
        if not int(known.result_rows[0][0]):
            _note_epoch(ch, current, 0, "first seen: the broker kept its state")
        return RestoreReport(current, True)
    epoch = uuid.uuid4().hex
    prices = 0
    for name, records in catalog_records(ch).items():
        publish_records(bootstrap, topic(name), records)
        prices += len(records)
    states = rebuild_states(ch)
    now = time.time_ns() // 1_000_000
    seen = restore_pricing_dedupe(bootstrap, topic, ch, partitions, now - dedupe_window_days * 86_400_000)
    if seen:
        step(
            f"the broker lost its state: {seen} priced event id(s) of the dedupe window given back to the pricing agent"
        )
    if states:
        step(f"the broker lost its state: restoring {len(states)} customer ledger(s) from ClickHouse")
        publish_records(
            bootstrap,
            topic("ledger-commands"),
            [
                (
                    c,
                    encode_message(
                        {
                            "type": "restore",
                            "command_id": f"restore:{epoch}:{c}",
                            "customer_id": c,
                            "at_ms": now,
                            "state": v,
                        }
                    ),
                )
                for c, v in sorted(states.items())
            ],
        )
    publish_records(bootstrap, topic("epoch"), [(EPOCH_KEY, encode_epoch(epoch))])
    _note_epoch(ch, epoch, len(states), f"restored {len(states)} ledgers, {prices} catalog records")
    return RestoreReport(epoch, False, tuple(sorted(states)), prices)


def _note_epoch(ch: Any, epoch: str, restored: int, note: str) -> None:
    from pipeline.sink import _utc

    ch.insert(
        "broker_epochs",
        [(epoch, _utc(time.time_ns() // 1_000_000), restored, note)],
        column_names=["epoch", "started_at", "restored", "note"],
    )


# --------------------------------------------------------------------------------- ledger states


def rebuild_states(ch: Any) -> dict[str, dict[str, Any]]:
    """customer -> table value (``CustomerLedger.to_dict()`` + ``x``) from ClickHouse facts."""
    snaps = {
        str(c): json.loads(s)
        for c, s in ch.query(
            "SELECT customer_id, argMax(state, version) FROM ledger_snapshots GROUP BY customer_id"
        ).result_rows
    }
    entries: dict[str, list[LedgerEntry]] = defaultdict(list)
    for r in ch.query(
        "SELECT entry_id, customer_id, seq, kind, amount, currency, toUnixTimestamp64Milli(at), "
        "grant_id, event_id, reason FROM ledger_entries FINAL ORDER BY customer_id, seq"
    ).result_rows:
        entries[str(r[1])].append(
            LedgerEntry(
                entry_id=str(r[0]),
                customer_id=str(r[1]),
                seq=int(r[2]),
                kind=str(r[3]),  # type: ignore[arg-type]
                amount_picos=parse_amount(format(r[4], "f")),
                currency=str(r[5]),
                at_ms=int(r[6]),
                grant_id=str(r[7]) or None,
                event_id=str(r[8]) or None,
                reason=str(r[9]) or None,
            )
        )
    out = {}
    for customer in sorted(set(snaps) | set(entries)):
        value = rebuild_state(customer, snaps.get(customer), entries.get(customer, []))
        CustomerLedger.from_dict(value)  # a value the agent cannot read must not be published
        out[customer] = value
    return out


def rebuild_state(customer: str, snap: Mapping[str, Any] | None, entries: list[LedgerEntry]) -> dict[str, Any]:
    """One customer's value: the snapshot's definitions, the entries' balances (see module doc)."""
    if snap is None:
        currency = entries[0].currency if entries else "usd"
        base = new_ledger(customer, currency, Policy(overage="allow")).to_dict()
        base["x"] = {"explicit_policy": False, "ver": 0}
    else:
        base = json.loads(json.dumps(snap))
    fold = fold_entries(entries)
    defs = {g["g"]["id"]: g for g in base.get("grants") or []}
    granted: dict[str, int] = defaultdict(int)
    for e in entries:
        if e.grant_id is not None and e.kind in ("grant", "top_up", "adjustment"):
            granted[e.grant_id] += e.amount_picos
        if e.grant_id is not None and e.kind in ("grant", "top_up") and e.grant_id not in defs:
            # A grant whose snapshot did not reach ClickHouse (only possible for the last record
            # before a crash): its definition from the entry, defaults for what the entry lacks.
            defs[e.grant_id] = {
                "g": {
                    "id": e.grant_id,
                    "cust": customer,
                    "amt": e.amount_picos,
                    "cur": e.currency,
                    "eff": e.at_ms,
                    "exp": None,
                    "prio": 50,
                    "cat": "paid",  # entries carry no category; a snapshot, when there is one, has it
                    "scope": None,
                },
                "granted": 0,
                "rem": 0,
                "st": "live",
            }
            log.warning(
                "restore: grant %r of %r has no stored definition; restored with priority 50, no expiry, no scope",
                e.grant_id,
                customer,
            )
    grants = []
    for gid, g in defs.items():
        g = dict(g)
        if gid in fold["grants"]:
            g["granted"], g["rem"] = granted[gid], fold["grants"][gid]
            closed = fold["closed"].get(gid)
            g["st"] = {"expiry": "expired", "void": "voided"}.get(closed or "", g.get("st", "live"))
        grants.append(g)
    base["grants"] = grants
    if snap is None and grants:
        base["policy"]["overage"] = "block"  # the agent's default once a customer has credit
    base["overage"] = fold["overage"]
    base["seq"] = max(int(base.get("seq") or 0), max((e.seq for e in entries), default=0))
    base["clock"] = max(int(base.get("clock") or 0), max((e.at_ms for e in entries), default=0))
    base["holds"] = []
    base["offsets"] = {}
    keep = int((base.get("policy") or {}).get("dn") or 10_000)
    debits: dict[bytes, int] = {}
    for e in entries:
        if e.kind == "debit" and e.event_id is not None:
            key = dedupe_digest(f"e:{e.event_id}")
            debits.pop(key, None)
            debits[key] = e.at_ms
    recent = dict(list(debits.items())[-keep:])
    base["recent"] = pack_recent(recent)
    x = dict(base.get("x") or {})
    base["x"] = {"explicit_policy": bool(x.get("explicit_policy")), "ver": int(x.get("ver") or 0)}
    return base


# --------------------------------------------------------------------------------- pricing dedupe

DEDUPE_IDS_PER_ENTRY = 1000


def restore_pricing_dedupe(bootstrap: str, topic: Callable[[str], str], ch: Any, partitions: int, since_ms: int) -> int:
    """Give the pricing agent back the event ids it priced within its dedupe window, so a gateway
    retry after the restart is a duplicate there (not only downstream, whose dedupe is bounded).

    Written straight into the ``pricing-dedupe`` table's changelog (the faust topic, created here
    with the table's partition count if missing), as entries keyed ``"<partition>:<negative n>"``:
    a first-seen position no real record has, so every re-sent event is "first seen elsewhere".
    faust's table codec is JSON for keys and values (key_type/value_type None)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    from pipeline.publish import control_producer

    rows = ch.query(
        "SELECT source_partition, customer_id, event_id, toUnixTimestamp64Milli(priced_at) "
        "FROM usage_priced WHERE priced_at >= fromUnixTimestamp64Milli({s:Int64}, 'UTC') "
        "ORDER BY source_partition, customer_id",
        parameters={"s": since_ms},
    ).result_rows
    if not rows:
        return 0
    changelog = f"{topic('')}pricing-pricing-dedupe-changelog"  # faust: "<app id>-<table>-changelog"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    if changelog not in admin.list_topics(timeout=10).topics:
        futures = admin.create_topics([NewTopic(changelog, partitions, -1, config={"cleanup.policy": "compact"})])
        for fut in futures.values():
            try:
                fut.result(15)
            except Exception as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise
    groups: dict[tuple[int, str], list[tuple[str, int]]] = defaultdict(list)
    for p, c, e, t in rows:
        groups[(int(p) % partitions, str(c))].append((str(e), int(t)))
    producer = control_producer(bootstrap)
    failures: list[str] = []
    n = 0
    for (p, c), ids in groups.items():
        ids = list(dict(ids).items())
        for i in range(0, len(ids), DEDUPE_IDS_PER_ENTRY):
            part = ids[i : i + DEDUPE_IDS_PER_ENTRY]
            n += 1
            key = json.dumps(f"{p}:{-n}").encode()
            value = json.dumps({"c": c, "ids": [e for e, _ in part], "t": max(t for _, t in part)}).encode()
            producer.produce(
                changelog,
                key=key,
                value=value,
                partition=p,
                on_delivery=lambda err, _m: failures.append(str(err)) if err else None,
            )
            # One record per batch: faust's table recovery stops at the high watermark, which the
            # dev broker reports as the last batch's base offset + 1 (shared/notes/broker.md).
            producer.flush(30)
    if producer.flush(60) or failures:
        raise RuntimeError(f"restoring the pricing dedupe failed: {failures[:3]}")
    return len(rows)


# --------------------------------------------------------------------------------- price records


#: Topics whose records are facts nothing else keeps: mirrored into ``price_records`` and given
#: back to an empty broker (those of them that ``infra/topics.yaml`` declares).
CATALOG_TOPICS = ("prices", "plans", "subscriptions")


def catalog_topics() -> list[str]:
    from meterline.stack.topics import load_topic_specs

    declared = {s.name for s in load_topic_specs()}
    return [t for t in CATALOG_TOPICS if t in declared]


def catalog_records(ch: Any) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every distinct record ever seen per catalog topic (logical name), in first-seen order."""
    out: dict[str, list[tuple[bytes, bytes]]] = defaultdict(list)
    rows = ch.query(
        "SELECT topic, key, any(value_b64), min(first_seen) AS f FROM price_records "
        "GROUP BY topic, digest, key ORDER BY f"
    ).result_rows
    for t, k, v, _f in rows:
        out[str(t)].append((str(k).encode(), base64.b64decode(v)))
    return dict(out)


class PriceMirror:
    """Copies every record of a catalog topic (``prices``, ``plans``, ``subscriptions``) into
    ClickHouse ``price_records`` (once per distinct record), so a broker that lost the topic can be
    given it back. A thread of ``up``. ``name`` is the logical topic name, ``topic`` the full one."""

    def __init__(self, bootstrap: str, topic: str, group_id: str, ch: Any, name: str = "prices") -> None:
        self.bootstrap, self.topic, self.group_id, self.ch, self.name = bootstrap, topic, group_id, ch, name
        self.mirrored = 0

    def run(self, stop: threading.Event) -> None:
        """Read the topic from its beginning (assigned, no group: a group join is slow on the dev
        broker and buys nothing here) and store what is new; re-storing a record is harmless."""
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        c = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": self.group_id,
                "enable.auto.commit": False,
                "log_level": 3,
            }
        )
        md = c.list_topics(self.topic, timeout=10).topics.get(self.topic)
        parts = sorted(md.partitions) if md is not None and md.error is None else [0]
        c.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in parts])
        seen: set[str] = set()
        try:
            while not stop.is_set():
                msgs = [m for m in c.consume(500, timeout=0.5) if m.error() is None and m.value() is not None]
                if not msgs:
                    continue
                rows = [
                    (
                        self.name,
                        hashlib.sha256((m.key() or b"") + b"\0" + m.value()).hexdigest(),
                        (m.key() or b"").decode("utf-8", "replace"),
                        base64.b64encode(m.value()).decode(),
                    )
                    for m in msgs
                ]
                rows = [r for r in rows if r[1] not in seen]
                if not rows:
                    continue
                while not stop.is_set():
                    try:
                        self.ch.insert("price_records", rows, column_names=["topic", "digest", "key", "value_b64"])
                        break
                    except Exception as exc:
                        log.warning("price mirror: insert failed (%s), retrying", exc)
                        stop.wait(1.0)
                self.mirrored += len(rows)
                seen.update(r[1] for r in rows)
        finally:
            c.close()
