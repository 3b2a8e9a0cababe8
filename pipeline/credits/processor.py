"""The credit step as a pure function of (source record, stored customer state, prices): no Kafka.

:meth:`CreditProcessor.process` takes one record of ``usage-priced``, ``ledger-commands`` or
``subscriptions`` with its position and broker timestamp, and the customer's stored table value, and returns
:class:`Outcome`: the messages to send (ledger entries, status, alerts, replies, dead letters) and
the new table value. The faust agent (``pipeline/credits/agent.py``) sends the messages, awaits
their delivery, THEN stores the value. Everything is deterministic in its inputs — times come from
the records (``occurred_at``, ``at_ms``, the broker timestamp), never from the wall clock — so a
replayed record regenerates byte-identical messages with the same ids.

Per record (one record = one customer: a ``PricedBatch`` holds one customer's events):

1. decode; undecodable → one dead letter, and the record's offset is marked applied on the key's
   customer if that customer exists (else nothing is stored);
2. load the state (or create it: currency of the event / grant, ``settings``' default otherwise;
   default policy ``allow`` until the customer's first grant or top-up switches it to ``block``,
   unless a ``set_policy`` came first: ``meterline.core.ledger.apply_command``);
3. the record's offset is at or below the state's applied offset for its source partition → skip
   the WHOLE record (nothing sent, nothing stored);
4. ``ExpireDue(now_ms=broker timestamp)`` when a grant or hold is due;
5. apply: every event of a priced record as ``ApplyPricedUsage`` (event-id dedupe inside the
   ledger), or the command (command-id dedupe, ``meterline.core.ledger.remember_command``, kept
   beside the ledger in the value's ``"x"`` key);
   a ``LedgerCommandError`` dead-letters that event / command and changes nothing else;
6. record the source offset (``mark_applied``) in the same value: all events of a record are
   applied, or (crash before the value is stored) the record is replayed whole.

A customer on a subscription plan (a ``subscriptions`` fact stored in the value's ``"plan"``):
each priced event first burns down the allowances of the segment it occurred in, and only the
overage amount it adds goes to the ledger (prepaid grants, then overage); the plan's
``on_exhausted`` gates enforcement (``SetPlanGate``), authorize reserves against the allowances,
and the status carries each allowance. docs/plans.md, "Live enforcement". A ``plan_correction``
command (``meterline reprice`` re-rating a plan period) applies its ledger effect and moves the
live segment it names when that segment is in force (docs/corrections.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from meterline.core.errors import InputError
from meterline.core.ledger import (
    COMMAND_ID_WINDOW_MS,
    MAX_COMMAND_IDS,
    ApplyPricedUsage,
    Authorize,
    CustomerLedger,
    Effects,
    ExpireDue,
    LedgerCommandError,
    SetPlanGate,
    SourcePos,
    apply,
    apply_command,
    apply_many,
    command_ids,
    command_seen,
    dedupe_digest,
    default_policy,
    format_picos,
    mark_applied,
    new_ledger,
    remember_command,
    usable_credit,
)
from meterline.core.plans import (
    MAX_FACTS,
    LivePlan,
    Terms,
    Usage,
    alerts_due,
    allowance_view,
    burn,
    consume,
    correct_segment,
    format_instant,
    gate,
    live_terms,
    parse_event,
    policy_room,
    usage_of_priced,
)
from pipeline.credits.plans import PlanBook
from pipeline.processor import MAX_DEAD_PAYLOAD_BYTES, unforeseen_dead_letter
from schemas.codec import decode_priced_batch, encode_dead_letter, encode_priced_batch
from schemas.credits import (
    AuthorizeRequest,
    LedgerRequest,
    alert_message,
    decode_command,
    encode_message,
    entry_message,
    reply_message,
    status_message,
)

ENTRIES, STATUS, ALERTS, REPLIES, DEAD = (
    "ledger-entries",
    "customer-status",
    "alerts",
    "ledger-replies",
    "usage-dead-letter",
)
#: Ledger entries per ``ledger-entries`` message (an entry is at most ~1 KB with 128-char ids):
#: a record's entries travel together, in messages that stay far below Kafka's 1 MB.
ENTRIES_PER_MESSAGE = 200
#: Events of a priced record applied (and persisted, with their effects in the outbox) together; a
#: larger record is applied in parts of this size (``split_record``).
CHUNK_EVENTS = 200


class Pricer(Protocol):
    def price(self, record: Mapping[str, Any]) -> Any: ...  # PricedAmounts (charge_picos, currency, ...)


@dataclass(slots=True)
class Outcome:
    """What one source record produces. ``sends``: (logical topic, key, value, same_partition);
    ``state``: the new table value for ``customer_id`` (None = store nothing)."""

    customer_id: str | None = None
    state: dict[str, Any] | None = None
    sends: list[tuple[str, bytes, bytes, bool]] = field(default_factory=list)
    entries: list[dict[str, Any]] = field(default_factory=list)  # sent as ONE ledger-entries message
    skipped: bool = False
    dead_letters: int = 0


def worst_case_charge(pricer: Pricer, customer_id: str, req: AuthorizeRequest, at_ms: int) -> tuple[int, str]:
    """Largest charge the request can cost: all input at the input rate and every output token at
    the dearer of the output and reasoning rates. Raises UnpriceableEvent like pricing does."""
    base = {
        "customer_id": customer_id,
        "provider": req.provider,
        "model": req.model,
        "model_version": req.model_version,
        "occurred_at": at_ms,
        "input_tokens": req.input_tokens_estimate,
        "cached_input_tokens": 0,
        "cache_write_tokens": 0,
        "requests": 1,
    }
    as_output = pricer.price({**base, "output_tokens": req.max_output_tokens, "reasoning_tokens": 0})
    as_reasoning = pricer.price({**base, "output_tokens": 0, "reasoning_tokens": req.max_output_tokens})
    return max(as_output.charge_picos, as_reasoning.charge_picos), as_output.currency


class CreditProcessor:
    def __init__(
        self,
        pricer: Pricer,
        *,
        priced_topic: str,
        commands_topic: str,
        default_currency: str = "usd",
        subscriptions_topic: str | None = None,
        plans: PlanBook | None = None,
    ) -> None:
        self.pricer = pricer
        self.priced_topic = priced_topic
        self.commands_topic = commands_topic
        self.subscriptions_topic = subscriptions_topic
        self.plans = plans if plans is not None else PlanBook()
        self.default_currency = default_currency.lower()

    def process(
        self,
        topic: str,
        partition: int,
        offset: int,
        timestamp_ms: int,
        key: bytes | None,
        value: bytes | None,
        load: Callable[[str], Mapping[str, Any] | None],
        *,
        final: bool = True,
    ) -> Outcome:
        """``final=False``: ``value`` is one part of a priced record split by :meth:`split_record`
        (not the last); its offset is not marked applied, so a crash before the last part replays
        the record, and the parts already applied are skipped by event-id dedupe."""
        src = SourcePos(topic, partition, offset)
        try:
            if topic == self.priced_topic:
                return self._priced(src, timestamp_ms, key, value, load, final)
            if topic == self.subscriptions_topic:
                return self._subscription(src, timestamp_ms, key, value, load)
            return self._command(src, timestamp_ms, key, value, load)
        except Exception as exc:
            return self._unforeseen(src, timestamp_ms, key, value, exc, load, final)

    def _unforeseen(
        self,
        src: SourcePos,
        now: int,
        key: bytes | None,
        value: bytes | None,
        exc: Exception,
        load: Callable[[str], Mapping[str, Any] | None],
        final: bool = True,
    ) -> Outcome:
        """Something no rule foresaw (a bug, a value the code cannot read). ``apply`` never mutates
        its input, so nothing of the record was applied: the WHOLE record goes to the dead letter
        (reason ``internal_error``, its bytes kept up to a bound, to re-drive once fixed) and its
        offset is marked on the key's customer when that state can be read. Nothing is charged
        twice: a re-drive of the dead letter is deduped by event id / command id like any record."""
        fmt = "priced_batch" if src.topic == self.priced_topic else "json"
        customer = key.decode("utf-8", "replace") if key else None
        out = Outcome(customer_id=customer, dead_letters=1)
        out.sends.append(
            (
                DEAD,
                (customer or "").encode(),
                unforeseen_dead_letter(src.topic, src.partition, src.offset, key, value, exc, now, fmt),
                True,
            )
        )
        try:
            stored = load(customer) if customer and final else None
            if stored is not None:
                out.state = _marked_applied(stored, src)
                if out.state is None:
                    return Outcome(customer_id=customer, skipped=True)
        except Exception:
            out.state = None
        return out

    # ---------------------------------------------------------------------------- usage

    def split_record(self, topic: str, value: bytes | None) -> list[bytes | None]:
        """A priced record of more than CHUNK_EVENTS events as parts of at most that many (each
        applied and persisted as its own value, so no value or outbox grows with the size of one
        record); anything else (commands, undecodable bytes) as itself."""
        if topic != self.priced_topic or not value:
            return [value]
        try:
            events = decode_priced_batch(value)
        except Exception:
            return [value]
        if len(events) <= CHUNK_EVENTS:
            return [value]
        return [encode_priced_batch(events[i : i + CHUNK_EVENTS]) for i in range(0, len(events), CHUNK_EVENTS)]

    def _priced(
        self,
        src: SourcePos,
        now: int,
        key: bytes | None,
        value: bytes | None,
        load: Callable[[str], Mapping[str, Any] | None],
        final: bool = True,
    ) -> Outcome:
        try:
            if not value:
                raise LedgerCommandError("empty record", reason_code="empty_record")
            events = decode_priced_batch(value)
            if not events:
                raise LedgerCommandError("empty priced batch", reason_code="empty_record")
        except InputError as exc:
            return self._undecodable(src, now, key, value, exc, "raw", load)
        customer = str(events[0]["customer_id"])
        state, extra = self._load(load, customer, str(events[0].get("currency") or self.default_currency))
        if state.applied_offsets.get(src.key, -1) >= src.offset:
            return Outcome(customer_id=customer, skipped=True)
        out = Outcome(customer_id=customer)
        state = self._expire(state, now, out)
        live = _live_of(load(customer))
        if live is not None:
            state = self._priced_on_plan(src, now, customer, state, live, events, out)
            return self._finish(state, extra, src, now, out, mark=final, live=live)
        cmds: list[ApplyPricedUsage] = []
        cmd_events: list[dict[str, Any]] = []
        for ev in events:
            try:
                if ev["customer_id"] != customer:
                    raise LedgerCommandError("a priced record must hold one customer", reason_code="wrong_customer")
                cmds.append(
                    ApplyPricedUsage(
                        event_id=ev["event_id"],
                        occurred_at_ms=int(ev["occurred_at"]),
                        charge_picos=int(ev["charge_picos"]),
                        currency=str(ev["currency"]),
                        provider=ev["provider"],
                        model=ev["model"],
                        project=ev.get("project"),
                        api_key_id=ev.get("api_key_id"),
                        request_id=ev.get("request_id"),
                    )
                )
                cmd_events.append(ev)
            except (LedgerCommandError, KeyError, TypeError, ValueError) as exc:
                self._dead_priced(src, now, customer, ev, exc, out)
        # One clone of the state for the whole record (apply_many), not one per event.
        state, results = apply_many(state, cmds)
        for ev, res in zip(cmd_events, results):
            if isinstance(res, LedgerCommandError):
                self._dead_priced(src, now, customer, ev, res, out)
            else:
                self._effects(customer, res, out)
        return self._finish(state, extra, src, now, out, mark=final)

    # ---------------------------------------------------------------------------- plans

    def _subscription(
        self,
        src: SourcePos,
        now: int,
        key: bytes | None,
        value: bytes | None,
        load: Callable[[str], Mapping[str, Any] | None],
    ) -> Outcome:
        """A ``subscriptions`` fact: remembered in the customer's value (``"plan"``), the timeline
        is folded from the facts with the plan catalog whenever it is needed."""
        try:
            ev = parse_event(value or b"")
            if key is not None and key.decode("utf-8", "replace") != ev.customer_id:
                raise LedgerCommandError("subscription fact keyed by another customer", reason_code="wrong_customer")
        except InputError as exc:
            return self._undecodable(src, now, key, value, exc, "json", load)
        customer = ev.customer_id
        stored = load(customer)
        state, extra = self._load(load, customer, self.default_currency)
        if state.applied_offsets.get(src.key, -1) >= src.offset:
            return Outcome(customer_id=customer, skipped=True)
        out = Outcome(customer_id=customer)
        state = self._expire(state, now, out)
        live = _live_of(stored) or LivePlan()
        if live.add_fact(ev):
            runs = self.plans.timeline(customer, live).runs
            if not live.compact(runs[-1].anchor if runs else None):
                del live.facts[ev.event_id]
                err = LedgerCommandError(
                    f"more than {MAX_FACTS} subscription facts in one run of {customer!r}",
                    reason_code="too_many_subscription_facts",
                )
                out.sends.append(self._dead(src, now, customer, ev.event_id, None, value or b"", "json", err))
                out.dead_letters += 1
        return self._finish(state, extra, src, now, out, live=live)

    def _priced_on_plan(
        self,
        src: SourcePos,
        now: int,
        customer: str,
        state: CustomerLedger,
        live: LivePlan,
        events: list[dict[str, Any]],
        out: Outcome,
    ) -> CustomerLedger:
        """Each event burns down the allowances of the segment it OCCURRED in (event time and the
        timeline, ``consume`` as the bill does); the overage amount it adds is what the ledger
        debits (prepaid grants first, then overage). Events one by one: a rejected event must
        burn nothing."""
        timeline = self.plans.timeline(customer, live)
        for ev in events:
            try:
                if ev["customer_id"] != customer:
                    raise LedgerCommandError("a priced record must hold one customer", reason_code="wrong_customer")
                cmd = ApplyPricedUsage(
                    event_id=ev["event_id"],
                    occurred_at_ms=int(ev["occurred_at"]),
                    charge_picos=int(ev["charge_picos"]),
                    currency=str(ev["currency"]),
                    provider=ev["provider"],
                    model=ev["model"],
                    project=ev.get("project"),
                    api_key_id=ev.get("api_key_id"),
                    request_id=ev.get("request_id"),
                )
                terms = live_terms(timeline, live, cmd.occurred_at_ms // 1000)
                if terms is None or dedupe_digest(f"e:{cmd.event_id}") in state.recent_ids:
                    state, eff = apply(state, cmd)  # no plan then (pay-per-token), or a duplicate
                    self._effects(customer, eff, out)
                    continue
                if cmd.charge_picos < 0:
                    raise LedgerCommandError("charge_picos must be ≥ 0", reason_code="invalid_amount")
                seg, split = burn(terms, live.seg(terms), usage_of_priced(ev))
                # Under volume tiers the overage amount can fall (the whole quantity re-priced):
                # the ledger never credits back live; the period's bill re-prices (docs/plans.md).
                cmd = _with_charge(cmd, max(split.overage_amount, 0))
                state, eff = apply(state, cmd)
            except (LedgerCommandError, KeyError, TypeError, ValueError) as exc:
                self._dead_priced(src, now, customer, ev, exc, out)
                continue
            seg.invoiced += sum(e.amount_picos for e in eff.entries if e.kind == "debit" and e.grant_id is None)
            for aid, pct, used, avail in alerts_due(terms, seg):
                out.sends.append(
                    (
                        ALERTS,
                        customer.encode(),
                        encode_message(_allowance_alert(customer, terms, aid, pct, used, avail, cmd.occurred_at_ms)),
                        True,
                    )
                )
            live.put(seg)
            if cmd.request_id is not None:
                live.holds.pop(cmd.request_id, None)
            self._effects(customer, eff, out)
        return state

    def _authorize_on_plan(
        self, state: CustomerLedger, req: LedgerRequest, out: Outcome, live: LivePlan, terms: Terms, worst_charge: int
    ) -> CustomerLedger:
        """The authorize gate of a customer on a plan: the request's worst case (every input token
        estimated, every output token as output or as reasoning, whichever costs more overage)
        is burned down on the segment's allowances AFTER what open holds reserved; only the
        overage amount left is reserved against prepaid credit, and the plan's policy decides
        whether overage beyond that may be reserved (``block``: none; ``cap``: up to the cap
        minus the invoiced and reserved overage). So authorized requests together never exceed
        allowance + prepaid (+ cap): the published bound (docs/plans.md)."""
        a = req.authorize
        assert a is not None
        customer = req.customer_id
        base = live.held(terms, list(state.holds))
        splits = [
            consume(
                terms,
                base,
                Usage(a.provider, a.model, {"input": a.input_tokens_estimate, cls: a.max_output_tokens}, worst_charge),
            )[1]
            for cls in ("output", "reasoning")
        ]
        split = max(splits, key=lambda sp: (sp.overage_amount, sp.overage_quantity))
        reserve = max(split.overage_amount, 0)
        cmd = _authorize_command(req, reserve)
        new, eff = apply(state, cmd)
        decision = eff.decision
        assert decision is not None
        if decision.allowed and decision.reason is None and decision.hold is not None:
            seg = live.seg(terms)
            reserved_overage = sum(h.overage_picos for rid, h in state.holds.items())
            room = policy_room(terms, seg.invoiced + reserved_overage)
            if room is not None and decision.hold.overage_picos > room:
                reason = "allowance_exhausted" if terms.plan.on_exhausted == "block" else "plan_cap_reached"
                from meterline.core.ledger import Decision

                denied = Decision(False, reason, a.request_id, None, decision.available_picos)
                out.sends.append(
                    (REPLIES, a.request_id.encode(), encode_message(reply_message(customer, denied, reserve)), False)
                )
                return state  # nothing reserved
            live.holds[a.request_id] = (dict(split.allowance), split.overage_quantity)
        self._effects(customer, eff, out)
        out.sends.append(
            (REPLIES, a.request_id.encode(), encode_message(reply_message(customer, decision, reserve)), False)
        )
        return new

    def _plan_gate(
        self, state: CustomerLedger, live: LivePlan, at_ms: int, out: Outcome
    ) -> tuple[CustomerLedger, dict[str, Any] | None]:
        """The plan in force at ``at_ms`` (the later of the record's time and the ledger clock)
        decides enforcement (``SetPlanGate``); returns the state and the status' plan view."""
        terms = live_terms(self.plans.timeline(state.customer_id, live), live, at_ms // 1000)
        block = None
        view = None
        if terms is not None:
            seg = live.seg(terms)
            block = gate(terms, seg, usable_credit(state, at_ms)[0])
            reserved = live.held(terms, list(state.holds))
            view = {
                "plan": terms.plan.key,
                "on_exhausted": terms.plan.on_exhausted,
                "segment_start": format_instant(terms.start),
                "segment_end": format_instant(terms.end),
                "invoiced_overage": format_picos(seg.invoiced),
                "allowances": [_formatted(d) for d in allowance_view(terms, seg, reserved)],
            }
        governs = terms is not None
        if (state.plan_governs, state.plan_block) != (governs, block):
            state, eff = apply(state, SetPlanGate(governs=governs, block=block, at_ms=state.clock_ms))
            self._effects(state.customer_id, eff, out)
        return state, view

    # ---------------------------------------------------------------------------- commands

    def _command(
        self,
        src: SourcePos,
        now: int,
        key: bytes | None,
        value: bytes | None,
        load: Callable[[str], Mapping[str, Any] | None],
    ) -> Outcome:
        restore = _restore_request(value)
        if restore is not None:
            return self._restore(src, now, restore, load)
        try:
            req = decode_command(value or b"")
        except InputError as exc:
            return self._undecodable(src, now, key, value, exc, "json", load)
        customer = req.customer_id
        state, extra = self._load(load, customer, req.currency or self._authorize_currency(req))
        if state.applied_offsets.get(src.key, -1) >= src.offset:
            return Outcome(customer_id=customer, skipped=True)
        out = Outcome(customer_id=customer)
        seen = command_ids(extra.get("cmds"))
        if command_seen(seen, req.command_id) and not (req.authorize and req.authorize.request_id in state.holds):
            if req.authorize is not None:  # a client re-sent an answered request: answer, apply nothing
                out.sends.append(
                    (
                        REPLIES,
                        req.authorize.request_id.encode(),
                        encode_message(
                            {
                                "request_id": req.authorize.request_id,
                                "customer_id": customer,
                                "decision": "deny",
                                "reason": "duplicate_request",
                                "hold_id": None,
                                "estimate": "0.00",
                                "available": "0.00",
                                "expires_at_ms": None,
                            }
                        ),
                        False,
                    )
                )
            return self._finish(state, extra, src, now, out, status=False, live=_live_of(load(customer)))
        state = self._expire(state, now, out)
        live = _live_of(load(customer))
        if live is not None:  # enforcement as of this command's time (a new period lifts a block)
            state, _view = self._plan_gate(state, live, max(now, state.clock_ms, req.at_ms), out)
        try:
            if req.plan_correction is not None:
                state = self._plan_correction(src, now, value, state, extra, req, out, live)
            elif req.authorize is not None:
                state = self._authorize(state, req, out, live)
            else:
                assert req.command is not None
                # The default-policy rule lives in the ledger (meterline.core.ledger.apply_command).
                state, effects, explicit = apply_command(
                    state, req.command, explicit_policy=bool(extra.get("explicit_policy"))
                )
                for eff in effects:
                    self._effects(customer, eff, out)
                if explicit:
                    extra["explicit_policy"] = True
        except LedgerCommandError as exc:
            out.sends.append(self._dead(src, now, customer, req.command_id, None, value or b"", "json", exc))
            out.dead_letters += 1
        extra["cmds"] = remember_command(
            seen,
            req.command_id,
            max(state.clock_ms, req.at_ms),
            max_ids=MAX_COMMAND_IDS,  # read at call time (a test lowers it)
            window_ms=COMMAND_ID_WINDOW_MS,
        )
        return self._finish(state, extra, src, now, out, live=live)

    def _plan_correction(
        self,
        src: SourcePos,
        now: int,
        value: bytes | None,
        state: CustomerLedger,
        extra: dict[str, Any],
        req: LedgerRequest,
        out: Outcome,
        live: LivePlan | None,
    ) -> CustomerLedger:
        """A re-rated plan period (``plan_correction``, jobs/reprice): its ledger effect (a debit
        like usage for a raise; the refunds, overage first, for a cut: each part as the ledger
        command it was before this command existed, so balances are the same; a part the ledger
        refuses is dead-lettered alone, as before), then, when the corrected period is the one in
        force, the live segment follows (``correct_segment``: ``used`` per allowance, the overage
        quantity, and ``invoiced`` by what of the effect prepaid credit did not carry). Both go
        into the customer's ONE table value of this record: the effect and the segment change are
        stored together or (crash before the store) replayed together."""
        pc = req.plan_correction
        assert pc is not None
        customer = req.customer_id
        not_prepaid = 0
        for cmd in pc.ledger:
            try:
                state, effects, _explicit = apply_command(
                    state, cmd, explicit_policy=bool(extra.get("explicit_policy"))
                )
            except LedgerCommandError as exc:
                out.sends.append(self._dead(src, now, customer, req.command_id, None, value or b"", "json", exc))
                out.dead_letters += 1
                continue
            for eff in effects:
                self._effects(customer, eff, out)
                for e in eff.entries:
                    if e.grant_id is None and e.kind == "debit":
                        not_prepaid += e.amount_picos
                    elif e.grant_id is None and e.kind == "adjustment":
                        not_prepaid -= e.amount_picos
        if live is None:
            return state
        at = max(now, state.clock_ms, req.at_ms)
        terms = live_terms(self.plans.timeline(customer, live), live, at // 1000)
        if terms is None:
            return state  # no plan in force now: the ledger only
        for change in pc.segments:
            seg = correct_segment(terms, live.seg(terms), change, pc.correction_id, not_prepaid)
            if seg is None:
                continue  # another segment (no longer live: the ledger only), or already applied
            for aid, pct, used, avail in alerts_due(terms, seg):
                out.sends.append(
                    (
                        ALERTS,
                        customer.encode(),
                        encode_message(_allowance_alert(customer, terms, aid, pct, used, avail, at)),
                        True,
                    )
                )
            live.put(seg)
        return state

    def _restore(
        self, src: SourcePos, now: int, d: Mapping[str, Any], load: Callable[[str], Mapping[str, Any] | None]
    ) -> Outcome:
        """``{"type": "restore", "customer_id", "state"}`` (published by ``pipeline.restore`` when
        the broker lost the table): the customer's state rebuilt from ClickHouse. Applied ONLY when
        the table has no state for the customer, so a restore can never overwrite (or re-apply
        onto) a state the broker kept. Emits the status, no ledger entry (they are stored)."""
        customer = str(d.get("customer_id") or "")
        stored = load(customer) if customer else None
        if stored is not None:
            state = CustomerLedger.from_dict(dict(stored))
            if state.applied_offsets.get(src.key, -1) >= src.offset:
                return Outcome(customer_id=customer, skipped=True)
            out = Outcome(customer_id=customer)
            return self._finish(state, dict(stored.get("x") or {}), src, now, out, status=False, live=_live_of(stored))
        raw = dict(d["state"])
        state = CustomerLedger.from_dict(raw)
        if state.customer_id != customer:
            raise LedgerCommandError("restore state of another customer", reason_code="wrong_customer")
        extra = {k: v for k, v in dict(raw.get("x") or {}).items() if k in ("explicit_policy", "ver")}
        return self._finish(state, extra, src, now, Outcome(customer_id=customer), live=_live_of(raw))

    def _dead_priced(
        self, src: SourcePos, now: int, customer: str, ev: dict[str, Any], exc: Exception, out: Outcome
    ) -> None:
        err = exc if isinstance(exc, InputError) else LedgerCommandError(f"bad priced event: {exc!r}")
        out.sends.append(
            self._dead(
                src, now, customer, ev.get("event_id"), ev.get("occurred_at"), _priced_payload(ev), "priced_batch", err
            )
        )
        out.dead_letters += 1

    def _authorize_currency(self, req: LedgerRequest) -> str:
        return self.default_currency

    def _authorize(
        self, state: CustomerLedger, req: LedgerRequest, out: Outcome, live: LivePlan | None = None
    ) -> CustomerLedger:
        a = req.authorize
        assert a is not None
        try:
            estimate, _currency = worst_case_charge(self.pricer, req.customer_id, a, req.at_ms)
        except InputError as exc:  # no price for the model: refuse, never reserve 0
            out.sends.append(
                (
                    REPLIES,
                    a.request_id.encode(),
                    encode_message(
                        {
                            "request_id": a.request_id,
                            "customer_id": req.customer_id,
                            "decision": "deny",
                            "reason": exc.reason_code,
                            "hold_id": None,
                            "estimate": "0.00",
                            "available": "0.00",
                            "expires_at_ms": None,
                        }
                    ),
                    False,
                )
            )
            return state
        terms = (
            None if live is None else live_terms(self.plans.timeline(req.customer_id, live), live, req.at_ms // 1000)
        )
        if terms is not None and live is not None:
            return self._authorize_on_plan(state, req, out, live, terms, estimate)
        cmd = _authorize_command(req, estimate)
        state, eff = apply(state, cmd)
        self._effects(req.customer_id, eff, out)
        assert eff.decision is not None
        out.sends.append(
            (
                REPLIES,
                a.request_id.encode(),
                encode_message(reply_message(req.customer_id, eff.decision, estimate)),
                False,
            )
        )
        return state

    # ---------------------------------------------------------------------------- shared steps

    def _load(
        self, load: Callable[[str], Mapping[str, Any] | None], customer: str, currency: str
    ) -> tuple[CustomerLedger, dict[str, Any]]:
        stored = load(customer)
        if stored is None:
            return new_ledger(customer, currency, default_policy()), {"explicit_policy": False, "cmds": []}
        return CustomerLedger.from_dict(dict(stored)), dict(stored.get("x") or {})

    @staticmethod
    def _expire(state: CustomerLedger, now: int, out: Outcome) -> CustomerLedger:
        due = any(
            g.state == "live" and g.grant.expires_at_ms is not None and g.grant.expires_at_ms <= now
            for g in state.grants.values()
        ) or any(h.expires_ms <= now for h in state.holds.values())
        if not due:
            return state
        state, eff = apply(state, ExpireDue(now_ms=now))
        CreditProcessor._effects(state.customer_id, eff, out)
        return state

    @staticmethod
    def _effects(customer: str, eff: Effects, out: Outcome) -> None:
        key = customer.encode()
        out.entries.extend(entry_message(e) for e in eff.entries)
        for a in eff.alerts:
            out.sends.append((ALERTS, key, encode_message(alert_message(a)), True))
        for s in eff.status_changes:
            what = "blocked" if s.blocked else "unblocked"
            out.sends.append(
                (
                    ALERTS,
                    key,
                    encode_message(
                        {
                            "alert_id": f"{customer}/status/{s.scope}/{s.reason}/{what}/{s.at_ms}",
                            "customer_id": customer,
                            "kind": what,
                            "message": f"{s.scope} {what} ({s.reason})",
                            "at_ms": s.at_ms,
                            "scope": s.scope,
                            "reason": s.reason,
                        }
                    ),
                    True,
                )
            )

    def _finish(
        self,
        state: CustomerLedger,
        extra: dict[str, Any],
        src: SourcePos,
        now: int,
        out: Outcome,
        *,
        status: bool = True,
        mark: bool = True,
        live: LivePlan | None = None,
    ) -> Outcome:
        plan_view = None
        if live is not None and live.facts:
            state, plan_view = self._plan_gate(state, live, max(now, state.clock_ms), out)
        if mark:
            state = mark_applied(state, src)
        extra["ver"] = int(extra.get("ver") or 0) + 1
        value = state.to_dict()
        value["x"] = extra
        if live is not None and live.facts:
            value["plan"] = live.to_dict()
        chunks = [
            out.entries[i : i + ENTRIES_PER_MESSAGE] for i in range(0, len(out.entries), ENTRIES_PER_MESSAGE)
        ] or [[]]
        for i, chunk in enumerate(chunks):
            # Few messages per source record: a 500-event record writes 500 debits, and faust pays
            # ~100 µs per Kafka record, so entries travel together (the sink unpacks them), in
            # bounded messages (a record's debits must never make a message over Kafka's limit).
            # The last one also carries the state after the record (``snapshot``): the durable
            # fact a one-box restart restores from (the ledger sink stores it after the entries).
            doc: dict[str, Any] = {"entries": chunk}
            if i == len(chunks) - 1:
                doc["snapshot"] = snapshot_of(value)
            out.sends.append((ENTRIES, state.customer_id.encode(), encode_message(doc, trusted=True), True))
        if status:
            doc = status_message(state, max(now, state.clock_ms), plan_view)
            out.sends.append((STATUS, state.customer_id.encode(), encode_message(doc, trusted=True), True))
        out.state = value
        return out

    def _undecodable(
        self,
        src: SourcePos,
        now: int,
        key: bytes | None,
        value: bytes | None,
        exc: InputError,
        fmt: str,
        load: Callable[[str], Mapping[str, Any] | None],
    ) -> Outcome:
        customer = key.decode("utf-8", "replace") if key else None
        out = Outcome(customer_id=customer, dead_letters=1)
        out.sends.append(self._dead(src, now, customer, None, None, value or b"", fmt, exc))
        stored = load(customer) if customer else None
        if stored is not None:
            out.state = _marked_applied(stored, src)
            if out.state is None:
                return Outcome(customer_id=customer, skipped=True)
        return out

    @staticmethod
    def _dead(
        src: SourcePos,
        now: int,
        customer: str | None,
        event_id: Any,
        occurred: Any,
        payload: bytes,
        fmt: str,
        exc: InputError,
    ) -> tuple[str, bytes, bytes, bool]:
        reason = exc.message
        if len(payload) > MAX_DEAD_PAYLOAD_BYTES:  # the dead letter itself must fit in a message
            reason += f" (payload of {len(payload)} bytes left out: read it at the source position)"
            payload = b""
        record = encode_dead_letter(
            {
                "reason_code": exc.reason_code,
                "reason": reason,
                "field": exc.field,
                "source_topic": src.topic,
                "source_partition": src.partition,
                "source_offset": src.offset,
                "customer_id": customer,
                "event_id": event_id if isinstance(event_id, str) else None,
                "occurred_at": occurred if isinstance(occurred, int) else None,
                "payload": payload,
                "payload_format": fmt,
                "failed_at": now,
            }
        )
        return DEAD, (customer or "").encode(), record, True


def snapshot_of(value: Mapping[str, Any]) -> dict[str, Any]:
    """The durable part of a table value: everything but the remembered ids (rebuilt from the
    stored debits), the applied offsets (broker positions), the holds (minutes-long reservations)
    and the agent's delivery bookkeeping (outbox, watermarks)."""
    snap = {k: v for k, v in value.items() if k not in ("recent", "offsets", "holds", "x")}
    x = value.get("x") or {}
    snap["x"] = {"explicit_policy": bool(x.get("explicit_policy")), "ver": int(x.get("ver") or 0)}
    return snap


def _restore_request(value: bytes | None) -> dict[str, Any] | None:
    """The decoded message when it is a ``restore`` (checked cheaply first), else None."""
    if not value or b'"restore"' not in value:
        return None
    try:
        d = json.loads(value)
    except ValueError:
        return None
    if isinstance(d, dict) and d.get("type") == "restore" and isinstance(d.get("state"), dict):
        return d
    return None


def _live_of(stored: Mapping[str, Any] | None) -> LivePlan | None:
    """The customer's live plan state (None: no subscription fact seen: today's rules)."""
    if not stored or not stored.get("plan"):
        return None
    live = LivePlan.from_dict(stored["plan"])
    return live if live.facts else None


def _formatted(d: dict[str, Any]) -> dict[str, Any]:
    """Token allowances as integers, amount allowances as decimal strings (like ``bill preview``)."""
    if d["unit"] == "tokens":
        return d
    return {**d, **{k: format_picos(d[k]) for k in ("included", "used", "remaining", "reserved") if k in d}}


def _with_charge(cmd: ApplyPricedUsage, charge: int) -> ApplyPricedUsage:
    from dataclasses import replace

    return replace(cmd, charge_picos=charge)


def _allowance_alert(
    customer: str, terms: Terms, aid: str, pct: int, used: int, avail: int, at_ms: int
) -> dict[str, Any]:
    """An ``alerts`` value for an allowance threshold; the id names the segment, so a replay
    regenerates the same id and each threshold fires once per segment."""
    unit = next((a.unit for a in terms.plan.allowances if a.id == aid), "tokens")
    fmt = str if unit == "tokens" else format_picos
    return {
        "alert_id": f"{customer}/allowance/{terms.plan.key}/{terms.start}/{aid}/{pct}",
        "customer_id": customer,
        "kind": "allowance_used",
        "message": f"allowance {aid} of {terms.plan.key}: {pct}% used ({fmt(used)} of {fmt(avail)})",
        "at_ms": at_ms,
        "scope": "customer",
        "threshold": str(pct),
        "threshold_unit": "percent",
        "value": fmt(used),
        "allowance_id": aid,
        "plan": terms.plan.key,
    }


def _priced_payload(ev: Mapping[str, Any]) -> bytes:
    try:
        return encode_priced_batch([dict(ev)])
    except Exception:
        return json.dumps(ev, default=repr).encode()[:256_000]


def _authorize_command(req: LedgerRequest, estimate_picos: int) -> Authorize:
    """The ledger's Authorize for an authorize request, reserving ``estimate_picos``."""
    a = req.authorize
    assert a is not None
    return Authorize(
        request_id=a.request_id,
        estimate_picos=estimate_picos,
        now_ms=req.at_ms,
        provider=a.provider,
        model=a.model,
        project=a.project,
        api_key_id=a.api_key_id,
        ttl_ms=a.ttl_ms,
    )


def _marked_applied(stored: Mapping[str, Any], src: SourcePos) -> dict[str, Any] | None:
    """The stored value with ``src`` marked applied (its side keys kept), or None if it already was."""
    state = CustomerLedger.from_dict(dict(stored))
    if state.applied_offsets.get(src.key, -1) >= src.offset:
        return None
    value_d = mark_applied(state, src).to_dict()
    value_d["x"] = dict(stored.get("x") or {})
    if stored.get("plan"):
        value_d["plan"] = stored["plan"]
    return value_d
