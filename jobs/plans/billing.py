"""Plan bills from meterline's own data: ClickHouse usage aggregates + the subscription timeline.

``bill_preview`` is what ``meterline bill preview`` prints; ``close_period`` is ``meterline bill
close`` (it writes ``plan_bills`` / ``plan_allowance_usage`` for analysts). The arithmetic is the
pure :mod:`meterline.core.plans` (the same code the credit agent burns allowances down with); this
module only reads:

- the catalog from ``plans FINAL`` and the customer's facts from ``subscription_events FINAL``;
- usage aggregated **in SQL**: one ``GROUP BY segment, provider, model`` over ``usage_priced
  FINAL`` per period, where ``segment`` is a ``multiIf`` over the period's segment boundaries;
- prepaid credit applied: the ledger's debits against grants for usage in the period
  (``ledger_entries``, kind ``debit``, ``grant_id != ''``, by entry time).

Which periods ``--period YYYY-MM`` means: every billing period of the customer that *starts* in
that calendar month (UTC), current or past. A customer with no plan in that month gets the
pay-per-token bill: one ``usage`` line, the month's exact charge.

Corrections (``meterline reprice``, docs/corrections.md) are bill lines of their own, kind
``correction``, never folded into the usage: history stays as priced and the bill says what changed,
by which correction and why (``reprice_runs.reason``):

- a billing period gets one line per ``usage_corrections`` row set with ``kind = 'plan'`` whose
  ``occurred_at`` (the period start the re-rating wrote) falls in the period: its ``charge`` is the
  change of that period's bill, exact;
- the pay-per-token part of the month (outside any plan run) gets one line per correction of its
  hours (``kind = 'usage'``, the hours overlapping the gaps). Inside a plan run a usage row corrects
  only the cost: the plan row carries the bill.

So ``usage_priced`` + the corrections = the re-rated bill (before prepaid credit, which is how the
bill is paid, read from the ledger as before).
"""

from __future__ import annotations

import calendar
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from meterline.core.errors import InputError, MeterlineError
from meterline.core.money import decimal_to_picos
from meterline.core.plans import (
    PLAN_KEY_PREFIX,
    Bill,
    BillLine,
    Period,
    PlanCatalog,
    SubscriptionError,
    SubscriptionEvent,
    Timeline,
    Usage,
    catalog_from_records,
    fold_timeline,
    format_picos,
    parse_event,
    rate_periods,
    round_total,
)

__all__ = [
    "BillCorrection",
    "bill_preview",
    "close_period",
    "corrected_bills",
    "load_catalog",
    "load_events",
    "month_bounds",
    "payg_corrections",
    "period_corrections",
    "period_usage",
]

_CLASSES = ("input", "output", "cached_input", "cache_write", "reasoning")


def month_bounds(text: str) -> tuple[int, int]:
    """``YYYY-MM`` -> ``[start, end)`` epoch seconds of that UTC calendar month."""
    m = re.fullmatch(r"(\d{4})-(\d{2})", text.strip())
    if not m or not 1 <= int(m.group(2)) <= 12:
        raise InputError(f"bad period {text!r}: use YYYY-MM", field="period")
    y, mo = int(m.group(1)), int(m.group(2))
    start = calendar.timegm((y, mo, 1, 0, 0, 0))
    end = calendar.timegm((y + mo // 12, mo % 12 + 1, 1, 0, 0, 0))
    return start, end


def _picos(d: Any) -> int:
    """An exact ClickHouse Decimal(38, 12) (or int) -> integer picos."""
    picos = decimal_to_picos(d if isinstance(d, Decimal) else Decimal(d))
    if picos is None:
        raise MeterlineError(f"{d!r} is not an exact amount in picos")
    return picos


def _ts(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def load_catalog(client: Any) -> PlanCatalog:
    """Every plan version landed in ``plans`` (verified against its hash, like a topic record)."""
    rows = client.query("SELECT version_key, currency, plan_hash, definition FROM plans FINAL").result_rows
    records = []
    for key, currency, plan_hash, definition in rows:
        value = {"kind": "plan", "currency": currency, "plan_hash": plan_hash, **json.loads(definition)}
        records.append((PLAN_KEY_PREFIX + str(key), json.dumps(value).encode()))
    return catalog_from_records(records)


def load_events(client: Any, customer_id: str | None = None) -> list[SubscriptionEvent]:
    """Subscription facts from ``subscription_events`` (one customer, or all)."""
    where = "WHERE customer_id = {c:String}" if customer_id is not None else ""
    rows = client.query(
        "SELECT event_id, type, customer_id, toUnixTimestamp(at), plan_id, version, at_period_end"
        f" FROM subscription_events FINAL {where}",
        parameters={"c": customer_id} if customer_id is not None else None,
    ).result_rows
    out = []
    for event_id, typ, cid, at, plan_id, version, ape in rows:
        doc: dict[str, Any] = {
            "event_id": event_id,
            "type": typ,
            "customer_id": cid,
            "at": datetime.fromtimestamp(int(at), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        if plan_id:
            doc["plan_id"] = plan_id
        if version:
            doc["version"] = int(version)
        if ape:
            doc["at_period_end"] = True
        try:
            out.append(parse_event(doc))
        except SubscriptionError:
            continue  # landed facts were validated by the sink; a bad one cannot bill
    return out


def period_usage(client: Any, period: Period) -> list[list[Usage]]:
    """The period's priced usage per segment and model, aggregated in ClickHouse."""
    bounds = [s.end if s.end is not None else period.stop for s in period.segments][:-1]
    params: dict[str, Any] = {"c": period.customer_id, "lo": period.start * 1000, "hi": period.stop * 1000}
    if bounds:
        arms = ", ".join(
            f"occurred_at < fromUnixTimestamp64Milli({{b{i}:Int64}}, 'UTC'), {i}" for i in range(len(bounds))
        )
        seg = f"multiIf({arms}, {len(bounds)})"
        params.update({f"b{i}": b * 1000 for i, b in enumerate(bounds)})
    else:
        seg = "0"
    rows = client.query(
        f"SELECT {seg} AS seg, provider, model, sum(input_tokens), sum(output_tokens), sum(cached_input_tokens),"
        " sum(cache_write_tokens), sum(reasoning_tokens), sum(charge), groupUniqArray(upper(currency))"
        " FROM usage_priced FINAL WHERE customer_id = {c:String}"
        " AND occurred_at >= fromUnixTimestamp64Milli({lo:Int64}, 'UTC')"
        " AND occurred_at < fromUnixTimestamp64Milli({hi:Int64}, 'UTC')"
        " GROUP BY seg, provider, model ORDER BY seg, provider, model",
        parameters=params,
    ).result_rows
    out: list[list[Usage]] = [[] for _ in period.segments]
    for seg_i, provider, model, *rest in rows:
        counts, charge, currencies = rest[:5], rest[5], rest[6]
        plan = period.segments[int(seg_i)].plan
        foreign = sorted(str(c) for c in currencies if c and str(c) != plan.currency.upper())
        if foreign:
            raise MeterlineError(
                f"{period.customer_id}: usage priced in {', '.join(foreign)} cannot be billed on {plan.key} ({plan.currency})"
            )
        tokens = {c: int(n) for c, n in zip(_CLASSES, counts, strict=True) if int(n)}
        out[int(seg_i)].append(Usage(str(provider), str(model), tokens, _picos(charge)))
    return out


def _prepaid(client: Any, customer_id: str, start: int, stop: int) -> int:
    rows = client.query(
        "SELECT sum(amount) FROM ledger_entries FINAL WHERE customer_id = {c:String} AND kind = 'debit'"
        " AND grant_id != '' AND at >= fromUnixTimestamp64Milli({lo:Int64}, 'UTC')"
        " AND at < fromUnixTimestamp64Milli({hi:Int64}, 'UTC')",
        parameters={"c": customer_id, "lo": start * 1000, "hi": stop * 1000},
    ).result_rows
    return _picos(rows[0][0] or 0) if rows else 0


def _charge(client: Any, customer_id: str, start: int, stop: int) -> tuple[int, str | None]:
    rows = client.query(
        "SELECT sum(charge), any(currency) FROM usage_priced FINAL WHERE customer_id = {c:String}"
        " AND occurred_at >= fromUnixTimestamp64Milli({lo:Int64}, 'UTC')"
        " AND occurred_at < fromUnixTimestamp64Milli({hi:Int64}, 'UTC')",
        parameters={"c": customer_id, "lo": start * 1000, "hi": stop * 1000},
    ).result_rows
    if not rows:
        return 0, None
    return _picos(rows[0][0] or 0), (str(rows[0][1]) or None)


def _bills(
    client: Any,
    timeline: Timeline,
    start: int,
    end: int,
    *,
    overlapping: bool = False,
    usage_of: Any = None,
    prepaid_of: Any = None,
) -> list[tuple[Period, Bill]]:
    """Bills of the timeline's periods starting in ``[start, end)`` (with ``overlapping``, when
    none starts there, e.g. a yearly plan: the periods overlapping it); earlier periods of the same
    run are rated too when a plan in it rolls allowances over (rollover chains periods).
    ``usage_of`` / ``prepaid_of`` replace the per-period queries (the simulator passes its own
    aggregates, so its "current plan" figure is this very function)."""
    periods = timeline.periods(end)
    wanted = [p for p in periods if start <= p.start < end]
    if not wanted and overlapping:
        wanted = [p for p in periods if p.start < end and p.stop > start]
    if not wanted:
        return []
    rolls = any(a.rollover_max is not None for p in periods for s in p.segments for a in s.plan.allowances)
    chain = [
        p for p in periods if p.start < end and ((rolls and any(p.anchor == w.anchor for w in wanted)) or p in wanted)
    ]
    bills = rate_periods(
        chain,
        usage_of or (lambda p: period_usage(client, p)),
        prepaid_of or (lambda p: _prepaid(client, p.customer_id, p.start, p.stop)),
    )
    return [(p, b) for p, b in zip(chain, bills, strict=True) if p in wanted]


def _gaps(timeline: Timeline, start: int, end: int) -> list[tuple[int, int]]:
    """The parts of ``[start, end)`` in which the customer had no subscription (pay-per-token)."""
    gaps, cur = [], start
    for a, b in sorted((r.anchor, r.end if r.end is not None else end) for r in timeline.runs):
        if a >= end or cur >= end:
            break
        if b <= cur:
            continue
        if a > cur:
            gaps.append((cur, a))
        cur = max(cur, b)
    if cur < end:
        gaps.append((cur, end))
    return gaps


@dataclass(frozen=True, slots=True)
class BillCorrection:
    """One correction of a bill (``meterline reprice``): a ``usage_corrections`` row set of one
    ``correction_id``. ``amount`` / ``ledger_amount`` are exact picos (signed)."""

    correction_id: str
    kind: str  # plan (a billing period's bill) | usage (pay-per-token hours outside plan runs)
    reason: str
    amount: int
    ledger_amount: int
    plans: str  # the plan versions re-rated (plan rows), '' for usage
    created_at: int  # epoch seconds, when the correction was applied
    start: int  # the period (plan) or the first corrected hour (usage), epoch seconds
    end: int

    @property
    def description(self) -> str:
        what = "plan bill re-rated" if self.kind == "plan" else "pay-per-token usage re-rated"
        return f"correction {self.correction_id} ({self.reason or 'no reason given'}): {what}"

    def line(self, plan: str | None = None) -> BillLine:
        """The bill line: kind ``correction``, ``ref`` the correction id, the exact amount."""
        return BillLine(
            "correction",
            self.description,
            plan,
            self.correction_id,
            "1",
            "correction",
            None,
            self.amount,
            self.start,
            self.end,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "correction_id": self.correction_id,
            "kind": self.kind,
            "reason": self.reason,
            "amount": format_picos(self.amount),
            "ledger_amount": format_picos(self.ledger_amount),
            "plans": self.plans.split(",") if self.plans else [],
            "start": _iso(self.start),
            "end": _iso(self.end),
            "applied_at": _iso(self.created_at),
        }


_CORRECTIONS_SQL = (
    "SELECT c.correction_id, sum(c.charge), sum(c.ledger_charge), arrayStringConcat(arraySort(groupUniqArray("
    "c.price_version)), ','), toUnixTimestamp(min(c.created_at)), toUnixTimestamp(min(c.occurred_at)), "
    "toUnixTimestamp(max(c.period_end)), any(r.reason) "
    "FROM (SELECT correction_id, charge, ledger_charge, price_version, created_at, occurred_at, period_end "
    "      FROM usage_corrections FINAL WHERE customer_id = {{c:String}} AND kind = '{kind}' AND ({where})) AS c "
    "LEFT JOIN (SELECT correction_id, reason FROM reprice_runs FINAL) AS r ON c.correction_id = r.correction_id "
    "GROUP BY c.correction_id HAVING sum(c.charge) != 0 OR sum(c.ledger_charge) != 0 "
    "ORDER BY min(c.created_at), c.correction_id"
)


def _corrections(client: Any, customer_id: str, kind: str, where: str, params: dict[str, Any]) -> list[BillCorrection]:
    rows = client.query(
        _CORRECTIONS_SQL.format(kind=kind, where=where), parameters={"c": customer_id, **params}
    ).result_rows
    return [
        BillCorrection(
            str(cid),
            kind,
            str(reason or ""),
            _picos(charge or 0),
            _picos(ledger or 0),
            str(plans or "") if kind == "plan" else "",
            int(created),
            int(lo),
            int(hi) + (3600 if kind == "usage" else 0),  # a usage row is the hour starting there
        )
        for cid, charge, ledger, plans, created, lo, hi, reason in rows
    ]


def period_corrections(client: Any, period: Period) -> list[BillCorrection]:
    """The plan corrections of a billing period: ``kind = 'plan'`` rows whose ``occurred_at`` (the
    period start the re-rating wrote) lies in ``[period.start, period.stop)``."""
    return _corrections(
        client,
        period.customer_id,
        "plan",
        "occurred_at >= fromUnixTimestamp64Milli({lo:Int64}, 'UTC') AND occurred_at < fromUnixTimestamp64Milli({hi:Int64}, 'UTC')",
        {"lo": period.start * 1000, "hi": period.stop * 1000},
    )


def payg_corrections(client: Any, customer_id: str, gaps: list[tuple[int, int]]) -> list[BillCorrection]:
    """The corrections of the pay-per-token usage in ``gaps`` (no plan then): ``kind = 'usage'``
    rows of the hours overlapping a gap. A row is one hour; an hour cut by a subscription start or
    end holds, in its charge, only the pay-per-token events' delta (inside a plan run only the cost
    is corrected), so it counts here whole. One line per correction over all the gaps."""
    if not gaps:
        return []
    arms, params = [], {}
    for i, (a, b) in enumerate(gaps):
        arms.append(
            f"(occurred_at >= toStartOfHour(fromUnixTimestamp64Milli({{a{i}:Int64}}, 'UTC')) "
            f"AND occurred_at < fromUnixTimestamp64Milli({{b{i}:Int64}}, 'UTC'))"
        )
        params.update({f"a{i}": a * 1000, f"b{i}": b * 1000})
    return _corrections(client, customer_id, "usage", " OR ".join(arms), params)


def corrected_bills(client: Any, pairs: list[tuple[Period, Bill]]) -> list[tuple[Period, Bill, list[BillCorrection]]]:
    """Each bill with its period's plan corrections appended as ``correction`` lines (so its
    ``subtotal`` / ``total`` are the corrected ones, still rounded once)."""
    out = []
    for period, bill in pairs:
        corr = period_corrections(client, period)
        plan = ",".join(dict.fromkeys(s.plan.key for s in period.segments))
        lines = bill.lines + tuple(c.line(plan) for c in corr)
        out.append((period, replace(bill, lines=lines) if corr else bill, corr))
    return out


def bill_preview(client: Any, customer_id: str, month: str) -> dict[str, Any]:
    """The JSON of ``meterline bill preview CUSTOMER --period YYYY-MM``: ``total`` (decimal
    string, rounded once), ``lines`` (kind, description, quantity, amount, ...), ``allowances``
    (id, included, used, remaining, ...) and, per billing period, its own bill.

    The bill is that of the customer's billing periods starting in the month (or, when none
    does, the period overlapping it, e.g. a yearly plan), plus one ``usage`` line for the
    pay-per-token usage of the calendar month that fell outside any subscription, plus one
    ``correction`` line per re-rating that changed them (``corrections``: id, kind, reason,
    exact amount; a period's own ``corrections`` and ``billed_subtotal``, its bill as first
    computed)."""
    start, end = month_bounds(month)
    catalog = load_catalog(client)
    timeline = fold_timeline(customer_id, load_events(client, customer_id), catalog)
    triples = corrected_bills(client, _bills(client, timeline, start, end, overlapping=True))
    payg, payg_currency = 0, None
    usage_lines: list[dict[str, Any]] = []
    gaps = _gaps(timeline, start, end)
    for a, b in gaps:
        charge, cur = _charge(client, customer_id, a, b)
        payg, payg_currency = payg + charge, payg_currency or cur
        if charge or not triples:
            usage_lines.append(
                {
                    "kind": "usage",
                    "description": "pay-per-token usage at the customer's rate card (no plan then)",
                    "plan": None,
                    "ref": None,
                    "quantity": format_picos(charge),
                    "unit": "amount",
                    "unit_price": None,
                    "amount": format_picos(charge),
                    "start": _iso(a),
                    "end": _iso(b),
                }
            )
    payg_corr = payg_corrections(client, customer_id, gaps)
    usage_lines += [c.line().to_json() for c in payg_corr]
    payg += sum(c.amount for c in payg_corr)
    currency = triples[0][1].currency if triples else (payg_currency or catalog.currency).upper()
    subtotal = sum(bill.subtotal for _, bill, _ in triples) + payg
    bills = []
    for _, bill, corr in triples:
        doc = bill.to_json()
        doc["billed_subtotal"] = format_picos(bill.subtotal - sum(c.amount for c in corr))
        doc["corrections"] = [c.to_json() for c in corr]
        bills.append(doc)
    corrections = payg_corr + [c for _, _, corr in triples for c in corr]
    return {
        "customer_id": customer_id,
        "period": month,
        "plan": triples[-1][0].segments[-1].plan.key if triples else None,
        "currency": currency,
        "total": str(round_total(subtotal, currency)),
        "subtotal": format_picos(subtotal),
        "lines": usage_lines + [line for b in bills for line in b["lines"]],
        "allowances": [a for b in bills for a in b["allowances"]],
        "periods": bills,
        "corrections": [c.to_json() for c in corrections],
        "corrections_total": format_picos(sum(c.amount for c in corrections)),
        "rejected_facts": [{"event_id": r.event.event_id, "reason": r.reason} for r in timeline.rejected],
    }


def _iso(seconds: int) -> str:
    return _ts(seconds).strftime("%Y-%m-%dT%H:%M:%SZ")


def close_period(client: Any, month: str, *, customers: Iterable[str] | None = None, closed_at_ms: int) -> int:
    """Write the bills of every subscribed customer's periods starting in ``month`` into
    ``plan_bills`` and ``plan_allowance_usage`` (a newer close replaces an older one). Returns
    the number of bills written. ``closed_at_ms`` orders re-closes (the caller passes the time).
    A period's plan corrections (``meterline reprice``) are ``correction`` lines of its bill: in
    ``lines``, ``subtotal`` and ``total`` (fee, overage, ... stay the bill as first rated), so a
    close after a reprice writes the re-rated bill."""
    start, end = month_bounds(month)
    catalog = load_catalog(client)
    events = load_events(client)
    by_customer: dict[str, list[SubscriptionEvent]] = {}
    for ev in events:
        by_customer.setdefault(ev.customer_id, []).append(ev)
    wanted = set(customers) if customers is not None else None
    closed_at = datetime.fromtimestamp(closed_at_ms // 1000, tz=UTC).replace(microsecond=(closed_at_ms % 1000) * 1000)
    bill_rows: list[tuple[Any, ...]] = []
    use_rows: list[tuple[Any, ...]] = []
    for cid in sorted(by_customer):
        if wanted is not None and cid not in wanted:
            continue
        timeline = fold_timeline(cid, by_customer[cid], catalog)
        for period, bill, _ in corrected_bills(client, _bills(client, timeline, start, end)):
            last = period.segments[-1].plan
            charge, _ = _charge(client, cid, period.start, period.stop)

            def units(kind: str, bill: Bill = bill) -> Decimal:
                return Decimal(bill.amount_of(kind)).scaleb(-12)

            bill_rows.append(
                (
                    cid,
                    _ts(period.start),
                    _ts(period.end),
                    _ts(period.stop),
                    last.plan_id,
                    last.version,
                    bill.currency,
                    units("fee"),
                    units("overage"),
                    units("cap") + units("blocked"),
                    units("minimum_commitment"),
                    units("prepaid_credit"),
                    Decimal(bill.subtotal).scaleb(-12),
                    bill.total,
                    Decimal(charge).scaleb(-12),
                    json.dumps([line.to_json() for line in bill.lines], sort_keys=True),
                    closed_at,
                )
            )
            for a in bill.allowances:
                plan_id, _, version = a.plan.rpartition("@")
                scale = 0 if a.unit == "tokens" else -12  # tokens, or picos -> currency units

                def conv(n: int, scale: int = scale) -> Decimal:
                    return Decimal(n).scaleb(scale)

                use_rows.append(
                    (
                        cid,
                        _ts(period.start),
                        a.segment,
                        a.id,
                        plan_id,
                        int(version),
                        a.unit,
                        conv(a.included),
                        conv(a.rolled_in),
                        conv(a.used),
                        conv(a.remaining),
                        conv(a.rollover_out),
                        closed_at,
                    )
                )
    if bill_rows:
        client.insert("plan_bills", bill_rows, column_names=_BILL_COLUMNS)
    if use_rows:
        client.insert("plan_allowance_usage", use_rows, column_names=_USE_COLUMNS)
    return len(bill_rows)


_BILL_COLUMNS = (
    "customer_id",
    "period_start",
    "period_end",
    "period_stop",
    "plan_id",
    "version",
    "currency",
    "fee",
    "overage",
    "written_off",
    "true_up",
    "prepaid",
    "subtotal",
    "total",
    "usage_charge",
    "lines",
    "closed_at",
)
_USE_COLUMNS = (
    "customer_id",
    "period_start",
    "segment",
    "allowance_id",
    "plan_id",
    "version",
    "unit",
    "included",
    "rolled_in",
    "used",
    "remaining",
    "rollover_out",
    "closed_at",
)
