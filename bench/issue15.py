"""The targets of issue #15 beside this run's figures: one short table after the full report.

Every figure is taken from a :class:`bench.Result` of this run (nothing is re-measured or
remembered from an earlier run); a benchmark that did not run, or failed, shows "not run".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench import Result

Row = dict[str, Any]


def _find(results: list[Result], benchmark: str, match: Callable[[str], bool]) -> Result | None:
    for r in results:
        if r.benchmark == benchmark and match(r.name) and r.figure is not None:
            return r
    return None


def _num(r: Result | None) -> float | None:
    return float(r.figure) if r is not None and isinstance(r.figure, int | float) else None


def _row(measure: str, target: str, value: str | None, met: bool | None, note: str = "") -> Row:
    return {"measure": measure, "target": target, "measured": value or "not run", "met": met, "note": note}


def summary(results: list[Result]) -> list[Row]:
    rows: list[Row] = []
    # A run that did not complete (time budget, balances behind) has a Result without a figure.
    e2e = {
        w: next(
            (
                r
                for r in results
                if r.benchmark == "e2e" and r.name == f"rows in ClickHouse AND balances caught up, {w} worker(s)"
            ),
            None,
        )
        for w in (1, 2)
    }
    one, two = _num(e2e[1]), _num(e2e[2])

    def shown(r: Result | None, v: float | None) -> str | None:
        if r is None:
            return None
        return f"{v:,.0f} events/s" if v is not None else "incomplete"

    rows.append(
        _row(
            "end to end, 1 worker (rows in ClickHouse AND every balance caught up)",
            ">= 50,000 events/s",
            shown(e2e[1], one),
            None if e2e[1] is None else (one is not None and one >= 50_000),
            e2e[1].note if e2e[1] else "",
        )
    )
    rows.append(
        _row(
            "2 workers on these cores",
            "no slower than 1 worker",
            shown(e2e[2], two),
            None if e2e[2] is None or e2e[1] is None else (one is not None and two is not None and two >= one),
            "same measure as the row above" + (f"; {e2e[2].note}" if e2e[2] and two is None else ""),
        )
    )
    for customers, suffix in ((100, ""), (1_000, ", 1,000 customers")):
        for pct in ("p50", "p99"):
            lat = _find(
                results,
                "latency",
                lambda n, pct=pct, suffix=suffix: n == f"occurred_at -> balance visible over API, {pct}{suffix}",
            )
            v = _num(lat)
            rows.append(
                _row(
                    f"occurred -> balance visible over the API, {pct} ({customers:,} customers)",
                    "p99 < 250 ms" if pct == "p99" else "",
                    f"{v:,.0f} ms" if v is not None else None,
                    (None if v is None else v < 250) if pct == "p99" else None,
                    lat.note[:160] if lat else "",
                )
            )
    rps = _find(results, "authorize", lambda n: n.startswith("answered requests/s,"))
    p99 = _find(results, "authorize", lambda n: n.startswith("latency p99,") and "concurrent" in n)
    rows.append(
        _row(
            "authorize: " + (rps.name.split(", ", 1)[1] if rps else "32 concurrent clients"),
            ">= 1,000 req/s",
            f"{_num(rps):,.1f} req/s" if rps else None,
            None if rps is None else (_num(rps) or 0) >= 1_000,
        )
    )
    rows.append(
        _row(
            "authorize: p99, " + (p99.name.split(", ", 1)[1] if p99 else "32 concurrent clients"),
            "< 50 ms",
            f"{_num(p99):,.1f} ms" if p99 else None,
            None if p99 is None else (_num(p99) or 0) < 50,
        )
    )
    for label, name in (
        ("pricing core vs tokencost, per event (PricingEngine.price)", "speed-up vs tokencost"),
        (
            "pricing core vs tokencost, 500-event batches (price_many, the agent's path)",
            "batch (price_many) speed-up vs tokencost",
        ),
        (
            "pricing core vs tokencost, 500-event batches (price_batch, numpy columns)",
            "batch (price_batch) speed-up vs tokencost",
        ),
    ):
        r = _find(results, "pricing-core", lambda n, name=name: n == name)
        rows.append(
            _row(label, ">= 5x, exact", f"{_num(r):.2f}x" if r else None, r.met if r else None, r.note if r else "")
        )
    wrong = _find(results, "pricing-core", lambda n: n.startswith("meterline") and "wrong vs exact" in n)
    rows.append(
        _row(
            "pricing core exactness (events off by any amount)",
            "0",
            f"{wrong.figure}" if wrong else None,
            None if wrong is None else wrong.figure == 0,
        )
    )
    for r in results:
        if r.benchmark == "dedupe-memory" and r.unit == "MiB":
            rows.append(
                _row(
                    r.name.replace("worker dedupe state, ", "worker RSS, dedupe state: "),
                    r.target,
                    f"{_num(r):,.0f} MiB",
                    r.met,
                    r.note,
                )
            )
    for w in (1, 2):
        r = _find(results, "memory", lambda n, w=w: n == f"worker peak RSS (VmHWM), {w} worker(s)")
        if r is not None:
            rows.append(
                _row(f"worker peak RSS at the end of the e2e run, {w} worker(s)", "", f"{_num(r):,.0f} MiB", None)
            )
    return rows


def print_summary(rows: list[Row]) -> None:
    def met(v: bool | None) -> str:
        return "" if v is None else ("yes" if v else "NO")

    try:
        from rich.table import Table

        from meterline.shell.console import make_console
    except ImportError:
        print("\nissue #15 targets")
        for row in rows:
            print(f"{row['measure']:70} {row['target']:22} {row['measured']:>18} {met(row['met']):4} {row['note']}")
        return
    table = Table(title="issue #15: targets beside this run's figures")
    for col, kw in (
        ("measure", {}),
        ("target", {}),
        ("measured", {"justify": "right"}),
        ("met?", {}),
        ("note", {"overflow": "fold"}),
    ):
        table.add_column(col, **kw)
    for row in rows:
        m = met(row["met"])
        table.add_row(
            row["measure"], row["target"], row["measured"], m, row["note"], style="red" if m == "NO" else None
        )
    make_console().print(table)
