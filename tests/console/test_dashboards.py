"""Every metric and table that a Grafana dashboard in infra/grafana names exists: metrics in a
real scrape of the API and the worker, tables (and views) in the migrated ClickHouse."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.console.conftest import REPO, Stack
from tests.console.test_metrics import scrape, worker_url

pytestmark = pytest.mark.broker

DASHBOARDS = sorted((REPO / "infra" / "grafana" / "dashboards").glob("*.json"))
_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")
_SQL_KEYWORDS = {"select", "where", "group", "order", "limit", "final"}


def targets(path: Path) -> list[dict[str, Any]]:
    doc = json.loads(path.read_text())
    return [t for p in doc["panels"] for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bmeterline_[a-z0-9_]+", expr))


def table_names(sql: str) -> set[str]:
    return {m.lower() for m in re.findall(r"\b(?:FROM|JOIN)\s+([A-Za-z_][A-Za-z0-9_]*)", sql)} - _SQL_KEYWORDS


def family_of(sample_name: str, families: set[str]) -> str | None:
    if sample_name in families:
        return sample_name
    for suffix in _SUFFIXES:
        if sample_name.endswith(suffix) and sample_name[: -len(suffix)] in families:
            return sample_name[: -len(suffix)]
    return None


def test_the_dashboards_and_provisioning_are_well_formed() -> None:
    assert {p.name for p in DASHBOARDS} == {"business.json", "pipeline.json"}
    uids = {
        d["uid"]
        for d in yaml.safe_load((REPO / "infra/grafana/provisioning/datasources/datasources.yaml").read_text())[
            "datasources"
        ]
    }
    for path in DASHBOARDS:
        for t in targets(path):
            assert t["datasource"]["uid"] in uids, (path.name, t)
            assert ("expr" in t) != ("rawSql" in t), (path.name, t)
    compose = yaml.safe_load((REPO / "infra" / "compose.yaml").read_text())
    assert {"prometheus", "grafana"} <= set(compose["services"])
    mounts = " ".join(compose["services"]["grafana"]["volumes"])
    assert "./grafana/dashboards" in mounts and "./grafana/provisioning" in mounts


def test_every_metric_a_dashboard_names_is_exposed(stack: Stack) -> None:
    families = set(scrape(stack.url + "/metrics")) | set(scrape(worker_url(stack)))
    named = {n for path in DASHBOARDS for t in targets(path) if "expr" in t for n in metric_names(t["expr"])}
    assert len(named) >= 10
    assert {n for n in named if family_of(n, families) is None} == set()


def test_every_table_a_dashboard_names_exists_in_the_migrated_clickhouse(stack: Stack) -> None:
    tables = {r[0] for r in stack.sql("SHOW TABLES")}
    named = {n for path in DASHBOARDS for t in targets(path) if "rawSql" in t for n in table_names(t["rawSql"])}
    assert {"usage_daily", "ledger_balances", "v_rejected_open"} <= named
    assert named - tables == set()
