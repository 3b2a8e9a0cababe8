"""/metrics of the API (`meterline up`) and of the faust worker, scraped and parsed with
prometheus-client's parser, against the known counts of the produced workload."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.console.conftest import Stack

pytestmark = pytest.mark.broker


def scrape(url: str) -> dict[str, Any]:
    r = httpx.get(url, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text[:200]
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def value(families: dict[str, Any], family: str, sample: str, **labels: str) -> float:
    matching = [
        s.value
        for s in families[family].samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(matching) <= 1, (sample, labels, matching)
    return matching[0] if matching else 0.0


def worker_url(stack: Stack) -> str:
    doc = json.loads((stack.data_dir / "metrics" / "worker-0.json").read_text())
    assert doc["url"].startswith("http://127.0.0.1:")
    return str(doc["url"])


def test_worker_metrics_equal_the_known_counts(stack: Stack) -> None:
    w = stack.workload
    redrive_priced = stack.sql("SELECT count() FROM usage_priced WHERE model = 'console-unpriced-model'")[0][0]
    m = scrape(worker_url(stack))
    assert value(m, "meterline_events_received", "meterline_events_received_total") == w.accepted + w.redriven
    assert value(m, "meterline_events_priced", "meterline_events_priced_total") == w.priced + redrive_priced
    assert value(m, "meterline_events_duplicate", "meterline_events_duplicate_total") == w.duplicates
    assert (
        value(m, "meterline_events_rejected", "meterline_events_rejected_total", reason="unknown_model")
        == w.unpriced + w.redriven - redrive_priced
    )
    assert {s.labels["reason"] for s in m["meterline_events_rejected"].samples} == {"unknown_model"}
    # one occurred -> priced observation per priced event; the credit agent's per priced record
    assert (
        value(m, "meterline_stage_latency_seconds", "meterline_stage_latency_seconds_count", stage="priced")
        == w.priced + redrive_priced
    )
    assert value(m, "meterline_stage_latency_seconds", "meterline_stage_latency_seconds_count", stage="balance") >= 1
    # lag: one gauge per assigned partition of each source topic; all caught up by now
    lag = m["meterline_consumer_lag_records"].samples
    assert {s.labels["partition"] for s in lag if s.labels["topic"] == "console.usage-events"} == {"0", "1", "2", "3"}
    assert all(s.value >= 0 for s in lag)


def test_api_metrics_equal_the_known_counts(stack: Stack) -> None:
    w = stack.workload
    priced_rows = stack.sql("SELECT count() FROM usage_priced")[0][0]
    rejected_rows = stack.sql("SELECT count() FROM usage_rejected")[0][0]
    m = scrape(stack.url + "/metrics")
    assert value(m, "meterline_api_ingest_events", "meterline_api_ingest_events_total", status="accepted") == w.accepted
    # the sink inserted every stored row exactly once, and timed priced -> row for each usage row
    assert (
        value(m, "meterline_sink_flush_rows", "meterline_sink_flush_rows_sum", sink="usage_priced")
        == priced_rows + rejected_rows
    )
    assert value(m, "meterline_sink_flush_seconds", "meterline_sink_flush_seconds_count", sink="usage_priced") >= 1
    assert (
        value(m, "meterline_stage_latency_seconds", "meterline_stage_latency_seconds_count", stage="row") == priced_rows
    )
    entries = stack.sql("SELECT count() FROM ledger_entries FINAL")[0][0]
    assert value(m, "meterline_sink_flush_rows", "meterline_sink_flush_rows_sum", sink="ledger_entries") == entries
    # authorize: one request, timed by its outcome
    r = stack.call(
        "POST",
        "/v1/authorize",
        stack.keys["globex"],
        json={
            "customer_id": "globex",
            "request_id": "console-auth-1",
            "model": "gpt-4o",
            "provider": "openai",
            "input_tokens_estimate": 10,
            "max_output_tokens": 10,
        },
    )
    assert r.status_code in (200, 503), r.text
    m = scrape(stack.url + "/metrics")
    timed = sum(
        value(m, "meterline_authorize_seconds", "meterline_authorize_seconds_count", outcome=o)
        for o in ("allow", "deny", "timeout")
    )
    assert timed == 1
    assert "meterline_alert_deliveries" in m and "meterline_stripe_sync_runs" in m


def test_metrics_need_no_key_but_console_data_does(stack: Stack) -> None:
    assert httpx.get(stack.url + "/metrics", timeout=30).status_code == 200
    assert httpx.get(stack.url + "/v1/console/spend", timeout=30).status_code == 401


def test_worker_metrics_port_is_base_plus_index() -> None:
    from meterline.stack.metrics import worker_metrics_port

    assert worker_metrics_port("worker-0", None) == 0 and worker_metrics_port("worker-3", "0") == 0
    assert worker_metrics_port("worker-0", "9464") == 9464 and worker_metrics_port("worker-1", "9464") == 9465
    assert worker_metrics_port("custom", "9464") == 9464
