"""``meterline stripe provision``: create the meters, product, prices and customers the config describes.

Idempotent by lookup, then by key:

1. every object is first looked up — meters by ``event_name``, the product by its fixed id
   (``ml_prod_<mode>_<currency>``), prices by ``lookup_key``, customers by the ClickHouse mapping
   (``stripe_customers``) and then by ``metadata.meterline_customer_id``, subscriptions by
   ``metadata.meterline_customer_id`` among the customer's subscriptions;
2. only what is missing is created, with an ``Idempotency-Key`` derived from the object and a hash
   of its parameters, so a crash-and-rerun inside Stripe's 24 h key window replays instead of
   creating a twin (and a changed config gets a new key instead of an ``idempotency_error``).

Running it twice creates nothing the second time. A price whose amount differs from the config is
reported in ``ProvisionReport.warnings`` (Stripe prices are immutable; see docs/stripe.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import stripe

from jobs.stripe._config import REPO_ROOT, BillingConfig, MeterSpec, idem_key, meter_specs, product_id
from jobs.stripe._meters import ensure_meter
from jobs.stripe._store import CustomerLink, load_customers, save_customer
from jobs.stripe.plans import PlanReport
from meterline.core.errors import ConfigError

META_KEY = "meterline_customer_id"


@dataclass
class ProvisionReport:
    created: list[str] = field(default_factory=list)  # "meter:<event_name>", "price:<lookup_key>", ...
    existing: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    meters: dict[str, str] = field(default_factory=dict)  # event_name -> meter id
    prices: dict[str, str] = field(default_factory=dict)  # event_name -> price id
    customers: dict[str, CustomerLink] = field(default_factory=dict)
    plans: PlanReport | None = None  # plan customers (jobs/stripe/plans.py)


def _create(fn: Any, params: dict[str, Any], key: str) -> Any:
    return fn(params, {"idempotency_key": key})


def _ensure_product(client: stripe.StripeClient, cfg: BillingConfig, report: ProvisionReport) -> str:
    pid = product_id(cfg)
    try:
        client.v1.products.retrieve(pid)
        report.existing.append(f"product:{pid}")
    except stripe.InvalidRequestError as exc:
        if exc.http_status != 404:
            raise
        params = {"id": pid, "name": cfg.product_name, "metadata": {"meterline_mode": cfg.mode}}
        _create(client.v1.products.create, params, idem_key("product", pid, params))
        report.created.append(f"product:{pid}")
    return pid


def _ensure_price(
    client: stripe.StripeClient, cfg: BillingConfig, spec: MeterSpec, meter_id: str, pid: str, report: ProvisionReport
) -> str:
    found = client.v1.prices.list({"lookup_keys": [spec.lookup_key], "active": True, "limit": 1}).data
    if found:
        price = found[0]
        have = price.unit_amount_decimal
        if have is None or Decimal(str(have)).normalize() != Decimal(spec.unit_amount_decimal).normalize():
            report.warnings.append(
                f"price {spec.lookup_key}: Stripe has {price.unit_amount_decimal} cents/unit, "
                f"config says {spec.unit_amount_decimal} (prices are immutable: see docs/stripe.md)"
            )
        report.existing.append(f"price:{spec.lookup_key}")
        return str(price.id)
    params = {
        "currency": cfg.currency,
        "product": pid,
        "lookup_key": spec.lookup_key,
        "unit_amount_decimal": spec.unit_amount_decimal,
        "billing_scheme": "per_unit",
        "recurring": {"interval": cfg.interval, "usage_type": "metered", "meter": meter_id},
        "metadata": {"meterline_meter": spec.event_name},
    }
    price = _create(client.v1.prices.create, params, idem_key("price", spec.lookup_key, params))
    report.created.append(f"price:{spec.lookup_key}")
    return str(price.id)


def provision(
    client: stripe.StripeClient,
    ch: Any,
    cfg: BillingConfig,
    *,
    customers: Iterable[str] = (),
    root: Path = REPO_ROOT,
    now: int | None = None,
) -> ProvisionReport:
    """Create what is missing: meters, the product, metered prices, then each customer's mapping.

    ``customers``: meterline customer ids to map (in addition to nothing: pass
    :func:`usage_customers` to map everyone with priced usage). Customers with subscription facts
    (``meterline plans subscribe``) get their plan's prices and subscription instead
    (:func:`jobs.stripe.plans.apply_plans`, at Stripe's clock ``now``, default wall time).
    """
    import time

    from jobs.stripe.plans import PLAN_METER, apply_plans, plan_customers

    report = ProvisionReport()
    try:
        on_plans = plan_customers(ch)
    except Exception:  # no subscription_events table: no plans
        on_plans = []
    specs = meter_specs(cfg, root)
    existing = {m.event_name: m for m in client.v1.billing.meters.list({"limit": 100}).auto_paging_iter()}
    pid = _ensure_product(client, cfg, report)
    for spec in specs:
        report.meters[spec.event_name] = ensure_meter(client, spec, existing, report)
        report.prices[spec.event_name] = _ensure_price(client, cfg, spec, report.meters[spec.event_name], pid, report)
    wanted = sorted(set(customers) - set(on_plans))
    if wanted:
        report.customers = ensure_customers(client, ch, cfg, wanted, list(report.prices.values()), report)
    if on_plans:
        report.meters[PLAN_METER.event_name] = ensure_meter(client, PLAN_METER, existing, report)
        report.plans = apply_plans(
            client,
            ch,
            cfg,
            report.meters[PLAN_METER.event_name],
            now=int(time.time()) if now is None else now,
            changes=False,
        )
        report.created += report.plans.created
        report.existing += report.plans.existing
        report.warnings += report.plans.unmapped + report.plans.warnings
        report.customers.update(report.plans.customers)
    return report


def usage_customers(ch: Any) -> list[str]:
    """Every customer with priced usage in ClickHouse."""
    return [r[0] for r in ch.query("SELECT DISTINCT customer_id FROM usage_priced ORDER BY customer_id").result_rows]


def price_ids(client: stripe.StripeClient, cfg: BillingConfig, root: Path = REPO_ROOT) -> list[str]:
    """The provisioned prices of ``cfg`` (raises ConfigError when provision has not run)."""
    out = []
    for spec in meter_specs(cfg, root):
        found = client.v1.prices.list({"lookup_keys": [spec.lookup_key], "active": True, "limit": 1}).data
        if not found:
            raise ConfigError(f"price {spec.lookup_key} missing: run `meterline stripe provision` first")
        out.append(str(found[0].id))
    return out


def ensure_customers(
    client: stripe.StripeClient,
    ch: Any,
    cfg: BillingConfig,
    customer_ids: Iterable[str],
    prices: list[str],
    report: ProvisionReport | None = None,
) -> dict[str, CustomerLink]:
    """Map each meterline customer to a Stripe customer with a subscription to ``prices``."""
    report = report if report is not None else ProvisionReport()
    links = load_customers(ch)
    by_meta: dict[str, Any] | None = None
    out: dict[str, CustomerLink] = {}
    for cid in customer_ids:
        link = links.get(cid)
        if link is not None and link.subscription_id:
            report.existing.append(f"customer:{cid}")
            out[cid] = link
            continue
        if by_meta is None:  # one scan of Stripe customers, only when some mapping is missing
            by_meta = {}
            for c in client.v1.customers.list({"limit": 100}).auto_paging_iter():
                meta = c.metadata.to_dict() if c.metadata else {}
                if META_KEY in meta:
                    by_meta.setdefault(meta[META_KEY], c)
        cus = by_meta.get(cid)
        if cus is None:
            params = {"name": cid, "metadata": {META_KEY: cid}}
            cus = _create(client.v1.customers.create, params, idem_key("cus", cid, params))
            report.created.append(f"customer:{cid}")
        else:
            report.existing.append(f"customer:{cid}")
        sub_id = _ensure_subscription(client, str(cus.id), cid, prices, report)
        link = CustomerLink(cid, str(cus.id), sub_id)
        save_customer(ch, link, cfg.mode)
        out[cid] = link
    return out


def _ensure_subscription(
    client: stripe.StripeClient, stripe_customer: str, cid: str, prices: list[str], report: ProvisionReport
) -> str:
    for sub in client.v1.subscriptions.list({"customer": stripe_customer, "limit": 100}).auto_paging_iter():
        meta = sub.metadata.to_dict() if sub.metadata else {}
        if meta.get(META_KEY) == cid and sub.status not in ("canceled", "incomplete_expired"):
            have = {item.price.id for item in sub["items"].data}
            missing = set(prices) - have
            if missing:
                report.warnings.append(f"subscription {sub.id} of {cid} lacks prices {sorted(missing)}")
            report.existing.append(f"subscription:{cid}")
            return str(sub.id)
    params = {"customer": stripe_customer, "items": [{"price": p} for p in prices], "metadata": {META_KEY: cid}}
    sub = _create(client.v1.subscriptions.create, params, idem_key("sub", cid, params))
    report.created.append(f"subscription:{cid}")
    return str(sub.id)
