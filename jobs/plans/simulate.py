"""The plan simulator (issue #13): what each customer would have paid under other plans, on its real
usage, read-only.

How it stays fast and exact
---------------------------
ClickHouse does the heavy lifting in ONE ``GROUP BY`` over ``usage_priced FINAL``: per customer,
provider, model and *bucket*, the sums of the five token classes and of the charge. A bucket is
the stretch between two consecutive boundaries, computed in SQL with ``arrayCount(b -> b <= t,
boundaries)``; two independent bucketings are grouped at once:

- ``s``: shared boundaries: each calendar month of ``--period`` and each candidate plan's periods
  (a candidate is simulated as a subscription starting at the first month's start);
- ``o``: the customer's own boundaries: every period start/stop and segment start/end of its real
  subscription timeline (so its current plan is rated per segment exactly as billing does).

Python then only folds those aggregates (a few per customer, model and period) through
:mod:`meterline.core.plans` — the SAME rating code as billing. The customer's current plan goes through
:func:`jobs.plans.billing._bills` itself (only the source of the aggregates differs), so its figure
equals ``meterline bill preview`` to the cent; prepaid credit is bucketed the same way from
``ledger_entries``.

What each candidate means (per calendar month ``M`` of ``--period``):

- ``payg``: the month's pay-per-token charge at the customer's rate card (no plan), as ``bill
  preview`` gives for a customer without a plan;
- ``current``: the customer's real plan bill for its periods starting in ``M`` (with prepaid credit
  applied to overage, as billed);
- a candidate plan: the bill of its periods starting in ``M`` if the customer had subscribed at
  the range's start. No prepaid credit is applied (credit is a way to pay, not a price).

Each month's total is rounded once (it is an invoice); a candidate's ``total`` is the sum of its
monthly totals, its ``average`` the exact mean (rounded half-even to the minor unit, the exact
fraction beside it).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction
from typing import Any

from jobs.plans.billing import _bills, _gaps, _picos, load_catalog, load_events, month_bounds
from meterline.core.errors import InputError
from meterline.core.plans import (
    Bill,
    Period,
    PlanCatalog,
    PlanVersion,
    SubscriptionEvent,
    Timeline,
    Usage,
    fold_timeline,
    format_picos,
    rate_periods,
    round_total,
)
from meterline.core.plans._values import minor_unit
from meterline.core.simulator import crossings, curve_points, fraction_json, mix_of, payg_curve, plan_curve
from meterline.core.simulator._routing import Route

__all__ = ["MAX_MONTHS", "parse_months", "resolve_plans", "simulate"]

MAX_MONTHS = 36
_CLASSES = ("input", "output", "cached_input", "cache_write", "reasoning")
_TOKEN_SUM = "input_tokens + output_tokens + cached_input_tokens + cache_write_tokens + reasoning_tokens"


# --------------------------------------------------------------------------- inputs


def parse_months(text: str) -> list[str]:
    """``YYYY-MM`` or ``YYYY-MM..YYYY-MM`` -> the months, in order (at most :data:`MAX_MONTHS`)."""
    parts = text.strip().split("..")
    if len(parts) > 2:
        raise InputError(f"bad period {text!r}: use YYYY-MM or YYYY-MM..YYYY-MM", field="period")
    first, last = parts[0], parts[-1]
    month_bounds(first), month_bounds(last)  # validates both
    y, m = int(first[:4]), int(first[5:7])
    out: list[str] = []
    while True:
        label = f"{y:04d}-{m:02d}"
        out.append(label)
        if label == last.strip():
            return out
        if label > last.strip() or len(out) >= MAX_MONTHS:
            raise InputError(
                f"bad period {text!r}: the range must run forward, at most {MAX_MONTHS} months", field="period"
            )
        y, m = (y + 1, 1) if m == 12 else (y, m + 1)


def resolve_plans(
    spec: Sequence[str], catalog: PlanCatalog, at: int, file_catalog: PlanCatalog | None = None
) -> list[PlanVersion]:
    """Candidate plans: every version in a plan file, or ids (``pro`` = the version in force at
    ``at``, else its latest; ``pro@2`` = that version) from the published catalog."""
    if file_catalog is not None:
        latest: dict[str, PlanVersion] = {}
        for fv in file_catalog.versions:
            if fv.plan_id not in latest or fv.version > latest[fv.plan_id].version:
                latest[fv.plan_id] = fv
        return list(latest.values())
    out: list[PlanVersion] = []
    for item in spec:
        pid, _, ver = item.strip().partition("@")
        if not pid:
            continue
        if ver:
            if not ver.isdigit():
                raise InputError(f"bad plan {item!r}: use ID or ID@VERSION", field="plans")
            v: PlanVersion | None = catalog.get(pid, int(ver))
        else:
            v = catalog.current(pid, at) or (catalog.versions_of(pid)[-1] if catalog.versions_of(pid) else None)
        if v is None:
            raise InputError(
                f"unknown plan {item!r}: load it with `meterline plans load` or pass a plan file", field="plans"
            )
        if v not in out:
            out.append(v)
    if not out:
        raise InputError("--plans names no plan", field="plans")
    return out


# --------------------------------------------------------------------------- aggregates


@dataclass
class _Agg:
    """One aggregate row: a customer's usage of one model in one (s, o) bucket."""

    s: int
    o: int
    provider: str
    model: str
    tokens: dict[str, int]
    charge: int


def _merge(rows: Iterable[_Agg]) -> list[Usage]:
    """Aggregates -> one Usage per (provider, model), in billing's order (provider, model)."""
    acc: dict[tuple[str, str], list[int]] = {}
    for r in rows:
        v = acc.get((r.provider, r.model))
        if v is None:
            v = acc[(r.provider, r.model)] = [0, 0, 0, 0, 0, 0]
        t = r.tokens
        for i, c in enumerate(_CLASSES):
            v[i] += t.get(c, 0)
        v[5] += r.charge
    return [Usage(p, m, {c: v[i] for i, c in enumerate(_CLASSES) if v[i]}, v[5]) for (p, m), v in sorted(acc.items())]


_SIGNATURES: dict[tuple[str, str, str], tuple[Any, ...]] = {}  # (plan_hash, provider, model) -> allowance ids


def _collapse(plan: PlanVersion, usage: list[Usage]) -> list[Usage]:
    """Merge the usage of models that ``plan`` treats alike (the same allowance for every token
    class, or the same amount allowance) into one item named after the first of them.

    Rating-neutral: :func:`meterline.core.plans.consume` looks at provider and model only through
    ``plan.allowance_for``, allowance draw is ``min(available, usage in scope)`` and overage is
    priced on the cumulative quantity, so the bill of a merged aggregate is the bill of its parts
    (``rate_period`` takes usage "aggregated any way"). It turns ~20 items per period into ~1."""
    if len(usage) < 2:
        return usage
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for u in usage:
        ck = (plan.plan_hash, u.provider, u.model)
        key = _SIGNATURES.get(ck)
        if key is None:
            if plan.unit == "tokens":
                key = tuple(getattr(plan.allowance_for(u.provider, u.model, c), "id", None) for c in _CLASSES)
            else:
                key = (getattr(plan.allowance_for(u.provider, u.model, None), "id", None),)
            if len(_SIGNATURES) > 100_000:
                _SIGNATURES.clear()
            _SIGNATURES[ck] = key
        g = groups.get(key)
        if g is None:
            groups[key] = [u.provider, u.model, dict(u.tokens), u.charge]
        else:
            for c, n in u.tokens.items():
                g[2][c] = g[2].get(c, 0) + n
            g[3] += u.charge
    return [Usage(p, m, t, ch) for p, m, t, ch in groups.values()]


def _ms(seconds: int) -> int:
    return seconds * 1000


def _bucket_of(bounds: Sequence[int], idx: int) -> tuple[int, int] | None:
    """Bucket ``idx`` of ``arrayCount(b -> b <= t, bounds)`` as ``[lo, hi)`` seconds (None outside)."""
    if idx <= 0 or idx >= len(bounds):
        return None
    return bounds[idx - 1], bounds[idx]


# --------------------------------------------------------------------------- the simulation


@dataclass
class _Cand:
    name: str
    role: str  # payg | current | plan
    plan: PlanVersion | None = None
    months: list[tuple[int, list[Bill]]] = field(default_factory=list)  # (month charge or subtotal, bills)
    distinct_subtotal: int | None = None  # current plan: each billing period once over the range


def _round_fraction(x: Fraction, currency: str) -> str:
    q = Decimal(1).scaleb(-minor_unit(currency))
    return str((Decimal(x.numerator) / Decimal(x.denominator)).quantize(q, rounding=ROUND_HALF_EVEN))


def _per_million(subtotal: int, tokens: int) -> str | None:
    """Effective price per million tokens (exact subtotal / tokens, 6 places, half-even)."""
    if tokens <= 0:
        return None
    d = Decimal(subtotal * 10**6) / Decimal(tokens * 10**12)
    return str(d.quantize(Decimal("0.000001"), rounding=ROUND_HALF_EVEN))


def _ts(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def simulate(
    client: Any,
    period: str,
    plans: Sequence[PlanVersion],
    *,
    customer: str | None = None,
    cohort: str | None = None,
    routes: Sequence[Route] = (),
    price_engine: Any = None,
    substitute_versions: Mapping[tuple[str, str], Sequence[int]] | None = None,
    break_even: bool = True,
    timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The simulator's JSON document (see the module docstring and ``docs/plans.md``).

    ``customer``: one customer; else every customer with usage or a subscription in the range.
    ``cohort``: only customers whose current plan (at the range's end) is this plan id.
    ``routes`` with ``price_engine`` (a :class:`meterline.core.pricing.PricingEngine` built from the
    prices topic) and ``substitute_versions`` ((provider, model) -> effective_from epoch ms of its
    price versions) add the routing what-if. ``timings`` (if given) receives the seconds spent in
    ClickHouse (``query_s``) and folding in Python (``fold_s``), for the benchmark."""
    t0 = time.perf_counter()
    months = parse_months(period)
    spans = [month_bounds(m) for m in months]
    r_start, r_end = spans[0][0], spans[-1][1]
    catalog = load_catalog(client)
    events = load_events(client, customer)
    by_cust: dict[str, list[SubscriptionEvent]] = defaultdict(list)
    for ev in events:
        by_cust[ev.customer_id].append(ev)
    timelines: dict[str, Timeline] = {c: fold_timeline(c, evs, catalog) for c, evs in by_cust.items()}
    tperiods: dict[str, list[Period]] = {c: tl.periods(r_end) for c, tl in timelines.items()}

    # candidate plans: one synthetic timeline each, anchored at the range's start
    cand_catalog = PlanCatalog(
        catalog.currency, tuple(sorted({*catalog.versions, *plans}, key=lambda v: (v.plan_id, v.version)))
    )
    cand_periods: dict[str, list[Period]] = {}
    for pv in plans:
        tl = fold_timeline("_", [SubscriptionEvent("subscribed", "_", r_start, pv.plan_id, pv.version)], cand_catalog)
        if tl.rejected:
            raise InputError(
                f"plan {pv.key} cannot be simulated from {_ts(r_start)}: {tl.rejected[0].reason}", field="plans"
            )
        cand_periods[pv.key] = [p for p in tl.periods(r_end) if r_start <= p.start < r_end]

    shared = sorted(
        {b for s in spans for b in s} | {b for ps in cand_periods.values() for p in ps for b in (p.start, p.stop)}
    )

    # each subscribed customer's own boundaries
    own: dict[str, list[int]] = {}
    for c in timelines:
        if customer is not None and c != customer:
            continue
        bs: set[int] = set()
        for p in tperiods[c]:
            bs.update((p.start, p.stop))
            for s in p.segments:
                bs.add(s.start)
                bs.add(s.end if s.end is not None else p.stop)
        if bs:
            bs.update(b for span in spans for b in span)  # months: pay-per-token gaps are cut at them
            own[c] = sorted(bs)
    lo = min([shared[0], *(b[0] for b in own.values())])
    hi = max([shared[-1], *(b[-1] for b in own.values())])
    cids = sorted(own)
    # Models matter to rating only through allowance model scopes (token classes are columns of
    # their own). When no plan involved has one, ClickHouse sums over models too: a customer's
    # usage per bucket is then one row, and rating gets the same totals per allowance.
    involved = [*plans, *{s.plan for c in own for p in tperiods[c] for s in p.segments}]
    by_model = any(a.models for pv in involved for a in pv.allowances)
    model_cols = "provider, model" if by_model else "'' AS provider, '' AS model"
    model_group = ", provider, model" if by_model else ""

    where = ""
    params: dict[str, Any] = {
        "shared": [_ms(b) for b in shared],
        "own": [[]] + [[_ms(b) for b in own[c]] for c in cids],
        "cids": cids,
        "lo": _ms(lo),
        "hi": _ms(hi),
    }
    if customer is not None:
        where = " AND customer_id = {c:String}"
        params["c"] = customer
    t_query = time.perf_counter()
    rows = client.query(
        "WITH toUnixTimestamp64Milli(occurred_at) AS t"
        " SELECT customer_id, arrayCount(b -> b <= t, {shared:Array(Int64)}) AS s,"
        " arrayCount(b -> b <= t, {own:Array(Array(Int64))}[transform(customer_id, {cids:Array(String)}, range(2, length({cids:Array(String)}) + 2), 1)]) AS o,"
        f" {model_cols}, sum(input_tokens), sum(output_tokens), sum(cached_input_tokens),"
        " sum(cache_write_tokens), sum(reasoning_tokens), sum(charge), any(currency)"
        " FROM usage_priced FINAL"
        " WHERE occurred_at >= fromUnixTimestamp64Milli({lo:Int64}, 'UTC')"
        " AND occurred_at < fromUnixTimestamp64Milli({hi:Int64}, 'UTC')"
        + where
        + f" GROUP BY customer_id, s, o{model_group}",
        parameters=params,
    ).result_rows
    query_s = time.perf_counter() - t_query  # the usage GROUP BY (the ledger one is small)
    aggs: dict[str, list[_Agg]] = defaultdict(list)
    currencies: set[str] = set()
    for cid, s, o, provider, model, *rest in rows:
        counts, charge, cur = rest[:5], rest[5], rest[6]
        if cur:
            currencies.add(str(cur))
        tokens = {c: int(n) for c, n in zip(_CLASSES, counts, strict=True) if int(n)}
        aggs[str(cid)].append(_Agg(int(s), int(o), str(provider), str(model), tokens, _picos(charge)))

    prepaid: dict[str, dict[int, int]] = defaultdict(dict)
    if cids:
        for cid, o, amount in client.query(
            "WITH toUnixTimestamp64Milli(at) AS t"
            " SELECT customer_id, arrayCount(b -> b <= t, {own:Array(Array(Int64))}[transform(customer_id, {cids:Array(String)}, range(2, length({cids:Array(String)}) + 2), 1)]) AS o,"
            " sum(amount) FROM ledger_entries FINAL WHERE kind = 'debit' AND grant_id != ''"
            " AND has({cids:Array(String)}, customer_id)"
            " AND at >= fromUnixTimestamp64Milli({lo:Int64}, 'UTC') AND at < fromUnixTimestamp64Milli({hi:Int64}, 'UTC')"
            " GROUP BY customer_id, o",
            parameters={"own": params["own"], "cids": cids, "lo": _ms(lo), "hi": _ms(hi)},
        ).result_rows:
            prepaid[str(cid)][int(o)] = _picos(amount or 0)

    currency = sorted(currencies)[0] if len(currencies) == 1 else catalog.currency
    if len(currencies) > 1:
        raise InputError(
            f"usage in several currencies ({', '.join(sorted(currencies))}): simulate one currency at a time",
            field="period",
        )
    other = [pv.key for pv in plans if pv.currency != currency]
    if other:
        raise InputError(f"plan(s) {', '.join(other)} are not in {currency}, the usage's currency", field="plans")

    # which customers
    wanted = set(aggs) | {c for c in own if any(r_start <= p.start < r_end for p in tperiods[c])}
    if customer is not None:
        wanted = {customer}
    month_of_shared: dict[int, int] = {}
    for i in range(1, len(shared)):
        for k, (a, b) in enumerate(spans):
            if a <= shared[i - 1] < b:
                month_of_shared[i] = k

    def current_plan(c: str) -> PlanVersion | None:
        tl = timelines.get(c)
        if tl is None:
            return None
        ps = [p for p in tperiods[c] if p.start < r_end and p.stop > r_start and p.segments]
        return ps[-1].segments[-1].plan if ps else None

    customers_out: list[dict[str, Any]] = []
    for c in sorted(wanted):
        cur_plan = current_plan(c)
        if cohort is not None and (cur_plan is None or cur_plan.plan_id != cohort):
            continue
        rows_c = aggs.get(c, [])
        customers_out.append(
            _customer(
                c,
                rows_c,
                months,
                spans,
                shared,
                month_of_shared,
                cand_periods,
                plans,
                timelines.get(c),
                own.get(c, []),
                prepaid.get(c, {}),
                currency,
                r_end,
                cur_plan,
                break_even,
            )
        )

    doc: dict[str, Any] = {
        "period": period,
        "periods": months,
        "currency": currency,
        "candidates": ["payg", "current", *[p.key for p in plans]],
        "customers": customers_out,
        "cohorts": _cohorts(customers_out, currency),
        "notes": {
            "total": "sum of the monthly totals, each rounded once to the currency's minor unit",
            "break_even": "volume in tokens per billing period at the customer's usage mix; 'exact' is a "
            "rational number (numerator/denominator), 'tokens' the same truncated to 6 places",
            "current": "the customer's real subscription, equal to `meterline bill preview` (prepaid credit applied)",
            "plans": "candidate plans as if subscribed at the range's start; no prepaid credit applied",
        },
    }
    if routes:
        doc["routing"] = _routing(
            client,
            routes,
            price_engine,
            substitute_versions or {},
            spans,
            shared,
            month_of_shared,
            customer,
            {x["customer_id"] for x in customers_out},
            currency,
        )
        by_c = {r["customer_id"]: r for r in doc["routing"]["customers"]}
        for x in customers_out:
            x["routing"] = by_c.get(x["customer_id"], {"savings": "0.00", "by_model": []})
    if timings is not None:
        timings.update({"total_s": time.perf_counter() - t0, "usage_query_s": query_s})
    return doc


def _customer(
    c: str,
    rows: list[_Agg],
    months: list[str],
    spans: list[tuple[int, int]],
    shared: list[int],
    month_of_shared: dict[int, int],
    cand_periods: dict[str, list[Period]],
    plans: Sequence[PlanVersion],
    timeline: Timeline | None,
    own: list[int],
    prepaid: dict[int, int],
    currency: str,
    r_end: int,
    cur_plan: PlanVersion | None,
    break_even: bool,
) -> dict[str, Any]:
    n = len(months)
    cands: list[_Cand] = []
    # payg: the month's charge
    payg = _Cand("payg", "payg")
    month_charge = [0] * n
    month_tokens = [0] * n
    for r in rows:
        k = month_of_shared.get(r.s)
        if k is not None:
            month_charge[k] += r.charge
            month_tokens[k] += sum(r.tokens.values())
    payg.months = [(month_charge[k], []) for k in range(n)]
    cands.append(payg)

    # current: billing's own _bills over the aggregates bucketed by the customer's boundaries
    if timeline is not None and own:
        by_o: dict[int, list[_Agg]] = defaultdict(list)
        for r in rows:
            by_o[r.o].append(r)

        own_start = {o: b[0] for o in by_o if (b := _bucket_of(own, o))}

        def usage_of(p: Period) -> list[list[Usage]]:
            out = []
            for s in p.segments:
                s_end = s.end if s.end is not None else p.stop
                out.append(
                    _collapse(
                        s.plan,
                        _merge(
                            r
                            for o, rs in by_o.items()
                            if o in own_start and s.start <= own_start[o] < s_end
                            for r in rs
                        ),
                    )
                )
            return out

        def prepaid_of(p: Period) -> int:
            return sum(v for o, v in prepaid.items() if (b := _bucket_of(own, o)) and p.start <= b[0] < p.stop)

        cur = _Cand(cur_plan.key if cur_plan else "current", "current", cur_plan)
        # per month exactly what `bill preview` does: the periods starting in the month (or, when
        # none does, the one overlapping it), plus pay-per-token usage outside any subscription
        seen: dict[tuple[int, int], int] = {}
        gap_total = 0
        for lo_m, hi_m in spans:
            pairs = _bills(None, timeline, lo_m, hi_m, overlapping=True, usage_of=usage_of, prepaid_of=prepaid_of)
            gap = sum(
                r.charge
                for a, b in _gaps(timeline, lo_m, hi_m)
                for o, rs in by_o.items()
                if o in own_start and a <= own_start[o] < b
                for r in rs
            )
            gap_total += gap
            for p, x in pairs:
                seen[(p.anchor, p.index)] = x.subtotal
            cur.months.append((sum(x.subtotal for _, x in pairs) + gap, [x for _, x in pairs]))
        if seen:
            # a period overlapping several months (a yearly plan) shows in each month's preview;
            # the range's total counts each billing period once
            cur.distinct_subtotal = sum(seen.values()) + gap_total
            cands.append(cur)

    # candidate plans
    by_s: dict[int, list[_Agg]] = defaultdict(list)
    for r in rows:
        by_s[r.s].append(r)
    s_start = {s: b[0] for s in by_s if (b := _bucket_of(shared, s))}
    merged: dict[tuple[int, int], list[Usage]] = {}  # a period's usage, shared by the candidates
    for pv in plans:
        periods = cand_periods[pv.key]

        def usage_of_c(p: Period, pv: PlanVersion = pv) -> list[list[Usage]]:
            key = (p.start, p.stop)
            if key not in merged:
                merged[key] = _merge(
                    r for s, rs in by_s.items() if s in s_start and p.start <= s_start[s] < p.stop for r in rs
                )
            return [_collapse(pv, merged[key])]

        named = [Period(c, p.index, p.anchor, p.start, p.end, p.stop, p.segments) for p in periods]
        bills = rate_periods(named, usage_of_c)
        cand = _Cand(pv.key, "plan", pv)
        for lo, hi in spans:
            mine = [x for p, x in zip(named, bills, strict=True) if lo <= p.start < hi]
            cand.months.append((sum(x.subtotal for x in mine), mine))
        cands.append(cand)

    tokens = sum(month_tokens)
    out_c = [_candidate_json(x, months, tokens, currency) for x in cands]
    cheapest = min(out_c, key=lambda x: Decimal(x["total"]))["plan"] if out_c else None
    doc: dict[str, Any] = {
        "customer_id": c,
        "current_plan": cur_plan.key if cur_plan else None,
        "tokens": tokens,
        "candidates": out_c,
        "cheapest": cheapest,
    }
    if break_even:
        doc["break_even"], doc["curves"] = _break_even(cands, rows, months, month_tokens)
    return doc


def _candidate_json(x: _Cand, months: list[str], tokens: int, currency: str) -> dict[str, Any]:
    totals = [round_total(sub, currency) for sub, _ in x.months]
    bills = [b for _, bs in x.months for b in bs]

    def amt(kind: str) -> int:
        return sum(b.amount_of(kind) for b in bills)

    subtotal = sum(sub for sub, _ in x.months)
    allowances: dict[tuple[str, str], dict[str, Any]] = {}
    for b in bills:
        for a in b.allowances:
            d = allowances.setdefault(
                (a.plan, a.id),
                {"id": a.id, "plan": a.plan, "unit": a.unit, "included": 0, "rolled_in": 0, "used": 0, "unused": 0},
            )
            d["included"] += a.included
            d["rolled_in"] += a.rolled_in
            d["used"] += a.used
            d["unused"] += a.remaining
    allow_json = []
    for d in allowances.values():
        avail = d["included"] + d["rolled_in"]
        util = (
            None
            if avail == 0
            else str((Decimal(d["used"] * 100) / Decimal(avail)).quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN))
        )
        money = d["unit"] != "tokens"
        allow_json.append(
            {
                **{
                    k: (format_picos(v) if money and k in ("included", "rolled_in", "used", "unused") else v)
                    for k, v in d.items()
                },
                "utilisation_pct": util,
            }
        )
    fee = amt("fee")
    total = sum(totals, Decimal(0))
    if x.distinct_subtotal is not None and x.distinct_subtotal != subtotal:
        total = round_total(x.distinct_subtotal, currency)
    average = (
        Fraction(int(total.scaleb(minor_unit(currency))), len(totals)) / 10 ** minor_unit(currency)
        if totals
        else Fraction(0)
    )
    return {
        "plan": x.name,
        "role": x.role,
        "total": str(total),
        "subtotal": format_picos(subtotal),
        "fee": format_picos(fee) if x.role != "payg" else "0",
        "usage": format_picos(subtotal) if x.role == "payg" else "0",
        "overage": format_picos(amt("overage")),
        "written_off": format_picos(-(amt("cap") + amt("blocked"))),
        "true_up": format_picos(amt("minimum_commitment")),
        "prepaid_credit": format_picos(-amt("prepaid_credit")),
        "effective_per_million": _per_million(subtotal, tokens),
        "allowances": allow_json,
        "unused_included_tokens": sum(int(d["unused"]) for d in allowances.values() if d["unit"] == "tokens"),
        "periods": [
            {
                "period": m,
                "total": str(t),
                "overage": format_picos(sum(b.amount_of("overage") for b in bs)),
                "unused_included_tokens": sum(a.remaining for b in bs for a in b.allowances if a.unit == "tokens"),
            }
            for m, t, (_, bs) in zip(months, totals, x.months, strict=True)
        ],
        "range": {"min": str(min(totals)), "max": str(max(totals))} if totals else None,
        "average": _round_fraction(average, currency),
        "average_exact": f"{average.numerator}/{average.denominator}"
        if average.denominator != 1
        else str(average.numerator),
    }


def _break_even(
    cands: list[_Cand], rows: list[_Agg], months: list[str], month_tokens: list[int]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Exact crossings between every pair of candidates at the customer's mix, and the curves
    (picos per period against volume) for the chart."""
    mix = mix_of(_merge(rows))
    curves = {}
    for x in cands:
        if x.role == "payg":
            curves[x.name] = payg_curve(mix)
        elif x.plan is not None and x.name not in curves:
            curves[x.name] = plan_curve(x.plan, mix)
    names = list(curves)
    pairs: list[dict[str, Any]] = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            xs = crossings(curves[names[i]], curves[names[j]])
            pairs.append({"a": names[i], "b": names[j], "volumes": [fraction_json(v) for v in xs]})
    peak = max([*month_tokens, 0])
    top = max(
        [
            Fraction(peak * 2),
            Fraction(1_000_000),
            *(Fraction(v["exact"]) * Fraction(5, 4) for p in pairs for v in p["volumes"]),
        ]
    )
    chart = {
        "max_tokens": str(int(top)),
        "series": {
            n: [[str(int(v)), format_picos(int(a))] for v, a in curve_points(f, top)] for n, f in curves.items()
        },
    }
    return pairs, chart


def _cohorts(customers: list[dict[str, Any]], currency: str) -> list[dict[str, Any]]:
    """Per current plan: the cohort's revenue under it and under every other candidate, and how
    many of its customers would pay more, less or the same."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for c in customers:
        if c["current_plan"] and any(x["role"] == "current" for x in c["candidates"]):
            groups[c["current_plan"]].append(c)
    out = []
    for plan, members in sorted(groups.items()):
        base = {
            c["customer_id"]: Decimal(next(x["total"] for x in c["candidates"] if x["role"] == "current"))
            for c in members
        }
        revenue = sum(base.values(), Decimal(0))
        against = []
        names = [x["plan"] for x in members[0]["candidates"] if x["role"] != "current"]
        for name in names:
            alt = {
                c["customer_id"]: Decimal(
                    next(x["total"] for x in c["candidates"] if x["plan"] == name and x["role"] != "current")
                )
                for c in members
            }
            more = sum(1 for k in base if alt[k] > base[k])
            less = sum(1 for k in base if alt[k] < base[k])
            rev = sum(alt.values(), Decimal(0))
            against.append(
                {
                    "plan": name,
                    "revenue": str(rev),
                    "difference": str(rev - revenue),
                    "would_pay_more": more,
                    "would_pay_less": less,
                    "same": len(base) - more - less,
                }
            )
        out.append({"plan": plan, "customers": len(members), "revenue": str(revenue), "against": against})
    return out


# --------------------------------------------------------------------------- routing what-if


def _routing(
    client: Any,
    routes: Sequence[Route],
    engine: Any,
    versions: Mapping[tuple[str, str], Sequence[int]],
    spans: list[tuple[int, int]],
    shared: list[int],
    month_of_shared: dict[int, int],
    customer: str | None,
    customers: set[str],
    currency: str,
) -> dict[str, Any]:
    """Re-price routed usage at the substitute's price in force at each event's time.

    One GROUP BY per route, by customer, month and the substitute's *price window* (bucketed on
    its versions' ``effective_from``), so every group lies inside one substitute price version
    and is priced exactly by the pricing engine at the group's earliest instant (charges are
    linear in tokens within a version)."""
    from meterline.core.errors import UnpriceableEvent

    if engine is None:
        raise InputError("the routing what-if needs the price book (the prices topic)", field="routing")
    r_start, r_end = spans[0][0], spans[-1][1]
    per_c: dict[str, dict[str, Any]] = {}
    totals: dict[str, dict[str, Any]] = {}
    for route in routes:
        cond = f" AND ({_TOKEN_SUM}) < {{n:UInt64}}" if route.under_tokens is not None else ""
        cfilter = " AND customer_id = {c:String}" if customer is not None else ""
        wins = sorted(versions.get((route.to_provider, route.to_model), ()))
        rows = client.query(
            "WITH toUnixTimestamp64Milli(occurred_at) AS t"
            " SELECT customer_id, arrayCount(b -> b <= t, {shared:Array(Int64)}) AS s,"
            " arrayCount(b -> b <= t, {wins:Array(Int64)}) AS w, min(t), count(), sum(input_tokens), sum(output_tokens),"
            " sum(cached_input_tokens), sum(cache_write_tokens), sum(reasoning_tokens), sum(requests), sum(charge)"
            " FROM usage_priced FINAL WHERE provider = {p:String} AND model = {m:String}"
            " AND occurred_at >= fromUnixTimestamp64Milli({lo:Int64}, 'UTC')"
            " AND occurred_at < fromUnixTimestamp64Milli({hi:Int64}, 'UTC')"
            + cond
            + cfilter
            + " GROUP BY customer_id, s, w ORDER BY customer_id, s, w",
            parameters={
                "shared": [_ms(b) for b in shared],
                "wins": list(wins),
                "p": route.provider,
                "m": route.model,
                "lo": _ms(r_start),
                "hi": _ms(r_end),
                **({"n": route.under_tokens} if route.under_tokens is not None else {}),
                **({"c": customer} if customer is not None else {}),
            },
        ).result_rows
        for cid, s, _w, t0, events, it, ot, ct, cw, rt, req, charge in rows:
            cid = str(cid)
            if cid not in customers or month_of_shared.get(int(s)) is None:
                continue
            rec = {
                "customer_id": cid,
                "provider": route.to_provider,
                "model": route.to_model,
                "model_version": route.to_model_version,
                "occurred_at": int(t0),
                "input_tokens": int(it),
                "output_tokens": int(ot),
                "cached_input_tokens": int(ct),
                "cache_write_tokens": int(cw),
                "reasoning_tokens": int(rt),
                "requests": int(req),
            }
            try:
                priced = engine.price(rec)
            except UnpriceableEvent as exc:
                raise InputError(
                    f"routing {route.label}: cannot price {cid}'s usage at {_ts(int(t0) // 1000)} "
                    f"on the substitute: {exc}",
                    field="routing",
                ) from exc
            before = _picos(charge)
            after = int(priced.charge_picos)
            entry = per_c.setdefault(cid, {})
            m = entry.setdefault(
                route.label,
                {
                    "route": route.to_json(),
                    "events": 0,
                    "tokens": 0,
                    "original": 0,
                    "routed": 0,
                    "price_versions": set(),
                },
            )
            m["events"] += int(events)
            m["tokens"] += int(it) + int(ot) + int(ct) + int(cw) + int(rt)
            m["original"] += before
            m["routed"] += after
            m["price_versions"].add(priced.price_version)
            tm = totals.setdefault(route.label, {"route": route.to_json(), "events": 0, "original": 0, "routed": 0})
            tm["events"] += int(events)
            tm["original"] += before
            tm["routed"] += after

    def fmt(d: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in d.items() if k not in ("original", "routed", "price_versions")}
        out.update(
            {
                "original": format_picos(d["original"]),
                "routed": format_picos(d["routed"]),
                "savings": format_picos(d["original"] - d["routed"]),
            }
        )
        if "price_versions" in d:
            out["substitute_price_versions"] = sorted(d["price_versions"])
        return out

    customers_out = []
    for cid in sorted(per_c):
        models = per_c[cid]
        saved = sum(m["original"] - m["routed"] for m in models.values())
        customers_out.append(
            {"customer_id": cid, "savings": format_picos(saved), "by_model": [fmt(m) for m in models.values()]}
        )
    return {
        "routes": [r.to_json() for r in routes],
        "customers": customers_out,
        "by_model": [fmt(m) for m in totals.values()],
    }
