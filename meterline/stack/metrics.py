"""Prometheus metrics of every meterline process (prometheus-client; names in docs/metrics.md).

Each process has its own default registry:

- ``meterline up`` (API, ClickHouse sinks, Stripe sync, alert webhooks) serves it at the API's
  ``GET /metrics`` (no key: it carries counts and latencies, no customer data);
- each faust worker serves its own from a small HTTP listener on 127.0.0.1
  (:func:`serve_worker_metrics`), on ``METERLINE_WORKER_METRICS_PORT`` (default 0: any free port),
  and advertises the address in ``<data_dir>/metrics/<worker name>.json`` = ``{"url", "pid"}``.

Metrics are recorded where the facts are known (the pricing agent's per-record result, the sink's
flush, the authorize route ...). Nothing here is used for correctness; money never goes through a
metric (counts and seconds only).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "ALERT_DELIVERIES",
    "AUTHORIZE_SECONDS",
    "EVENTS_DUPLICATE",
    "EVENTS_PRICED",
    "EVENTS_RECEIVED",
    "EVENTS_REJECTED",
    "INGEST_EVENTS",
    "SINK_FLUSH_ROWS",
    "SINK_FLUSH_SECONDS",
    "STAGE_SECONDS",
    "STRIPE_METER_EVENTS",
    "STRIPE_SYNC_RUNS",
    "metrics_endpoint",
    "observe_stage_ms",
    "read_worker_lag",
    "serve_worker_metrics",
    "set_lag_source",
    "worker_endpoints",
    "worker_metrics_port",
]

log = logging.getLogger(__name__)

# Latency buckets from 5 ms to 10 min: the pipeline's delays range from milliseconds (sink) to
# minutes (a backlog after a restart).
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

# -- pricing agent (faust workers) ------------------------------------------------------------
EVENTS_RECEIVED = Counter(
    "meterline_events_received",
    "Usage events read by the pricing agent from usage-events (an undecodable record counts as one)",
)
EVENTS_PRICED = Counter("meterline_events_priced", "Usage events priced and sent to usage-priced")
EVENTS_REJECTED = Counter("meterline_events_rejected", "Usage events dead-lettered, by reason_code", ["reason"])
EVENTS_DUPLICATE = Counter("meterline_events_duplicate", "Usage events dropped as duplicates by the pricing agent")
STAGE_SECONDS = Histogram(
    "meterline_stage_latency_seconds",
    "Delay of each event at each stage: priced = occurred_at -> priced (pricing agent); row = priced -> row "
    "inserted in usage_priced (sink); balance = priced -> debited in the balance (credit agent)",
    ["stage"],
    buckets=_LATENCY,
)

# -- ClickHouse sinks (meterline up) -----------------------------------------------------------
SINK_FLUSH_ROWS = Histogram(
    "meterline_sink_flush_rows",
    "Rows inserted by one sink flush",
    ["sink"],
    buckets=(0, 1, 10, 50, 100, 500, 1000, 5000, 10000, 50000),
)
SINK_FLUSH_SECONDS = Histogram(
    "meterline_sink_flush_seconds", "Duration of one sink flush (dedupe, insert, commit)", ["sink"], buckets=_LATENCY
)

# -- API -----------------------------------------------------------------------------------------
INGEST_EVENTS = Counter("meterline_api_ingest_events", "Events posted to POST /v1/events, by result status", ["status"])
AUTHORIZE_SECONDS = Histogram(
    "meterline_authorize_seconds",
    "POST /v1/authorize, request to answer, by outcome (allow, deny, timeout)",
    ["outcome"],
    buckets=_LATENCY,
)

# -- jobs ----------------------------------------------------------------------------------------
STRIPE_SYNC_RUNS = Counter(
    "meterline_stripe_sync_runs",
    "Periodic `stripe sync` runs inside `meterline up`, by outcome (ok, failed, skipped)",
    ["outcome"],
)
STRIPE_METER_EVENTS = Counter(
    "meterline_stripe_meter_events",
    "Meter events a `stripe sync` run sent to Stripe, by outcome (acked, too_old, failed)",
    ["outcome"],
)
ALERT_DELIVERIES = Counter(
    "meterline_alert_deliveries", "Alert webhook delivery attempts, by outcome (delivered, retry, dead)", ["outcome"]
)


def observe_stage_ms(stage: str, from_ms: int | None, to_ms: int | None = None) -> None:
    """Record one event's delay at ``stage`` (negative delays from clock skew count as 0)."""
    if not from_ms:
        return
    end = to_ms if to_ms is not None else time.time_ns() // 1_000_000
    STAGE_SECONDS.labels(stage).observe(max(0, end - from_ms) / 1000)


# -- consumer lag (faust workers) ------------------------------------------------------------------

_lag_source: Callable[[], dict[str, int] | None] | None = None


class _LagCollector(Collector):
    """``meterline_consumer_lag_records{topic, partition}``, read on each scrape from the worker's
    watchdog: highwater minus the next offset to hand to the agents, per assigned source partition."""

    def collect(self) -> Iterable[GaugeMetricFamily]:
        g = GaugeMetricFamily(
            "meterline_consumer_lag_records",
            "Records of an assigned source partition not yet handed to the agents (highwater - position)",
            labels=["topic", "partition"],
        )
        source = _lag_source
        lag = None
        if source is not None:
            try:
                lag = source()
            except Exception as exc:
                log.debug("lag source failed: %s", exc)
        for name, n in sorted((lag or {}).items()):
            topic, _, part = name.rpartition(":")
            g.add_metric([topic, part], n)
        yield g


REGISTRY.register(_LagCollector())


def set_lag_source(source: Callable[[], dict[str, int] | None]) -> None:
    """Where the lag gauge reads from: ``{"topic:partition": records behind}`` (the watchdog's ``all_lag``)."""
    global _lag_source
    _lag_source = source


# -- exposition ----------------------------------------------------------------------------------


async def metrics_endpoint(request: Any) -> Any:
    """``GET /metrics`` on the API (Prometheus text format)."""
    from starlette.responses import Response

    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


def worker_metrics_port(name: str, base: str | None) -> int:
    """``METERLINE_WORKER_METRICS_PORT`` + the worker's index (``worker-<i>``), or 0 (any free port)
    when unset: ``meterline up --workers 2`` with base 9464 listens on 9464 and 9465."""
    if not base or int(base) == 0:
        return 0
    suffix = name.rsplit("-", 1)[-1]
    return int(base) + (int(suffix) if suffix.isdigit() else 0)


def serve_worker_metrics(data_dir: Path, name: str, port: int = 0, host: str = "127.0.0.1") -> str:
    """Start the worker's metrics listener on ``host:port`` and advertise it; return its URL.
    ``host`` stays 127.0.0.1 except in a container whose Prometheus scrapes it from outside."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host)
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    folder = Path(data_dir) / "metrics"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.json.tmp"
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid(), "name": name}))
    os.replace(tmp, folder / f"{name}.json")
    return url


def worker_endpoints(data_dir: Path) -> list[dict[str, Any]]:
    """The advertised metrics listeners of live workers of ``data_dir``."""
    out = []
    for path in sorted((Path(data_dir) / "metrics").glob("*.json")):
        try:
            doc = json.loads(path.read_text())
            os.kill(int(doc["pid"]), 0)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        out.append(doc)
    return out


def read_worker_lag(data_dir: Path, timeout: float = 2.0) -> dict[str, int]:
    """``{"<worker> <topic>:<partition>": records behind}`` scraped from every live worker."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, int] = {}
    for doc in worker_endpoints(data_dir):
        try:
            text = httpx.get(doc["url"], timeout=timeout).text
        except httpx.HTTPError:
            continue
        for fam in text_string_to_metric_families(text):
            if fam.name == "meterline_consumer_lag_records":
                for s in fam.samples:
                    out[f"{doc.get('name', doc['pid'])} {s.labels['topic']}:{s.labels['partition']}"] = int(s.value)
    return out
