"""Statements a customer can check: the cent-rounded lines add up to the rounded total
(largest remainder), the rule is on the page, and the charts say something for short periods."""

from __future__ import annotations

import calendar
import re
from datetime import date
from decimal import ROUND_HALF_UP, Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.stripe.statement import Statement, StatementLine, render_html
from meterline.core.allocation import CENT, allocate, round_total

PICO = Decimal("0.000000000001")
amounts = st.lists(st.integers(min_value=0, max_value=10**15).map(lambda p: Decimal(p) * PICO), max_size=40)


@settings(max_examples=500, deadline=None)
@given(amounts)
def test_allocated_lines_sum_to_the_rounded_total_and_stay_within_a_cent(exact: list[Decimal]) -> None:
    out = allocate(exact)
    assert sum(out, Decimal(0)) == sum(exact, Decimal(0)).quantize(CENT, rounding=ROUND_HALF_UP)
    for a, x in zip(out, exact):
        assert a == a.quantize(CENT) and abs(a - x) < CENT  # floor or ceil of the exact amount
    # largest remainder: a line rounded up never has a smaller remainder than one rounded down
    up = [x - x.quantize(CENT, rounding="ROUND_FLOOR") for a, x in zip(out, exact) if a > x]
    down = [x - x.quantize(CENT, rounding="ROUND_FLOOR") for a, x in zip(out, exact) if a <= x and a != x]
    assert not up or not down or min(up) >= max(down)


@given(st.lists(st.integers(min_value=-(10**14), max_value=10**14).map(lambda p: Decimal(p) * PICO), max_size=20))
def test_allocation_also_adds_up_with_negative_lines(exact: list[Decimal]) -> None:
    assert sum(allocate(exact), Decimal(0)) == round_total(sum(exact, Decimal(0)))


def _ts(d: date) -> int:
    return calendar.timegm(d.timetuple())


def _line(day: date, model: str, project: str, charge: str) -> StatementLine:
    return StatementLine(day, project, "openai", model, "usd", 1, 1, (1, 1, 0, 0, 0), Decimal(charge))


def test_six_lines_that_rounded_one_by_one_missed_a_cent_now_add_up() -> None:
    # The shape of the reported statement: each line rounded on its own gives 102.08, the total 102.09.
    charges = ["17.014", "17.014", "17.014", "17.014", "17.015", "17.018"]
    assert sum(Decimal(c).quantize(CENT, rounding=ROUND_HALF_UP) for c in charges) == Decimal("102.08")
    day = date(2026, 12, 3)
    st_ = Statement(
        "acme",
        _ts(date(2026, 12, 1)),
        _ts(date(2027, 1, 1)),
        [
            _line(day, m, p, c)
            for (m, p), c in zip(
                [
                    ("gpt-4o", "chat"),
                    ("gpt-4o", "search"),
                    ("o1", "chat"),
                    ("o1", "search"),
                    ("gpt-4o", "bots"),
                    ("o1", "bots"),
                ],
                charges,
            )
        ],
    )
    page = render_html(st_)
    shown = [Decimal(a.replace(",", "")) for a in re.findall(r'<td class="amount">([^<]+)</td>', page)]
    lines, total = shown[:-1], shown[-1]
    assert len(lines) == 6 and total == Decimal("102.09") and sum(lines) == total
    assert "USD 102.09 (exact 102.089)" in page
    assert "largest remainder" in page and "17.014" in page  # the rule, and the exact amounts beside
    # One day: the day chart labels the day and its amount; one bar per model and per project.
    assert page.count('data-label="2026-12-03"') == 1 and ">102.09</text>" in page
    assert page.count('<rect class="bar"') == 1 + 2 + 3
    assert "(100.0 %)" not in page and " %)" in page  # shares of the total beside each bar
    assert "src=" not in page and "<script" not in page and "<link" not in page


def test_a_single_model_and_project_say_so() -> None:
    st_ = Statement(
        "acme", _ts(date(2026, 12, 1)), _ts(date(2026, 12, 2)), [_line(date(2026, 12, 1), "gpt-4o", "", "3.5")]
    )
    page = render_html(st_)
    assert "(100.0 %)" in page and "(none)" in page and ">3.50</text>" in page
