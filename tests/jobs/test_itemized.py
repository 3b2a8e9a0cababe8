"""Itemized mode: one meter per model x token class, quantities in tokens, prices from the catalog."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from devtools.stripe_local import LocalStripe
from jobs.stripe import StripeTarget, load_billing_config, meter_specs, provision, sync
from jobs.stripe._store import load_customers
from jobs.stripe.reconcile import reconcile
from tests.jobs.conftest import DAY, HOUR, Usage


def test_itemized_meters_and_token_quantities(
    ls: LocalStripe, target: StripeTarget, clickhouse: Any, usage: Usage
) -> None:
    cfg = load_billing_config(mode="itemized").with_sync(settle_seconds=0)
    specs = {s.event_name: s for s in meter_specs(cfg)}
    gpt_in = specs["ml_tok_openai_gpt-4o_input"]
    assert gpt_in.unit_amount_decimal == "0.0005"  # $5.00 / 1M tokens = 0.0005 cents per token
    assert specs["ml_tok_openai_o1_reasoning"].unit_amount_decimal == "0.006"  # reasoning = output rate
    client = target.client()
    first = provision(client, clickhouse, cfg, customers=["acme"])
    assert len(first.meters) == len(specs)
    assert provision(client, clickhouse, cfg, customers=["acme"]).created == []
    base = ls.now() // HOUR * HOUR - 5 * HOUR
    usage.add_many(
        [("acme", base + h * HOUR, 1) for h in range(3)], model="gpt-4o", input_tokens=1234, output_tokens=56
    )
    usage.add("acme", base, 1, model="no-such-model")
    s = sync(target, clickhouse, cfg, now=ls.now())
    assert s.acked == 6 and s.unmapped == ["openai/no-such-model:input", "openai/no-such-model:output"]
    sc = load_customers(clickhouse)["acme"].stripe_customer_id
    res = client.v1.billing.meters.event_summaries.list(
        first.meters["ml_tok_openai_gpt-4o_input"], {"customer": sc, "start_time": base - DAY, "end_time": base + DAY}
    )
    assert Decimal(str(res.data[0].aggregated_value)) == 3 * 1234
    rows = reconcile(client, clickhouse, cfg, base - DAY, base + DAY)
    assert {r.meter for r in rows} == {"ml_tok_openai_gpt-4o_input", "ml_tok_openai_gpt-4o_output"}
    assert not any(r.drifted for r in rows)


def test_public_surface() -> None:
    import jobs.stripe

    assert sorted(jobs.stripe.__all__) == jobs.stripe.__all__
    assert all(hasattr(jobs.stripe, name) for name in jobs.stripe.__all__)
