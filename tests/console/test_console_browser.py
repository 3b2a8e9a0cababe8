"""The console in a real browser (headless Debian chromium via Playwright) on a produced workload
through the real stack: every figure on the page equals the API's and ClickHouse's."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.console.conftest import Stack, cents

pytestmark = pytest.mark.broker

ARTIFACTS = Path(os.environ.get("METERLINE_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / ".test-artifacts"))
# Set to a folder (e.g. docs) to keep the console screenshot that the README shows.
SCREENSHOT_DIR = os.environ.get("METERLINE_CONSOLE_SCREENSHOT_DIR")


@contextlib.contextmanager
def screenshot_on_failure(page: Any, name: str) -> Iterator[None]:
    try:
        yield
    except BaseException:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}-{int(time.time())}.png"
        with contextlib.suppress(Exception):
            page.screenshot(path=str(path), full_page=True)
            print(f"screenshot of the failing page: {path}")
        raise


def login(page: Any, stack: Stack, key: str) -> None:
    page.goto(stack.url + "/console")
    page.fill("#key", key)
    page.click("#login-form button")
    page.wait_for_selector("#logout", state="visible")


def test_customer_sees_own_figures_equal_to_api_and_clickhouse(stack: Stack, browser: Any) -> None:
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.set_default_timeout(60_000)  # a loaded CI machine; waits end as soon as the page is ready
    with screenshot_on_failure(page, "console-customer"):
        # No request of the page leaves this origin (no CDN, nothing fetched from the network).
        foreign: list[str] = []
        page.on(
            "request",
            lambda req: (
                None
                if req.url.startswith(stack.url) or req.url.startswith("data:") or req.url == "about:srcdoc"
                else foreign.append(req.url)
            ),
        )
        login(page, stack, stack.keys["acme"])
        assert page.inner_text("#customer-id") == "acme"
        assert page.is_hidden("#operator")
        # The key is in sessionStorage, never in the URL.
        assert "ml_live_" not in page.url
        assert page.evaluate("sessionStorage.getItem('meterline.key')") == stack.keys["acme"]

        # Spend: total and every bar, against ClickHouse (exact) and the cent-rounded text.
        total = Decimal(
            stack.sql(
                "SELECT sum(charge) FROM usage_priced WHERE customer_id = 'acme' "
                "AND toYYYYMM(occurred_at) = toYYYYMM(now())"
            )[0][0]
        )
        page.wait_for_selector("#spend-total[data-exact]")
        assert Decimal(page.get_attribute("#spend-total", "data-exact")) == total
        assert page.inner_text("#spend-total") == f"{cents(total)} USD"
        for dim, col in (("model", "model"), ("project", "project"), ("day", "toString(toDate(occurred_at))")):
            expected = {
                k: Decimal(v)
                for k, v in stack.sql(
                    f"SELECT {col}, sum(charge) FROM usage_priced WHERE customer_id = 'acme' "
                    f"AND toYYYYMM(occurred_at) = toYYYYMM(now()) GROUP BY 1"
                )
            }
            bars = page.locator(f"#chart-{dim} rect.bar")
            shown = {
                bars.nth(i).get_attribute("data-label"): Decimal(bars.nth(i).get_attribute("data-value"))
                for i in range(bars.count())
            }
            assert shown == expected, dim
            if dim != "day":
                labels = page.locator(f"#chart-{dim} text.value")
                texts = {
                    labels.nth(i).get_attribute("data-label"): labels.nth(i).text_content()
                    for i in range(labels.count())
                }
                assert {k: t.split(" USD")[0] for k, t in texts.items()} == {k: cents(v) for k, v in expected.items()}

        # Balance: equal to the API's live status.
        balance = stack.call("GET", "/v1/customers/acme/balance", stack.keys["acme"]).json()
        page.wait_for_selector("#balance[data-exact]")
        assert page.get_attribute("#balance", "data-exact") == balance["available"]
        assert page.inner_text("#balance").startswith(cents(balance["available"]))

        # Alerts: the credit alerts of the credit agent (the $1.00 grant is used up).
        page.wait_for_selector("#alerts table", timeout=30_000)
        assert "credit_used" in page.inner_text("#alerts")

        # The same statement as `meterline statement acme --period <month> --format html`.
        page.click("#show-statement")
        frame = page.frame_locator("#statement")
        total_li = frame.locator("li.total").first.inner_text()
        assert total_li.startswith(f"USD {cents(total)}") and f"exact {total}" in total_li.replace(",", "")
        amounts = frame.locator("tbody td.amount")
        assert sum(Decimal(amounts.nth(i).inner_text().replace(",", "")) for i in range(amounts.count())) == Decimal(
            cents(total).replace(",", "")
        )
        assert "largest remainder" in frame.locator("p.rule").inner_text()

        # Another customer's data is refused to this key (by the API the page uses).
        assert stack.call("GET", "/v1/console/spend?customer_id=globex", stack.keys["acme"]).status_code == 403
        assert stack.call("GET", "/v1/console/customers", stack.keys["acme"]).status_code == 403
        assert foreign == []
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "console-customer.png"), full_page=True)
        if SCREENSHOT_DIR:
            page.set_viewport_size({"width": 1200, "height": 1000})
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(Path(SCREENSHOT_DIR) / "console.png"), full_page=False)
    page.close()


def test_operator_sees_every_customer_dead_letters_and_pipeline_and_redrives(stack: Stack, browser: Any) -> None:
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.set_default_timeout(60_000)  # a loaded CI machine; waits end as soon as the page is ready
    with screenshot_on_failure(page, "console-operator"):
        login(page, stack, stack.admin)
        page.wait_for_selector("#customers tbody tr")
        rows = page.locator("#customers tbody tr")
        shown = {
            rows.nth(i).locator("td").nth(0).inner_text(): [
                rows.nth(i).locator("td").nth(j).inner_text() for j in range(7)
            ]
            for i in range(rows.count())
        }
        expected = stack.sql("SELECT customer_id, count(), sum(cost), sum(charge) FROM usage_priced GROUP BY 1")
        assert set(shown) == {r[0] for r in expected} == stack.workload.customers
        for customer, n, cost, charge in expected:
            cells = shown[customer]
            assert cells[2] == f"{n:,}" and cells[3] == cents(cost) and cells[4] == cents(charge)
            assert cells[5] == cents(Decimal(charge) - Decimal(cost))

        if SCREENSHOT_DIR:
            page.wait_for_selector("#dead-letters table")
            page.wait_for_selector("#pipeline table")
            page.screenshot(path=str(Path(SCREENSHOT_DIR) / "console-operator.png"), full_page=True)
        # Pipeline health: the priced events of the last 15 minutes, and the open dead letters.
        page.wait_for_selector("#pipeline table")
        health = page.inner_text("#pipeline")
        recent = stack.sql("SELECT count() FROM usage_priced WHERE inserted_at >= now64(3) - INTERVAL 15 MINUTE")[0][0]
        assert f"events priced\t{recent:,}" in health
        assert f"open dead letters\t{stack.workload.unpriced}" in health

        # Dead letters: both unpriced events, re-drivable. Price the model, re-drive from the page
        # until both are priced (the worker's price feed follows the prices topic asynchronously).
        page.wait_for_selector("#dead-letters button[data-reason='unknown_model']")
        assert page.inner_text("#dead-letters").startswith(f"{stack.workload.unpriced} open dead letter")
        more = stack.data_dir.parent / "more.yaml"
        more.write_text(
            "currency: USD\nprices:\n  - provider: meta\n    model: console-unpriced-model\n"
            '    effective_from: "2024-01-01T00:00:00Z"\n    per_million: {input: "1", output: "2"}\n'
        )
        stack.run("prices", "load", str(more))
        deadline = time.monotonic() + 90
        while stack.sql("SELECT count() FROM v_rejected_open")[0][0] > 0:
            assert time.monotonic() < deadline, "the re-driven dead letters were not priced"
            button = page.locator("#dead-letters button[data-reason='unknown_model']")
            if button.count():
                button.click()
                done = page.wait_for_selector("#dead-letters >> text=re-drove")
                stack.workload.redriven += int(done.inner_text().split("re-drove ")[1].split()[0])
            time.sleep(2)
            page.reload()
            page.wait_for_selector("#dead-letters p")
        page.reload()
        page.wait_for_selector("#dead-letters p")
        assert page.inner_text("#dead-letters").startswith("0 open dead letter")
        assert stack.sql("SELECT count() FROM usage_priced WHERE model = 'console-unpriced-model'")[0][0] == 2

        # An operator opens one customer from the list.
        page.click("#customers tbody tr[data-customer='globex']")
        page.wait_for_selector("#spend-total[data-exact]")
        globex = stack.sql("SELECT sum(charge) FROM usage_priced WHERE customer_id = 'globex'")[0][0]
        assert Decimal(page.get_attribute("#spend-total", "data-exact")) == Decimal(globex)
    page.close()
