"""The console's page and JSON routes over HTTP: auth (customer vs admin), exact figures, no
external assets."""

from __future__ import annotations

import re
from decimal import Decimal

import httpx
import pytest

from meterline.shell.api.console import ASSETS
from tests.console.conftest import Stack

pytestmark = pytest.mark.broker


def test_page_and_assets_are_served_from_the_repo_with_a_strict_policy(stack: Stack) -> None:
    r = httpx.get(stack.url + "/console", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    for name in ("console.js", "console.css"):
        a = httpx.get(f"{stack.url}/console/assets/{name}", timeout=30)
        assert a.status_code == 200 and a.text == (ASSETS / name).read_text()
    for asset in (r.text, (ASSETS / "console.js").read_text(), (ASSETS / "console.css").read_text()):
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", asset)  # nothing from the network
    assert httpx.get(stack.url + "/console/assets/index.html", timeout=30).status_code == 404
    assert httpx.get(stack.url + "/console/assets/..%2Fconsole.py", timeout=30).status_code == 404


def test_a_customer_key_reads_only_its_own_customer(stack: Stack) -> None:
    acme = stack.keys["acme"]
    me = stack.call("GET", "/v1/console/me", acme).json()
    assert me["role"] == "customer" and me["customer_id"] == "acme" and acme not in str(me)
    for path in (
        "/v1/console/spend?customer_id=globex",
        "/v1/console/alerts?customer_id=globex",
        "/v1/console/statement?customer_id=globex",
        "/v1/console/customers",
        "/v1/console/dead-letters",
        "/v1/console/pipeline",
    ):
        assert stack.call("GET", path, acme).status_code == 403, path
    assert stack.call("POST", "/v1/console/dead-letters/redrive", acme, json={}).status_code == 403
    assert stack.call("GET", "/v1/console/spend", None).status_code == 401
    r = stack.call("GET", "/v1/console/spend?period=2026-13", acme)
    assert r.status_code == 400 and r.json()["error"]["field"] == "period"


def test_spend_is_exact_and_equals_clickhouse(stack: Stack) -> None:
    doc = stack.call("GET", f"/v1/console/spend?period={stack.period}", stack.keys["acme"]).json()
    assert doc["customer_id"] == "acme" and [c.lower() for c in doc["currency"]] == ["usd"]
    usd = next(iter(doc["currency"].values()))
    rows = stack.sql(
        "SELECT model, sum(charge) FROM usage_priced WHERE customer_id = 'acme' "
        "AND toYYYYMM(occurred_at) = toYYYYMM(now()) GROUP BY model"
    )
    assert {k: Decimal(v) for k, v in usd["by_model"].items()} == {m: Decimal(c) for m, c in rows}
    assert Decimal(usd["total"]) == sum(Decimal(c) for _, c in rows)
    assert (
        sum(Decimal(v) for v in usd["by_day"].values())
        == sum(Decimal(v) for v in usd["by_project"].values())
        == Decimal(usd["total"])
    )
    # the admin may read any customer; the statement page is the CLI's
    page = stack.call("GET", f"/v1/console/statement?customer_id=globex&period={stack.period}", stack.admin)
    assert page.status_code == 200 and page.text.startswith("<!doctype html>") and "globex" in page.text
