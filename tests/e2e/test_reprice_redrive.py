"""Dead-letter re-drive composes with re-rating, on the real pipeline (Tansu, a faust worker, the
ClickHouse sink on chDB): events of a model without a price are dead-lettered; once the price is
published (two versions, one changing inside the period) and the dead letters re-driven, each is
priced at ITS OWN time; a re-rating of the period then corrects only the other events, and the
rollups equal the catalog-now figures for everything."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from jobs.reprice.apply import apply_plan
from jobs.reprice.compute import Filters, open_reprice
from meterline.core.money import to_decimal
from pipeline.publish import publish_records
from schemas.models import UsageEvent
from tests.e2e.conftest import Pipeline
from tests.jobs.reprice_helpers import BOOK_AFTER, BOOK_BEFORE, engine, make_events

HOUR = 3600


def _usage_event(ev: dict[str, Any]) -> UsageEvent:
    return UsageEvent(
        event_id=ev["event_id"],
        occurred_at=datetime.fromtimestamp(ev["occurred_at"] / 1000, UTC),
        customer_id=ev["customer_id"],
        project=ev["project"],
        feature=ev["feature"] or None,
        provider=ev["provider"],
        model=ev["model"],
        model_version=ev["model_version"],
        input_tokens=ev["input_tokens"],
        output_tokens=ev["output_tokens"],
        cached_input_tokens=ev["cached_input_tokens"],
        cache_write_tokens=ev["cache_write_tokens"],
        reasoning_tokens=ev["reasoning_tokens"],
        requests=ev["requests"],
    )


def test_redriven_dead_letters_are_priced_at_their_own_time_and_compose_with_reprice(pipeline: Pipeline) -> None:
    p = pipeline
    t0 = (int(time.time()) // HOUR - 4) * HOUR
    mid = t0 + 2 * HOUR  # the new model's second price version starts here
    known = make_events(31, 150, t0=t0, seconds=3 * HOUR)
    unknown = [
        {
            **ev,
            "event_id": f"new-{i}",
            "provider": "mistral",
            "model": "newm",
            "model_version": None,
            "cached_input_tokens": 0,
            "cache_write_tokens": 0,
        }
        for i, ev in enumerate(make_events(32, 60, t0=t0, seconds=3 * HOUR))
    ]
    assert any(ev["occurred_at"] < mid * 1000 for ev in unknown) and any(
        ev["occurred_at"] >= mid * 1000 for ev in unknown
    )

    p.publish_prices(BOOK_BEFORE)
    p.start_worker()
    p.produce([_usage_event(ev) for ev in known + unknown])
    p.wait_priced(len(known), timeout=180)
    p.wait_for(
        "the unknown model dead-lettered",
        lambda: (
            p.query("SELECT count() FROM v_rejected_open WHERE reason_code = 'unknown_model'")[0][0] == len(unknown)
        ),
    )

    # the catalog now: BOOK_AFTER (a late gpt-4o cut, a corrected claude version, globex -15 %) + the missing model
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    now_book = {
        **BOOK_AFTER,
        "prices": [
            *BOOK_AFTER["prices"],
            {
                "provider": "mistral",
                "model": "newm",
                "effective_from": "2024-01-01T00:00:00Z",
                "per_million": {"input": "1.00", "output": "3.00"},
            },
            {
                "provider": "mistral",
                "model": "newm",
                "effective_from": datetime.fromtimestamp(mid, UTC).strftime(fmt),
                "per_million": {"input": "2.00", "output": "5.00"},
            },
        ],
    }
    p.publish_prices(now_book)
    eng = engine(now_book)

    def redrive() -> None:  # what `meterline dead-letters redrive --reason unknown_model` sends
        rows = p.query(
            "SELECT customer_id, hex(payload) FROM v_rejected_open WHERE reason_code = 'unknown_model' "
            "AND payload_format = 'usage_batch'"
        )
        publish_records(
            p.settings.kafka_bootstrap or "",
            p.settings.topic("usage-events"),
            [(str(c), bytes.fromhex(str(h))) for c, h in rows],
        )

    last = [0.0]

    def all_priced() -> bool:
        if time.monotonic() - last[0] > 10:  # the worker may not have read the new prices yet: re-drive again
            redrive()
            last[0] = time.monotonic()
        return int(p.query("SELECT count() FROM usage_priced WHERE model = 'newm'")[0][0]) == len(unknown)

    time.sleep(2)
    p.wait_for("the re-driven events priced", all_priced, timeout=180)
    # each at its own time: the version in force at its occurred_at
    got = {
        str(e): Decimal(c) for e, c in p.query("SELECT event_id, charge FROM usage_priced FINAL WHERE model = 'newm'")
    }
    assert got == {ev["event_id"]: to_decimal(eng.price(ev).charge_picos) for ev in unknown}
    assert p.query("SELECT count() FROM v_rejected_open")[0][0] == 0

    # re-rating the period with the catalog now: the re-driven events need no correction
    filters = Filters(t0, t0 + 4 * HOUR)
    with open_reprice(p.ch, eng, filters) as rp:
        plan = rp.report()
        newm = [ln for ln in plan.lines if ln.model == "newm"]
        assert newm and all(ln.new_charge == ln.old_charge for ln in newm)
        assert {ln.new_version.split("@")[1][:13] for ln in newm} == {
            "2024-01-01T00",
            datetime.fromtimestamp(mid, UTC).strftime("%Y-%m-%dT%H"),
        }
        res = apply_plan(
            p.ch,
            rp,
            ran_by="test",
            reason="late cut",
            command="test",
            send=lambda c: None,
            at_ms=int(time.time() * 1000),
        )
    assert res.correction_id
    assert p.query("SELECT count() FROM usage_corrections WHERE model = 'newm'")[0][0] == 0
    want: dict[str, int] = {}
    for ev in known + unknown:
        want[ev["customer_id"]] = want.get(ev["customer_id"], 0) + eng.price(ev).charge_picos
    hourly = {
        str(c): Decimal(v) for c, v in p.query("SELECT customer_id, sum(charge) FROM usage_hourly GROUP BY customer_id")
    }
    assert hourly == {c: to_decimal(v) for c, v in want.items()}
