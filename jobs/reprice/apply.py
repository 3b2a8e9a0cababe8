"""Applying a re-rating: corrections as new events, never edits (docs/corrections.md).

Order of one correction (each step is safe to crash after; the next run resumes it):

1. **Resume** every earlier run whose latest audit row is not ``done`` (below).
2. **Deltas** (:meth:`jobs.reprice.compute.Repricing.delta_summary`): how many correction keys
   change and a fingerprint of their values. None = no-op (a second apply): nothing is written.
   ``correction_id`` hashes the period, the filters and that summary: the same re-rating gets the
   same id.
3. **Audit row** ``planned`` in ``reprice_runs`` (who, why, the command line, versions and cards
   before/after, the totals).
4. **Correction rows** into ``usage_corrections`` by one ``INSERT … SELECT`` computed by
   ClickHouse; the rollups follow through their materialized views.
5. **Ledger commands**, computed from the rows STORED under the id (so a cut-short insert sends
   what it wrote; the next plan corrects the rest under a new id), kept in the audit row
   (``stored``) and sent to ``ledger-commands``: the credit agent stays the single writer of
   balances. An extra charge is a ``usage_correction`` (debited under grants and policy), a refund
   is ``adjust`` commands (overage first, then the grants the debits came from); a plan period is
   one ``plan_correction`` (its ledger amount, its share of the refund split, and the change of
   each segment's consumption, recorded with the ``planned`` row, so the live plan gate follows). Deterministic
   ``command_id`` / ``event_id`` / ``adjustment_id``: a re-send is applied once. -> ``ledger``,
   ``done``.
6. **Stripe** is not pushed from here: ``meterline stripe sync`` reads usage_priced +
   usage_corrections (jobs/stripe/sync.py) and pushes a grown window as a new revision.

Resume of a run not ``done``: ``planned`` with rows stored -> its commands are computed from them
and sent; ``planned`` without rows -> ``abandoned`` (the current plan redoes it, under the same id
when nothing else changed); ``stored`` / ``ledger`` -> its recorded commands are (re)sent.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from jobs.reprice.compute import Filters, Plan, Repricing
from meterline.core.money import format_picos
from schemas.credits import plan_correction_message

__all__ = ["ApplyResult", "apply_plan", "correction_id", "ledger_commands", "resume"]

Send = Callable[[dict[str, Any]], None]

_RUN_COLUMNS = [
    "correction_id",
    "ran_by",
    "reason",
    "command",
    "period_start",
    "period_end",
    "customer_filter",
    "model_filter",
    "versions_before",
    "versions_after",
    "cards_before",
    "cards_after",
    "customers",
    "old_charge",
    "new_charge",
    "delta",
    "ledger_commands",
    "status",
    "ver",
    "created_at",
]


@dataclass
class ApplyResult:
    correction_id: str = ""
    rows: int = 0
    commands: int = 0
    resumed: list[str] = field(default_factory=list)
    abandoned: list[str] = field(default_factory=list)

    @property
    def noop(self) -> bool:
        return not self.correction_id and not self.resumed


def correction_id(filters: Filters, rows: int, fingerprint: int) -> str:
    """Deterministic: the period, the filters and the deltas (their count and fingerprint)."""
    h = hashlib.sha256(
        json.dumps(
            [filters.start, filters.end, filters.customer, filters.provider, filters.model, rows, fingerprint]
        ).encode()
    )
    return "rp-" + h.hexdigest()[:24]


def _picos(d: Decimal) -> int:
    p = d.scaleb(12)
    assert p == p.to_integral_value(), d
    return int(p)


def ledger_commands(ch: Any, cid: str, *, at_ms: int, reason: str) -> list[dict[str, Any]]:
    """The ledger-commands messages of the correction rows STORED under ``cid`` (so a correction
    whose insert was cut short sends exactly what it wrote; deterministic ids).

    Extra charge per customer × currency × provider × model × project: a ``usage_correction``
    debited like usage (grants in debit order, then overage under the policy). Refund per customer ×
    currency: ``adjust`` on the overage first (what the customer still owes), then credit back to
    the grants its debits came from, latest first, each capped at what was debited from it net of
    earlier reprice refunds (read from ``ledger_entries``: history, not balances)."""
    groups = ch.query(
        "SELECT customer_id, lower(currency), provider, model, project, sum(charge) FROM usage_corrections FINAL "
        "WHERE correction_id = {c:String} AND kind = 'usage' GROUP BY customer_id, currency, provider, model, project "
        "ORDER BY customer_id, currency, provider, model, project",
        parameters={"c": cid},
    ).result_rows
    up: dict[tuple[str, str, str, str, str], int] = {}
    down: dict[tuple[str, str], int] = {}
    for cust, cur, provider, model, project, charge in groups:
        p = _picos(Decimal(charge))
        if p > 0:
            up[(str(cust), str(cur), str(provider), str(model), str(project))] = p
        elif p < 0:
            down[(str(cust), str(cur))] = down.get((str(cust), str(cur)), 0) - p
    # Plan periods (kind 'plan', jobs/reprice/plans.py): one ``plan_correction`` per customer ×
    # period carrying the period's ledger amount (the overage part of the bill, ledger_charge) and
    # what it changes in each segment (recorded in the audit row at ``planned``), so the live plan
    # gate follows. A raise is debited like usage (provider 'plan': only unscoped grants pay it);
    # a cut carries its share of the customer's refund split (below).
    segments = _planned_segments(ch, cid)
    plan_rows: list[tuple[str, str, int, str, int]] = []
    plan_down: dict[tuple[str, str], list[int]] = {}
    for cust, cur, start, versions, ledger in ch.query(
        "SELECT customer_id, lower(currency), toUnixTimestamp(occurred_at), price_version, sum(ledger_charge) "
        "FROM usage_corrections FINAL WHERE correction_id = {c:String} AND kind = 'plan' "
        "GROUP BY customer_id, currency, occurred_at, price_version ORDER BY customer_id, occurred_at",
        parameters={"c": cid},
    ).result_rows:
        p = _picos(Decimal(ledger))
        if p or segments.get((str(cust), int(start))):
            plan_rows.append((str(cust), str(cur), int(start), str(versions), p))
        if p < 0:
            plan_down.setdefault((str(cust), str(cur)), []).append(-p)
    # Refunds: the plan cuts and the usage refund of a customer × currency are split TOGETHER, as
    # one need (overage first, then grants), exactly as before plan corrections had their own
    # command; the plan periods take the first parts (in period order), the usage adjusts the rest.
    plan_refunds: dict[tuple[str, str], list[list[tuple[str, int]]]] = {}
    usage_refunds: dict[tuple[str, str], list[tuple[str, int]]] = {}
    for cc in sorted(set(down) | set(plan_down)):
        needs = plan_down.get(cc, [])
        split = _refund_split(ch, cc[0], cc[1], down.get(cc, 0) + sum(needs))
        parts = _allocate(split, needs)
        plan_refunds[cc], usage_refunds[cc] = parts[:-1], parts[-1]
    full = f"reprice {cid}: {reason}"[:500]
    plan_cmds: list[dict[str, Any]] = []
    for cust, cur, start, versions, p in plan_rows:
        msg = plan_correction_message(
            event_id=f"reprice:{cid}:{cust}:plan@{start}",
            customer_id=cust,
            at_ms=at_ms,
            currency=cur,
            period_start=start,
            plans=versions,
            amount_picos=p,
            refunds=[(g or None, a) for g, a in plan_refunds[(cust, cur)].pop(0)] if p < 0 else [],
            reason=full,
            segments=[],
        )
        msg["segments"] = segments.get((cust, start), [])
        plan_cmds.append(msg)
    out: list[dict[str, Any]] = [m for m in plan_cmds if not m["refunds"]]
    for (cust, cur, provider, model, project), p in sorted(up.items()):
        eid = f"reprice:{cid}:{cust}:{provider}/{model}:{project}"
        out.append(
            {
                "type": "usage_correction",
                "command_id": eid,
                "customer_id": cust,
                "at_ms": at_ms,
                "event_id": eid,
                "amount": format_picos(p),
                "currency": cur,
                "provider": provider,
                "model": model,
                "project": project or None,
            }
        )
    out.extend(m for m in plan_cmds if m["refunds"])  # after the debits, where the refunds always were
    for (cust, _cur), parts in sorted(usage_refunds.items()):
        for grant, amount in parts:
            aid = f"reprice:{cid}:{cust}:{grant or 'overage'}"
            out.append(
                {
                    "type": "adjust",
                    "command_id": aid,
                    "customer_id": cust,
                    "at_ms": at_ms,
                    "adjustment_id": aid,
                    "amount": format_picos(amount),
                    "grant_id": grant or None,
                    "reason": full,
                }
            )
    return out


def _allocate(split: list[tuple[str, int]], needs: list[int]) -> list[list[tuple[str, int]]]:
    """``split`` (ordered parts of one refund) cut into one list per need, in order, then the rest
    (parts merged per grant, in split order)."""
    left = list(split)
    out: list[list[tuple[str, int]]] = []
    for need in needs:
        mine: dict[str, int] = {}
        while need and left:
            g, a = left[0]
            take = min(a, need)
            mine[g] = mine.get(g, 0) + take
            need -= take
            left[0] = (g, a - take)
            if left[0][1] == 0:
                left.pop(0)
        out.append(list(mine.items()))
    rest: dict[str, int] = {}
    for g, a in left:
        rest[g] = rest.get(g, 0) + a
    out.append(list(rest.items()))
    return out


def _planned_segments(ch: Any, cid: str) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """The segment changes recorded with ``cid``'s ``planned`` audit row, per customer × period."""
    rows = ch.query(
        "SELECT ledger_commands FROM reprice_runs FINAL WHERE correction_id = {c:String}", parameters={"c": cid}
    ).result_rows
    out: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for (commands,) in rows:
        for cmd in json.loads(commands or "[]"):
            if cmd.get("type") == "plan_correction" and cmd.get("segments"):
                out[(str(cmd["customer_id"]), int(cmd["period_start"]))] = list(cmd["segments"])
    return out


def planned_plan_corrections(rp: Repricing, cid: str, *, at_ms: int, reason: str) -> list[dict[str, Any]]:
    """The ``plan_correction`` commands as planned (before the insert, without the refund split):
    recorded in the ``planned`` audit row so the segment changes survive a crash; the commands
    sent are built from the stored rows with these segments (:func:`ledger_commands`)."""
    return [
        plan_correction_message(
            event_id=f"reprice:{cid}:{b.customer_id}:plan@{b.start}",
            customer_id=b.customer_id,
            at_ms=at_ms,
            currency=b.currency,
            period_start=b.start,
            plans=",".join(b.plans),
            amount_picos=b.ledger_delta,
            refunds=[],
            reason=f"reprice {cid}: {reason}"[:500],
            segments=list(b.segments),
        )
        for b in rp.plan_rows()
    ]


def _refund_split(ch: Any, customer: str, currency: str, need: int) -> list[tuple[str, int]]:
    rows = ch.query(
        "SELECT grant_id, sumIf(amount, kind = 'debit') - sumIf(amount, kind = 'adjustment' AND startsWith(reason, "
        "'reprice ')) AS refundable, max(seq) AS last FROM ledger_entries FINAL WHERE customer_id = {c:String} "
        "AND lower(currency) = {cur:String} GROUP BY grant_id ORDER BY grant_id != '', last DESC, grant_id",
        parameters={"c": customer, "cur": currency.lower()},
    ).result_rows
    out: list[tuple[str, int]] = []
    for grant, refundable, _ in rows:
        take = min(need, max(0, _picos(Decimal(refundable))))
        if take:
            out.append((str(grant), take))
            need -= take
        if not need:
            break
    if need:  # never debited (no ledger history, e.g. credits not in use): settle it against the overage
        out.append(("", need))
        merged: dict[str, int] = {}
        for g, a in out:
            merged[g] = merged.get(g, 0) + a
        out = list(merged.items())
    return out


def _run_row(
    cid: str,
    plan: Plan,
    *,
    ran_by: str,
    reason: str,
    command: str,
    commands: list[dict[str, Any]],
    status: str,
    ver: int,
    now: datetime,
) -> list[Any]:
    customers = plan.customers()
    vb, va, cb, ca = plan.versions()
    old = sum((c["old_charge"] for c in customers), Decimal(0))
    new = sum((c["new_charge"] for c in customers), Decimal(0))
    f = plan.filters
    model = f"{f.provider}/{f.model}" if f.provider else (f.model or "")
    return [
        cid,
        ran_by,
        reason,
        command,
        datetime.fromtimestamp(f.start, UTC),
        datetime.fromtimestamp(f.end, UTC),
        f.customer or "",
        model,
        vb,
        va,
        cb,
        ca,
        len(customers),
        old,
        new,
        new - old,
        json.dumps(commands, ensure_ascii=False),
        status,
        ver,
        now,
    ]


def _set_status(ch: Any, cid: str, status: str, commands: list[dict[str, Any]] | None = None) -> None:
    """A new audit row for ``cid`` with ``status`` (copy of its latest row, higher ``ver``)."""
    swap = {"status": "{s:String} AS status", "ver": "ver + 1 AS ver"}
    params: dict[str, Any] = {"c": cid, "s": status}
    if commands is not None:
        swap["ledger_commands"] = "{lc:String} AS ledger_commands"
        params["lc"] = json.dumps(commands, ensure_ascii=False)
    cols = ", ".join(swap.get(c, c) for c in _RUN_COLUMNS)
    ch.command(
        f"INSERT INTO reprice_runs ({', '.join(_RUN_COLUMNS)}) SELECT {cols} FROM reprice_runs FINAL "
        "WHERE correction_id = {c:String}",
        parameters=params,
    )


def _stored(ch: Any, cid: str) -> int:
    return int(
        ch.query(
            "SELECT count() FROM usage_corrections WHERE correction_id = {c:String}", parameters={"c": cid}
        ).result_rows[0][0]
    )


def _send_all(
    ch: Any, cid: str, commands: list[dict[str, Any]], send: Send | None, on_step: Callable[[str], None] | None
) -> int:
    if send is None and commands:
        raise RuntimeError(f"correction {cid} needs {len(commands)} ledger command(s) but no broker is configured")
    for cmd in commands:
        assert send is not None
        send(cmd)
        if on_step is not None:
            on_step("command")
    _set_status(ch, cid, "ledger")
    _set_status(ch, cid, "done")
    return len(commands)


def resume(
    ch: Any,
    send: Send | None,
    *,
    at_ms: int,
    on_step: Callable[[str], None] | None = None,
    result: ApplyResult | None = None,
) -> ApplyResult:
    """Finish every unfinished run (see the module docstring)."""
    result = result or ApplyResult()
    rows = ch.query(
        "SELECT correction_id, status, ledger_commands, reason FROM reprice_runs FINAL "
        "WHERE status NOT IN ('done', 'abandoned') ORDER BY created_at, correction_id"
    ).result_rows
    for cid, status, commands, reason in rows:
        if _stored(ch, cid) == 0:
            _set_status(ch, cid, "abandoned")
            result.abandoned.append(str(cid))
            continue
        if status == "planned":  # cut short at or after the insert: send what was written
            cmds = ledger_commands(ch, str(cid), at_ms=at_ms, reason=str(reason))
            _set_status(ch, str(cid), "stored", cmds)
        else:
            cmds = json.loads(commands)
        result.commands += _send_all(ch, str(cid), cmds, send, on_step)
        result.resumed.append(str(cid))
    return result


def apply_plan(
    ch: Any,
    rp: Repricing,
    *,
    ran_by: str,
    reason: str,
    command: str,
    send: Send | None,
    at_ms: int,
    on_step: Callable[[str], None] | None = None,
) -> ApplyResult:
    """Apply the re-rating ``rp`` (inside :func:`jobs.reprice.compute.open_reprice`) after finishing any
    interrupted run; its report must have been computed (``rp.report()``)."""
    result = resume(ch, send, at_ms=at_ms, on_step=on_step)
    n, fingerprint = rp.delta_summary()
    if n == 0:
        return result
    plan = rp.plan
    cid = correction_id(plan.filters, n, fingerprint)
    now = datetime.fromtimestamp(at_ms / 1000, UTC)
    existing = ch.query(
        "SELECT ver FROM reprice_runs FINAL WHERE correction_id = {c:String}", parameters={"c": cid}
    ).result_rows
    ch.insert(
        "reprice_runs",
        [
            _run_row(
                cid,
                plan,
                ran_by=ran_by,
                reason=reason,
                command=command,
                commands=planned_plan_corrections(rp, cid, at_ms=at_ms, reason=reason),
                status="planned",
                ver=int(existing[0][0]) + 1 if existing else 1,
                now=now,
            )
        ],
        column_names=_RUN_COLUMNS,
    )
    if on_step is not None:
        on_step("planned")
    rp.insert_corrections(cid, now)
    result.rows = _stored(ch, cid)
    if on_step is not None:
        on_step("inserted")
    commands = ledger_commands(ch, cid, at_ms=at_ms, reason=reason)
    _set_status(ch, cid, "stored", commands)
    if on_step is not None:
        on_step("stored")
    result.commands += _send_all(ch, cid, commands, send, on_step)
    result.correction_id = cid
    return result
