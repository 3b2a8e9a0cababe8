"""Issue #19.2: `meterline up` on the embedded, memory-only broker, stopped and started again,
keeps every grant and balance to the pico-unit (restored from ClickHouse), counts nothing twice
(a gateway retry of old events after the restart is not debited again), and prices new usage
(price records republished). A broker that kept its state is never restored onto."""

from __future__ import annotations

import random
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from devtools.verify import make_events
from devtools.verify.oracle import CUSTOMERS, Expected, price_file
from meterline.core.config import Settings
from meterline.core.pricing import load_price_book
from meterline.shell.runtime import Runtime
from meterline.stack.producer import UsageProducer
from pipeline.publish import publish_records
from pipeline.restore import read_epoch, restore_if_lost

MONEY = ("available", "credit_remaining", "overage", "net_balance", "overage_policy")


def _wait(what: str, predicate: Any, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _q(rt: Runtime, sql: str) -> list[tuple[Any, ...]]:
    with rt.clickhouse_lock:
        return list(rt.clickhouse.query(sql).result_rows)


def _money(http: httpx.Client, admin: dict[str, str], customer: str) -> dict[str, Any]:
    b = http.get(f"/v1/customers/{customer}/balance", headers=admin).json()
    return {
        **{k: b.get(k) for k in MONEY},
        "grants": sorted((g["grant_id"], g["granted"], g["remaining"], g["state"]) for g in b.get("grants", [])),
    }


def _settled(rt: Runtime, n_events: int) -> bool:
    """usage_priced holds n events, each debited exactly once, and Σ debits = Σ charge."""
    ((priced,),) = _q(rt, "SELECT count() FROM usage_priced FINAL")
    rows = _q(
        rt,
        "SELECT p.customer_id, p.s, d.s FROM (SELECT customer_id, sum(charge) s FROM usage_priced FINAL "
        "GROUP BY customer_id) p LEFT JOIN (SELECT customer_id, sum(amount) s FROM ledger_entries FINAL "
        "WHERE kind = 'debit' GROUP BY customer_id) d USING customer_id",
    )
    return priced == n_events and all(b is not None and Decimal(a) == Decimal(b) for _c, a, b in rows)


def _per_event_debits_once(rt: Runtime) -> list[tuple[Any, ...]]:
    """Events whose Σ debit differs from their charge (missing, doubled or extra debits)."""
    return _q(
        rt,
        "SELECT p.customer_id, p.event_id, p.charge, d.s FROM usage_priced AS p FINAL FULL OUTER JOIN "
        "(SELECT customer_id, event_id, sum(amount) AS s FROM ledger_entries FINAL WHERE kind = 'debit' "
        "GROUP BY customer_id, event_id) AS d ON p.customer_id = d.customer_id AND p.event_id = d.event_id "
        "WHERE p.charge != d.s",
    )


def test_up_stop_start_keeps_grants_and_balances_and_counts_nothing_twice(
    topic_prefix: str, clickhouse_dsn: str, tmp_path: Path
) -> None:
    rng = random.Random(19)
    settings = Settings(
        topic_prefix=topic_prefix, partitions=4, data_dir=tmp_path, clickhouse_dsn=clickhouse_dsn, api_port=0
    )  # (no kafka_bootstrap: the embedded, memory-only broker)
    a, b, c = CUSTOMERS[0], CUSTOMERS[1], CUSTOMERS[2]
    first = [e for e in make_events(rng, 900) if e.customer_id in (a, b, c)]
    expected = Expected()
    expected.add_priced(first)

    rt = Runtime(settings).start()
    try:
        assert rt.restore_report is not None and not rt.restore_report.broker_kept_state
        bootstrap = rt.settings.kafka_bootstrap
        publish_records(bootstrap, rt.settings.topic("prices"), load_price_book(price_file()).to_records())
        http = httpx.Client(base_url=rt.api_server.url, timeout=30)
        admin = {"Authorization": f"Bearer {rt.admin_key}"}
        day_ago = int(time.time() * 1000) - 86_400_000
        for body in (
            {"customer_id": a, "grant_id": "ga", "amount": "10.000000000001", "effective_at_ms": day_ago},
            {"customer_id": b, "grant_id": "gb", "amount": "0.5", "effective_at_ms": day_ago},
            {
                "customer_id": b,
                "grant_id": "gb2",
                "amount": "1000",
                "priority": 10,
                "effective_at_ms": day_ago,
                "expires_at_ms": day_ago + 86_400_000 * 30,
            },
        ):
            assert http.post("/v1/credits/grants", json=body, headers=admin).status_code == 202
        assert http.put(f"/v1/customers/{c}/policy", json={"overage": "allow"}, headers=admin).status_code == 202
        _wait("grants", lambda: len(_q(rt, "SELECT entry_id FROM ledger_entries FINAL WHERE kind = 'grant'")) == 3)
        producer = UsageProducer(bootstrap, rt.settings.topic("usage-events"), linger_ms=5)
        for e in first:
            producer.send(e)
        producer.flush(30)
        producer.close()
        _wait("usage priced and debited", lambda: _settled(rt, len(first)))
        before = {x: _money(http, admin, x) for x in (a, b, c)}
        _wait("statuses caught up", lambda: {x: _money(http, admin, x) for x in (a, b, c)} == before)
        assert Decimal(before[c]["overage"]) > 0 and any(g[1] != g[2] for g in before[b]["grants"])
    finally:
        rt.stop()

    rt = Runtime(settings).start()  # a new, empty broker: the state comes back from ClickHouse
    try:
        report = rt.restore_report
        assert not report.broker_kept_state and set(report.customers) == {a, b, c} and report.prices > 0
        bootstrap = rt.settings.kafka_bootstrap
        http = httpx.Client(base_url=rt.api_server.url, timeout=30)
        admin = {"Authorization": f"Bearer {rt.admin_key}"}
        _wait("the API's status view", lambda: all(_money(http, admin, x)["available"] is not None for x in (a, b, c)))
        after = {x: _money(http, admin, x) for x in (a, b, c)}
        assert after == before  # every grant and balance, to the pico-unit

        # A gateway retries old events after the restart, and new usage arrives.
        more = [e for e in make_events(rng, 300) if e.customer_id in (a, b, c)]
        expected.add_priced(more)
        producer = UsageProducer(bootstrap, rt.settings.topic("usage-events"), linger_ms=5)
        for e in rng.sample(first, 100) + more:
            producer.send(e)
        producer.flush(30)
        producer.close()
        _wait("new usage priced and debited", lambda: _settled(rt, len(first) + len(more)))
        assert _per_event_debits_once(rt) == []
        ((n,),) = _q(rt, "SELECT count() FROM usage_priced FINAL")
        assert n == len(expected.priced)
        # A second restore attempt on this broker (it kept its state): nothing is re-applied.
        with rt.clickhouse_lock:
            kept = restore_if_lost(bootstrap, rt.settings.topic, rt.clickhouse)
        assert kept.broker_kept_state and kept.epoch == read_epoch(bootstrap, rt.settings.topic("epoch"))
    finally:
        rt.stop()


def test_sigkill_of_the_whole_stack_restores_the_facts_and_counts_nothing_twice(
    topic_prefix: str, clickhouse_dsn: str, tmp_path: Path
) -> None:
    """The broker and the workers are SIGKILLed while usage is being priced and debited. On the
    next start the balances equal what ClickHouse's ledger_entries say (the facts), no event is
    debited twice, and once the gateways retry everything each event is debited exactly once."""
    import os
    import signal

    rng = random.Random(23)
    settings = Settings(
        topic_prefix=topic_prefix, partitions=4, data_dir=tmp_path, clickhouse_dsn=clickhouse_dsn, api_port=0
    )
    customers = list(CUSTOMERS[:4])
    events = [e for e in make_events(rng, 3000) if e.customer_id in customers]
    rt = Runtime(settings).start()
    try:
        bootstrap = rt.settings.kafka_bootstrap
        publish_records(bootstrap, rt.settings.topic("prices"), load_price_book(price_file()).to_records())
        http = httpx.Client(base_url=rt.api_server.url, timeout=30)
        admin = {"Authorization": f"Bearer {rt.admin_key}"}
        day_ago = int(time.time() * 1000) - 86_400_000
        for i, cust in enumerate(customers):
            body = {
                "customer_id": cust,
                "grant_id": f"g-{cust}",
                "amount": f"{37 * (i + 1)}.123456789012",
                "effective_at_ms": day_ago,
            }
            assert http.post("/v1/credits/grants", json=body, headers=admin).status_code == 202
        _wait("grants", lambda: len(_q(rt, "SELECT entry_id FROM ledger_entries FINAL WHERE kind = 'grant'")) == 4)
        producer = UsageProducer(bootstrap, rt.settings.topic("usage-events"), linger_ms=5, max_batch_events=50)
        for e in events:
            producer.send(e)
        producer.flush(30)
        producer.close()
        _wait(
            "some usage debited", lambda: _q(rt, "SELECT count() FROM ledger_entries WHERE kind = 'debit'")[0][0] > 50
        )
        # SIGKILL: the broker (its whole process group) and every worker, mid-stream.
        assert rt.broker is not None and rt.broker.pid is not None
        os.killpg(rt.broker.pid, signal.SIGKILL)
        for w in rt.workers:
            w.kill()
    finally:
        rt.stop()

    rt = Runtime(settings).start()
    try:
        report = rt.restore_report
        assert not report.broker_kept_state
        http = httpx.Client(base_url=rt.api_server.url, timeout=30)
        admin = {"Authorization": f"Bearer {rt.admin_key}"}
        facts = {
            str(c): (Decimal(r), Decimal(o))
            for c, r, o in _q(rt, "SELECT customer_id, credit_remaining, overage FROM ledger_balances")
        }
        assert set(facts) == set(customers) <= set(report.customers)
        _wait("the API's status view", lambda: all(_money(http, admin, x)["available"] is not None for x in customers))
        for cust in customers:
            m = _money(http, admin, cust)
            assert (Decimal(m["credit_remaining"]), Decimal(m["overage"])) == facts[cust], cust
        # Nothing counted twice: each event is either fully debited once or not yet at all.
        partial = _q(
            rt,
            "SELECT p.customer_id, p.event_id FROM usage_priced AS p FINAL INNER JOIN (SELECT customer_id, "
            "event_id, sum(amount) AS s FROM ledger_entries FINAL WHERE kind = 'debit' GROUP BY "
            "customer_id, event_id) AS d ON p.customer_id = d.customer_id AND p.event_id = d.event_id "
            "WHERE d.s != p.charge",
        )
        assert partial == []

        # The gateways retry everything they did not get an acknowledgement for (here: all).
        producer = UsageProducer(rt.settings.kafka_bootstrap, rt.settings.topic("usage-events"), linger_ms=5)
        for e in events:
            producer.send(e)
        producer.flush(30)
        producer.close()
        _wait("every event priced and debited", lambda: _settled(rt, len(events)))
        assert _per_event_debits_once(rt) == []
    finally:
        rt.stop()
