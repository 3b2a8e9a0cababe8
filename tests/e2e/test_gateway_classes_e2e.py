"""UsageEvent v2 through the real pipeline (Tansu, a faust pricing worker, the ClickHouse sink on
chDB, the seed prices): long cache writes, web-search calls and a batch-tier event are priced
exactly and land in their migration-0009 columns; a class or tier the seed does not price is
dead-lettered with its reason, never priced at 0; a raw dated model id prices."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from schemas.models import UsageEvent

pytestmark = pytest.mark.broker


def test_v2_classes_tiers_and_raw_dated_ids_through_the_pipeline(pipeline) -> None:
    at = datetime.now(UTC) - timedelta(minutes=10)
    claude = dict(
        occurred_at=at, customer_id="zeta", provider="anthropic", model="claude-3-5-sonnet", model_version="20241022"
    )
    events = [
        UsageEvent(
            event_id="v2-long",
            input_tokens=100,
            output_tokens=10,
            cache_write_tokens=1000,
            cache_write_long_tokens=2000,
            web_search_requests=3,
            **claude,
        ),
        UsageEvent(event_id="v2-batch", input_tokens=1000, output_tokens=100, service_tier="batch", **claude),
        # a raw dated id (an old gateway, no normalisation): the lookup normalises it
        UsageEvent(
            event_id="v2-raw",
            occurred_at=at,
            customer_id="zeta",
            provider="anthropic",
            model="claude-3-5-sonnet-20241022",
            input_tokens=1000,
            output_tokens=100,
        ),
        # refused: no audio price for gpt-4o; no priority tier for claude
        UsageEvent(
            event_id="v2-audio",
            occurred_at=at,
            customer_id="zeta",
            provider="openai",
            model="gpt-4o",
            input_tokens=10,
            input_audio_tokens=5,
        ),
        UsageEvent(event_id="v2-priority", input_tokens=10, service_tier="priority", **claude),
    ]
    pipeline.publish_prices()
    pipeline.start_worker()
    pipeline.produce(events)
    pipeline.wait_priced(3)
    pipeline.wait_for(
        "2 dead letters",
        lambda: int(pipeline.query("SELECT count() FROM usage_rejected WHERE event_id LIKE 'v2-%'")[0][0]) >= 2,
    )

    rows = {
        r[0]: r[1:]
        for r in pipeline.query(
            "SELECT event_id, cost, cache_write_tokens, cache_write_long_tokens, web_search_requests, service_tier "
            "FROM usage_priced FINAL WHERE customer_id = 'zeta'"
        )
    }
    # seed: $3 in, $15 out, $3.75 5-minute writes, $6 1-hour writes, $0.01 per search; batch half price
    # 100x3 + 10x15 + 1000x3.75 + 2000x6 ($/M) + 3 x $0.01
    assert rows["v2-long"] == (Decimal("0.0462"), 1000, 2000, 3, "")
    assert rows["v2-batch"] == (Decimal("0.00225"), 0, 0, 0, "batch")  # 1000x1.50 + 100x7.50 ($/M)
    assert rows["v2-raw"][0] == Decimal("0.0045")
    rejected = dict(pipeline.query("SELECT event_id, reason_code FROM usage_rejected WHERE event_id LIKE 'v2-%'"))
    assert rejected == {"v2-audio": "no_rate_for_token_class", "v2-priority": "no_price_for_service_tier"}
