"""Find-or-create a Billing Meter (shared by ``provision`` and the plan mapping, which creates the
plan charge meter on first use: one place, no import cycle between the two)."""

from __future__ import annotations

from typing import Any

import stripe

from jobs.stripe._config import MeterSpec, idem_key


def ensure_meter(client: stripe.StripeClient, spec: MeterSpec, existing: dict[str, Any], report: Any) -> str:
    """The meter of ``spec.event_name`` (``existing``: event name -> meter, as listed), created or
    reactivated when needed; ``report`` gets ``created`` / ``existing`` / ``warnings`` entries."""
    meter = existing.get(spec.event_name)
    if meter is None:
        params = {
            "display_name": spec.display_name,
            "event_name": spec.event_name,
            "default_aggregation": {"formula": "sum"},
            "customer_mapping": {"type": "by_id", "event_payload_key": "stripe_customer_id"},
            "value_settings": {"event_payload_key": "value"},
        }
        create: Any = client.v1.billing.meters.create  # params typed loosely, as in provision
        meter = create(params, {"idempotency_key": idem_key("meter", spec.event_name, params)})
        report.created.append(f"meter:{spec.event_name}")
    else:
        if meter.status != "active":
            meter = client.v1.billing.meters.reactivate(meter.id)
            report.warnings.append(f"meter {spec.event_name} was inactive: reactivated")
        report.existing.append(f"meter:{spec.event_name}")
    return str(meter.id)
