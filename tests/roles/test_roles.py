"""Each role alone, through the installed ``meterline``: two ``meterline worker`` processes and one
``meterline sink`` price and land what ``meterline produce`` sent, sharing the partitions through
faust's consumer group; ``meterline api`` serves authorize and balances against the broker.

ClickHouse here is chDB, which admits ONE process per engine path: the sink owns its path while it
runs, and the totals are read with ``meterline sql`` once it stopped. (Production runs a ClickHouse
server over http, which the sink and every API replica share: docs/scaling.md.)
"""

from __future__ import annotations

import json
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from tests.roles.conftest import Role, role_env, run, wait_until, worker_metrics

pytestmark = pytest.mark.broker

N_EVENTS = 120
CUSTOMERS = [f"cust-{i:02d}" for i in range(24)]
LLAMA_LIST = Decimal("0.59") + Decimal("0.79")  # infra/prices/seed.yaml: 1M input + 1M output, list price


def _events(path: Path, now_ms: int) -> Counter[str]:
    per_customer: Counter[str] = Counter()
    with path.open("w") as f:
        for i in range(N_EVENTS):
            customer = CUSTOMERS[i % len(CUSTOMERS)]
            per_customer[customer] += 1
            event = {
                "event_id": f"roles-{i}",
                "occurred_at": now_ms - i,
                "customer_id": customer,
                "provider": "meta",
                "model": "llama-3-70b",
                "input_tokens": 1_000_000,
                "output_tokens": 1_000_000,
            }
            f.write(json.dumps(event) + "\n")
    return per_customer


def _assigned(metrics: dict[str, float], topic: str) -> set[int]:
    """usage-events partitions a worker holds (its lag gauge has one sample per assigned partition)."""
    out = set()
    for sample in metrics:
        if sample.startswith("meterline_consumer_lag_records{") and f'topic="{topic}"' in sample:
            m = re.search(r'partition="(\d+)"', sample)
            if m:
                out.add(int(m.group(1)))
    return out


def _sink_caught_up(bootstrap: str, prefix: str) -> bool:
    """The sink's group committed every usage-priced record there is (it commits after inserting)."""
    from confluent_kafka import Consumer, TopicPartition

    topic = f"{prefix}usage-priced"
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{prefix}sink", "enable.auto.commit": False})
    try:
        committed = consumer.committed([TopicPartition(topic, p) for p in range(4)], timeout=10)
        for tp in committed:
            _low, high = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=10)
            if high > 0 and tp.offset < high:
                return False
        return True
    finally:
        consumer.close()


def test_workers_and_sink_as_separate_processes(
    kafka_bootstrap: str, tmp_path: Path, roles: Callable[[dict[str, str], list[str], Path], Role]
) -> None:
    prefix = f"r{uuid.uuid4().hex[:8]}."
    usage_topic = f"{prefix}usage-events"
    sink_dsn = f"chdb://{(tmp_path / 'sink-host' / 'chdb').resolve()}"
    sink_env = role_env(kafka_bootstrap, prefix, tmp_path / "sink-host", METERLINE_CLICKHOUSE_DSN=sink_dsn)
    ops_env = role_env(kafka_bootstrap, prefix, tmp_path / "ops")

    # A role never migrates and never starts a broker: an unmigrated database is refused on one line.
    refused = run(sink_env, "sink", check=False)
    assert refused.returncode == 1 and "run `meterline migrate` first" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "applied" in run(sink_env, "migrate").stdout

    hosts = {name: tmp_path / f"{name}-host" for name in ("w-a", "w-b")}
    workers = {
        name: roles(role_env(kafka_bootstrap, prefix, d), ["worker", "--name", name], tmp_path / f"{name}.log")
        for name, d in hosts.items()
    }
    sink = roles(sink_env, ["sink"], tmp_path / "sink.log")
    all_roles = [*workers.values(), sink]

    # Both workers in the one consumer group, the four partitions split between them, none twice.
    def held() -> dict[str, set[int]]:
        return {name: _assigned(worker_metrics(hosts[name], name), usage_topic) for name in workers}

    def split() -> bool:
        now = held()
        return all(now.values()) and sorted(p for ps in now.values() for p in ps) == [0, 1, 2, 3]

    wait_until("two workers sharing the 4 partitions", split, 240, *all_roles)
    assignment = held()
    run(ops_env, "prices", "load", "infra/prices/seed.yaml")
    events = tmp_path / "events.jsonl"
    per_customer = _events(events, int(time.time() * 1000))
    assert f"produced {N_EVENTS} event(s)" in run(ops_env, "produce", str(events)).stdout

    def priced_by() -> dict[str, float]:
        return {n: worker_metrics(hosts[n], n).get("meterline_events_priced_total", 0.0) for n in workers}

    wait_until("every event priced", lambda: sum(priced_by().values()) >= N_EVENTS, 240, *all_roles)
    counts = priced_by()
    assert all(v > 0 for v in counts.values()), counts  # each worker priced some
    if held() == assignment:
        # No rebalance since the split, so no replay: together exactly every event, none twice.
        assert sum(counts.values()) == N_EVENTS, counts
    # (A rebalance under load replays uncommitted records, which the counters count again; what
    # was charged must still be exact, and that is checked in ClickHouse below either way.)
    assert all(worker_metrics(hosts[n], n).get("meterline_events_duplicate_total", 0.0) == 0 for n in workers), (
        "a worker saw a duplicate"
    )

    wait_until("the sink committed every priced record", lambda: _sink_caught_up(kafka_bootstrap, prefix), 240, sink)
    assert sink.stop() == 0, sink.log()
    for w in workers.values():
        assert w.stop() == 0, w.log()

    def sql(query: str) -> list[str]:
        out = run(sink_env, "sql", query, "--format", "csv").stdout.strip().splitlines()
        return [line.replace('"', "") for line in out[1:]]

    assert sql("SELECT count(), uniqExact(event_id) FROM usage_priced") == [f"{N_EVENTS},{N_EVENTS}"]
    rows = sql("SELECT customer_id, count(), sum(charge) FROM usage_priced GROUP BY customer_id ORDER BY customer_id")
    got = {c: (int(n), Decimal(s)) for c, n, s in (r.split(",") for r in rows)}
    assert got == {c: (n, LLAMA_LIST * n) for c, n in per_customer.items()}
    assert sql("SELECT count() FROM usage_rejected") == ["0"]


def test_api_role_serves_authorize_and_balance_against_the_broker(
    kafka_bootstrap: str, tmp_path: Path, roles: Callable[[dict[str, str], list[str], Path], Role]
) -> None:
    prefix = f"r{uuid.uuid4().hex[:8]}."
    api_dir = tmp_path / "api-host"
    # The API's own engine path: with chDB nothing else may open it (production: one ClickHouse server).
    api_env = role_env(
        kafka_bootstrap, prefix, api_dir, METERLINE_CLICKHOUSE_DSN=f"chdb://{(api_dir / 'chdb').resolve()}"
    )
    assert "applied" in run(api_env, "migrate").stdout
    worker = roles(role_env(kafka_bootstrap, prefix, tmp_path / "w-host"), ["worker"], tmp_path / "worker.log")
    api = roles(api_env, ["api", "--port", "0"], tmp_path / "api.log")
    url_holder: list[str] = []

    def listening() -> bool:
        m = re.search(r"meterline api listening on (http://127\.0\.0\.1:\d+)", api.log())
        if m:
            url_holder.append(m.group(1))
        return bool(m)

    wait_until("the API to listen", listening, 120, api, worker)
    url = url_holder[0]
    admin = (api_dir / "admin.key").read_text().strip()
    headers = {"Authorization": f"Bearer {admin}"}
    run(role_env(kafka_bootstrap, prefix, tmp_path / "ops"), "prices", "load", "infra/prices/seed.yaml")

    r = httpx.post(
        f"{url}/v1/credits/grants", headers=headers, json={"customer_id": "roles-c", "amount": "2"}, timeout=30
    )
    assert r.status_code == 202, r.text

    def balance() -> dict[str, object] | None:
        resp = httpx.get(f"{url}/v1/customers/roles-c/balance", headers=headers, timeout=30)
        return resp.json() if resp.status_code == 200 else None

    wait_until("the grant in the balance", lambda: (balance() or {}).get("available") == "2.00", 240, api, worker)
    body = {
        "customer_id": "roles-c",
        "provider": "meta",
        "model": "llama-3-70b",
        "input_tokens_estimate": 1_000_000,
        "max_output_tokens": 1_000_000,
        "request_id": "roles-r1",
    }
    doc: dict[str, object] = {}

    def authorized() -> bool:
        resp = httpx.post(f"{url}/v1/authorize", headers=headers, json=body, timeout=30)
        doc.update(resp.json())
        return resp.status_code == 200

    wait_until("an authorize answer", authorized, 120, api, worker)
    # 1M in + 1M out of llama-3-70b at list price = 1.38, held out of the 2.00 granted
    assert doc["decision"] == "allow" and doc["estimate"] == "1.38" and doc["hold_id"] == "roles-r1", doc
    wait_until(
        "the hold in the balance",
        lambda: (b := balance() or {}).get("available") == "0.62" and b.get("held") == "1.38",
        120,
        api,
        worker,
    )
    assert api.stop(sig=signal.SIGINT) == 0, api.log()
    assert worker.stop(sig=signal.SIGINT) == 0, worker.log()
    assert not (api_dir / "runtime.json").exists()
