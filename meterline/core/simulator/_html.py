"""The simulator's HTML report: one self-contained page (inline CSS and SVG, no script, no network).

Charts per customer: bill per candidate, bill per period, allowance utilisation, and the
break-even curve (bill per period against token volume at the customer's mix, with the exact
crossings marked). Every number shown is the JSON's own string (``data-value`` on each bar or
point, the same text in the tables), so a test can compare the rendered page with the JSON.
Pixel geometry is computed with fractions and printed to 0.1 px; money is never converted.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from fractions import Fraction
from html import escape
from typing import Any

__all__ = ["MAX_CUSTOMERS", "render_html"]

MAX_CUSTOMERS = 200  # customers drawn in full; the cohort table covers everyone
_W, _H, _PAD = 520, 220, 44
_COLORS = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d")


def _px(x: Fraction) -> str:
    tenths = (x * 10).__round__()
    return f"{tenths // 10}.{tenths % 10}"


def _frac(s: str) -> Fraction:
    return Fraction(Decimal(s))


def _e(v: Any) -> str:
    return escape("" if v is None else str(v), quote=True)


def _svg(kind: str, body: list[str], title: str) -> str:
    return (
        f'<figure><figcaption>{_e(title)}</figcaption><svg class="chart" data-chart="{kind}" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img" aria-label="{_e(title)}">'
        f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - 8}" y2="{_H - _PAD}" stroke="#888"/>'
        f'<line x1="{_PAD}" y1="8" x2="{_PAD}" y2="{_H - _PAD}" stroke="#888"/>' + "".join(body) + "</svg></figure>"
    )


def _bars(kind: str, title: str, items: Sequence[tuple[str, str]], unit: str = "") -> str:
    """Vertical bars: (label, decimal string value)."""
    top = max([_frac(v) for _, v in items] + [Fraction(1)])
    n = max(len(items), 1)
    slot = Fraction(_W - _PAD - 16, n)
    body = [f'<text x="4" y="16" font-size="10">{_e(str(top.__round__()) + unit)}</text>']
    for i, (label, value) in enumerate(items):
        h = _frac(value) / top * (_H - _PAD - 16)
        x = _PAD + 8 + slot * i
        y = _H - _PAD - h
        body.append(
            f'<rect class="bar" data-label="{_e(label)}" data-value="{_e(value)}" x="{_px(x)}" y="{_px(y)}" '
            f'width="{_px(slot * Fraction(7, 10))}" height="{_px(max(h, Fraction(1, 2)))}" fill="{_COLORS[i % len(_COLORS)]}">'
            f"<title>{_e(label)}: {_e(value)}{_e(unit)}</title></rect>"
            f'<text x="{_px(x)}" y="{_H - _PAD + 14}" font-size="10">{_e(label[:14])}</text>'
            f'<text x="{_px(x)}" y="{_px(y - 3)}" font-size="10">{_e(value)}</text>'
        )
    return _svg(kind, body, title)


def _lines(
    kind: str, title: str, series: dict[str, list[tuple[str, str]]], marks: Sequence[tuple[str, str]] = ()
) -> str:
    """Polylines: name -> [(x decimal string, y decimal string)], plus vertical marks (label, x)."""
    xs = [_frac(x) for pts in series.values() for x, _ in pts] + [_frac(x) for _, x in marks]
    ys = [_frac(y) for pts in series.values() for _, y in pts]
    x_max = max([*xs, Fraction(1)])
    y_max = max([*ys, Fraction(1)])

    def sx(x: str) -> Fraction:
        return _PAD + _frac(x) / x_max * (_W - _PAD - 16)

    def sy(y: str) -> Fraction:
        return _H - _PAD - _frac(y) / y_max * (_H - _PAD - 16)

    body = [
        f'<text x="4" y="16" font-size="10">{_e(y_max.__round__())}</text>',
        f'<text x="{_W - 90}" y="{_H - _PAD + 28}" font-size="10">{_e(x_max.__round__())}</text>',
    ]
    for i, (name, pts) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        path = " ".join(f"{_px(sx(x))},{_px(sy(y))}" for x, y in pts)
        body.append(
            f'<polyline class="series" data-series="{_e(name)}" points="{path}" fill="none" stroke="{color}" stroke-width="2"/>'
        )
        for x, y in pts:
            body.append(
                f'<circle class="point" data-series="{_e(name)}" data-x="{_e(x)}" data-value="{_e(y)}" cx="{_px(sx(x))}" '
                f'cy="{_px(sy(y))}" r="2.5" fill="{color}"><title>{_e(name)} {_e(x)}: {_e(y)}</title></circle>'
            )
        body.append(f'<text x="{_W - 120}" y="{14 + 12 * i}" font-size="10" fill="{color}">{_e(name)}</text>')
    for label, x in marks:
        px = _px(sx(x))
        body.append(
            f'<line class="mark" data-x="{_e(x)}" x1="{px}" y1="8" x2="{px}" y2="{_H - _PAD}" stroke="#999" stroke-dasharray="3,3">'
            f"<title>{_e(label)}</title></line>"
        )
    return _svg(kind, body, title)


def _customer(c: dict[str, Any], periods: list[str], currency: str) -> str:
    cid = c["customer_id"]
    rows = []
    for x in c["candidates"]:
        cheap = ' class="cheapest"' if x["plan"] == c["cheapest"] else ""
        cells = [
            ("plan", x["plan"]),
            ("role", x["role"]),
            ("total", x["total"]),
            ("fee", x["fee"]),
            ("overage", x["overage"]),
            ("true_up", x["true_up"]),
            ("effective_per_million", x["effective_per_million"] or "-"),
            ("unused_included_tokens", x["unused_included_tokens"]),
            ("range", f"{x['range']['min']} – {x['range']['max']}" if x["range"] else "-"),
            ("average", x["average"]),
        ]
        rows.append(
            f'<tr{cheap} data-plan="{_e(x["plan"])}" data-role="{_e(x["role"])}">'
            + "".join(f'<td data-field="{k}">{_e(v)}</td>' for k, v in cells)
            + "</tr>"
        )
    table = (
        '<table class="candidates"><thead><tr><th>plan</th><th>role</th><th>total</th><th>fee</th><th>overage</th>'
        "<th>true-up</th><th>per M tokens</th><th>unused included tokens</th><th>range per period</th><th>average</th>"
        "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )

    def label(x: dict[str, Any]) -> str:
        return str(x["plan"]) if x["role"] != "current" else f"current: {x['plan']}"

    charts = [
        _bars(
            "candidates",
            f"Bill per candidate ({currency}, {len(periods)} period(s))",
            [(label(x), x["total"]) for x in c["candidates"]],
        )
    ]
    charts.append(
        _lines(
            "periods",
            f"Bill per period ({currency}): {periods[0]} to {periods[-1]}",
            {label(x): [(str(i), p["total"]) for i, p in enumerate(x["periods"])] for x in c["candidates"]},
        )
    )
    util = [
        (f"{x['plan']}:{a['id']}", a["utilisation_pct"])
        for x in c["candidates"]
        for a in x["allowances"]
        if a["utilisation_pct"] is not None
    ]
    charts.append(
        _bars("utilisation", "Allowance utilisation (% of included used)", util, "%")
        if util
        else _svg(
            "utilisation",
            ['<text x="60" y="100" font-size="12">no allowances among the candidates</text>'],
            "Allowance utilisation",
        )
    )
    if c.get("curves"):
        marks = [
            (f"{p['a']} = {p['b']} at {v['tokens']} tokens ({v['exact']})", v["tokens"])
            for p in c.get("break_even", [])
            for v in p["volumes"]
        ]
        charts.append(
            _lines(
                "break_even",
                f"Break-even: bill per period ({currency}) against tokens per period",
                {n: [(x, y) for x, y in pts] for n, pts in c["curves"]["series"].items()},
                marks,
            )
        )
    be_rows = "".join(
        f'<tr><td>{_e(p["a"])}</td><td>{_e(p["b"])}</td><td data-field="break_even">'
        + (", ".join(f"{_e(v['tokens'])} ({_e(v['exact'])})" for v in p["volumes"]) or "never")
        + "</td></tr>"
        for p in c.get("break_even", [])
    )
    routing = ""
    if c.get("routing") and c["routing"].get("by_model"):
        routing = (
            '<h4>Routing what-if</h4><table class="routing"><tr><th>route</th><th>events</th><th>original</th><th>routed</th>'
            "<th>savings</th></tr>"
            + "".join(
                f"<tr><td>{_e(m['route']['from']['model'])} → {_e(m['route']['to']['model'])}</td><td>{_e(m['events'])}</td>"
                f'<td>{_e(m["original"])}</td><td>{_e(m["routed"])}</td><td data-field="savings">{_e(m["savings"])}</td></tr>'
                for m in c["routing"]["by_model"]
            )
            + "</table>"
        )
    return (
        f'<section class="customer" data-customer="{_e(cid)}"><h2>{_e(cid)}</h2>'
        f"<p>current plan: <b>{_e(c['current_plan'] or 'none (pay-per-token)')}</b> · cheapest: "
        f'<b class="cheapest-name">{_e(c["cheapest"])}</b> · {_e(c["tokens"])} tokens</p>{table}'
        f'<div class="charts">{"".join(charts)}</div>'
        + (
            f'<h4>Break-even volumes (tokens per period)</h4><table class="break-even">{be_rows}</table>'
            if be_rows
            else ""
        )
        + routing
        + "</section>"
    )


def render_html(doc: dict[str, Any]) -> str:
    """The report for a simulator JSON document."""
    currency = doc["currency"]
    customers = doc["customers"]
    shown = customers[:MAX_CUSTOMERS]
    more = (
        ""
        if len(customers) <= MAX_CUSTOMERS
        else f"<p>{len(customers) - MAX_CUSTOMERS} more customers are in the JSON output.</p>"
    )
    cohorts = "".join(
        f'<tr data-cohort="{_e(k["plan"])}" data-against="{_e(a["plan"])}"><td>{_e(k["plan"])}</td><td>{_e(k["customers"])}</td>'
        f'<td>{_e(k["revenue"])}</td><td>{_e(a["plan"])}</td><td data-field="revenue">{_e(a["revenue"])}</td>'
        f"<td>{_e(a['difference'])}</td><td>{_e(a['would_pay_more'])}</td><td>{_e(a['would_pay_less'])}</td><td>{_e(a['same'])}</td></tr>"
        for k in doc.get("cohorts", [])
        for a in k["against"]
    )
    cohort_html = (
        (
            '<h2>Cohorts</h2><table class="cohorts"><tr><th>current plan</th><th>customers</th><th>revenue</th><th>against</th>'
            "<th>revenue</th><th>difference</th><th>would pay more</th><th>would pay less</th><th>same</th></tr>"
            + cohorts
            + "</table>"
        )
        if cohorts
        else ""
    )
    notes = "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in doc.get("notes", {}).items())
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>meterline plan simulation {_e(doc['period'])}</title><style>"
        "body{font:14px system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}tr.cheapest{background:#e8f6e8}"
        ".charts{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0}figcaption{font-size:12px;color:#555}"
        "section.customer{border-top:2px solid #ddd;margin-top:18px}</style></head><body>"
        f"<h1>Plan simulation · {_e(doc['period'])} · {_e(currency)}</h1>"
        f"<p>{len(customers)} customer(s); candidates: {_e(', '.join(doc['candidates']))}.</p><ul>{notes}</ul>"
        + cohort_html
        + "".join(_customer(c, doc["periods"], currency) for c in shown)
        + more
        + "</body></html>"
    )
