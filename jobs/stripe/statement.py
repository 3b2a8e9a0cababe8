"""``meterline statement CUSTOMER --period ...``: the itemized usage statement behind an invoice.

Rows per day x project x provider x model (currency kept apart), with every token class, requests,
events and the exact charge, read from ``usage_daily`` (exact Decimal sums). Rendered as CSV (exact
amounts) or as one self-contained HTML page (inline SVG charts of spend by day, model and project;
no external assets, no scripts). Display rounding happens only in the HTML, and adds up: the total
is rounded half-up to the cent and the lines get the largest-remainder allocation of it
(:mod:`meterline.core.allocation`), with the exact amount beside each line and the rule on the page.

Corrections (``meterline reprice``, docs/corrections.md) reach ``usage_daily`` through their own
materialized views, merged into the day's lines. The statement takes them back out: the usage lines
show what was priced at the time, and each correction is a line of its own (correction id, reason,
day, project, provider, model, exact signed charge), in the totals, the charts and the allocation.
A plan customer's ``kind = 'plan'`` rows are lines of the plan bill of their period instead (the
bills of ``meterline bill preview``, corrections included).
"""

from __future__ import annotations

import csv
import html
import io
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from jobs.stripe._charts import day_columns, hbars, money
from jobs.stripe._store import utc
from meterline.core.allocation import RULE, allocate

TOKEN_COLUMNS = ("input_tokens", "output_tokens", "cached_input_tokens", "cache_write_tokens", "reasoning_tokens")
CSV_COLUMNS = ("day", "project", "provider", "model", "currency", "events", "requests", *TOKEN_COLUMNS, "charge")
PLAN_CSV_COLUMNS = ("period_start", "kind", "description", "quantity", "unit_price", "amount")
CORRECTION_CSV_COLUMNS = ("correction_id", "reason", "day", "project", "provider", "model", "currency", "charge")


@dataclass(frozen=True, slots=True)
class StatementLine:
    day: date
    project: str
    provider: str
    model: str
    currency: str
    events: int
    requests: int
    tokens: tuple[int, int, int, int, int]  # in TOKEN_COLUMNS order
    charge: Decimal


@dataclass(frozen=True, slots=True)
class CorrectionLine:
    """The part of a re-rating (``meterline reprice``) for one day x project x provider x model of
    pay-per-token usage: the signed, exact charge delta."""

    correction_id: str
    reason: str
    day: date
    project: str
    provider: str
    model: str
    currency: str
    charge: Decimal


@dataclass(frozen=True, slots=True)
class PlanLine:
    """One line of a plan bill (``meterline bill preview``) for a billing period in the statement."""

    period_start: int
    kind: str
    description: str
    quantity: str
    unit_price: str
    amount: Decimal  # exact currency units


@dataclass(frozen=True)
class Statement:
    customer_id: str
    start: int
    end: int
    lines: list[StatementLine]
    plan_lines: list[PlanLine] = field(default_factory=list)  # bills of plan periods starting in [start, end)
    plan_total: Decimal | None = None  # the plan bills' total, rounded once (None: no plan period)
    corrections: list[CorrectionLine] = field(default_factory=list)  # pay-per-token re-ratings

    def _all(self) -> list[StatementLine | CorrectionLine]:
        return [*self.lines, *self.corrections]

    def totals(self) -> dict[str, Decimal]:
        out: dict[str, Decimal] = {}
        for line in self._all():
            out[line.currency] = out.get(line.currency, Decimal(0)) + line.charge
        return out

    def allocated(self) -> list[Decimal]:
        """Each line's amount in cents, allocated per currency so the lines (usage, then
        corrections) add up to the cent-rounded total (:func:`meterline.core.allocation.allocate`);
        in that order."""
        every = self._all()
        out: list[Decimal] = [Decimal(0)] * len(every)
        for cur in self.totals():
            idx = [i for i, ln in enumerate(every) if ln.currency == cur]
            for i, amount in zip(idx, allocate([every[i].charge for i in idx])):
                out[i] = amount
        return out

    def by(self, dimension: str, currency: str) -> dict[Any, Decimal]:
        """Exact spend in ``currency`` per ``day`` | ``model`` | ``project`` (project '' -> '(none)')."""
        out: dict[Any, Decimal] = {}
        for line in self._all():
            if line.currency != currency:
                continue
            k = getattr(line, dimension)
            if dimension == "project" and not k:
                k = "(none)"
            out[k] = out.get(k, Decimal(0)) + line.charge
        return out

    def daily(self) -> dict[tuple[date, str], Decimal]:
        out: dict[tuple[date, str], Decimal] = {}
        for line in self._all():
            out[(line.day, line.currency)] = out.get((line.day, line.currency), Decimal(0)) + line.charge
        return out


def build_statement(ch: Any, customer: str, start: int, end: int) -> Statement:
    """Read the statement of ``customer`` for days in ``[start, end)`` (unix seconds, day-aligned UTC)."""
    sql = (
        f"SELECT day, project, provider, model, currency, sum(events), sum(requests), "
        f"{', '.join(f'sum({c})' for c in TOKEN_COLUMNS)}, sum(charge) FROM usage_daily "
        "WHERE customer_id = {c:String} AND day >= toDate({s:DateTime}) AND day < toDate({e:DateTime}) "
        "GROUP BY day, project, provider, model, currency ORDER BY day, project, provider, model, currency"
    )
    rows = ch.query(sql, parameters={"c": customer, "s": utc(start), "e": utc(end)}).result_rows
    lines = [
        StatementLine(
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            int(r[5]),
            int(r[6]),
            tuple(int(x) for x in r[7:12]),  # type: ignore[arg-type]
            Decimal(r[12]),
        )
        for r in rows
    ]
    lines, corrections = _split_corrections(ch, customer, start, end, lines)
    plan_lines, plan_total = _plan_bills(ch, customer, start, end)
    return Statement(customer, start, end, lines, plan_lines, plan_total, corrections)


def _split_corrections(
    ch: Any, customer: str, start: int, end: int, lines: list[StatementLine]
) -> tuple[list[StatementLine], list[CorrectionLine]]:
    """Take the corrections back out of the ``usage_daily`` lines (their materialized views merged
    them in): usage lines as priced at the time, and the ``kind = 'usage'`` corrections as lines of
    their own. ``kind = 'plan'`` rows belong to their period's plan bill (:func:`_plan_bills`)."""
    rows = ch.query(
        "SELECT c.correction_id, c.kind, toDate(c.occurred_at, 'UTC') AS day, c.project, c.provider, c.model, "
        "c.currency, sum(c.charge), any(r.reason) "
        "FROM (SELECT correction_id, kind, occurred_at, project, provider, model, currency, charge "
        "      FROM usage_corrections FINAL WHERE customer_id = {c:String} "
        "      AND toDate(occurred_at, 'UTC') >= toDate({s:DateTime}) AND toDate(occurred_at, 'UTC') < toDate({e:DateTime})) AS c "
        "LEFT JOIN (SELECT correction_id, reason FROM reprice_runs FINAL) AS r ON c.correction_id = r.correction_id "
        "GROUP BY c.correction_id, c.kind, day, c.project, c.provider, c.model, c.currency "
        "ORDER BY day, c.project, c.provider, c.model, c.currency, c.correction_id",
        parameters={"c": customer, "s": utc(start), "e": utc(end)},
    ).result_rows
    merged: dict[tuple[date, str, str, str, str], Decimal] = {}
    out: list[CorrectionLine] = []
    for cid, kind, day, project, provider, model, currency, charge, reason in rows:
        key = (day, project, provider, model, currency)
        merged[key] = merged.get(key, Decimal(0)) + Decimal(charge)
        if kind == "usage" and Decimal(charge) != 0:
            out.append(CorrectionLine(cid, reason or "", day, project, provider, model, currency, Decimal(charge)))
    kept: list[StatementLine] = []
    for ln in lines:
        delta = merged.get((ln.day, ln.project, ln.provider, ln.model, ln.currency), Decimal(0))
        if ln.events == 0 and ln.requests == 0 and not any(ln.tokens) and ln.charge == delta:
            continue  # a line made only of corrections
        kept.append(replace(ln, charge=ln.charge - delta) if delta else ln)
    return kept, out


def _plan_bills(ch: Any, customer: str, start: int, end: int) -> tuple[list[PlanLine], Decimal | None]:
    """The plan bills (the plans domain's, as ``bill preview``) of periods starting in ``[start, end)``."""
    from jobs.plans.billing import _bills, corrected_bills, load_catalog, load_events
    from meterline.core.plans import fold_timeline, round_total

    try:
        events = load_events(ch, customer)
    except Exception:  # no plans tables: a pay-per-token deployment
        return [], None
    if not events:
        return [], None
    pairs = corrected_bills(ch, _bills(ch, fold_timeline(customer, events, load_catalog(ch)), start, end))
    if not pairs:
        return [], None
    out = [
        PlanLine(p.start, ln.kind, ln.description, ln.quantity, ln.unit_price or "", Decimal(ln.amount).scaleb(-12))
        for p, bill, _ in pairs
        for ln in bill.lines
    ]
    return out, round_total(sum(b.subtotal for _, b, _ in pairs), pairs[0][1].currency)


def render_csv(st: Statement) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for ln in st.lines:
        w.writerow(
            [
                ln.day.isoformat(),
                ln.project,
                ln.provider,
                ln.model,
                ln.currency,
                ln.events,
                ln.requests,
                *ln.tokens,
                format(ln.charge, "f"),
            ]
        )
    if st.plan_lines:  # a second table after one blank line: the plan bill lines, exact amounts
        w.writerow([])
        w.writerow(PLAN_CSV_COLUMNS)
        for pl in st.plan_lines:
            w.writerow(
                [
                    utc(pl.period_start).isoformat(),
                    pl.kind,
                    pl.description,
                    pl.quantity,
                    pl.unit_price,
                    format(pl.amount, "f"),
                ]
            )
        w.writerow(["", "total", "", "", "", format(st.plan_total, "f")])
    if st.corrections:  # then the re-ratings of the pay-per-token usage, exact signed deltas
        w.writerow([])
        w.writerow(CORRECTION_CSV_COLUMNS)
        for c in st.corrections:
            w.writerow(
                [
                    c.correction_id,
                    c.reason,
                    c.day.isoformat(),
                    c.project,
                    c.provider,
                    c.model,
                    c.currency,
                    format(c.charge, "f"),
                ]
            )
    return buf.getvalue()


def _cents(d: Decimal) -> str:
    return money(d)


def _plan_html(st: Statement) -> str:
    """The plan bill lines (fee, allowances, overage per tier, true-up, credit) and their total."""
    if not st.plan_lines:
        return ""
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(f'{utc(pl.period_start):%Y-%m-%d}')}</td><td>{e(pl.kind)}</td><td>{e(pl.description)}</td>"
        f"<td>{e(pl.quantity)}</td><td>{e(pl.unit_price)}</td><td>{e(format(pl.amount, 'f'))}</td></tr>"
        for pl in st.plan_lines
    )
    head = "".join(f"<th>{e(c.replace('_', ' '))}</th>" for c in PLAN_CSV_COLUMNS)
    return (
        f"<h2>Plan</h2><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
        f"<p>Plan total <b>{e(format(st.plan_total, 'f'))}</b> (rounded once; exact line amounts above).</p>"
    )


def render_html(st: Statement) -> str:
    """One self-contained HTML page (no external assets, no scripts).

    Line amounts are allocated with :func:`meterline.core.allocation.allocate` per currency, so the
    detail lines add up to the total shown; each line's exact amount is shown beside it.
    """
    e = html.escape
    period = f"{utc(st.start):%Y-%m-%d} – {utc(st.end):%Y-%m-%d} (end exclusive, UTC)"
    cols = [c for c in CSV_COLUMNS if c != "charge"]
    head = (
        "<tr>"
        + "".join(f"<th>{e(c.replace('_', ' '))}</th>" for c in cols)
        + "<th>amount</th><th>exact charge</th></tr>"
    )
    amounts = st.allocated()
    body = []
    for ln, amount in zip(st.lines, amounts):
        cells = [
            ln.day.isoformat(),
            ln.project or "(none)",
            ln.provider,
            ln.model,
            ln.currency.upper(),
            f"{ln.events:,}",
            f"{ln.requests:,}",
            *(f"{t:,}" for t in ln.tokens),
        ]
        body.append(
            "<tr>"
            + "".join(f"<td>{e(str(c))}</td>" for c in cells)
            + f'<td class="amount">{e(f"{amount:,}")}</td><td class="exact">{e(format(ln.charge, "f"))}</td></tr>'
        )
    for c, amount in zip(st.corrections, amounts[len(st.lines) :]):  # the re-ratings, in the same total
        cells = [c.day.isoformat(), c.project or "(none)", c.provider, c.model, c.currency.upper()]
        body.append(
            '<tr class="correction">'
            + "".join(f"<td>{e(str(x))}</td>" for x in cells)
            + f'<td colspan="{len(cols) - len(cells)}">correction {e(c.correction_id)} ({e(c.reason or "no reason given")})</td>'
            + f'<td class="amount">{e(f"{amount:,}")}</td><td class="exact">{e(format(c.charge, "f"))}</td></tr>'
        )
    foot = "".join(
        f'<tr class="total"><td colspan="{len(cols)}">total {e(cur.upper())}</td>'
        f'<td class="amount">{e(_cents(v))}</td><td class="exact">{e(format(v, "f"))}</td></tr>'
        for cur, v in sorted(st.totals().items())
    )
    totals = "".join(
        f'<li class="total" data-currency="{e(cur)}">{e(cur.upper())} {e(_cents(v))} (exact {e(format(v, "f"))})</li>'
        for cur, v in sorted(st.totals().items())
    )
    start_day, end_day = utc(st.start).date(), utc(st.end).date()
    charts = []
    for cur in sorted(st.totals()):
        suffix = f" ({cur.upper()})" if len(st.totals()) > 1 else ""
        charts.append(f"<h3>By day{suffix}</h3>" + day_columns(st.by("day", cur), start_day, end_day, currency=cur))
        charts.append(
            f"<h3>By model{suffix}</h3>"
            + hbars(sorted(st.by("model", cur).items()), label="spend by model", currency=cur)
        )
        charts.append(
            f"<h3>By project{suffix}</h3>"
            + hbars(sorted(st.by("project", cur).items()), label="spend by project", currency=cur)
        )
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Usage statement {e(st.customer_id)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}td:nth-child(-n+5){{text-align:left}}
tr.total td{{font-weight:bold}}.rule{{font-size:12px;color:#444;max-width:60em}}</style>
</head><body>
<h1>Usage statement</h1>
<p>Customer <b>{e(st.customer_id)}</b>, period {e(period)}. Generated {generated}.</p>
<h2>Total</h2><ul>{totals or "<li>0.00</li>"}</ul>
{_plan_html(st)}
<h2>Spend</h2>
{"".join(charts) or "<p>No usage in this period.</p>"}
<h2>Detail</h2>
<p class="rule">{e(RULE)}</p>
<table><thead>{head}</thead><tbody>{"".join(body)}</tbody><tfoot>{foot}</tfoot></table>
</body></html>
"""
