"""Hand-written inline SVG charts for statements (no scripts, no external assets).

Both charts label every bar with its value, so they say something even for one bar: a one-day
period shows one labelled column among the period's empty days, a single model shows one bar
marked 100 %. Amounts are exact Decimals; only the drawing (bar lengths) uses floats, and the
labels are the cent-rounded figures.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from datetime import date, timedelta
from decimal import Decimal

from meterline.core.allocation import round_total

__all__ = ["day_columns", "hbars", "money"]


def money(d: Decimal) -> str:
    return f"{round_total(d):,}"


def _share(value: Decimal, total: Decimal) -> str:
    if total <= 0:
        return ""
    return f" ({(value * 100 / total).quantize(Decimal('0.1'))} %)"


def hbars(items: Sequence[tuple[str, Decimal]], *, label: str, currency: str, width: int = 720) -> str:
    """One horizontal bar per item (largest first), each with its amount and share of the total."""
    if not items:
        return "<p>No usage in this period.</p>"
    rows = sorted(items, key=lambda kv: (-kv[1], kv[0]))
    total = sum((v for _, v in rows), Decimal(0))
    peak = max((v for _, v in rows), default=Decimal(0))
    name_w, value_w, row_h = 180, 200, 24
    bar_max = width - name_w - value_w
    height = row_h * len(rows) + 8
    e = html.escape
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart hbars" width="{width}" height="{height}" '
        f'role="img" aria-label="{e(label)}">'
    ]
    for i, (name, value) in enumerate(rows):
        y = 4 + i * row_h
        w = float(value / peak) * bar_max if peak > 0 else 0.0
        text = f"{money(value)} {currency.upper()}{_share(value, total)}"
        parts.append(f'<text x="{name_w - 8}" y="{y + 16}" font-size="12" text-anchor="end">{e(name)}</text>')
        parts.append(
            f'<rect class="bar" x="{name_w}" y="{y + 3}" width="{max(w, 1.0):.1f}" height="{row_h - 6}" '
            f'fill="#4a7bd0" data-label="{e(name)}" data-value="{value}"><title>{e(name)}: {e(text)}</title></rect>'
        )
        parts.append(f'<text x="{name_w + max(w, 1.0) + 6:.1f}" y="{y + 16}" font-size="12">{e(text)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def day_columns(
    daily: dict[date, Decimal],
    start: date,
    end: date,
    *,
    currency: str,
    width: int = 720,
    height: int = 220,
    max_days: int = 62,
) -> str:
    """One column per day of ``[start, end)`` (days without usage drawn empty), each column with
    its date under it; amounts above the columns when they fit. Longer periods: used days only."""
    if not daily:
        return "<p>No usage in this period.</p>"
    n_days = (end - start).days
    days = [start + timedelta(days=i) for i in range(n_days)] if 0 < n_days <= max_days else sorted(daily)
    peak = max(daily.values()) or Decimal(1)
    pad_l, pad_r, pad_t, pad_b = 10, 10, 24, 40
    slot = (width - pad_l - pad_r) / len(days)
    bar_w = min(48.0, max(2.0, slot - 4))
    plot_h = height - pad_t - pad_b
    base = height - pad_b
    e = html.escape
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart days" width="{width}" height="{height}" '
        f'role="img" aria-label="spend by day">',
        f'<line x1="{pad_l}" y1="{base}" x2="{width - pad_r}" y2="{base}" stroke="#888"/>',
    ]
    every = max(1, round(len(days) / 12))  # at most ~12 date labels
    for i, day in enumerate(days):
        value = daily.get(day, Decimal(0))
        cx = pad_l + (i + 0.5) * slot
        h = float(value / peak) * plot_h if peak > 0 else 0.0
        if value:
            label = f"{day.isoformat()}: {money(value)} {currency.upper()}"
            parts.append(
                f'<rect class="bar" x="{cx - bar_w / 2:.1f}" y="{base - h:.1f}" width="{bar_w:.1f}" '
                f'height="{h:.1f}" fill="#4a7bd0" data-label="{day.isoformat()}" data-value="{value}">'
                f"<title>{e(label)}</title></rect>"
            )
            if slot >= 44 or len(daily) == 1:
                parts.append(
                    f'<text x="{cx:.1f}" y="{base - h - 5:.1f}" font-size="11" text-anchor="middle">'
                    f"{e(money(value))}</text>"
                )
        if i % every == 0 or (value and len(daily) == 1):
            parts.append(
                f'<text x="{cx:.1f}" y="{base + 14}" font-size="10" text-anchor="middle">{day.strftime("%m-%d")}</text>'
            )
    parts.append(
        f'<text x="{pad_l}" y="{height - 6}" font-size="11">{start.isoformat()} – '
        f"{(end - timedelta(days=1)).isoformat()}, peak {e(money(peak))} {currency.upper()}</text>"
    )
    parts.append("</svg>")
    return "".join(parts)
