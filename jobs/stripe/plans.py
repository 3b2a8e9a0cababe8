"""Subscription plans on Stripe: prices per plan version, one subscription per customer, plan changes
as subscription updates with proration, and the minimum-commitment true-up.

The mapping (docs/stripe.md, "Plans"):

- **Fee**: a licensed monthly/weekly/... price of ``fee`` (``unit_amount_decimal`` in cents),
  quantity 1, billed in advance by Stripe. No item when the fee is 0.
- **Usage**: one meter, ``meterline_plan_tokens`` (sum of every token class), and per plan version
  a metered price: a *graduated* price whose first tier is free up to the included tokens (Stripe's
  documented pattern for included usage), then the overage tiers shifted by the allowance. A plan
  without allowance and with one overage rate is a per-unit price; ``volume`` tiers (no allowance)
  a volume price. ``on_exhausted: block`` writes overage off, so its overage tiers are free.
- **A period with a plan change** is cut into segments; each segment bills its usage at a price
  whose free tier is the segment's prorated allowance (the plans domain's ``terms_for``). Those
  prices are created on demand (lookup key ``..._a{included}``) and put on the subscription
  with ``proration_date`` = the segment's start (Stripe's flexible billing mode bills a removed
  metered price's usage up to the change on an invoice item). The fee item changes price at the
  same ``proration_date`` with ``create_prorations``: Stripe credits the unused old fee and
  charges the new one by seconds.
- **Minimum commitment**: Stripe has no minimum. ``sync`` adds an invoice item to the period's
  draft invoice (the hour after period end in which Stripe keeps it a draft) so the period's
  Stripe lines add up to meterline's total: the true-up.

- **Priced on the charge** (an ``amount`` allowance with ``rate_card`` overage): a second meter,
  ``meterline_plan_charge`` (the in-plan pay-per-token charge in meter units, like the cost meter),
  and a graduated price: free up to the allowance in meter units, then multiplier x the charge.
  A re-rating leaves the in-plan charge as priced; the re-rated bill's change reaches Stripe as a
  corrective amount (jobs/stripe/corrective.py).

Not mapped (``provision`` reports them and creates nothing for the customer): allowances limited
to some token classes or models, several allowances, an ``amount`` allowance with token-priced
overage, ``amount`` tiers, ``cap``, rollover, volume tiers with an allowance, and a plan that
stops mid-period (an immediate cancellation, an interval change). A cancellation at period end is
Stripe's ``cancel_at_period_end``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import stripe

from jobs.stripe._config import BillingConfig, MeterSpec, idem_key
from jobs.stripe._store import CustomerLink, load_customers, save_customer
from jobs.stripe.corrective import PLAN_CORRECTION_KIND

PLAN_EVENT = "meterline_plan_tokens"
PLAN_METER = MeterSpec(
    event_name=PLAN_EVENT, display_name="Plan tokens (all classes)", lookup_key="", unit_amount_decimal="0"
)
# Plans priced on the charge (an amount allowance + rate-card overage): their usage is the in-plan
# pay-per-token charge in meter units (10^unit_exponent per currency unit, like the cost meter)
PLAN_CHARGE_EVENT = "meterline_plan_charge"
PLAN_CHARGE_METER = MeterSpec(
    event_name=PLAN_CHARGE_EVENT, display_name="Plan usage charge", lookup_key="", unit_amount_decimal="0"
)
PLAN_METERS = (PLAN_EVENT, PLAN_CHARGE_EVENT)
META_CUSTOMER = "meterline_customer_id"
META_PLAN = "meterline_plan"
META_PERIOD = "meterline_period"
META_APPLIED = "meterline_segments"
META_ROLE = "meterline_role"
META_ANCHOR = "meterline_anchor"
PICOS_PER_CENT = 10**10


class NotMappable(Exception):
    """A plan version Stripe's prices cannot express exactly."""


def _cents(picos: int) -> str:
    """Picos -> a cents decimal string (at most 10 decimals: inside Stripe's 12)."""
    return format(Decimal(picos).scaleb(-10).normalize(), "f")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def charge_metered(plan: Any) -> bool:
    """A plan priced on the charge (rate-card overage): its usage goes to the plan charge meter."""
    return bool(plan.overage.kind == "rate_card")


def _charge_rate(plan: Any, unit_exponent: int) -> str:
    """Cents per meter unit of a rate-card overage (multiplier x 10^(2 - unit_exponent)), exactly, or
    NotMappable when that is not a decimal of at most 12 places (Stripe's limit)."""
    m = plan.overage.multiplier
    cents = Decimal(m.numerator) / Decimal(m.denominator) * Decimal(10) ** (2 - unit_exponent)
    exponent = cents.normalize().as_tuple().exponent
    exact = cents * Decimal(m.denominator) == Decimal(m.numerator) * Decimal(10) ** (2 - unit_exponent)
    if not exact or not isinstance(exponent, int) or exponent < -12:
        raise NotMappable(f"{plan.key}: multiplier {m} is not a price of at most 12 decimals per meter unit")
    return format(cents.normalize(), "f")


def _check_charge_plan(plan: Any, unit_exponent: int) -> None:
    for a in plan.allowances:
        if a.unit != "amount":
            raise NotMappable(f"{plan.key}: rate-card overage over a token allowance needs two meters")
        if a.models:
            raise NotMappable(f"{plan.key}: allowance {a.id} is limited to some models")
        if a.rollover_max is not None:
            raise NotMappable(f"{plan.key}: allowance {a.id} rolls over")
    if plan.on_exhausted == "cap":
        raise NotMappable(f"{plan.key}: a cap on overage has no Stripe price")
    _charge_rate(plan, unit_exponent)


def check_mappable(plan: Any, currency: str, unit_exponent: int = 6) -> None:
    """Raise NotMappable (with the reason) unless ``plan`` has an exact Stripe mapping in ``currency``."""
    if plan.currency.lower() != currency:
        raise NotMappable(f"{plan.key}: priced in {plan.currency}, the billing currency is {currency}")
    if len(plan.allowances) > 1:
        raise NotMappable(f"{plan.key}: several allowances need one meter each")
    if charge_metered(plan):
        _check_charge_plan(plan, unit_exponent)
        return
    ov = plan.overage
    if ov.unit != "tokens" or ov.kind == "rate_card":
        raise NotMappable(f"{plan.key}: overage priced on the charge (amount unit) is not mapped")
    for a in plan.allowances:
        if a.unit != "tokens":
            raise NotMappable(f"{plan.key}: allowance {a.id} is an amount, not tokens")
        if a.models or set(a.token_classes) != set(_all_classes()):
            raise NotMappable(f"{plan.key}: allowance {a.id} is limited to some models or token classes")
        if a.rollover_max is not None:
            raise NotMappable(f"{plan.key}: allowance {a.id} rolls over")
    if plan.on_exhausted == "cap":
        raise NotMappable(f"{plan.key}: a cap on overage has no Stripe price")
    if ov.kind == "tiers" and ov.mode == "volume" and plan.allowances and plan.allowances[0].included:
        raise NotMappable(f"{plan.key}: volume tiers over an allowance price the allowance too on Stripe")


def _all_classes() -> tuple[str, ...]:
    from meterline.core.plans import TOKEN_CLASSES

    return tuple(TOKEN_CLASSES)


def usage_price_params(plan: Any, included: int, unit_exponent: int = 6) -> dict[str, Any]:
    """The metered price of ``plan``'s usage with ``included`` free tokens (Stripe params, no meter);
    for a rate-card plan, ``included`` free meter units of charge, then multiplier x the charge."""
    ov = plan.overage
    free = plan.on_exhausted == "block"
    if charge_metered(plan):
        per_unit = "0" if free else _charge_rate(plan, unit_exponent)
        if included <= 0:
            return {"billing_scheme": "per_unit", "unit_amount_decimal": per_unit}
        return {
            "billing_scheme": "tiered",
            "tiers_mode": "graduated",
            "tiers": [
                {"up_to": included, "unit_amount_decimal": "0"},
                {"up_to": "inf", "unit_amount_decimal": per_unit},
            ],
        }

    def rate(picos: int) -> str:
        return "0" if free else _cents(picos)

    if ov.kind == "per_million":
        steps: list[tuple[int | None, int]] = [(None, ov.rate_picos)]
        mode = "graduated"
    else:
        steps = [(s.up_to, s.rate_picos) for s in ov.steps]
        mode = ov.mode or "graduated"
    if mode == "volume":
        tiers = [{"up_to": "inf" if u is None else u, "unit_amount_decimal": rate(r)} for u, r in steps]
        return {"billing_scheme": "tiered", "tiers_mode": "volume", "tiers": tiers}
    tiers = [{"up_to": included, "unit_amount_decimal": "0"}] if included > 0 else []
    tiers += [{"up_to": "inf" if u is None else included + u, "unit_amount_decimal": rate(r)} for u, r in steps]
    if len(tiers) == 1:
        return {"billing_scheme": "per_unit", "unit_amount_decimal": tiers[0]["unit_amount_decimal"]}
    return {"billing_scheme": "tiered", "tiers_mode": "graduated", "tiers": tiers}


def _lookup(plan: Any, currency: str, what: str) -> str:
    return f"ml_plan_{_slug(plan.plan_id)}_v{plan.version}_{currency}_{what}"[:200]


@dataclass
class PlanReport:
    created: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)  # plan versions Stripe cannot express (NotMappable)
    customers: dict[str, CustomerLink] = field(default_factory=dict)


class PlanPrices:
    """Find-or-create the product and prices of plan versions (by lookup key; idempotent)."""

    def __init__(self, client: stripe.StripeClient, cfg: BillingConfig, meter_id: str, report: PlanReport) -> None:
        self.client, self.cfg, self.meter_id, self.report = client, cfg, meter_id, report
        self._cache: dict[str, str] = {}

    def _product(self, plan: Any) -> str:

        pid = f"ml_plan_{_slug(plan.plan_id)}_v{plan.version}"
        try:
            self.client.v1.products.retrieve(pid)
        except stripe.InvalidRequestError as exc:
            if exc.http_status != 404:
                raise
            params = {"id": pid, "name": plan.name or plan.plan_id, "metadata": {META_PLAN: plan.key}}
            self.client.v1.products.create(params, {"idempotency_key": idem_key("product", pid, params)})  # type: ignore[arg-type]
            self.report.created.append(f"product:{pid}")
        return pid

    def _price(self, plan: Any, key: str, params: dict[str, Any]) -> str:

        if key in self._cache:
            return self._cache[key]
        found = self.client.v1.prices.list({"lookup_keys": [key], "active": True, "limit": 1}).data
        if found:
            self.report.existing.append(f"price:{key}")
            self._cache[key] = str(found[0].id)
            return self._cache[key]
        full = {
            "currency": self.cfg.currency,
            "product": self._product(plan),
            "lookup_key": key,
            "metadata": {META_PLAN: plan.key},
            **params,
        }
        price = self.client.v1.prices.create(full, {"idempotency_key": idem_key("price", key, full)})  # type: ignore[arg-type]
        self.report.created.append(f"price:{key}")
        self._cache[key] = str(price.id)
        return self._cache[key]

    def fee(self, plan: Any) -> str | None:
        if plan.fee == 0:
            return None
        return self._price(
            plan,
            _lookup(plan, self.cfg.currency, "fee"),
            {
                "unit_amount_decimal": _cents(plan.fee),
                "recurring": {"interval": plan.interval, "usage_type": "licensed"},
            },
        )

    def usage(self, plan: Any, included: int) -> str:
        params = usage_price_params(plan, included, self.cfg.cost.unit_exponent)
        meter = self._charge_meter() if charge_metered(plan) else self.meter_id
        params["recurring"] = {"interval": plan.interval, "usage_type": "metered", "meter": meter}
        what = f"chg_a{included}" if charge_metered(plan) else f"use_a{included}"
        return self._price(plan, _lookup(plan, self.cfg.currency, what), params)

    def _charge_meter(self) -> str:
        """The plan charge meter (created on first use: only rate-card plans need it)."""
        if PLAN_CHARGE_EVENT not in self._cache:
            from jobs.stripe._meters import ensure_meter

            existing = {m.event_name: m for m in self.client.v1.billing.meters.list({"limit": 100}).auto_paging_iter()}
            self._cache[PLAN_CHARGE_EVENT] = ensure_meter(self.client, PLAN_CHARGE_METER, existing, self.report)
        return self._cache[PLAN_CHARGE_EVENT]


def _included(terms: Any, unit_exponent: int = 6) -> int:
    """The segment's free quantity in its meter's units: tokens, or (rate-card plans) the amount
    allowance's picos in meter units, rounded down (a whole number of units: Stripe's tier bound)."""
    plan = terms.plan
    included = terms.included.get(plan.allowances[0].id, 0) if plan.allowances else 0
    if charge_metered(plan):
        return int(included) // 10 ** (12 - unit_exponent)
    return int(included)


def plan_customers(ch: Any) -> list[str]:
    rows = ch.query("SELECT DISTINCT customer_id FROM subscription_events FINAL ORDER BY customer_id").result_rows
    return [str(r[0]) for r in rows]


def _items_by_role(sub: Any) -> dict[str, Any]:
    out = {}
    for item in sub["items"].data:
        meta = item.metadata.to_dict() if item.metadata else {}
        out[meta.get(META_ROLE, "usage" if item.price.recurring.usage_type == "metered" else "fee")] = item
    return out


def apply_plans(
    client: stripe.StripeClient,
    ch: Any,
    cfg: BillingConfig,
    meter_id: str,
    *,
    now: int,
    customers: list[str] | None = None,
    report: PlanReport | None = None,
    changes: bool = True,
) -> PlanReport:
    """Bring each plan customer's Stripe subscription in line with its timeline at Stripe's now.

    ``changes=False`` (``provision``) only creates missing subscriptions. Segment updates belong
    to ``sync``, which pushes usage first: Stripe bills a replaced metered price's usage from what
    was reported when the update is made."""
    from jobs.plans.billing import load_catalog, load_events
    from meterline.core.plans import fold_timeline

    report = report if report is not None else PlanReport()
    prices = PlanPrices(client, cfg, meter_id, report)
    catalog = load_catalog(ch)
    links = load_customers(ch)
    for cid in customers if customers is not None else plan_customers(ch):
        timeline = fold_timeline(cid, load_events(ch, cid), catalog)
        period = timeline.period_at(now)
        if period is None:
            report.warnings.append(f"{cid}: no plan in force now")
            continue
        run = next((r for r in timeline.runs if r.anchor == period.anchor), None)
        try:
            if run is not None and run.end is not None and run.end < period.end:
                raise NotMappable(
                    f"the plan stops mid-period at {run.end} (an immediate cancellation or an "
                    "interval change): not mapped to Stripe"
                )
            link = _apply_customer(client, ch, prices, links, report, cid, period, now, changes)
            if run is not None and run.end == period.end and run.cancelled:
                _cancel_at_period_end(client, link, report)
        except NotMappable as exc:
            report.unmapped.append(f"{cid}: {exc}")
            continue
        except stripe.StripeError as exc:  # one customer's refusal never stops the others
            report.unmapped.append(f"{cid}: Stripe refused the plan mapping: {exc.user_message or exc}")
            continue
        report.customers[cid] = link
    return report


def _apply_customer(
    client: stripe.StripeClient,
    ch: Any,
    prices: PlanPrices,
    links: dict[str, CustomerLink],
    report: PlanReport,
    cid: str,
    period: Any,
    now: int,
    changes: bool,
) -> CustomerLink:
    from meterline.core.plans import terms_for

    current = period.segment_at(now)
    current = len(period.segments) - 1 if current is None else current
    for seg in period.segments[: current + 1]:
        check_mappable(seg.plan, prices.cfg.currency, prices.cfg.cost.unit_exponent)
    terms = [terms_for(period, i) for i in range(current + 1)]
    stripe_customer = _ensure_customer(client, cid, links, report)
    sub = _find_subscription(client, stripe_customer, cid)
    if sub is None:
        t0 = terms[0]
        items: list[dict[str, Any]] = [
            {
                "price": prices.usage(t0.plan, _included(t0, prices.cfg.cost.unit_exponent)),
                "metadata": {META_ROLE: "usage"},
            }
        ]
        fee = prices.fee(t0.plan)
        if fee is not None:
            items.insert(0, {"price": fee, "quantity": 1, "metadata": {META_ROLE: "fee"}})
        params: dict[str, Any] = {
            "customer": stripe_customer,
            "items": items,
            "metadata": {
                META_CUSTOMER: cid,
                META_PLAN: t0.plan.key,
                META_PERIOD: str(period.start),
                META_APPLIED: "1",
                META_ANCHOR: str(period.anchor),
            },
            # Stripe's periods must be meterline's: start the subscription at the period start
            # (backdated: it began before this call reaches Stripe) and anchor its cycle at the end
            "backdate_start_date": period.start,
            "billing_cycle_anchor": period.end,
        }

        sub = client.v1.subscriptions.create(params, {"idempotency_key": idem_key("plansub", cid, params)})  # type: ignore[arg-type]
        report.created.append(f"subscription:{cid}")
        applied = 1
    else:
        meta = sub.metadata.to_dict() if sub.metadata else {}
        if meta.get(META_ANCHOR, str(period.anchor)) != str(period.anchor):
            raise NotMappable(
                f"a new subscription run from {period.anchor} (a resubscription or an interval "
                f"change) needs its Stripe subscription {sub.id} ended first"
            )
        applied = int(meta.get(META_APPLIED, "1")) if meta.get(META_PERIOD) == str(period.start) else 0
        report.existing.append(f"subscription:{cid}")
    todo = range(applied, current + 1) if changes else range(0)
    for i in todo:
        if i > 0:  # the previous segment now ends at this change: re-price it with its prorated allowance
            _swap(client, sub, prices, terms[i - 1], terms[i - 1].start, fee=False)
        _swap(client, sub, prices, terms[i], terms[i].start, fee=True)
        report.updated.append(f"subscription:{cid}@{terms[i].start}")
    if todo:
        client.v1.subscriptions.update(
            sub.id,
            {
                "metadata": {
                    META_PERIOD: str(period.start),
                    META_APPLIED: str(current + 1),
                    META_PLAN: terms[current].plan.key,
                }
            },
        )
    link = CustomerLink(cid, stripe_customer, str(sub.id))
    if links.get(cid) != link:
        save_customer(ch, link, "plan")
    return link
    return report


def _cancel_at_period_end(client: stripe.StripeClient, link: CustomerLink, report: PlanReport) -> None:
    """A plan cancelled at its period end: Stripe's ``cancel_at_period_end``, so the last cycle
    invoice bills the period's usage and no next fee."""
    sub = client.v1.subscriptions.retrieve(link.subscription_id)
    if not sub.cancel_at_period_end:
        client.v1.subscriptions.update(link.subscription_id, {"cancel_at_period_end": True})
        report.updated.append(f"subscription:{link.customer_id} cancels at period end")


def _swap(client: stripe.StripeClient, sub: Any, prices: PlanPrices, terms: Any, at: int, *, fee: bool) -> None:
    """Put ``terms``' prices on the subscription as of ``at`` (``proration_date``), prorating by seconds."""
    sub = client.v1.subscriptions.retrieve(sub.id)
    have = _items_by_role(sub)
    items: list[dict[str, Any]] = []
    want_usage = prices.usage(terms.plan, _included(terms, prices.cfg.cost.unit_exponent))
    usage = have.get("usage")
    if usage is None:
        items.append({"price": want_usage, "metadata": {META_ROLE: "usage"}})
    elif usage.price.id != want_usage:
        items.append({"id": usage.id, "price": want_usage})
    if fee:
        want_fee = prices.fee(terms.plan)
        cur = have.get("fee")
        if cur is not None and want_fee is None:
            items.append({"id": cur.id, "deleted": True})
        elif cur is None and want_fee is not None:
            items.append({"price": want_fee, "quantity": 1, "metadata": {META_ROLE: "fee"}})
        elif cur is not None and cur.price.id != want_fee:
            items.append({"id": cur.id, "price": want_fee})
    if items:
        params: dict[str, Any] = {"items": items, "proration_date": at, "proration_behavior": "create_prorations"}
        client.v1.subscriptions.update(sub.id, params)  # type: ignore[arg-type]


def _ensure_customer(client: stripe.StripeClient, cid: str, links: dict[str, CustomerLink], report: PlanReport) -> str:

    link = links.get(cid)
    if link is not None:
        return link.stripe_customer_id
    for c in client.v1.customers.list({"limit": 100}).auto_paging_iter():
        if (c.metadata.to_dict() if c.metadata else {}).get(META_CUSTOMER) == cid:
            return str(c.id)
    params = {"name": cid, "metadata": {META_CUSTOMER: cid}}
    cus = client.v1.customers.create(params, {"idempotency_key": idem_key("cus", cid, params)})  # type: ignore[arg-type]
    report.created.append(f"customer:{cid}")
    return str(cus.id)


def _find_subscription(client: stripe.StripeClient, stripe_customer: str, cid: str) -> Any:
    for sub in client.v1.subscriptions.list({"customer": stripe_customer, "limit": 100}).auto_paging_iter():
        meta = sub.metadata.to_dict() if sub.metadata else {}
        if meta.get(META_CUSTOMER) == cid and META_PLAN in meta and sub.status != "canceled":
            return sub
    return None


# --------------------------------------------------------------------------- period amounts and true-up


def stripe_period_cents(client: stripe.StripeClient, subscription: str, start: int, end: int) -> int:
    """What Stripe bills for the service period ``[start, end)`` of a subscription, in cents: every
    invoice line whose ``period`` lies inside it (the fee was billed in advance on the invoice that
    opened the period; usage, prorations and the true-up on the one that closed it), minus the
    credits applied to those lines. Draft invoices count (their lines are final but for late usage)."""
    total = 0
    for inv in client.v1.invoices.list({"subscription": subscription, "limit": 100}).auto_paging_iter():
        if inv.status == "void":
            continue
        for line in inv.lines.auto_paging_iter():
            if start <= line.period.start and line.period.end <= end:
                total += int(line.amount) - sum(int(c.amount) for c in (line.pretax_credit_amounts or []))
    return total


def to_cents(total: Decimal) -> int:
    return int((total * 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def true_ups(client: stripe.StripeClient, ch: Any, cfg: BillingConfig) -> list[str]:
    """Add the minimum-commitment true-up to each plan customer's draft cycle invoice (idempotent)."""
    from jobs.plans.billing import _bills, load_catalog, load_events
    from meterline.core.plans import fold_timeline

    done: list[str] = []
    catalog = load_catalog(ch)
    for cid, link in load_customers(ch).items():
        if not link.subscription_id:
            continue
        drafts = [
            i
            for i in client.v1.invoices.list(
                {"subscription": link.subscription_id, "status": "draft", "limit": 100}
            ).auto_paging_iter()
            if i.billing_reason == "subscription_cycle"
        ]
        if not drafts:
            continue
        timeline = fold_timeline(cid, load_events(ch, cid), catalog)
        for inv in drafts:
            pairs = _bills(ch, timeline, int(inv.period_start), int(inv.period_start) + 1)
            for period, bill in pairs:
                if period.start != inv.period_start or bill.amount_of("minimum_commitment") <= 0:
                    continue
                marker = f"{cid}:{period.start}"
                items = client.v1.invoice_items.list({"invoice": inv.id, "limit": 100}).data
                if any(
                    (ii.metadata.to_dict() if ii.metadata else {}).get("meterline_true_up") == marker for ii in items
                ):
                    continue
                gap = to_cents(bill.total) - stripe_period_cents(client, link.subscription_id, period.start, period.end)
                if gap > 0:
                    client.v1.invoice_items.create(
                        {
                            "customer": link.stripe_customer_id,
                            "subscription": link.subscription_id,
                            "invoice": inv.id,
                            "amount": gap,
                            "currency": cfg.currency,
                            "description": "minimum commitment true-up",
                            "period": {"start": period.start, "end": period.end},
                            "metadata": {"meterline_true_up": marker},
                        },
                        {"idempotency_key": f"ml-trueup-{marker}"},
                    )
                    done.append(marker)
    return done


# --------------------------------------------------------------------------- usage for the plan meter


def plan_windows(
    ch: Any,
    cfg: BillingConfig,
    since: int,
    until: int,
    customer: str | None = None,
) -> tuple[set[str], dict[tuple[str, str, int], Decimal]]:
    """Usage of plan customers per (customer, meter, bucket) for ``sync``.

    A bucket is a sync window cut at every plan boundary (period start, plan change, end of a
    run), so each meter event's timestamp (the bucket start) falls on the right side of a change:
    Stripe attributes usage to a subscription item by event timestamp. Inside a plan run the bucket
    goes to the plan meter in tokens (every token class); outside one (pay-per-token before or after
    a plan) to the cost meter, as for any other customer. Returns (plan customers, quantities).

    Re-rating corrections (``usage_corrections``) change money, never tokens: they count in the
    cost meter's buckets (pay-per-token outside a plan run, like ``aggregate_usage``) and add 0 to
    the plan meter. A re-rated plan bill (a ``kind = 'plan'`` row) is not usage of any bucket:
    it reaches Stripe as a corrective amount (jobs/stripe/corrective.py)."""
    from jobs.plans.billing import load_catalog, load_events
    from meterline.core.plans import fold_timeline

    try:
        wanted = plan_customers(ch) if customer is None else [customer]
    except Exception:  # no subscription_events table: no plans
        return set(), {}
    if not wanted:
        return set(), {}
    catalog = load_catalog(ch)
    out: dict[tuple[str, str, int], Decimal] = {}
    customers: set[str] = set()
    w = cfg.sync.window_seconds
    for cid in wanted:
        events = load_events(ch, cid)
        if not events:
            continue
        customers.add(cid)
        timeline = fold_timeline(cid, events, catalog)
        runs = [(r.anchor, r.end) for r in timeline.runs]
        bounds = {0}
        by_charge: list[tuple[int, bool]] = []  # (segment start, its plan is priced on the charge)
        for p in timeline.periods(until):
            bounds.add(p.start)
            bounds.add(p.stop)
            bounds.update(s.start for s in p.segments)
            by_charge += [(s.start, charge_metered(s.plan)) for s in p.segments]
        by_charge.sort()
        rows = ch.query(
            "SELECT greatest(intDiv(toUnixTimestamp(occurred_at), {w:UInt32}) * {w:UInt32},"
            " arrayMax(arrayFilter(x -> x <= toUnixTimestamp(occurred_at), {b:Array(UInt64)}))) AS bucket,"
            " sum(input_tokens + output_tokens + cached_input_tokens + cache_write_tokens + reasoning_tokens),"
            " sum(charge) FROM ("
            "SELECT occurred_at, input_tokens, output_tokens, cached_input_tokens, cache_write_tokens,"
            " reasoning_tokens, charge, currency FROM usage_priced FINAL WHERE customer_id = {c:String}"
            " UNION ALL SELECT occurred_at, 0, 0, 0, 0, 0, charge, currency FROM usage_corrections FINAL"
            " WHERE customer_id = {c:String} AND kind != {plan_row:String})"
            " WHERE occurred_at >= fromUnixTimestamp({since:UInt64}) AND occurred_at < fromUnixTimestamp({until:UInt64})"
            " AND lower(currency) = {cur:String} GROUP BY bucket",
            parameters={
                "w": w,
                "b": sorted(bounds),
                "c": cid,
                "since": since,
                "until": until,
                "cur": cfg.currency,
                "plan_row": PLAN_CORRECTION_KIND,
            },
        ).result_rows
        for bucket, tokens, charge in rows:
            b = int(bucket)
            in_plan = any(a <= b and (e is None or b < e) for a, e in runs)
            if in_plan:
                on_charge = next((c for at, c in reversed(by_charge) if at <= b), False)
                if on_charge:  # rate-card plan: the in-plan charge (reprice leaves it as priced)
                    out[(cid, PLAN_CHARGE_EVENT, b)] = Decimal(charge)
                else:
                    out[(cid, PLAN_EVENT, b)] = Decimal(int(tokens))
            elif cfg.mode == "cost":
                out[(cid, cfg.cost.event_name, b)] = Decimal(charge)
    return customers, out
