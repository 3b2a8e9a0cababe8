"""``meterline statement CUSTOMER --period ...``: the itemized usage statement behind an invoice.

Rows per day x project x provider x model (currency kept apart), with every token class, requests,
events and the exact charge, read from ``usage_daily`` (exact Decimal sums). Rendered as CSV (exact
amounts) or as one self-contained HTML page (inline SVG bar chart of daily spend; no external
assets, no scripts). Display rounding (to the cent, half-up) happens only in the HTML.
"""

from __future__ import annotations

import csv
import html
import io
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from jobs.stripe._store import utc

TOKEN_COLUMNS = ("input_tokens", "output_tokens", "cached_input_tokens", "cache_write_tokens", "reasoning_tokens")
CSV_COLUMNS = ("day", "project", "provider", "model", "currency", "events", "requests", *TOKEN_COLUMNS, "charge")
PLAN_CSV_COLUMNS = ("period_start", "kind", "description", "quantity", "unit_price", "amount")


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

    def totals(self) -> dict[str, Decimal]:
        out: dict[str, Decimal] = {}
        for line in self.lines:
            out[line.currency] = out.get(line.currency, Decimal(0)) + line.charge
        return out

    def daily(self) -> dict[tuple[date, str], Decimal]:
        out: dict[tuple[date, str], Decimal] = {}
        for line in self.lines:
            out[(line.day, line.currency)] = out.get((line.day, line.currency), Decimal(0)) + line.charge
        return out


def build_statement(ch: Any, customer: str, start: int, end: int) -> Statement:
    """Read the statement of ``customer`` for days in ``[start, end)`` (unix seconds, day-aligned UTC)."""
    sql = (f"SELECT day, project, provider, model, currency, sum(events), sum(requests), "
           f"{', '.join(f'sum({c})' for c in TOKEN_COLUMNS)}, sum(charge) FROM usage_daily "
           "WHERE customer_id = {c:String} AND day >= toDate({s:DateTime}) AND day < toDate({e:DateTime}) "
           "GROUP BY day, project, provider, model, currency ORDER BY day, project, provider, model, currency")  # fmt: skip
    rows = ch.query(sql, parameters={"c": customer, "s": utc(start), "e": utc(end)}).result_rows
    lines = [StatementLine(r[0], r[1], r[2], r[3], r[4], int(r[5]), int(r[6]), tuple(int(x) for x in r[7:12]),  # type: ignore[arg-type]
                           Decimal(r[12])) for r in rows]  # fmt: skip
    plan_lines, plan_total = _plan_bills(ch, customer, start, end)
    return Statement(customer, start, end, lines, plan_lines, plan_total)


def _plan_bills(ch: Any, customer: str, start: int, end: int) -> tuple[list[PlanLine], Decimal | None]:
    """The plan bills (the plans domain's, as ``bill preview``) of periods starting in ``[start, end)``."""
    from jobs.plans.billing import _bills, load_catalog, load_events
    from meterline.plans import fold_timeline, round_total

    try:
        events = load_events(ch, customer)
    except Exception:  # no plans tables: a pay-per-token deployment
        return [], None
    if not events:
        return [], None
    pairs = _bills(ch, fold_timeline(customer, events, load_catalog(ch)), start, end)
    if not pairs:
        return [], None
    out = [PlanLine(p.start, ln.kind, ln.description, ln.quantity, ln.unit_price or "", Decimal(ln.amount).scaleb(-12))
           for p, bill in pairs for ln in bill.lines]  # fmt: skip
    return out, round_total(sum(b.subtotal for _, b in pairs), pairs[0][1].currency)


def render_csv(st: Statement) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for ln in st.lines:
        w.writerow([ln.day.isoformat(), ln.project, ln.provider, ln.model, ln.currency, ln.events, ln.requests,
                    *ln.tokens, format(ln.charge, "f")])  # fmt: skip
    if st.plan_lines:  # a second table after one blank line: the plan bill lines, exact amounts
        w.writerow([])
        w.writerow(PLAN_CSV_COLUMNS)
        for pl in st.plan_lines:
            w.writerow([utc(pl.period_start).isoformat(), pl.kind, pl.description, pl.quantity, pl.unit_price,
                        format(pl.amount, "f")])  # fmt: skip
        w.writerow(["", "total", "", "", "", format(st.plan_total, "f")])
    return buf.getvalue()


def _cents(d: Decimal) -> str:
    return f"{d.quantize(Decimal('0.01'), rounding=ROUND_HALF_UP):,}"


def _svg_chart(daily: dict[tuple[date, str], Decimal], width: int = 720, height: int = 220) -> str:
    if not daily:
        return "<p>No usage in this period.</p>"
    items = sorted(daily.items())
    peak = max(v for _, v in items) or Decimal(1)
    pad, n = 40, len(items)
    bar_w = max(2.0, (width - 2 * pad) / n - 2)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="daily spend">', f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" '
             f'y2="{height - pad}" stroke="#888"/>']  # fmt: skip
    for i, ((day, cur), value) in enumerate(items):
        h = float(value / peak) * (height - 2 * pad)
        x = pad + i * (width - 2 * pad) / n
        label = html.escape(f"{day.isoformat()}: {_cents(value)} {cur.upper()}")
        parts.append(f'<rect x="{x:.1f}" y="{height - pad - h:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                     f'fill="#4a7bd0"><title>{label}</title></rect>')  # fmt: skip
    first, last = items[0][0][0], items[-1][0][0]
    parts.append(f'<text x="{pad}" y="{height - pad + 16}" font-size="11">{first.isoformat()}</text>')
    parts.append(f'<text x="{width - pad}" y="{height - pad + 16}" font-size="11" text-anchor="end">{last.isoformat()}</text>')
    parts.append(f'<text x="{pad}" y="{pad - 8}" font-size="11">peak {html.escape(_cents(peak))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _plan_html(st: Statement) -> str:
    """The plan bill lines (fee, allowances, overage per tier, true-up, credit) and their total."""
    if not st.plan_lines:
        return ""
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(f'{utc(pl.period_start):%Y-%m-%d}')}</td><td>{e(pl.kind)}</td><td>{e(pl.description)}</td>"
        f"<td>{e(pl.quantity)}</td><td>{e(pl.unit_price)}</td><td>{e(format(pl.amount, 'f'))}</td></tr>"
        for pl in st.plan_lines)  # fmt: skip
    head = "".join(f"<th>{e(c.replace('_', ' '))}</th>" for c in PLAN_CSV_COLUMNS)
    return (f"<h2>Plan</h2><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
            f"<p>Plan total <b>{e(format(st.plan_total, 'f'))}</b> (rounded once; exact line amounts above).</p>")


def render_html(st: Statement) -> str:
    """One self-contained HTML page (no external assets)."""
    e = html.escape
    period = f"{utc(st.start):%Y-%m-%d} – {utc(st.end):%Y-%m-%d} (end exclusive, UTC)"
    head = ("<tr>" + "".join(f"<th>{e(c.replace('_', ' '))}</th>" for c in CSV_COLUMNS) + "</tr>")
    body = []
    for ln in st.lines:
        cells = [ln.day.isoformat(), ln.project or "(none)", ln.provider, ln.model, ln.currency.upper(),
                 f"{ln.events:,}", f"{ln.requests:,}", *(f"{t:,}" for t in ln.tokens), _cents(ln.charge)]  # fmt: skip
        body.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in cells) + "</tr>")
    totals = "".join(f"<li>{e(cur.upper())} {e(_cents(v))} (exact {e(format(v, 'f'))})</li>"
                     for cur, v in sorted(st.totals().items()))  # fmt: skip
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Usage statement {e(st.customer_id)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}td:nth-child(-n+5){{text-align:left}}</style>
</head><body>
<h1>Usage statement</h1>
<p>Customer <b>{e(st.customer_id)}</b>, period {e(period)}. Generated {generated}.</p>
<h2>Total</h2><ul>{totals or "<li>0.00</li>"}</ul>
{_plan_html(st)}
<h2>Daily spend</h2>
{_svg_chart(st.daily())}
<h2>Detail</h2>
<table><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>
</body></html>
"""
