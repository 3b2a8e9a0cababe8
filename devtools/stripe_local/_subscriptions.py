"""Subscriptions: create (first invoice in advance), update with proration, cancel, list.

Billing mode is ``flexible``, the default for new subscriptions in the SDK's API version
("If no value is passed, the default is `flexible`", ``billing_mode`` in spec3.json).

- Licensed items are billed in advance: the ``subscription_create`` invoice bills the first period
  (prorated by seconds when ``billing_cycle_anchor`` makes it short), each cycle invoice bills the
  next period. Metered items are billed in arrears from the meter.
- An update with ``proration_behavior`` ``create_prorations`` (default) or ``always_invoice``
  prorates by seconds over the current period ("The prorated amount is calculated down to the
  second ... using the current billing period's start and end times", Stripe's proration docs):
  "Unused time on ..." credits the old licensed amount x (end - t) / (end - start), "Remaining time
  on ..." charges the new one; each is an invoice item rounded to the cent on its own.
  ``always_invoice`` invoices them at once (``billing_reason: subscription_update``); otherwise
  they wait for the next invoice. ``none`` creates none.
- Flexible billing mode and metered prices (Stripe's "Update prices mid-cycle"): removing a
  metered price creates an invoice item that bills the usage reported so far at the old price
  (not with ``proration_behavior=none``); the new price bills usage from the change on.
  ``t`` is ``proration_date`` when given ("calculated as though the subscription was updated at
  the given time"), else now; the usage cut is at ``t`` as well.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

from devtools.stripe_local._billing import (
    add_interval,
    current_period,
    exact_amount,
    full_period_before,
    round_cents,
    set_period,
)
from devtools.stripe_local._core import expands, need, public_price
from devtools.stripe_local._invoicing import _label, is_metered
from devtools.stripe_local._params import ApiError, invalid, missing, p_bool, p_int, p_list, p_metadata, p_str
from devtools.stripe_local._routes import Ctx, base, list_response, route
from devtools.stripe_local._store import new_id

PRORATION_BEHAVIORS = ("create_prorations", "none", "always_invoice")


def plan_of(price: dict[str, Any]) -> dict[str, Any]:
    """The legacy ``plan`` view of a recurring price (required on subscription items by the spec)."""
    rec = price["recurring"] or {}
    return {
        "id": price["id"],
        "object": "plan",
        "active": price["active"],
        "amount": price.get("unit_amount"),
        "amount_decimal": price.get("unit_amount_decimal"),
        "billing_scheme": price["billing_scheme"],
        "created": price["created"],
        "currency": price["currency"],
        "interval": rec.get("interval"),
        "interval_count": rec.get("interval_count"),
        "livemode": False,
        "metadata": price.get("metadata") or {},
        "meter": rec.get("meter"),
        "nickname": price.get("nickname"),
        "product": price["product"],
        "tiers_mode": price.get("tiers_mode"),
        "transform_usage": price.get("transform_quantity"),
        "trial_period_days": None,
        "usage_type": rec.get("usage_type"),
    }


def public_subscription(sub: dict[str, Any], params: dict[str, Any] | None = None) -> dict[str, Any]:
    out = {k: v for k, v in sub.items() if not k.startswith("_")}
    tiers = expands(params or {}, "items.data.price.tiers")
    items = []
    for item in sub["items"]["data"]:
        clean = {k: v for k, v in item.items() if not k.startswith("_")}
        clean["price"] = public_price(item["price"], tiers)
        clean["plan"] = plan_of(item["price"])
        items.append(clean)
    out["items"] = dict(sub["items"], data=items)
    return out


def _check_price(
    ctx: Ctx, sub_rec: dict[str, Any] | None, currency: str | None, price_id: str, param: str
) -> dict[str, Any]:
    price = need(ctx, "price", price_id, param=param)
    if price["recurring"] is None:
        raise invalid(param, f"Price {price_id} is not recurring.")
    if sub_rec is not None and (sub_rec["interval"], sub_rec["interval_count"]) != (
        price["recurring"]["interval"],
        price["recurring"]["interval_count"],
    ):
        raise invalid(param, "All prices on a subscription must share one billing interval.")
    if currency is not None and price["currency"] != currency:
        raise invalid(param, "All prices on a subscription must share one currency.")
    return price


def _new_item(
    ctx: Ctx, sid: str, price: dict[str, Any], raw: dict[str, Any], param: str, usage_from: int
) -> dict[str, Any]:
    metered = is_metered(price)
    if metered and raw.get("quantity") not in (None, ""):
        raise invalid(f"{param}[quantity]", "Quantity cannot be set for metered prices.")
    return base("subscription_item", new_id("si"), ctx) | {
        "price": price,
        "quantity": None if metered else p_int(raw, "quantity", default=1, lo=0),
        "subscription": sid,
        "metadata": p_metadata(raw),
        "discounts": [],
        "tax_rates": [],
        "billing_thresholds": None,
        "_usage_from": usage_from,
    }


def licensed_cents(item: dict[str, Any], factor: Decimal = Decimal(1)) -> Decimal:
    """Exact (unrounded) cents of a licensed item for ``factor`` of a period."""
    return exact_amount(item["price"], Decimal(item["quantity"] or 0)) * factor


def _day(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%d %b %Y")


@route("POST", "/v1/subscriptions")
def create_subscription(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    from devtools.stripe_local._invoicing import issue_invoice

    cid = p_str(params, "customer", required=True) or ""
    need(ctx, "customer", cid, param="customer")
    raw_items = p_list(params, "items")
    if not raw_items:
        raise missing("items")
    behavior = p_str(params, "proration_behavior", default="create_prorations", choices=PRORATION_BEHAVIORS)
    sid = new_id("sub")
    items: list[dict[str, Any]] = []
    rec: dict[str, Any] | None = None
    currency: str | None = None
    for i, it in enumerate(raw_items):
        price = _check_price(ctx, rec, currency, p_str(it, "price", required=True) or "", f"items[{i}][price]")
        rec, currency = rec or price["recurring"], currency or price["currency"]
        items.append(_new_item(ctx, sid, price, it, f"items[{i}]", ctx.now))
    assert rec is not None and currency is not None
    start = p_int(params, "backdate_start_date", default=ctx.now)
    assert start is not None
    if start > ctx.now:
        raise invalid("backdate_start_date", "backdate_start_date must be in the past.")
    anchor = p_int(params, "billing_cycle_anchor")
    if anchor is not None and anchor <= ctx.now:
        raise invalid("billing_cycle_anchor", "billing_cycle_anchor must be in the future.")
    first_end = anchor if anchor is not None else add_interval(start, rec["interval"], rec["interval_count"], 1)
    if first_end <= ctx.now:
        raise invalid(
            "backdate_start_date", "The backdated first period must not have ended; pass billing_cycle_anchor."
        )
    for it in items:
        it["_usage_from"] = start  # "backdate a subscription to include usage in the next invoice"
    sub = base("subscription", sid, ctx) | {
        "customer": cid,
        "status": "active",
        "currency": currency,
        "metadata": p_metadata(params),
        "billing_cycle_anchor": anchor if anchor is not None else start,
        "start_date": start,
        "cancel_at_period_end": False,
        "cancel_at": None,
        "canceled_at": None,
        "ended_at": None,
        "latest_invoice": None,
        "collection_method": "charge_automatically",
        "test_clock": None,
        "discounts": [],
        "automatic_tax": {"enabled": False, "liability": None, "disabled_reason": None},
        "billing_mode": {"type": "flexible", "flexible": {"proration_discounts": "included"}, "updated_at": ctx.now},
        "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
        "default_tax_rates": [],
        "description": None,
        "days_until_due": None,
        "pending_update": None,
        "items": {
            "object": "list",
            "data": items,
            "has_more": False,
            "url": f"/v1/subscription_items?subscription={sid}",
        },
        "_recurring": {"interval": rec["interval"], "interval_count": rec["interval_count"]},
    }
    set_period(sub, 0)
    # the first invoice: licensed items in advance for the first period, prorated when it is short
    base_start = full_period_before(sub, first_end)
    short = anchor is not None and behavior != "none" and start > base_start
    factor = Decimal(first_end - start) / Decimal(first_end - base_start) if short else Decimal(1)
    specs = [
        {
            "kind": "licensed",
            "item": it["id"],
            "price": it["price"]["id"],
            "quantity": it["quantity"],
            "start": start,
            "end": first_end,
            "factor": str(factor),
            "proration": short,
            "description": _label(ctx, it)
            if not short
            else f"Remaining time on {_label(ctx, it)} until {_day(first_end)}",
        }
        for it in items
        if not is_metered(it["price"])
    ]
    ctx.store.put("subscription", sub)
    inv = issue_invoice(ctx, sub, "subscription_create", start, start, specs)
    sub["latest_invoice"] = inv["id"]
    ctx.store.put("subscription", sub)
    return public_subscription(sub, params)


@route("GET", "/v1/subscriptions/{sid}")
def get_subscription(ctx: Ctx, params: dict[str, Any], sid: str) -> dict[str, Any]:
    return public_subscription(need(ctx, "subscription", sid), params)


_UPDATE_IMPLEMENTED = {"items", "proration_behavior", "proration_date", "metadata", "expand", "cancel_at_period_end"}


@route("POST", "/v1/subscriptions/{sid}")
def update_subscription(ctx: Ctx, params: dict[str, Any], sid: str) -> dict[str, Any]:
    from devtools.stripe_local._invoicing import add_invoice_item, issue_invoice, metered_cents

    sub = need(ctx, "subscription", sid)
    extra = sorted(set(params) - _UPDATE_IMPLEMENTED)
    if extra:  # a Stripe parameter (unknown ones were refused already) this server does not model
        raise ApiError(
            400,
            f"The local Stripe server does not implement subscription parameter {extra[0]}.",
            code="parameter_unsupported_locally",
            param=extra[0],
        )
    if sub["status"] == "canceled":
        raise invalid("subscription", f"Subscription {sid} is canceled.")
    sub["metadata"] = p_metadata(params, sub["metadata"])
    if "cancel_at_period_end" in params:
        sub["cancel_at_period_end"] = p_bool(params, "cancel_at_period_end", default=False)
    raw_items = p_list(params, "items")
    if not raw_items:
        ctx.store.put("subscription", sub)
        return public_subscription(sub, params)
    behavior = p_str(params, "proration_behavior", default="create_prorations", choices=PRORATION_BEHAVIORS)
    start, end = current_period(sub)
    t = p_int(params, "proration_date", default=ctx.now)
    assert t is not None
    if not start <= t <= end or t > ctx.now:
        raise invalid("proration_date", "proration_date must lie in the current billing period and not in the future.")
    factor = Decimal(end - t) / Decimal(end - start)
    current = {it["id"]: it for it in sub["items"]["data"]}
    rec = sub["_recurring"]
    credits: list[tuple[dict[str, Any], Decimal, str]] = []  # (item, exact cents, description)
    removed_metered: list[dict[str, Any]] = []
    for i, raw in enumerate(raw_items):
        param = f"items[{i}]"
        if not isinstance(raw, dict):
            raise invalid(param, f"Invalid {param}.")
        item_id = p_str(raw, "id")
        if item_id is None:  # a new item
            price = _check_price(ctx, rec, sub["currency"], p_str(raw, "price", required=True) or "", f"{param}[price]")
            item = _new_item(ctx, sid, price, raw, param, t)
            item["current_period_start"], item["current_period_end"] = start, end
            sub["items"]["data"].append(item)
            if not is_metered(price):
                credits.append(
                    (item, licensed_cents(item, factor), f"Remaining time on {_label(ctx, item)} after {_day(t)}")
                )
            continue
        old = current.get(item_id)
        if old is None:
            raise invalid(f"{param}[id]", f"No such subscription item: '{item_id}'", code="resource_missing")
        if p_bool(raw, "deleted", default=False):
            sub["items"]["data"] = [x for x in sub["items"]["data"] if x["id"] != item_id]
            if is_metered(old["price"]):
                removed_metered.append(old)
            else:
                credits.append(
                    (old, -licensed_cents(old, factor), f"Unused time on {_label(ctx, old)} after {_day(t)}")
                )
            continue
        price_id = p_str(raw, "price")
        price = (
            old["price"]
            if price_id in (None, old["price"]["id"])
            else _check_price(ctx, rec, sub["currency"], price_id or "", f"{param}[price]")
        )
        if is_metered(price) and raw.get("quantity") not in (None, ""):
            raise invalid(f"{param}[quantity]", "Quantity cannot be set for metered prices.")
        qty = None if is_metered(price) else p_int(raw, "quantity", default=old["quantity"] or 1, lo=0)
        if price["id"] == old["price"]["id"] and qty == old["quantity"]:
            old["metadata"] = p_metadata(raw, old["metadata"])
            continue
        if is_metered(old["price"]):
            removed_metered.append(dict(old))
        else:
            credits.append(
                (dict(old), -licensed_cents(old, factor), f"Unused time on {_label(ctx, old)} after {_day(t)}")
            )
        old.update({"price": price, "quantity": qty, "metadata": p_metadata(raw, old["metadata"])})
        if is_metered(price):
            old["_usage_from"] = t
        else:
            credits.append((old, licensed_cents(old, factor), f"Remaining time on {_label(ctx, old)} after {_day(t)}"))
    if behavior != "none":
        for item, cents, description in credits:
            if cents:
                add_invoice_item(
                    ctx,
                    sub,
                    round_cents(cents),
                    description,
                    t,
                    end,
                    price=item["price"],
                    quantity=item["quantity"],
                    proration=True,
                    subscription_item=item["id"],
                )
        for old in removed_metered:  # flexible mode: bill the usage reported so far at the old price
            lo = max(start, int(old.get("_usage_from", start)))
            qty, used_cents = metered_cents(ctx, sub["customer"], old["price"], lo, t)
            if qty == 0 and used_cents == 0:
                continue  # no usage reported under that price: nothing to bill
            add_invoice_item(
                ctx,
                sub,
                used_cents,
                f"{_label(ctx, old)} usage {_day(lo)} – {_day(t)}",
                lo,
                t,
                price=old["price"],
                quantity=qty,
                proration=False,
                subscription_item=old["id"],
            )
    ctx.store.put("subscription", sub)
    if behavior == "always_invoice":
        inv = issue_invoice(ctx, sub, "subscription_update", t, t, [])
        sub["latest_invoice"] = inv["id"]
        ctx.store.put("subscription", sub)
    return public_subscription(sub, params)


@route("DELETE", "/v1/subscriptions/{sid}")
def cancel_subscription(ctx: Ctx, params: dict[str, Any], sid: str) -> dict[str, Any]:
    """Cancel now. spec3.json: ``prorate`` "will generate a proration invoice item that credits
    remaining unused time until the subscription period end"; ``invoice_now`` "will generate a final
    invoice that invoices for any un-invoiced metered usage and new/pending proration invoice items"."""
    from devtools.stripe_local._invoicing import add_invoice_item, cycle_specs, issue_invoice

    sub = need(ctx, "subscription", sid)
    if sub["status"] == "canceled":
        raise invalid("subscription", f"Subscription {sid} is already canceled.")
    start, end = current_period(sub)
    if p_bool(params, "prorate", default=False):
        factor = Decimal(end - ctx.now) / Decimal(end - start)
        for it in sub["items"]["data"]:
            if not is_metered(it["price"]):
                cents = round_cents(licensed_cents(it, factor))
                if cents:
                    add_invoice_item(
                        ctx,
                        sub,
                        -cents,
                        f"Unused time on {_label(ctx, it)} after {_day(ctx.now)}",
                        ctx.now,
                        end,
                        price=it["price"],
                        quantity=it["quantity"],
                        proration=True,
                        subscription_item=it["id"],
                    )
    if p_bool(params, "invoice_now", default=False):
        inv = issue_invoice(ctx, sub, "subscription_cycle", start, ctx.now, cycle_specs(ctx, sub, start, ctx.now))
        sub["latest_invoice"] = inv["id"]
    sub["status"] = "canceled"
    sub["canceled_at"] = sub["ended_at"] = ctx.now
    ctx.store.put("subscription", sub)
    return public_subscription(sub, params)


@route("GET", "/v1/subscriptions")
def list_subscriptions(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    cid = p_str(params, "customer")
    status = p_str(params, "status")
    items = ctx.store.list_objects(
        "subscription",
        lambda s: (
            (cid is None or s["customer"] == cid)
            and ((status is None and s["status"] != "canceled") or status in ("all", s["status"]))
        ),
    )
    return list_response(ctx, [public_subscription(s) for s in items], params)
