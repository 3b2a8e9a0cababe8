"""The contract of the credits topics: their JSON messages to and from ``meterline.core.ledger`` values.

This module is the one codec of ``ledger-commands``, ``ledger-entries``, ``customer-status``,
``alerts`` and ``ledger-replies``: every producer and consumer of those topics goes through it.

Inbound (``ledger-commands``): :func:`decode_command` turns one record value into a
:class:`LedgerRequest` — the ledger ``Command`` it stands for (or, for ``authorize``, an
:class:`AuthorizeRequest` the agent prices first) plus the envelope (command_id, customer_id,
at_ms, currency). :func:`command_message` / :func:`authorize_message` build the same dicts from
ledger values for producers; :func:`encode_message` serialises any message (UTF-8 JSON, decimal
amounts as strings, never floats).

Outbound (produced by the credit agent): :func:`entry_message` (``ledger-entries``),
:func:`status_message` (``customer-status``), :func:`alert_message` (``alerts``),
:func:`reply_message` (``ledger-replies``) and their decoders where a consumer needs typed values
(:func:`entry_from_message`, :func:`decode_json`).

Errors: a value that is not a JSON object, or an unknown ``type``, raises
:class:`meterline.core.errors.InvalidEvent` (``reason_code="invalid_ledger_message"``); a well-formed
message whose values break the ledger's rules raises :class:`meterline.core.ledger.LedgerCommandError`
(missing/ill-typed fields, bad amounts, float money). Both are ``InputError``: dead-letter, never retry.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meterline.core.errors import InvalidEvent
from meterline.core.ids import CUSTOMER_ID_RULE, is_customer_id
from meterline.core.ledger import (
    Adjust,
    Alert,
    ApplyPricedUsage,
    Budget,
    Command,
    CreditGrant,
    CustomerLedger,
    Decision,
    Grant,
    GrantScope,
    LedgerCommandError,
    LedgerEntry,
    Policy,
    SetBlock,
    SetBudget,
    SetPolicy,
    TopUp,
    VelocityRule,
    Void,
    balance_view,
    format_picos,
    parse_amount,
    status_of,
)
from meterline.core.plans import SegmentChange

__all__ = [
    "COMMAND_TYPES",
    "AuthorizeRequest",
    "LedgerRequest",
    "PlanCorrection",
    "alert_message",
    "authorize_message",
    "command_message",
    "decode_command",
    "decode_json",
    "encode_message",
    "entry_from_message",
    "entry_message",
    "plan_correction_message",
    "reply_message",
    "segment_changes",
    "status_message",
]

COMMAND_TYPES = (
    "grant",
    "top_up",
    "void",
    "adjust",
    "set_policy",
    "set_budget",
    "set_block",
    "authorize",
    "usage_correction",
    "plan_correction",
)
_MISSING = object()


@dataclass(frozen=True, slots=True)
class AuthorizeRequest:
    """An ``authorize`` command before pricing: the agent turns the token bounds into a worst-case
    charge with the pricing engine and the customer's rate card."""

    request_id: str
    provider: str
    model: str
    model_version: str | None
    project: str | None
    api_key_id: str | None
    input_tokens_estimate: int
    max_output_tokens: int
    ttl_ms: int | None = None


@dataclass(frozen=True, slots=True)
class PlanCorrection:
    """A ``plan_correction``: the re-rating of one plan customer's billing period (jobs/reprice,
    docs/corrections.md). ``ledger`` is its ledger effect, applied in order: one
    ``ApplyPricedUsage`` for a raise (debited like usage, provider ``plan``), or the ``Adjust``
    refunds of a cut (overage first, then grants, as the job split them); empty when only the
    consumption changes. ``segments``: what the correction changes in each segment of the period
    (the credit agent applies the one in force to its live segment)."""

    correction_id: str  # the event id: ``reprice:<correction_id>:<customer>:plan@<period start>``
    period_start: int
    amount_picos: int  # signed: the sum of the ledger effect
    ledger: tuple[Command, ...]
    segments: tuple[SegmentChange, ...]


@dataclass(frozen=True, slots=True)
class LedgerRequest:
    """One decoded ``ledger-commands`` message. Exactly one of ``command`` / ``authorize`` /
    ``plan_correction`` is set. ``currency`` is the currency the message names (grants, top-ups,
    corrections), else None."""

    type: str
    command_id: str
    customer_id: str
    at_ms: int
    command: Command | None = None
    authorize: AuthorizeRequest | None = None
    currency: str | None = None
    plan_correction: PlanCorrection | None = None

    @property
    def ledger_commands(self) -> tuple[Command, ...]:
        """The ledger commands this message applies, in order (none for ``authorize``, which
        the agent prices first)."""
        if self.plan_correction is not None:
            return self.plan_correction.ledger
        return () if self.command is None else (self.command,)


# ------------------------------------------------------------------------------------ primitives


def _bad(msg: str, field: str | None = None) -> LedgerCommandError:
    err = LedgerCommandError(msg, reason_code="invalid_ledger_command")
    err.field = field
    return err


def _get(
    d: Mapping[str, Any], name: str, kind: type | tuple[type, ...], *, optional: bool = False, default: Any = _MISSING
) -> Any:
    value = d.get(name, _MISSING)
    if value is _MISSING or value is None:
        if default is not _MISSING:
            return default
        if optional:
            return None
        raise _bad(f"{name} is required", name)
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise _bad(f"{name} must be {kind}, got bool", name)
    if not isinstance(value, kind):
        raise _bad(f"{name} must be {getattr(kind, '__name__', kind)}, got {type(value).__name__}", name)
    if isinstance(value, str) and kind is str and not value and not optional:
        raise _bad(f"{name} must not be empty", name)
    return value


def _amount(d: Mapping[str, Any], name: str, *, optional: bool = False) -> int | None:
    value = d.get(name)
    if value is None:
        if optional:
            return None
        raise _bad(f"{name} is required", name)
    if not isinstance(value, str):  # the contract: decimal strings; ints/floats are refused
        raise LedgerCommandError(
            f"{name} must be a decimal string, got {type(value).__name__}", reason_code="invalid_amount"
        )
    return parse_amount(value)


def _str_list(v: Any, name: str) -> frozenset[str] | None:
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise _bad(f"{name} must be a list of strings or null", name)
    return frozenset(v)


def _scope_from(v: Any) -> GrantScope | None:
    if v is None:
        return None
    if not isinstance(v, Mapping):
        raise _bad("scope must be an object or null", "scope")
    scope = GrantScope(
        _str_list(v.get("providers"), "scope.providers"),
        _str_list(v.get("models"), "scope.models"),
        _str_list(v.get("projects"), "scope.projects"),
    )
    return None if scope == GrantScope() else scope


def _scope_to(s: GrantScope | None) -> dict[str, Any] | None:
    if s is None:
        return None
    return {
        k: None if v is None else sorted(v)
        for k, v in (("providers", s.providers), ("models", s.models), ("projects", s.projects))
    }


def _rule_from(v: Any, name: str) -> VelocityRule | None:
    if v is None:
        return None
    if not isinstance(v, Mapping):
        raise _bad(f"{name} must be an object or null", name)
    base = VelocityRule()
    return VelocityRule(
        window_ms=_get(v, "window_ms", int, default=base.window_ms),
        bucket_ms=_get(v, "bucket_ms", int, default=base.bucket_ms),
        baseline_ms=_get(v, "baseline_ms", int, default=base.baseline_ms),
        abs_cap_picos=_amount(v, "abs_cap", optional=True),
        baseline_multiple=_get(v, "baseline_multiple", int, optional=True),
        min_picos=_amount(v, "min", optional=True) or 0,
        block=_get(v, "block", bool, default=False),
    )


def _rule_to(r: VelocityRule | None) -> dict[str, Any] | None:
    if r is None:
        return None
    return {
        "window_ms": r.window_ms,
        "bucket_ms": r.bucket_ms,
        "baseline_ms": r.baseline_ms,
        "abs_cap": None if r.abs_cap_picos is None else format_picos(r.abs_cap_picos),
        "baseline_multiple": r.baseline_multiple,
        "min": format_picos(r.min_picos),
        "block": r.block,
    }


def _int_tuple(d: Mapping[str, Any], name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    v = d.get(name)
    if v is None:
        return default
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise _bad(f"{name} must be a list of integers", name)
    return tuple(v)


# ------------------------------------------------------------------------------------ inbound


def decode_json(value: bytes | str | Mapping[str, Any]) -> dict[str, Any]:
    """A record value (bytes/str JSON, or an already-parsed mapping) as a dict; InvalidEvent if not
    a JSON object. Floats are parsed as Decimal so they can be recognised and refused."""
    if isinstance(value, Mapping):
        return dict(value)
    try:
        from decimal import Decimal

        d = json.loads(value, parse_float=Decimal)
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise InvalidEvent(f"not JSON: {exc}", reason_code="invalid_ledger_message") from exc
    if not isinstance(d, dict):
        raise InvalidEvent("a ledger message must be a JSON object", reason_code="invalid_ledger_message")
    return d


def decode_command(value: bytes | str | Mapping[str, Any]) -> LedgerRequest:
    """Decode one ``ledger-commands`` value (see the module docstring for the errors)."""
    d = decode_json(value)
    kind = d.get("type")
    if kind not in COMMAND_TYPES:
        raise InvalidEvent(f"unknown ledger command type {kind!r}", reason_code="invalid_ledger_message", field="type")
    command_id = _get(d, "command_id", str)
    customer = _get(d, "customer_id", str)
    if not is_customer_id(customer):  # the contract's one allowed form (docs/security.md)
        raise _bad(CUSTOMER_ID_RULE, "customer_id")
    at = _get(d, "at_ms", int)
    env = {"type": kind, "command_id": command_id, "customer_id": customer, "at_ms": at}
    if kind in ("grant", "top_up"):
        currency = _get(d, "currency", str).lower()
        g = CreditGrant(
            grant_id=_get(d, "grant_id", str),
            customer_id=customer,
            amount_picos=_amount(d, "amount") or 0,
            currency=currency,
            effective_at_ms=_get(d, "effective_at_ms", int, default=at),
            expires_at_ms=_get(d, "expires_at_ms", int, optional=True),
            priority=_get(d, "priority", int, default=50),
            category=_get(d, "category", str, default="paid"),
            scope=_scope_from(d.get("scope")),
        )
        cmd: Command = TopUp(grant=g, at_ms=at) if kind == "top_up" else Grant(grant=g, at_ms=at)
        return LedgerRequest(**env, command=cmd, currency=currency)
    if kind == "usage_correction":
        # An extra charge found by re-rating (jobs/reprice, docs/corrections.md): debited exactly like
        # usage (grants in debit order, then overage under the policy), deduped by its event_id.
        charge = _amount(d, "amount")
        assert charge is not None
        return LedgerRequest(
            **env,
            currency=_get(d, "currency", str).lower(),
            command=ApplyPricedUsage(
                event_id=_get(d, "event_id", str),
                occurred_at_ms=at,
                charge_picos=charge,
                currency=_get(d, "currency", str).lower(),
                provider=_get(d, "provider", str),
                model=_get(d, "model", str),
                project=_get(d, "project", str, optional=True),
            ),
        )
    if kind == "plan_correction":
        return LedgerRequest(**env, currency=_get(d, "currency", str).lower(), plan_correction=_plan_correction(d, at))
    if kind == "void":
        return LedgerRequest(
            **env,
            command=Void(grant_id=_get(d, "grant_id", str), at_ms=at, reason=_get(d, "reason", str, default="voided")),
        )
    if kind == "adjust":
        amount = _amount(d, "amount")
        assert amount is not None
        return LedgerRequest(
            **env,
            command=Adjust(
                adjustment_id=_get(d, "adjustment_id", str),
                amount_picos=amount,
                reason=_get(d, "reason", str),
                at_ms=at,
                grant_id=_get(d, "grant_id", str, optional=True),
            ),
        )
    if kind == "set_policy":
        base = Policy()
        overage = _get(d, "overage", str)
        limit = _amount(d, "credit_limit", optional=True)
        if overage == "credit_limit" and limit is None:
            raise _bad("credit_limit is required with overage credit_limit", "credit_limit")
        low = d.get("low_balance") or []
        if not isinstance(low, list):
            raise _bad("low_balance must be a list of decimal strings", "low_balance")
        policy = Policy(
            overage=overage,
            credit_limit_picos=limit or 0,
            used_alert_pcts=_int_tuple(d, "used_alert_pcts", base.used_alert_pcts),
            low_balance_picos=tuple(_amount({"x": x}, "x") or 0 for x in low),
            hold_ttl_ms=_get(d, "hold_ttl_ms", int, default=base.hold_ttl_ms),
            runaway_customer=_rule_from(d.get("runaway_customer"), "runaway_customer"),
            runaway_api_key=_rule_from(d.get("runaway_api_key"), "runaway_api_key"),
            dedupe_window_ms=_get(d, "dedupe_window_ms", int, default=base.dedupe_window_ms),
            dedupe_max_ids=_get(d, "dedupe_max_ids", int, default=base.dedupe_max_ids),
        )
        return LedgerRequest(**env, command=SetPolicy(policy=policy, at_ms=at))
    if kind == "set_budget":
        b = _get(d, "budget", Mapping)
        limit = _amount(b, "limit")
        assert limit is not None
        budget = Budget(
            budget_id=_get(b, "budget_id", str),
            scope=_get(b, "scope", str),
            scope_value=_get(b, "scope_value", str, optional=True),
            period=_get(b, "period", str),
            limit_picos=limit,
            hard=_get(b, "hard", bool, default=False),
            alert_pcts=_int_tuple(b, "alert_pcts", (80, 100)),
        )
        return LedgerRequest(
            **env, command=SetBudget(budget=budget, at_ms=at, remove=_get(d, "remove", bool, default=False))
        )
    if kind == "set_block":
        reason = _get(d, "reason", str, default="manual")
        if reason not in ("manual", "runaway_guard"):
            raise _bad("set_block reason must be manual or runaway_guard", "reason")
        return LedgerRequest(
            **env,
            command=SetBlock(
                scope=_get(d, "scope", str, default="customer"),
                blocked=_get(d, "blocked", bool),
                at_ms=at,
                reason=reason,
            ),
        )
    # authorize
    inp, out = _get(d, "input_tokens_estimate", int), _get(d, "max_output_tokens", int)
    if inp < 0 or out < 0:
        raise _bad("token bounds must be >= 0", "input_tokens_estimate")
    return LedgerRequest(
        **env,
        authorize=AuthorizeRequest(
            request_id=_get(d, "request_id", str),
            provider=_get(d, "provider", str),
            model=_get(d, "model", str),
            model_version=_get(d, "model_version", str, optional=True),
            project=_get(d, "project", str, optional=True),
            api_key_id=_get(d, "api_key_id", str, optional=True),
            input_tokens_estimate=inp,
            max_output_tokens=out,
            ttl_ms=_get(d, "ttl_ms", int, optional=True),
        ),
    )


def _quantity(v: Any, name: str) -> int:
    """A consumption quantity: an integer (tokens) or a decimal string (picos of charge)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, str):
        return parse_amount(v)
    raise _bad(f"{name} must be an integer (tokens) or a decimal string (amount)", name)


def _plan_correction(d: Mapping[str, Any], at: int) -> PlanCorrection:
    eid = _get(d, "event_id", str)
    currency = _get(d, "currency", str).lower()
    amount = _amount(d, "amount")
    assert amount is not None
    refunds = d.get("refunds") or []
    if not isinstance(refunds, list) or not all(isinstance(r, Mapping) for r in refunds):
        raise _bad("refunds must be a list of objects", "refunds")
    ledger: list[Command] = []
    if amount > 0:
        if refunds:
            raise _bad("a plan correction that raises the bill has no refunds", "refunds")
        ledger.append(
            ApplyPricedUsage(
                event_id=eid,
                occurred_at_ms=at,
                charge_picos=amount,
                currency=currency,
                provider="plan",
                model=_get(d, "plans", str),
                project=None,
            )
        )
    elif amount < 0:
        reason = _get(d, "reason", str)
        parts: list[tuple[str | None, int]] = []
        for r in refunds:
            part = _amount(r, "amount")
            assert part is not None
            if part <= 0:
                raise LedgerCommandError("a refund part must be > 0", reason_code="invalid_amount")
            parts.append((_get(r, "grant_id", str, optional=True), part))
        if sum(p for _, p in parts) != -amount:
            raise _bad("the refunds must add up to the amount refunded", "refunds")
        if len({g for g, _ in parts}) != len(parts):
            raise _bad("one refund per grant (and one for the overage)", "refunds")
        ledger.extend(
            Adjust(adjustment_id=f"{eid}:{g or 'overage'}", amount_picos=p, reason=reason, at_ms=at, grant_id=g)
            for g, p in parts
        )
    elif refunds:
        raise _bad("a plan correction of 0 has no refunds", "refunds")
    return PlanCorrection(eid, _get(d, "period_start", int), amount, tuple(ledger), segment_changes(d))


def segment_changes(d: Mapping[str, Any]) -> tuple[SegmentChange, ...]:
    """The ``segments`` of a ``plan_correction`` message (LedgerCommandError when malformed)."""
    segs = d.get("segments") or []
    if not isinstance(segs, list) or not all(isinstance(x, Mapping) for x in segs):
        raise _bad("segments must be a list of objects", "segments")
    changes = []
    for x in segs:
        used = x.get("used") or {}
        if not isinstance(used, Mapping) or not all(isinstance(k, str) for k in used):
            raise _bad("segments[].used must map allowance ids to quantities", "segments.used")
        invoiced = _amount(x, "invoiced", optional=True)
        changes.append(
            SegmentChange(
                start=_get(x, "start", int),
                plan=_get(x, "plan", str),
                used={k: _quantity(v, "segments.used") for k, v in used.items()},
                overage=_quantity(x.get("overage", 0), "segments.overage"),
                invoiced=invoiced or 0,
            )
        )
    return tuple(changes)


def plan_correction_message(
    *,
    event_id: str,
    customer_id: str,
    at_ms: int,
    currency: str,
    period_start: int,
    plans: str,
    amount_picos: int,
    refunds: list[tuple[str | None, int]],
    reason: str,
    segments: list[tuple[SegmentChange, str, Mapping[str, str]]],
) -> dict[str, Any]:
    """A ``plan_correction`` message (``command_id`` = ``event_id``: a re-send is a duplicate).
    ``segments``: each change with the plan's overage unit and each allowance's unit (``tokens``:
    quantities as integers; ``amount``: decimal strings). ``refunds``: (grant id or None for the
    overage, picos > 0), for a cut."""

    def q(v: int, unit: str) -> int | str:
        return v if unit == "tokens" else format_picos(v)

    return {
        "type": "plan_correction",
        "command_id": event_id,
        "customer_id": customer_id,
        "at_ms": at_ms,
        "event_id": event_id,
        "currency": currency.lower(),
        "period_start": period_start,
        "plans": plans,
        "amount": format_picos(amount_picos),
        "refunds": [{"grant_id": g, "amount": format_picos(p)} for g, p in refunds],
        "reason": reason,
        "segments": [
            {
                "start": c.start,
                "plan": c.plan,
                "used": {k: q(v, units.get(k, unit)) for k, v in sorted(c.used.items()) if v},
                "overage": q(c.overage, unit),
                "invoiced": format_picos(c.invoiced),
            }
            for c, unit, units in segments
        ],
    }


def command_message(cmd: Command, *, command_id: str, customer_id: str) -> dict[str, Any]:
    """A ledger command (Grant, TopUp, Void, Adjust, SetPolicy, SetBudget, SetBlock) as its
    ``ledger-commands`` message; ``decode_command(command_message(c, ...)).command == c``."""
    env: dict[str, Any] = {"command_id": command_id, "customer_id": customer_id, "at_ms": cmd.time_ms}
    if isinstance(cmd, (Grant, TopUp)):
        g = cmd.grant
        return {
            "type": "top_up" if isinstance(cmd, TopUp) else "grant",
            **env,
            "grant_id": g.grant_id,
            "amount": format_picos(g.amount_picos),
            "currency": g.currency,
            "effective_at_ms": g.effective_at_ms,
            "expires_at_ms": g.expires_at_ms,
            "priority": g.priority,
            "category": g.category,
            "scope": _scope_to(g.scope),
        }
    if isinstance(cmd, Void):
        return {"type": "void", **env, "grant_id": cmd.grant_id, "reason": cmd.reason}
    if isinstance(cmd, Adjust):
        return {
            "type": "adjust",
            **env,
            "adjustment_id": cmd.adjustment_id,
            "amount": format_picos(cmd.amount_picos),
            "reason": cmd.reason,
            "grant_id": cmd.grant_id,
        }
    if isinstance(cmd, SetPolicy):
        p = cmd.policy
        return {
            "type": "set_policy",
            **env,
            "overage": p.overage,
            "credit_limit": format_picos(p.credit_limit_picos) if p.overage == "credit_limit" else None,
            "used_alert_pcts": list(p.used_alert_pcts),
            "low_balance": [format_picos(x) for x in p.low_balance_picos],
            "hold_ttl_ms": p.hold_ttl_ms,
            "runaway_customer": _rule_to(p.runaway_customer),
            "runaway_api_key": _rule_to(p.runaway_api_key),
            "dedupe_window_ms": p.dedupe_window_ms,
            "dedupe_max_ids": p.dedupe_max_ids,
        }
    if isinstance(cmd, SetBudget):
        b = cmd.budget
        return {
            "type": "set_budget",
            **env,
            "remove": cmd.remove,
            "budget": {
                "budget_id": b.budget_id,
                "scope": b.scope,
                "scope_value": b.scope_value,
                "period": b.period,
                "limit": format_picos(b.limit_picos),
                "hard": b.hard,
                "alert_pcts": list(b.alert_pcts),
            },
        }
    if isinstance(cmd, SetBlock):
        return {"type": "set_block", **env, "scope": cmd.scope, "blocked": cmd.blocked, "reason": cmd.reason}
    raise TypeError(f"{type(cmd).__name__} has no ledger-commands message (usage comes from usage-priced)")


def authorize_message(
    *,
    request_id: str,
    customer_id: str,
    at_ms: int,
    provider: str,
    model: str,
    input_tokens_estimate: int,
    max_output_tokens: int,
    model_version: str | None = None,
    project: str | None = None,
    api_key_id: str | None = None,
    ttl_ms: int | None = None,
) -> dict[str, Any]:
    """An ``authorize`` message; its command_id is ``authorize:<request_id>`` (idempotent re-sends)."""
    msg: dict[str, Any] = {
        "type": "authorize",
        "command_id": f"authorize:{request_id}",
        "customer_id": customer_id,
        "at_ms": at_ms,
        "request_id": request_id,
        "provider": provider,
        "model": model,
        "model_version": model_version,
        "project": project,
        "api_key_id": api_key_id,
        "input_tokens_estimate": input_tokens_estimate,
        "max_output_tokens": max_output_tokens,
    }
    if ttl_ms is not None:
        msg["ttl_ms"] = ttl_ms
    return msg


def encode_message(message: Mapping[str, Any], *, trusted: bool = False) -> bytes:
    """UTF-8 JSON of any credits message. Floats are refused (money is exact). ``trusted``: the
    message was built here from ints and decimal strings (entries, statuses), skip the walk."""

    def _check(v: Any) -> None:
        if isinstance(v, float):
            raise LedgerCommandError("messages must not carry floats", reason_code="invalid_amount")
        if isinstance(v, Mapping):
            for x in v.values():
                _check(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                _check(x)

    if not trusted:
        _check(message)
    return json.dumps(message, separators=(",", ":"), sort_keys=True).encode()


# ------------------------------------------------------------------------------------ outbound


def entry_message(e: LedgerEntry) -> dict[str, Any]:
    """A ledger entry for ``ledger-entries`` (amount as a signed decimal string)."""
    return {
        "entry_id": e.entry_id,
        "customer_id": e.customer_id,
        "seq": e.seq,
        "kind": e.kind,
        "amount": format_picos(e.amount_picos),
        "currency": e.currency,
        "at_ms": e.at_ms,
        "grant_id": e.grant_id,
        "event_id": e.event_id,
        "reason": e.reason,
    }


def entry_from_message(d: Mapping[str, Any]) -> LedgerEntry:
    """Inverse of :func:`entry_message` (LedgerCommandError on a malformed entry)."""
    amount = _amount(d, "amount")
    assert amount is not None
    return LedgerEntry(
        entry_id=_get(d, "entry_id", str),
        customer_id=_get(d, "customer_id", str),
        seq=_get(d, "seq", int),
        kind=_get(d, "kind", str),
        amount_picos=amount,
        currency=_get(d, "currency", str),
        at_ms=_get(d, "at_ms", int),
        grant_id=_get(d, "grant_id", str, optional=True),
        event_id=_get(d, "event_id", str, optional=True),
        reason=_get(d, "reason", str, optional=True),
    )


def status_message(state: CustomerLedger, now_ms: int, plan: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``customer-status`` value: status of the customer scope plus the full balance view.
    ``plan`` (a customer on a subscription plan): the plan in force and each allowance of the
    current segment (id, included, used, remaining, reserved), in ``balance.plan`` and
    ``balance.allowances``."""
    st = status_of(state)
    balance = balance_view(state, now_ms)
    if plan is not None:
        balance["plan"] = {k: v for k, v in plan.items() if k != "allowances"}
        balance["allowances"] = plan["allowances"]
    return {
        "customer_id": state.customer_id,
        "status": st["state"],
        "reason": st.get("reason"),
        "since_ms": st.get("since"),
        "balance": balance,
        "updated_at_ms": now_ms,
    }


def alert_message(a: Alert) -> dict[str, Any]:
    """An ``alerts`` value; ``alert_id`` is the ledger's deterministic id."""
    unit = "percent" if a.kind in ("credit_used", "budget") else "amount"
    threshold = str(a.threshold) if unit == "percent" else format_picos(a.threshold)
    return {
        "alert_id": a.alert_id,
        "customer_id": a.customer_id,
        "kind": a.kind,
        "message": f"{a.kind} on {a.scope}: threshold {threshold}{'%' if unit == 'percent' else ''} crossed "
        f"(value {format_picos(a.value_picos)})",
        "at_ms": a.at_ms,
        "scope": a.scope,
        "threshold": threshold,
        "threshold_unit": unit,
        "value": format_picos(a.value_picos),
    }


def reply_message(customer_id: str, decision: Decision, estimate_picos: int) -> dict[str, Any]:
    """A ``ledger-replies`` value for an authorize decision."""
    hold = decision.hold
    return {
        "request_id": decision.request_id,
        "customer_id": customer_id,
        "decision": "allow" if decision.allowed else "deny",
        "reason": decision.reason,
        "hold_id": hold.request_id if hold is not None else None,
        "estimate": format_picos(estimate_picos),
        "available": format_picos(decision.available_picos),
        "expires_at_ms": hold.expires_ms if hold is not None else None,
    }
