"""Applying a re-rating: corrections as new events, never edits (docs/corrections.md).

Order of one correction (each step is safe to crash after; the next run resumes it):

1. **Plan** (:func:`jobs.reprice.compute.plan_reprice`): the signed delta per correction key.
   ``correction_id`` is a hash of the period, the filters and the deltas, so the same re-rating
   gets the same id. Nothing left to correct (a second apply) = no-op: nothing is written.
2. **Audit row** ``planned`` in ``reprice_runs``, with who/why/versions and the exact ledger
   commands this correction will send (so a resume sends the same ones).
3. **Correction rows** into ``usage_corrections`` in ONE insert, unless rows of that id exist; the
   rollups follow through their materialized views. -> ``stored``.
4. **Ledger commands** to ``ledger-commands`` (the credit agent stays the single writer of
   balances): an extra charge is a ``usage_correction`` (debited under grants and policy), a refund
   is ``adjust`` commands (overage first, then the grants the customer's debits came from). Each
   has a deterministic ``command_id`` / ``event_id`` / ``adjustment_id``, so re-sending after a crash
   is applied once. -> ``ledger``, then ``done``.
5. **Stripe** is not pushed from here: ``meterline stripe sync`` reads usage_priced +
   usage_corrections (jobs/stripe/sync.py) and pushes the growth as a new revision of the window.

Resume: every run whose latest audit row is not ``done`` is finished first: with its correction
rows stored -> its ledger commands are (re)sent; without -> it is ``abandoned`` (the current plan
recomputes it, under the same id when nothing else changed).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from jobs.reprice.compute import Filters, KeyDelta, Plan
from meterline.money import format_picos

__all__ = ["ApplyResult", "apply_plan", "correction_id", "ledger_commands", "resume"]

Send = Callable[[dict[str, Any]], None]

_CORR_COLUMNS = ["correction_id", "occurred_at", "customer_id", "provider", "model", "model_version", "project",
                 "feature", "currency", "cost", "charge", "price_version", "rate_card", "created_at"]  # fmt: skip
_RUN_COLUMNS = ["correction_id", "ran_by", "reason", "command", "period_start", "period_end", "customer_filter",
                "model_filter", "versions_before", "versions_after", "cards_before", "cards_after", "customers",
                "old_charge", "new_charge", "delta", "ledger_commands", "status", "ver", "created_at"]  # fmt: skip


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


def correction_id(filters: Filters, deltas: list[KeyDelta]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([filters.start, filters.end, filters.customer, filters.provider, filters.model]).encode())
    for d in deltas:
        h.update(json.dumps([d.customer_id, d.hour.isoformat(), d.provider, d.model, d.model_version, d.project,
                             d.feature, d.currency, str(d.cost), str(d.charge)]).encode())  # fmt: skip
    return "rp-" + h.hexdigest()[:24]


def _picos(d: Decimal) -> int:
    p = d.scaleb(12)
    assert p == p.to_integral_value(), d
    return int(p)


def ledger_commands(ch: Any, cid: str, deltas: list[KeyDelta], *, at_ms: int, reason: str) -> list[dict[str, Any]]:
    """The ledger-commands messages of a correction (deterministic ids; see the module docstring).

    Extra charge per customer × provider × model × project × currency: a ``usage_correction``
    debited like usage. Refund per customer × currency: ``adjust`` on the overage first (what the
    customer still owes), then credit back to the grants its debits came from, latest first, each
    capped at what was debited from it net of earlier refunds (read from ``ledger_entries``: history,
    not balances)."""
    up: dict[tuple[str, str, str, str, str], int] = {}
    down: dict[tuple[str, str], int] = {}
    for d in deltas:
        p = _picos(d.charge)
        if p > 0:
            k = (d.customer_id, d.currency, d.provider, d.model, d.project)
            up[k] = up.get(k, 0) + p
        elif p < 0:
            down[(d.customer_id, d.currency)] = down.get((d.customer_id, d.currency), 0) - p
    out: list[dict[str, Any]] = []
    for (cust, cur, provider, model, project), p in sorted(up.items()):
        eid = f"reprice:{cid}:{cust}:{provider}/{model}:{project}"
        out.append({"type": "usage_correction", "command_id": eid, "customer_id": cust, "at_ms": at_ms,
                    "event_id": eid, "amount": format_picos(p), "currency": cur, "provider": provider,
                    "model": model, "project": project or None})  # fmt: skip
    for (cust, cur), need in sorted(down.items()):
        for grant, amount in _refund_split(ch, cust, cur, need):
            aid = f"reprice:{cid}:{cust}:{grant or 'overage'}"
            out.append({"type": "adjust", "command_id": aid, "customer_id": cust, "at_ms": at_ms,
                        "adjustment_id": aid, "amount": format_picos(amount), "grant_id": grant or None,
                        "reason": f"reprice {cid}: {reason}"[:500]})  # fmt: skip
    return out


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


def _run_row(cid: str, plan: Plan, *, ran_by: str, reason: str, command: str, commands: list[dict[str, Any]],
             status: str, ver: int, now: datetime) -> list[Any]:  # fmt: skip
    customers = plan.customers()
    vb, va, cb, ca = plan.versions()
    old = sum((c["old_charge"] for c in customers), Decimal(0))
    new = sum((c["new_charge"] for c in customers), Decimal(0))
    f = plan.filters
    model = f"{f.provider}/{f.model}" if f.provider else (f.model or "")
    return [cid, ran_by, reason, command, datetime.fromtimestamp(f.start, timezone.utc),
            datetime.fromtimestamp(f.end, timezone.utc), f.customer or "", model, vb, va, cb, ca, len(customers),
            old, new, new - old, json.dumps(commands, ensure_ascii=False), status, ver, now]  # fmt: skip


def _set_status(ch: Any, cid: str, status: str) -> None:
    """A new audit row for ``cid`` with ``status`` (copy of its latest row, higher ``ver``)."""
    cols = ", ".join(c if c not in ("status", "ver") else ({"status": "{s:String} AS status",
                                                            "ver": "ver + 1 AS ver"}[c]) for c in _RUN_COLUMNS)  # fmt: skip
    ch.command(f"INSERT INTO reprice_runs ({', '.join(_RUN_COLUMNS)}) SELECT {cols} FROM reprice_runs FINAL "
               "WHERE correction_id = {c:String}", parameters={"c": cid, "s": status})  # fmt: skip


def _stored(ch: Any, cid: str) -> int:
    return int(ch.query("SELECT count() FROM usage_corrections WHERE correction_id = {c:String}",
                        parameters={"c": cid}).result_rows[0][0])  # fmt: skip


def _send_all(ch: Any, cid: str, commands: list[dict[str, Any]], send: Send | None,
              on_step: Callable[[str], None] | None) -> int:  # fmt: skip
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


def resume(ch: Any, send: Send | None, *, keep: str = "", on_step: Callable[[str], None] | None = None,
           result: ApplyResult | None = None) -> ApplyResult:  # fmt: skip
    """Finish every unfinished run (see the module docstring); ``keep`` = the id being applied now."""
    result = result or ApplyResult()
    rows = ch.query("SELECT correction_id, status, ledger_commands FROM reprice_runs FINAL "
                    "WHERE status NOT IN ('done', 'abandoned') ORDER BY created_at, correction_id").result_rows  # fmt: skip
    for cid, status, commands in rows:
        if cid == keep:
            continue
        if _stored(ch, cid) == 0:
            _set_status(ch, cid, "abandoned")
            result.abandoned.append(str(cid))
            continue
        if status == "planned":
            _set_status(ch, cid, "stored")
        result.commands += _send_all(ch, str(cid), json.loads(commands), send, on_step)
        result.resumed.append(str(cid))
    return result


def apply_plan(ch: Any, plan: Plan, *, ran_by: str, reason: str, command: str, send: Send | None, at_ms: int,
               on_step: Callable[[str], None] | None = None) -> ApplyResult:  # fmt: skip
    """Apply ``plan`` (built ``with_deltas``) after finishing any interrupted run."""
    cid = correction_id(plan.filters, plan.deltas) if plan.deltas else ""
    result = resume(ch, send, keep=cid, on_step=on_step)
    if not plan.deltas:
        return result
    now = datetime.fromtimestamp(at_ms / 1000, timezone.utc)
    existing = ch.query("SELECT status, ledger_commands, ver FROM reprice_runs FINAL WHERE correction_id = {c:String}",
                        parameters={"c": cid}).result_rows  # fmt: skip
    if existing and existing[0][0] != "abandoned":
        commands = json.loads(existing[0][1])
    else:
        commands = ledger_commands(ch, cid, plan.deltas, at_ms=at_ms, reason=reason)
        ch.insert("reprice_runs", [_run_row(cid, plan, ran_by=ran_by, reason=reason, command=command,
                                            commands=commands, status="planned",
                                            ver=int(existing[0][2]) + 1 if existing else 1, now=now)],
                  column_names=_RUN_COLUMNS)  # fmt: skip
    if on_step is not None:
        on_step("planned")
    if _stored(ch, cid) == 0:
        rows = [[cid, d.hour.replace(tzinfo=timezone.utc), d.customer_id, d.provider, d.model, d.model_version,
                 d.project, d.feature, d.currency, d.cost, d.charge, d.price_versions, d.rate_cards, now]
                for d in plan.deltas]  # fmt: skip
        ch.insert("usage_corrections", rows, column_names=_CORR_COLUMNS)
        result.rows = len(rows)
    _set_status(ch, cid, "stored")
    if on_step is not None:
        on_step("stored")
    result.commands += _send_all(ch, cid, commands, send, on_step)
    result.correction_id = cid
    return result

