"""The ClickHouse sink against the real Tansu broker and the real embedded chDB engine."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from decimal import Decimal
from typing import Any

import pytest

from meterline.core.errors import ClickHouseUnavailable
from pipeline.sink import rebuild_rollups
from tests.sink.helpers import (
    DAY_MS,
    committed,
    dead_letter,
    drain,
    make_events,
    picos,
    produce_dead_letters,
    produce_priced,
    produce_raw,
    scalar,
)

RAW_BY_DAY = """
SELECT customer_id, model, toDate(occurred_at, 'UTC') AS day, currency,
       count(), sum(requests), sum(input_tokens), sum(output_tokens), sum(cached_input_tokens),
       sum(cache_write_tokens), sum(reasoning_tokens), sum(cost), sum(charge)
FROM usage_priced {final}
GROUP BY customer_id, model, day, currency ORDER BY customer_id, model, day, currency
"""
ROLLUP_BY_DAY = """
SELECT customer_id, model, {bucket} AS day, currency,
       sum(events), sum(requests), sum(input_tokens), sum(output_tokens), sum(cached_input_tokens),
       sum(cache_write_tokens), sum(reasoning_tokens), sum(cost), sum(charge)
FROM {table}
GROUP BY customer_id, model, day, currency ORDER BY customer_id, model, day, currency
"""


def rows(client: Any, sql: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in client.query(sql).result_rows]


def expected_by_day(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Python-side exact aggregation of the generated events, shaped like RAW_BY_DAY."""
    import datetime as dt

    acc: dict[tuple[Any, ...], list[Any]] = defaultdict(lambda: [0, 0, 0, 0, 0, 0, 0, Decimal(0), Decimal(0)])
    for ev in events:
        day = dt.date(1970, 1, 1) + dt.timedelta(days=ev["occurred_at"] // DAY_MS)
        a = acc[(ev["customer_id"], ev["model"], day, ev["currency"])]
        a[0] += 1
        a[1] += ev["requests"]
        for k, name in enumerate(
            ("input_tokens", "output_tokens", "cached_input_tokens", "cache_write_tokens", "reasoning_tokens"), start=2
        ):
            a[k] += ev[name]
        a[7] += picos(ev["cost_picos"])
        a[8] += picos(ev["charge_picos"])
    return [key + tuple(val) for key, val in sorted(acc.items())]


def assert_all_totals(client: Any, events: list[dict[str, Any]]) -> None:
    """Raw (with and without FINAL), daily and hourly rollups all equal the exact expectation."""
    want = expected_by_day(events)
    assert rows(client, RAW_BY_DAY.format(final="")) == want
    assert rows(client, RAW_BY_DAY.format(final="FINAL")) == want
    assert rows(client, ROLLUP_BY_DAY.format(table="usage_daily", bucket="day")) == want
    assert rows(client, ROLLUP_BY_DAY.format(table="usage_hourly", bucket="toDate(hour)")) == want


def test_priced_batches_land_exactly_and_offsets_are_committed(make_sink, kafka_bootstrap, topics, clickhouse):
    events = make_events(600)
    n_records = produce_priced(kafka_bootstrap, topics["usage-priced"], events)
    sink = make_sink()
    drain(sink, lambda: sink.rows_inserted == len(events) and sink.messages_consumed == n_records)

    assert scalar(clickhouse, "SELECT count() FROM usage_priced") == len(events)
    total_cost = scalar(clickhouse, "SELECT sum(cost) FROM usage_priced")
    assert isinstance(total_cost, Decimal)
    assert total_cost == picos(sum(e["cost_picos"] for e in events))
    assert scalar(clickhouse, "SELECT sum(charge) FROM usage_priced") == picos(sum(e["charge_picos"] for e in events))
    assert_all_totals(clickhouse, events)

    # One stored row matches its event field by field ('' for null strings, exact money, UTC times).
    ev = events[0]
    row = clickhouse.query(
        "SELECT api_key_id, project, feature, user_id, model_version, cost, charge, currency, source_partition,"
        " source_offset, toUnixTimestamp64Milli(occurred_at), toUnixTimestamp64Milli(priced_at)"
        " FROM usage_priced WHERE event_id = {e:String}",
        parameters={"e": ev["event_id"]},
    ).result_rows[0]
    assert tuple(row) == (
        ev["api_key_id"] or "",
        ev["project"] or "",
        ev["feature"] or "",
        "",
        "",
        picos(ev["cost_picos"]),
        picos(ev["charge_picos"]),
        "usd",
        ev["source_partition"],
        ev["source_offset"],
        ev["occurred_at"],
        ev["priced_at"],
    )

    # Offsets: every consumed record is committed (next offset to read), per partition.
    done = committed(kafka_bootstrap, sink.group_id, topics["usage-priced"])
    assert sum(done.values()) == n_records


def test_replayed_records_change_no_total(make_sink, kafka_bootstrap, topics, clickhouse):
    events = make_events(300, seed=11)
    first = produce_priced(kafka_bootstrap, topics["usage-priced"], events)
    second = produce_priced(kafka_bootstrap, topics["usage-priced"], events)  # an upstream replay
    # and a replay inside one record: the same event twice in a batch
    third = produce_priced(kafka_bootstrap, topics["usage-priced"], [events[0], events[0]], per_record=2)
    sink = make_sink()
    drain(sink, lambda: sink.messages_consumed == first + second + third)

    assert sink.rows_inserted == len(events)
    assert sink.duplicates_dropped == len(events) + 2
    assert scalar(clickhouse, "SELECT count() FROM usage_priced") == len(events)
    assert_all_totals(clickhouse, events)


def test_crash_between_insert_and_commit_replays_without_duplicates(make_sink, kafka_bootstrap, topics, clickhouse):
    events = make_events(400, seed=3)
    n_records = produce_priced(kafka_bootstrap, topics["usage-priced"], events)

    crashed = make_sink(group_id="crashy")
    crashed._commit = lambda: None  # the process dies right after the insert: no commit ever happens
    drain(crashed, lambda: crashed.rows_inserted == len(events))
    crashed.close()
    assert committed(kafka_bootstrap, "crashy", topics["usage-priced"]) == {}

    restarted = make_sink(group_id="crashy")
    drain(restarted, lambda: restarted.messages_consumed == n_records)
    assert restarted.rows_inserted == 0
    assert restarted.duplicates_dropped == len(events)
    assert scalar(clickhouse, "SELECT count() FROM usage_priced") == len(events)
    assert_all_totals(clickhouse, events)
    assert sum(committed(kafka_bootstrap, "crashy", topics["usage-priced"]).values()) == n_records


class FlakyClient:
    """A real client whose inserts fail the first ``failures`` times (ClickHouse 'down')."""

    def __init__(self, client: Any, failures: int) -> None:
        self._client, self.failures, self.attempts = client, failures, 0

    def query(self, *args: Any, **kwargs: Any) -> Any:
        return self._client.query(*args, **kwargs)

    def insert(self, *args: Any, **kwargs: Any) -> Any:
        self.attempts += 1
        if self.attempts <= self.failures:
            from clickhouse_connect.driver.exceptions import OperationalError

            raise OperationalError("simulated: connection refused")
        return self._client.insert(*args, **kwargs)

    def close(self) -> None:
        pass


def test_clickhouse_down_keeps_buffer_and_commits_nothing(make_sink, kafka_bootstrap, topics, clickhouse):
    events = make_events(200, seed=5)
    n_records = produce_priced(kafka_bootstrap, topics["usage-priced"], events)
    calls = {"n": 0}

    def factory() -> Any:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise ConnectionRefusedError("simulated: ClickHouse is down")
        if calls["n"] == 3:  # a client that connects but then fails mid-flush
            return FlakyClient(clickhouse, failures=1)
        return clickhouse

    sink = make_sink(clickhouse_target=factory, group_id="down")
    deadline = time.monotonic() + 60
    while sink.messages_consumed < n_records:
        assert time.monotonic() < deadline, sink.stats()
        sink.poll_once(timeout=0.2)

    for _ in range(3):  # factory fails twice, then the insert fails once
        with pytest.raises(ClickHouseUnavailable):
            sink.flush()
        assert sink.buffered == len(events)
        assert committed(kafka_bootstrap, "down", topics["usage-priced"]) == {}
        assert scalar(clickhouse, "SELECT count() FROM usage_priced") == 0

    assert sink.flush() == len(events)
    assert sink.buffered == 0
    assert sum(committed(kafka_bootstrap, "down", topics["usage-priced"]).values()) == n_records
    assert_all_totals(clickhouse, events)


def test_run_loop_pauses_retries_and_recovers(make_sink, kafka_bootstrap, topics, clickhouse):
    events = make_events(300, seed=9)
    produce_priced(kafka_bootstrap, topics["usage-priced"], events[:150])
    flaky = FlakyClient(clickhouse, failures=3)
    sink = make_sink(clickhouse_target=flaky, max_interval_ms=50, backoff_initial_ms=20, backoff_max_ms=100)
    stop = threading.Event()
    worker = threading.Thread(target=sink.run, args=(stop,), daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while sink.retries < 2:  # it is degraded: paused and retrying
            assert time.monotonic() < deadline and worker.is_alive(), sink.stats()
            time.sleep(0.02)
        produce_priced(kafka_bootstrap, topics["usage-priced"], events[150:])  # arrives while paused/retrying
        while sink.rows_inserted < len(events):
            assert time.monotonic() < deadline and worker.is_alive(), sink.stats()
            time.sleep(0.02)
        assert not sink.degraded
    finally:
        stop.set()
        worker.join(30)
    assert not worker.is_alive()
    assert flaky.attempts >= 4 and sink.retries >= 2
    assert scalar(clickhouse, "SELECT count() FROM usage_priced") == len(events)
    assert_all_totals(clickhouse, events)


def test_rollups_equal_raw_and_rebuild_repairs_double_counts(make_sink, kafka_bootstrap, topics, clickhouse):
    events = make_events(1500, seed=21, customers=7, days=5)
    produce_priced(kafka_bootstrap, topics["usage-priced"], events, per_record=100)
    sink = make_sink()
    drain(sink, lambda: sink.rows_inserted == len(events))
    assert_all_totals(clickhouse, events)

    hourly_raw = """
        SELECT customer_id, provider, model, project, feature, currency,
               toStartOfHour(toDateTime(occurred_at, 'UTC')) AS h, count(), sum(cost), sum(charge)
        FROM usage_priced FINAL GROUP BY ALL ORDER BY ALL"""
    hourly_rollup = """
        SELECT customer_id, provider, model, project, feature, currency, hour AS h,
               sum(events), sum(cost), sum(charge)
        FROM usage_hourly GROUP BY ALL ORDER BY ALL"""
    assert rows(clickhouse, hourly_raw) == rows(clickhouse, hourly_rollup)

    # The documented race: a second writer bypasses the dedupe and inserts events again.
    from pipeline.sink import PRICED_COLUMNS, priced_row

    dupes = [priced_row(e, partition=0, offset=0) for e in events[:50]]
    clickhouse.insert("usage_priced", dupes, column_names=PRICED_COLUMNS)
    assert rows(clickhouse, ROLLUP_BY_DAY.format(table="usage_daily", bucket="day")) != expected_by_day(events)
    assert rows(clickhouse, RAW_BY_DAY.format(final="FINAL")) == expected_by_day(events)  # FINAL stays exact

    rebuild_rollups(clickhouse)
    assert rows(clickhouse, ROLLUP_BY_DAY.format(table="usage_daily", bucket="day")) == expected_by_day(events)
    assert rows(clickhouse, hourly_rollup) == rows(clickhouse, hourly_raw)


def test_rebuild_select_matches_the_materialized_views(clickhouse):
    """rebuild_rollups() must compute what 0002_rollups.sql's views compute (no drift)."""
    from pipeline.sink import _ROLLUP_SELECT, _ROLLUPS

    defs = dict(
        clickhouse.query(
            "SELECT name, as_select FROM system.tables WHERE database = currentDatabase() AND engine = 'MaterializedView'"
        ).result_rows
    )
    for table, name, bucket in _ROLLUPS:
        mv = " ".join(defs[f"{table}_mv"].split())
        for expr in ("count() AS events", "sum(cost) AS cost", "sum(charge) AS charge", "sum(requests) AS requests"):
            assert expr in mv and expr in _ROLLUP_SELECT
        cols = [r[0] for r in clickhouse.query(f"DESCRIBE TABLE {table}").result_rows]
        assert cols[0] == name
        assert "toStartOfHour" in mv if name == "hour" else "toDate(occurred_at, 'UTC')" in mv
        assert bucket.split("(")[0] in mv


def test_dead_letters_land_in_usage_rejected_and_replays_collapse(make_sink, kafka_bootstrap, topics, clickhouse):
    letters = [dead_letter(i) for i in range(10)]
    produce_dead_letters(kafka_bootstrap, topics["usage-dead-letter"], letters)
    produce_dead_letters(kafka_bootstrap, topics["usage-dead-letter"], letters[:4])  # replayed dead letters
    garbage = b"\x00not avro at all\xff"
    produce_raw(kafka_bootstrap, topics["usage-priced"], [garbage], key=b"cust-x")  # undecodable priced record
    sink = make_sink()
    drain(sink, lambda: sink.messages_consumed == 15)

    assert sink.rejected_inserted == 11 and sink.duplicates_dropped == 4
    assert scalar(clickhouse, "SELECT count() FROM usage_rejected") == 11
    assert scalar(clickhouse, "SELECT count() FROM usage_rejected FINAL") == 11
    got = {
        r[0]: r[1:]
        for r in clickhouse.query(
            "SELECT source_offset, reason_code, reason, field, customer_id, event_id, payload, payload_format,"
            " occurred_at IS NULL, toUnixTimestamp64Milli(failed_at) FROM usage_rejected"
            " WHERE source_topic = 't.usage-events'"
        ).result_rows
    }
    for rec in letters:
        reason_code, reason, field, customer, event, payload, fmt, occ_null, failed = got[rec["source_offset"]]
        assert (reason_code, reason, field, customer, event, fmt) == (
            rec["reason_code"],
            rec["reason"],
            rec["field"] or "",
            rec["customer_id"] or "",
            rec["event_id"] or "",
            rec["payload_format"],
        )
        assert occ_null == (rec["occurred_at"] is None) and failed == rec["failed_at"]
    # payload bytes survive byte for byte (read as hex: they are not UTF-8)
    payload_hex = dict(
        clickhouse.query(
            "SELECT source_offset, hex(payload) FROM usage_rejected WHERE source_topic = 't.usage-events'"
        ).result_rows
    )
    assert payload_hex == {r["source_offset"]: r["payload"].hex().upper() for r in letters}
    # the undecodable priced record is kept, with its bytes
    undecodable = clickhouse.query(
        "SELECT reason_code, payload_format, hex(payload) FROM usage_rejected WHERE source_topic = {t:String}",
        parameters={"t": topics["usage-priced"]},
    ).result_rows
    assert len(undecodable) == 1
    assert undecodable[0][1:] == ("raw", garbage.hex().upper())
    assert undecodable[0][0] in ("undecodable", "not_single_object")


def test_rebalance_flushes_the_buffer_before_partitions_are_revoked(make_sink, kafka_bootstrap, topics, clickhouse):
    events = make_events(200, seed=13)
    n_records = produce_priced(kafka_bootstrap, topics["usage-priced"], events)
    first = make_sink(group_id="rebalance", max_rows=10**6)
    deadline = time.monotonic() + 60
    while first.messages_consumed < n_records:  # buffered, not flushed
        assert time.monotonic() < deadline, first.stats()
        first.poll_once(timeout=0.2)
    assert first.buffered == len(events) and first.flushes == 0

    second = make_sink(group_id="rebalance")
    while first.flushes == 0:  # the join of `second` revokes first's partitions -> on_revoke flushes
        assert time.monotonic() < deadline, (first.stats(), second.stats())
        first.poll_once(timeout=0.1)
        second.poll_once(timeout=0.1)
    assert first.rows_inserted == len(events) and first.buffered == 0
    assert sum(committed(kafka_bootstrap, "rebalance", topics["usage-priced"]).values()) == n_records
    for _ in range(5):  # the new owner finds nothing left to insert
        second.poll_once(timeout=0.1)
        second.flush()
    assert second.rows_inserted == 0
    assert_all_totals(clickhouse, events)
