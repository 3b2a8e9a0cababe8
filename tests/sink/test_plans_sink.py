"""The plans and subscriptions sinks on the real broker and chDB: facts land once, a replay from
the beginning adds nothing, and a record that does not validate goes to usage_rejected."""

from __future__ import annotations

import uuid
from typing import Any

from meterline.core.plans import SubscriptionEvent, load_plan_catalog, parse_instant
from pipeline.plans_sink import PlanCatalogSink, SubscriptionSink
from pipeline.publish import publish_records
from tests.sink.helpers import drain

CATALOG = load_plan_catalog(
    {
        "currency": "USD",
        "plans": [
            {
                "id": "pro",
                "version": v,
                "effective_from": "2026-01-01T00:00:00Z",
                "interval": "month",
                "fee": f"{200 + v}.00",
                "allowances": [{"id": "tokens", "tokens": 10_000_000, "token_classes": ["input", "output"]}],
                "overage": {"per_million": "30.00"},
            }
            for v in (1, 2)
        ],
    }
)


def _count(ch: Any, sql: str) -> int:
    return int(ch.query(sql).result_rows[0][0])


def test_plans_and_subscriptions_land_once(kafka_bootstrap: str, topics: dict[str, str], clickhouse: Any) -> None:
    at = parse_instant("2026-03-01T00:00:00Z", where="t")
    facts = [SubscriptionEvent("subscribed", f"c{i}", at, "pro") for i in range(5)]
    facts.append(SubscriptionEvent("cancelled", "c0", at + 86_400, at_period_end=True))
    publish_records(kafka_bootstrap, topics["plans"], [*CATALOG.to_records(), ("plan:pro@1", None)])  # a tombstone too
    publish_records(
        kafka_bootstrap,
        topics["subscriptions"],
        [f.to_record() for f in facts]
        + [("c9", b'{"type":"paused","customer_id":"c9","at":"2026-03-01T00:00:00Z"}'), ("c9", b"\xff")],
    )
    # the same facts twice (a producer retry): deduped in the buffer
    publish_records(kafka_bootstrap, topics["subscriptions"], [facts[1].to_record()])

    def land() -> None:
        group = f"plans-sink-{uuid.uuid4().hex[:8]}"
        plan_sink = PlanCatalogSink(kafka_bootstrap, group, topics["plans"], clickhouse, max_interval_ms=100)
        sub_sink = SubscriptionSink(
            kafka_bootstrap, group + "-s", topics["subscriptions"], clickhouse, max_interval_ms=100
        )
        try:
            drain(plan_sink, lambda: plan_sink.messages_consumed >= 3)
            drain(sub_sink, lambda: sub_sink.messages_consumed >= 9)
        finally:
            plan_sink.close()
            sub_sink.close()

    land()
    assert _count(clickhouse, "SELECT count() FROM plans") == 2
    assert _count(clickhouse, "SELECT count() FROM subscription_events") == 6
    rows = clickhouse.query(
        "SELECT version_key, fee, allowance_ids, allowance_included, overage_per_million FROM plans ORDER BY version_key"
    ).result_rows
    assert [(r[0], str(r[1]), list(r[2]), [str(x) for x in r[3]], str(r[4])) for r in rows] == [
        ("pro@1", "201.000000000000", ["tokens"], ["10000000.000000000000"], "30.000000000000"),
        ("pro@2", "202.000000000000", ["tokens"], ["10000000.000000000000"], "30.000000000000"),
    ]
    cancelled = clickhouse.query(
        "SELECT type, at_period_end, plan_id FROM subscription_events WHERE customer_id = 'c0' AND type = 'cancelled'"
    ).result_rows
    assert cancelled == [("cancelled", 1, "")]
    rejected = clickhouse.query(
        "SELECT reason_code, source_topic FROM usage_rejected WHERE source_topic = {t:String} ORDER BY source_offset",
        parameters={"t": topics["subscriptions"]},
    ).result_rows
    assert [r[0] for r in rejected] == ["invalid_subscription", "invalid_subscription"]

    land()  # a new consumer group re-reads everything: nothing is stored twice
    assert _count(clickhouse, "SELECT count() FROM plans") == 2
    assert _count(clickhouse, "SELECT count() FROM subscription_events") == 6
    assert (
        _count(clickhouse, f"SELECT count() FROM usage_rejected WHERE source_topic = '{topics['subscriptions']}'") == 2
    )
