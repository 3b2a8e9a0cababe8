"""Every example query of docs/analytics.md runs (read-only) and the key ones return exact answers."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from meterline.stack.analytics import run_readonly
from pipeline.sink import PRICED_COLUMNS, REJECTED_COLUMNS, priced_row, rejected_row
from tests.sink.helpers import DAY_MS, dead_letter, make_events, picos

DOC = Path(__file__).resolve().parents[2] / "docs" / "analytics.md"


def doc_queries() -> dict[str, str]:
    """``### heading`` -> the sql block under it, for the 'Example queries' section."""
    text = DOC.read_text(encoding="utf-8").split("## Example queries", 1)[1]
    found = re.findall(r"^### (.+?)\n.*?```sql\n(.*?)```", text, flags=re.S | re.M)
    return {title.strip(): sql for title, sql in found}


QUERIES = doc_queries()


def test_the_doc_has_six_to_ten_examples():
    assert 6 <= len(QUERIES) <= 10


@pytest.fixture
def seeded(clickhouse):
    events = make_events(120, seed=42, customers=4, days=3)
    clickhouse.insert(
        "usage_priced", [priced_row(e, partition=0, offset=0) for e in events], column_names=PRICED_COLUMNS
    )
    letters = [dead_letter(i) for i in range(9)]
    clickhouse.insert("usage_rejected", [rejected_row(r) for r in letters], column_names=REJECTED_COLUMNS)
    return events, letters


def _day(ms: int) -> date:
    return date(1970, 1, 1) + timedelta(days=ms // DAY_MS)


def test_every_doc_query_runs_and_the_answers_are_exact(clickhouse, seeded):
    events, letters = seeded
    results: dict[str, tuple[list[str], list[tuple[Any, ...]]]] = {}
    for title, sql in QUERIES.items():
        params = {"customer": events[0]["customer_id"]} if "{customer:String}" in sql else None
        results[title] = run_readonly(clickhouse, sql, params)
        if title.startswith("Reconciliation"):
            assert results[title][1] == [], title
        else:
            assert results[title][1], f"{title}: no rows"

    # Spend per customer per day == Python's exact sums.
    want: dict[tuple[Any, ...], list[Any]] = defaultdict(lambda: [0, Decimal(0), Decimal(0)])
    for e in events:
        acc = want[(_day(e["occurred_at"]), e["customer_id"], "usd")]
        acc[0] += 1
        acc[1] += picos(e["cost_picos"])
        acc[2] += picos(e["charge_picos"])
    cols, rows = results["Spend per customer per day"]
    assert cols == ["day", "customer_id", "currency", "events", "cost", "charge", "margin"]
    assert rows == [k + (v[0], v[1], v[2], v[2] - v[1]) for k, v in sorted(want.items())]

    # Margin per model: exact Decimal margin.
    per_model: dict[str, Decimal] = defaultdict(Decimal)
    for e in events:
        per_model[e["model"]] += picos(e["charge_picos"] - e["cost_picos"])
    cols, rows = results["Margin per model"]
    got = {r[cols.index("model")]: r[cols.index("margin")] for r in rows}
    assert got == dict(per_model) and all(isinstance(v, Decimal) for v in got.values())

    # Rejected events by reason.
    cols, rows = results["Rejected events by reason"]
    assert {r[0]: r[1] for r in rows} == dict(Counter(r["reason_code"] for r in letters))

    # Most expensive single events.
    cols, rows = results["Most expensive single events"]
    top = sorted(events, key=lambda e: (-e["charge_picos"], e["event_id"]))[:10]
    assert [(r[0], r[-1]) for r in rows] == [(e["event_id"], picos(e["charge_picos"])) for e in top]

    # Hourly usage of one customer: its charges add up to the customer's total.
    cols, rows = results["Hourly usage of one customer"]
    mine = [e for e in events if e["customer_id"] == events[0]["customer_id"]]
    assert sum(r[cols.index("charge")] for r in rows) == picos(sum(e["charge_picos"] for e in mine))
    assert sum(r[cols.index("events")] for r in rows) == len(mine)
