"""Open a simulator HTML report in Debian's Chromium (Playwright, no browser download) and check
that it renders its charts and shows exactly the JSON's numbers, with no network request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CHARTS = ("candidates", "periods", "utilisation", "break_even")


def check_report(html: Path, doc: dict[str, Any]) -> None:
    from playwright.sync_api import sync_playwright

    requests: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.goto(html.resolve().as_uri())
            page.wait_for_load_state("load")
            assert [u for u in requests if not u.startswith("file://")] == [], requests
            for c in doc["customers"]:
                sec = page.locator(f'section.customer[data-customer="{c["customer_id"]}"]')
                assert sec.count() == 1
                for kind in CHARTS:
                    svg = sec.locator(f'svg[data-chart="{kind}"]')
                    assert svg.count() == 1, (c["customer_id"], kind)
                    box = svg.bounding_box()
                    assert box is not None and box["width"] > 100 and box["height"] > 100
                # bill per candidate: one drawn bar per candidate, carrying the JSON total
                bars = sec.locator('svg[data-chart="candidates"] rect.bar')
                assert bars.evaluate_all("els => els.map(e => e.getAttribute('data-value'))") == [
                    x["total"] for x in c["candidates"]
                ]
                heights = bars.evaluate_all("els => els.map(e => e.getBBox().height)")
                assert all(h > 0 for h in heights)
                # the table says the same
                cells = sec.locator('table.candidates td[data-field="total"]').all_inner_texts()
                assert cells == [x["total"] for x in c["candidates"]]
                assert sec.locator(".cheapest-name").inner_text() == c["cheapest"]
                # bill per period: one point per candidate and period
                pts = sec.locator('svg[data-chart="periods"] circle.point').evaluate_all(
                    "els => els.map(e => e.getAttribute('data-value'))"
                )
                assert pts == [p["total"] for x in c["candidates"] for p in x["periods"]]
                # utilisation bars = the JSON's percentages
                util = sec.locator('svg[data-chart="utilisation"] rect.bar').evaluate_all(
                    "els => els.map(e => e.getAttribute('data-value'))"
                )
                assert util == [
                    a["utilisation_pct"]
                    for x in c["candidates"]
                    for a in x["allowances"]
                    if a["utilisation_pct"] is not None
                ]
                # break-even: a curve per candidate, a mark per exact crossing
                series = sec.locator('svg[data-chart="break_even"] polyline.series').count()
                assert series == len(c["curves"]["series"]) and series >= 2
                marks = sec.locator('svg[data-chart="break_even"] line.mark').evaluate_all(
                    "els => els.map(e => e.getAttribute('data-x'))"
                )
                assert marks == [v["tokens"] for p in c["break_even"] for v in p["volumes"]]
            for k in doc["cohorts"]:
                for a in k["against"]:
                    cell = page.locator(
                        f'tr[data-cohort="{k["plan"]}"][data-against="{a["plan"]}"] td[data-field="revenue"]'
                    )
                    assert cell.inner_text() == a["revenue"]
        finally:
            browser.close()
