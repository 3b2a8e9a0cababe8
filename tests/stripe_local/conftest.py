from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import stripe

from devtools.stripe_local import LocalStripe


@pytest.fixture
def ls() -> Iterator[LocalStripe]:
    with LocalStripe() as server:
        yield server


@pytest.fixture
def client(ls: LocalStripe) -> stripe.StripeClient:
    return ls.client()


@dataclass
class Metered:
    customer: str
    meter: str
    event_name: str


def make_metered(client: stripe.StripeClient, *, formula: str = "sum", event_name: str = "llm_tokens") -> Metered:
    customer = client.v1.customers.create({"email": "ada@example.com"})
    meter = client.v1.billing.meters.create(
        {
            "display_name": "LLM tokens",
            "event_name": event_name,
            "default_aggregation": {"formula": formula},
            "customer_mapping": {"type": "by_id", "event_payload_key": "stripe_customer_id"},
            "value_settings": {"event_payload_key": "value"},
        }
    )
    return Metered(customer.id, meter.id, event_name)


def send(
    client: stripe.StripeClient,
    m: Metered,
    value: int | str,
    *,
    identifier: str | None = None,
    timestamp: int | None = None,
    options: dict[str, str] | None = None,
) -> stripe.billing.MeterEvent:
    params: dict[str, object] = {
        "event_name": m.event_name,
        "payload": {"stripe_customer_id": m.customer, "value": str(value)},
    }
    if identifier is not None:
        params["identifier"] = identifier
    if timestamp is not None:
        params["timestamp"] = timestamp
    return client.v1.billing.meter_events.create(params, options)  # type: ignore[arg-type]


def total(client: stripe.StripeClient, m: Metered, start: int, end: int) -> int | float:
    """Meter aggregate over the minute-aligned range covering [start, end)."""
    lo = start - start % 60
    hi = end - end % 60 + 60
    res = client.v1.billing.meters.event_summaries.list(
        m.meter, {"customer": m.customer, "start_time": lo, "end_time": hi}
    )
    assert len(res.data) == 1
    return res.data[0].aggregated_value
