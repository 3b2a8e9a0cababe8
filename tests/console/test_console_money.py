"""The console's display rounding (console.js ``cents``, BigInt arithmetic in the browser) agrees
with the statements' (``meterline.core.allocation.round_total``, half-up) on every amount shape."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meterline.shell.api.console import ASSETS
from tests.console.conftest import cents

PICO = Decimal("0.000000000001")


@settings(max_examples=5, deadline=None)
@given(st.lists(st.integers(min_value=-(10**18), max_value=10**18), min_size=50, max_size=200))
def test_console_cents_equal_python_half_up(browser: Any, picos: list[int]) -> None:
    page = browser.new_page()
    try:
        page.set_content("<!doctype html><p>money</p>")
        page.add_script_tag(content=(ASSETS / "console.js").read_text())
        amounts = [format(Decimal(p) * PICO, "f") for p in picos] + [
            "0",
            "0.005",
            "-0.005",
            "12.345",
            "1",
            "999.995",
            "1234567.5",
            "0.004999999999",
        ]
        shown = page.evaluate("values => values.map(cents)", amounts)
        wrong = [(a, s, cents(a)) for a, s in zip(amounts, shown) if s != cents(a)]
        assert wrong == []
    finally:
        page.close()
