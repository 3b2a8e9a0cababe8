"""``CustomerLedger``: the whole per-customer state as ONE value (balances, holds, budgets, guards
and the record of what has been applied), with a compact JSON-able ``to_dict`` / ``from_dict``.

Treat it as immutable: ``apply`` works on a ``clone()`` and never mutates its input. Balances in it
are the running fold of the ledger entries it emitted (see ``fold_entries``), never edited beside them.
"""

from __future__ import annotations

import base64
import hashlib
import sys
from array import array
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from meterline.core.ledger._money import LedgerCommandError
from meterline.core.ledger._types import (
    Budget,
    BudgetState,
    CreditGrant,
    GrantScope,
    GrantState,
    Hold,
    Policy,
    VelocityRule,
)

FORMAT_VERSION = 1
DIGEST_BYTES = 12  # 96-bit digests: P(any collision among 10,000 ids) ≈ 6·10⁻²²


def dedupe_digest(key: str) -> bytes:
    """The fixed-size form a dedupe id is remembered by (12 bytes, whatever the id's length: the
    dedupe set must not grow with the ids' size, since a table value has to fit in one Kafka
    message). Deterministic, so a replay finds the same digest."""
    return hashlib.blake2b(key.encode("utf-8"), digest_size=DIGEST_BYTES).digest()


def pack_recent(ids: Mapping[bytes, int]) -> str:
    """``{digest: t}`` (insertion order kept) as one base64 string: every digest, then every time
    as a little-endian int64 (20 bytes per id, ~27 in the JSON value)."""
    times = array("q", ids.values())
    if sys.byteorder != "little":
        times.byteswap()
    return base64.b64encode(b"".join(ids) + times.tobytes()).decode()


def unpack_recent(packed: str | list[list[Any]]) -> dict[bytes, int]:
    """Inverse of :func:`pack_recent`; also reads the older list form ``[[key, t], ...]`` (the
    keys are digested as they are read)."""
    if isinstance(packed, list):
        return {dedupe_digest(str(k)): int(t) for k, t in packed}
    raw = base64.b64decode(packed)
    n = len(raw) // (DIGEST_BYTES + 8)
    cut = n * DIGEST_BYTES
    times = array("q")
    times.frombytes(raw[cut:])
    if sys.byteorder != "little":
        times.byteswap()
    return dict(zip((raw[i : i + DIGEST_BYTES] for i in range(0, cut, DIGEST_BYTES)), times))


@dataclass(slots=True)
class CustomerLedger:
    customer_id: str
    currency: str
    policy: Policy = field(default_factory=Policy)
    seq: int = 0  # ledger entries written so far (entry ids are {customer}:{seq})
    clock_ms: int = 0  # max time seen in any command: the ledger's own notion of "now"
    overage_picos: int = 0  # usage no grant covered (billed in arrears), minus overage adjustments
    grants: dict[str, GrantState] = field(default_factory=dict)
    holds: dict[str, Hold] = field(default_factory=dict)  # by request_id
    budgets: dict[str, BudgetState] = field(default_factory=dict)
    blocks: dict[str, dict[str, int]] = field(default_factory=dict)  # scope -> reason -> since_ms
    alert_tracks: dict[str, tuple[int, bool]] = field(default_factory=dict)  # key -> (crossings, active)
    velocity: dict[str, dict[int, int]] = field(default_factory=dict)  # key -> bucket index -> picos
    applied_offsets: dict[str, int] = field(default_factory=dict)  # "topic:partition" -> highest offset
    recent_ids: dict[bytes, int] = field(default_factory=dict)  # dedupe_digest(key) -> clock_ms when applied (ordered)
    plan_governs: bool = False  # a subscription plan is in force: its on_exhausted replaces the prepaid policy
    plan_block: str | None = None  # the plan's block reason now (SetPlanGate), folded into ``blocks``

    def clone(self) -> CustomerLedger:
        """A copy safe to mutate (inner records are frozen; containers are copied)."""
        return replace(
            self,
            grants=dict(self.grants),
            holds=dict(self.holds),
            budgets=dict(self.budgets),
            blocks={k: dict(v) for k, v in self.blocks.items()},
            alert_tracks=dict(self.alert_tracks),
            velocity={k: dict(v) for k, v in self.velocity.items()},
            applied_offsets=dict(self.applied_offsets),
            recent_ids=dict(self.recent_ids),
        )

    # ------------------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        """A compact dict of str/int/bool/None/list/dict only (``json.dumps``-able, order-stable)."""
        d = {
            "v": FORMAT_VERSION,
            "customer": self.customer_id,
            "currency": self.currency,
            "policy": _policy_to(self.policy),
            "seq": self.seq,
            "clock": self.clock_ms,
            "overage": self.overage_picos,
            "grants": [_grant_state_to(g) for g in self.grants.values()],
            "holds": [_hold_to(h) for h in self.holds.values()],
            "budgets": [_budget_state_to(b) for b in self.budgets.values()],
            "blocks": {s: dict(r) for s, r in self.blocks.items()},
            "alerts": {k: [n, a] for k, (n, a) in self.alert_tracks.items()},
            "vel": {k: [[b, p] for b, p in v.items()] for k, v in self.velocity.items()},
            "offsets": dict(self.applied_offsets),
            "recent": pack_recent(self.recent_ids),
        }
        if self.plan_governs or self.plan_block is not None:  # absent for customers without a plan
            d["plan_gate"] = [self.plan_governs, self.plan_block]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CustomerLedger:
        if d.get("v") != FORMAT_VERSION:
            raise LedgerCommandError(f"unknown ledger state format {d.get('v')!r}", reason_code="bad_state")
        grants = [_grant_state_from(g) for g in d["grants"]]
        holds = [_hold_from(h) for h in d["holds"]]
        budgets = [_budget_state_from(b) for b in d["budgets"]]
        return cls(
            customer_id=d["customer"],
            currency=d["currency"],
            policy=_policy_from(d["policy"]),
            seq=d["seq"],
            clock_ms=d["clock"],
            overage_picos=d["overage"],
            grants={g.grant.grant_id: g for g in grants},
            holds={h.request_id: h for h in holds},
            budgets={b.budget.budget_id: b for b in budgets},
            blocks={s: {r: int(t) for r, t in rs.items()} for s, rs in d["blocks"].items()},
            alert_tracks={k: (int(v[0]), bool(v[1])) for k, v in d["alerts"].items()},
            velocity={k: {int(b): int(p) for b, p in v} for k, v in d["vel"].items()},
            applied_offsets={k: int(v) for k, v in d["offsets"].items()},
            recent_ids=unpack_recent(d["recent"]),
            plan_governs=bool((d.get("plan_gate") or [False, None])[0]),
            plan_block=(d.get("plan_gate") or [False, None])[1],
        )


def new_ledger(customer_id: str, currency: str, policy: Policy | None = None) -> CustomerLedger:
    """The empty state of a customer (the faust table's default for an unknown key)."""
    return CustomerLedger(customer_id=customer_id, currency=currency.lower(), policy=policy or Policy())


# ------------------------------------------------------------------------------------ record codecs


def _opt_set(s: frozenset[str] | None) -> list[str] | None:
    return None if s is None else sorted(s)


def _set_opt(v: list[str] | None) -> frozenset[str] | None:
    return None if v is None else frozenset(v)


def _grant_to(g: CreditGrant) -> dict[str, Any]:
    sc = g.scope
    return {
        "id": g.grant_id,
        "cust": g.customer_id,
        "amt": g.amount_picos,
        "cur": g.currency,
        "eff": g.effective_at_ms,
        "exp": g.expires_at_ms,
        "prio": g.priority,
        "cat": g.category,
        "scope": None if sc is None else [_opt_set(sc.providers), _opt_set(sc.models), _opt_set(sc.projects)],
    }


def _grant_from(d: dict[str, Any]) -> CreditGrant:
    sc = d["scope"]
    return CreditGrant(
        grant_id=d["id"],
        customer_id=d["cust"],
        amount_picos=d["amt"],
        currency=d["cur"],
        effective_at_ms=d["eff"],
        expires_at_ms=d["exp"],
        priority=d["prio"],
        category=d["cat"],
        scope=None if sc is None else GrantScope(_set_opt(sc[0]), _set_opt(sc[1]), _set_opt(sc[2])),
    )


def _grant_state_to(g: GrantState) -> dict[str, Any]:
    return {"g": _grant_to(g.grant), "granted": g.granted, "rem": g.remaining, "st": g.state}


def _grant_state_from(d: dict[str, Any]) -> GrantState:
    return GrantState(grant=_grant_from(d["g"]), granted=d["granted"], remaining=d["rem"], state=d["st"])


def _hold_to(h: Hold) -> dict[str, Any]:
    return {
        "rid": h.request_id,
        "amt": h.amount_picos,
        "alloc": [list(a) for a in h.allocations],
        "ovg": h.overage_picos,
        "c": h.created_ms,
        "x": h.expires_ms,
        "prj": h.project,
        "key": h.api_key_id,
    }


def _hold_from(d: dict[str, Any]) -> Hold:
    return Hold(
        request_id=d["rid"],
        amount_picos=d["amt"],
        allocations=tuple((g, int(p)) for g, p in d["alloc"]),
        overage_picos=d["ovg"],
        created_ms=d["c"],
        expires_ms=d["x"],
        project=d["prj"],
        api_key_id=d["key"],
    )


def _rule_to(r: VelocityRule | None) -> list[Any] | None:
    if r is None:
        return None
    return [r.window_ms, r.bucket_ms, r.baseline_ms, r.abs_cap_picos, r.baseline_multiple, r.min_picos, r.block]


def _rule_from(v: list[Any] | None) -> VelocityRule | None:
    return None if v is None else VelocityRule(*v)


def _policy_to(p: Policy) -> dict[str, Any]:
    return {
        "overage": p.overage,
        "limit": p.credit_limit_picos,
        "used": list(p.used_alert_pcts),
        "low": list(p.low_balance_picos),
        "ttl": p.hold_ttl_ms,
        "rc": _rule_to(p.runaway_customer),
        "rk": _rule_to(p.runaway_api_key),
        "dw": p.dedupe_window_ms,
        "dn": p.dedupe_max_ids,
    }


def _policy_from(d: dict[str, Any]) -> Policy:
    return Policy(
        overage=d["overage"],
        credit_limit_picos=d["limit"],
        used_alert_pcts=tuple(d["used"]),
        low_balance_picos=tuple(d["low"]),
        hold_ttl_ms=d["ttl"],
        runaway_customer=_rule_from(d["rc"]),
        runaway_api_key=_rule_from(d["rk"]),
        dedupe_window_ms=d["dw"],
        dedupe_max_ids=d["dn"],
    )


def _budget_state_to(b: BudgetState) -> dict[str, Any]:
    bd = b.budget
    return {
        "id": bd.budget_id,
        "scope": bd.scope,
        "sv": bd.scope_value,
        "per": bd.period,
        "lim": bd.limit_picos,
        "hard": bd.hard,
        "pcts": list(bd.alert_pcts),
        "spent": [list(x) for x in b.spent],
        "fired": [list(x) for x in b.fired],
    }


def _budget_state_from(d: dict[str, Any]) -> BudgetState:
    bd = Budget(
        budget_id=d["id"],
        scope=d["scope"],
        scope_value=d["sv"],
        period=d["per"],
        limit_picos=d["lim"],
        hard=d["hard"],
        alert_pcts=tuple(d["pcts"]),
    )
    return BudgetState(
        budget=bd, spent=tuple((k, int(v)) for k, v in d["spent"]), fired=tuple((k, int(p)) for k, p in d["fired"])
    )
