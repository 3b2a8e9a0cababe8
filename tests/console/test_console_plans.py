"""'Your bill on other plans' in a real browser: a customer subscribed to a plan (through the
installed `meterline plans load|subscribe` against the running `up`) with usage through the real
pipeline sees, for this month, every candidate of the simulate API -- the same exact strings -- the
cheapest highlighted, and its plan's allowance use; its plan's total equals `meterline bill preview`."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.console.conftest import Stack, _wait
from tests.console.test_console_browser import SCREENSHOT_DIR, login, screenshot_on_failure

pytestmark = pytest.mark.broker

CUSTOMER = "console-plan-co"
PLANS = """
currency: USD
plans:
  - id: console-pro
    version: 1
    effective_from: "2026-01-01T00:00:00Z"
    interval: month
    fee: "200.00"
    allowances:
      - id: tokens
        tokens: 10000000
        token_classes: [input, output]
    overage:
      per_million: "30.00"
    on_exhausted: allow
  - id: console-flat
    version: 1
    effective_from: "2026-01-01T00:00:00Z"
    interval: month
    fee: "25.00"
    overage: {per_million: "0"}
"""


def test_customer_sees_its_bill_on_other_plans_equal_to_the_simulator(stack: Stack, browser: Any) -> None:
    plans = stack.data_dir.parent / "console-plans.yaml"
    plans.write_text(PLANS)
    assert "published" in stack.run("plans", "load", str(plans)).stdout
    now = datetime.now(UTC)
    start = now.strftime("%Y-%m-01T00:00:00Z")
    assert "recorded" in stack.run("plans", "subscribe", CUSTOMER, "console-pro", "--from", start).stdout
    key = json.loads(stack.run("keys", "create", CUSTOMER).stdout)["secret"]
    at = max(now - timedelta(minutes=1), now.replace(day=1, hour=0, minute=0, second=0, microsecond=0))
    usage = [(4_000_000, 3_000_000), (4_000_000, 1_000_000)]  # 12M tokens: 2M over pro's 10M
    events = [
        {
            "event_id": f"cplan-{i}",
            "occurred_at": at.isoformat(),
            "customer_id": CUSTOMER,
            "provider": "meta",
            "model": "llama-3-70b",
            "input_tokens": n_in,
            "output_tokens": n_out,
        }
        for i, (n_in, n_out) in enumerate(usage)
    ]
    r = stack.call("POST", "/v1/events", key, json={"events": events})
    assert r.status_code == 200 and r.json()["accepted"] == len(events), r.text
    # the shared workload now includes this customer (the operator and metrics tests count it)
    stack.workload.priced += len(events)
    stack.workload.accepted += len(events)
    stack.workload.customers.add(CUSTOMER)
    _wait(
        lambda: (
            stack.sql("SELECT count() FROM usage_priced WHERE customer_id = {c:String}", c=CUSTOMER)[0][0]
            == len(events)
            and stack.sql("SELECT count() FROM subscription_events WHERE customer_id = {c:String}", c=CUSTOMER)[0][0]
            == 1
            and stack.sql("SELECT count() FROM plans WHERE plan_id LIKE 'console-%'")[0][0] == 2
        ),
        120,
        "the usage, plans and subscription in ClickHouse",
    )

    month = now.strftime("%Y-%m")
    listed = stack.call("GET", "/v1/console/plans", key).json()["plans"]
    assert {"console-pro", "console-flat"} <= set(listed)
    r = stack.call(
        "GET", f"/v1/customers/{CUSTOMER}/simulate", key, params={"period": month, "plans": ",".join(listed)}
    )
    assert r.status_code == 200, r.text
    (sim,) = r.json()["customers"]
    current = next(c for c in sim["candidates"] if c["role"] == "current")
    # every published plan was asked for, the customer's own too: the page shows that one once
    by_plan = {c["plan"]: c for c in sim["candidates"] if c["role"] != "plan" or c["plan"] != current["plan"]}
    assert by_plan[current["plan"]] is current and {"payg", "console-flat@1"} <= set(by_plan)
    assert current["plan"] == "console-pro@1"
    preview = json.loads(stack.run("bill", "preview", CUSTOMER, "--period", month, "--format", "json").stdout)
    assert preview["plan"] == "console-pro@1" and current["total"] == preview["total"] == "260.00"

    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.set_default_timeout(60_000)
    with screenshot_on_failure(page, "console-plans"):
        login(page, stack, key)
        page.wait_for_selector("#plans table")
        rows = page.locator("#plans tbody tr")
        shown = {}
        for i in range(rows.count()):
            cells = [rows.nth(i).locator("td").nth(j).inner_text() for j in range(6)]
            shown[rows.nth(i).get_attribute("data-plan")] = (cells, rows.nth(i).get_attribute("class") or "")
        assert set(shown) == set(by_plan)
        for plan, c in by_plan.items():
            cells, cls = shown[plan]
            epm = c["effective_per_million"]
            assert cells[1:] == [
                f"{c['total']} USD",
                f"{c['fee']} USD",
                f"{c['overage']} USD",
                str(c["unused_included_tokens"]),
                "—" if epm is None else f"{epm} USD",
            ], plan
            assert ("cheapest" in cls) == (plan == sim["cheapest"]), plan
            assert ("cheapest" in cells[0]) == (plan == sim["cheapest"]), plan
        assert "your plan" in shown["console-pro@1"][0][0]
        # the bar chart: one bar per candidate, valued with the exact total
        bars = page.locator("#plans-chart rect.bar")
        assert {
            bars.nth(i).get_attribute("data-label"): bars.nth(i).get_attribute("data-value")
            for i in range(bars.count())
        } == {p: c["total"] for p, c in by_plan.items()}
        labels = page.locator("#plans-chart text.value")
        assert {
            labels.nth(i).get_attribute("data-label"): labels.nth(i).text_content() for i in range(labels.count())
        } == {p: f"{c['total']} USD" for p, c in by_plan.items()}
        assert page.locator("#plans-chart rect.bar.cheapest").get_attribute("data-label") == sim["cheapest"]
        # allowance use of the current plan: the simulator's figures, equal to the bill preview's
        page.wait_for_selector("#allowances .allowance")
        (allowance,) = current["allowances"]
        (billed,) = preview["allowances"]
        assert (allowance["included"], allowance["used"]) == (billed["included"], billed["used"])
        assert allowance["included"] == 10_000_000 and allowance["used"] >= 10_000_000
        box = page.locator("#allowances .allowance").first
        assert box.get_attribute("data-used") == str(allowance["used"])
        assert box.get_attribute("data-included") == str(allowance["included"])
        assert "tokens" in box.inner_text()
        if SCREENSHOT_DIR:
            page.set_viewport_size({"width": 1200, "height": 1000})
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(Path(SCREENSHOT_DIR) / "console-plans.png"), full_page=False)
    page.close()
