"""Credit grants, credit balance summary/transactions, invoices, period close and the test clock.

Period close (``tick``), in order:
1. every active subscription whose current period ended (store clock) gets a DRAFT invoice for
   that period and moves to the next period (repeated if several periods passed);
2. drafts whose grace hour is over (``automatically_finalizes_at = period_end + 3600``) are
   finalized; ``/_test/close_periods`` with ``finalize=true`` finalizes them at once.
Finalization recomputes every line from the meter (late usage inside the grace hour counts),
rounds each line once (half-up, integer cents), applies credit grants to metered lines (priority,
then soonest expiry, then oldest), then the customer balance, and records the credit and balance
transactions. An invoice with nothing left to pay becomes ``paid``, otherwise ``open``.
"""

from __future__ import annotations

import secrets
from decimal import Decimal
from typing import Any

from devtools.stripe_local._billing import (
    CreditLine,
    aggregate,
    apply_credits,
    current_period,
    exact_amount,
    grant_available,
    grant_covers,
    line_amount_cents,
    period_bounds,
    round_cents,
    set_period,
)
from devtools.stripe_local._core import add_balance_transaction, need
from devtools.stripe_local._params import (
    ApiError,
    invalid,
    missing,
    p_bool,
    p_dict,
    p_int,
    p_list,
    p_metadata,
    p_str,
)
from devtools.stripe_local._routes import Ctx, base, list_response, route
from devtools.stripe_local._store import new_id

GRACE = 3600

# ----------------------------------------------------------------------------- credit grants


@route("POST", "/v1/billing/credit_grants")
def create_grant(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    cid = p_str(params, "customer", required=True) or ""
    need(ctx, "customer", cid, param="customer")
    amount = p_dict(params, "amount", required=True)
    p_str(amount, "type", required=True, choices=("monetary",))
    monetary = p_dict(amount, "monetary", required=True)
    value = p_int(monetary, "value", required=True, lo=1)
    currency = (p_str(monetary, "currency", required=True) or "").lower()
    scope_raw = p_dict(p_dict(params, "applicability_config", required=True), "scope", required=True)
    price_type = p_str(scope_raw, "price_type", choices=("metered",))
    prices = [{"id": p_str(p, "id", required=True)} for p in p_list(scope_raw, "prices") if isinstance(p, dict)]
    if price_type is None and not prices:
        raise missing("applicability_config[scope][price_type]")
    for p in prices:
        need(ctx, "price", str(p["id"]), param="applicability_config[scope][prices]")
    effective_at = p_int(params, "effective_at", default=ctx.now)
    expires_at = p_int(params, "expires_at")
    if expires_at is not None and expires_at <= (effective_at or ctx.now):
        raise invalid("expires_at", "expires_at must be after effective_at.")
    obj = base("billing.credit_grant", new_id("credgr"), ctx) | {
        "amount": {"type": "monetary", "monetary": {"currency": currency, "value": value}},
        "applicability_config": {"scope": {"price_type": price_type, "prices": prices or None}},
        "category": p_str(params, "category", default="paid", choices=("paid", "promotional")),  # spec default
        "customer": cid,
        "customer_account": None,
        "effective_at": effective_at,
        "expires_at": expires_at,
        "metadata": p_metadata(params),
        "name": p_str(params, "name", max_len=100),
        "priority": p_int(params, "priority", default=50, lo=0, hi=100),
        "test_clock": None,
        "updated": ctx.now,
        "voided_at": None,
    }
    return ctx.store.put("billing.credit_grant", obj)


@route("GET", "/v1/billing/credit_grants/{gid}")
def get_grant(ctx: Ctx, params: dict[str, Any], gid: str) -> dict[str, Any]:
    return need(ctx, "billing.credit_grant", gid, "billing.credit_grant")


@route("GET", "/v1/billing/credit_grants")
def list_grants(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    cid = p_str(params, "customer")
    return list_response(
        ctx, ctx.store.list_objects("billing.credit_grant", lambda g: cid is None or g["customer"] == cid), params
    )


@route("POST", "/v1/billing/credit_grants/{gid}")
def update_grant(ctx: Ctx, params: dict[str, Any], gid: str) -> dict[str, Any]:
    grant = need(ctx, "billing.credit_grant", gid, "billing.credit_grant")
    if "expires_at" in params:
        grant["expires_at"] = p_int(params, "expires_at")
    grant["metadata"] = p_metadata(params, grant["metadata"])
    grant["updated"] = ctx.now
    return ctx.store.put("billing.credit_grant", grant)


@route("POST", "/v1/billing/credit_grants/{gid}/expire")
def expire_grant(ctx: Ctx, params: dict[str, Any], gid: str) -> dict[str, Any]:
    grant = need(ctx, "billing.credit_grant", gid, "billing.credit_grant")
    if grant["voided_at"] is not None or (grant["expires_at"] is not None and grant["expires_at"] <= ctx.now):
        raise invalid("id", f"Credit grant {gid} is already expired or voided.")
    grant["expires_at"] = grant["updated"] = ctx.now
    return ctx.store.put("billing.credit_grant", grant)


@route("POST", "/v1/billing/credit_grants/{gid}/void")
def void_grant(ctx: Ctx, params: dict[str, Any], gid: str) -> dict[str, Any]:
    grant = need(ctx, "billing.credit_grant", gid, "billing.credit_grant")
    if grant["voided_at"] is not None:
        raise invalid("id", f"Credit grant {gid} is already voided.")
    grant["voided_at"] = grant["updated"] = ctx.now
    return ctx.store.put("billing.credit_grant", grant)


def _applied(ctx: Ctx) -> dict[str, int]:
    out: dict[str, int] = {}
    for txn in ctx.store.list_objects("billing.credit_balance_transaction"):
        out[txn["credit_grant"]] = out.get(txn["credit_grant"], 0) + int(txn["debit"]["amount"]["monetary"]["value"])
    return out


def grants_available(ctx: Ctx, customer: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    grants = ctx.store.list_objects("billing.credit_grant", lambda g: g["customer"] == customer)
    applied = _applied(ctx)
    return grants, {g["id"]: grant_available(g, applied.get(g["id"], 0), ctx.now) for g in grants}


@route("GET", "/v1/billing/credit_balance_summary")
def balance_summary(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    cid = p_str(params, "customer", required=True) or ""
    need(ctx, "customer", cid, param="customer")
    flt = p_dict(params, "filter", required=True)
    ftype = p_str(flt, "type", required=True, choices=("applicability_scope", "credit_grant"))
    grants, available = grants_available(ctx, cid)
    if ftype == "credit_grant":
        gid = p_str(flt, "credit_grant", required=True)
        grants = [g for g in grants if g["id"] == gid]
    else:
        scope = p_dict(flt, "applicability_scope", required=True)
        if p_str(scope, "price_type", choices=("metered",)) == "metered":
            grants = [g for g in grants if g["applicability_config"]["scope"]["price_type"] == "metered"]
        else:
            ids = [str(p.get("id")) for p in p_list(scope, "prices") if isinstance(p, dict)]
            grants = [g for g in grants if any(grant_covers(g, i, g["amount"]["monetary"]["currency"]) for i in ids)]
    per_currency: dict[str, int] = {}
    for g in grants:
        cur = g["amount"]["monetary"]["currency"]
        per_currency[cur] = per_currency.get(cur, 0) + available[g["id"]]
    balances = [
        {
            "available_balance": {"type": "monetary", "monetary": {"currency": c, "value": v}},
            "ledger_balance": {"type": "monetary", "monetary": {"currency": c, "value": v}},
        }
        for c, v in sorted(per_currency.items())
    ]
    return {
        "object": "billing.credit_balance_summary",
        "balances": balances,
        "customer": cid,
        "customer_account": None,
        "livemode": False,
    }


@route("GET", "/v1/billing/credit_balance_transactions")
def list_credit_transactions(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    cid = p_str(params, "customer", required=True)
    gid = p_str(params, "credit_grant")
    return list_response(
        ctx,
        ctx.store.list_objects(
            "billing.credit_balance_transaction",
            lambda t: t["customer"] == cid and (gid is None or t["credit_grant"] == gid),
        ),
        params,
    )


@route("GET", "/v1/billing/credit_balance_transactions/{tid}")
def get_credit_transaction(ctx: Ctx, params: dict[str, Any], tid: str) -> dict[str, Any]:
    return need(ctx, "billing.credit_balance_transaction", tid, "billing.credit_balance_transaction")


# ----------------------------------------------------------------------------- invoice items


def add_invoice_item(
    ctx: Ctx,
    sub: dict[str, Any] | None,
    amount: int,
    description: str | None,
    start: int,
    end: int,
    *,
    customer: str | None = None,
    currency: str | None = None,
    price: dict[str, Any] | None = None,
    quantity: int | None = None,
    proration: bool = False,
    subscription_item: str | None = None,
    invoice: str | None = None,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A pending invoice item (``invoice`` None): the next invoice of its customer/subscription takes it."""
    cus = customer or (sub["customer"] if sub else "")
    obj = base("invoiceitem", new_id("ii"), ctx) | {
        "amount": amount,
        "currency": currency or (sub["currency"] if sub else "usd"),
        "customer": cus,
        "customer_account": None,
        "date": ctx.now,
        "description": description,
        "discountable": not proration,
        "discounts": [],
        "invoice": invoice,
        "metadata": metadata or {},
        "net_amount": amount,
        "period": {"start": start, "end": end},
        "proration": proration,
        "proration_details": {"discount_amounts": []},
        "quantity": quantity if quantity is not None else 1,
        "quantity_decimal": str(quantity if quantity is not None else 1),
        "tax_rates": [],
        "test_clock": None,
        "parent": None
        if sub is None
        else {
            "type": "subscription_details",
            "subscription_details": {"subscription": sub["id"], "subscription_item": subscription_item},
        },
        "pricing": None
        if price is None
        else {
            "type": "price_details",
            "price_details": {"price": price["id"], "product": price["product"]},
            "unit_amount_decimal": price.get("unit_amount_decimal"),
        },
    }
    return ctx.store.put("invoiceitem", obj)


def metered_cents(ctx: Ctx, customer: str, price: dict[str, Any], lo: int, hi: int) -> tuple[int, int]:
    """Meter aggregate of ``customer`` over ``[lo, hi)`` and its amount at ``price`` (cents, rounded once)."""
    meter = ctx.store.get("billing.meter", price["recurring"]["meter"])
    if meter is None or hi <= lo:
        return 0, 0
    events = ctx.store.valid_events(meter["event_name"], customer, lo, hi)
    qty = aggregate(meter["default_aggregation"]["formula"], events)
    return int(qty), line_amount_cents(price, qty)


@route("POST", "/v1/invoiceitems")
def create_invoice_item(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    cid = p_str(params, "customer", required=True) or ""
    need(ctx, "customer", cid, param="customer")
    implemented = {
        "customer",
        "amount",
        "currency",
        "description",
        "period",
        "subscription",
        "invoice",
        "metadata",
        "expand",
    }
    extra = sorted(set(params) - implemented)
    if extra:
        raise ApiError(
            400,
            f"The local Stripe server does not implement invoice item parameter {extra[0]}.",
            code="parameter_unsupported_locally",
            param=extra[0],
        )
    amount = p_int(params, "amount", required=True)
    currency = (p_str(params, "currency", required=True) or "").lower()
    sub = None
    sid = p_str(params, "subscription")
    if sid is not None:
        sub = need(ctx, "subscription", sid, param="subscription")
        if sub["customer"] != cid:
            raise invalid("subscription", f"Subscription {sid} does not belong to customer {cid}.")
    period = p_dict(params, "period")
    start = p_int(period, "start", default=ctx.now) if period else ctx.now
    end = p_int(period, "end", default=start) if period else ctx.now
    inv = None
    iid = p_str(params, "invoice")
    if iid is not None:
        inv = need_invoice(ctx, iid)
        if inv["status"] != "draft":
            raise invalid("invoice", f"Invoice {iid} is not a draft.", code="invoice_not_editable")
        if inv["customer"] != cid:
            raise invalid("invoice", f"Invoice {iid} does not belong to customer {cid}.")
    item = add_invoice_item(
        ctx,
        sub,
        int(amount or 0),
        p_str(params, "description"),
        int(start or 0),
        int(end or 0),
        customer=cid,
        currency=currency,
        invoice=iid,
        metadata=p_metadata(params),
    )
    if inv is not None:
        inv["_specs"].append({"kind": "invoiceitem", "id": item["id"]})
        compute_invoice(ctx, inv, record=False)
        ctx.store.put("invoice", inv)
    return item


@route("GET", "/v1/invoiceitems/{iid}")
def get_invoice_item(ctx: Ctx, params: dict[str, Any], iid: str) -> dict[str, Any]:
    return need(ctx, "invoiceitem", iid, "invoiceitem")


@route("GET", "/v1/invoiceitems")
def list_invoice_items(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    cid = p_str(params, "customer")
    iid = p_str(params, "invoice")
    pending = params.get("pending")
    items = ctx.store.list_objects(
        "invoiceitem",
        lambda x: (
            (cid is None or x["customer"] == cid)
            and (iid is None or x["invoice"] == iid)
            and (pending is None or (x["invoice"] is None) == (pending == "true"))
        ),
    )
    return list_response(ctx, items, params)


# ----------------------------------------------------------------------------- invoices


def _line(ctx: Ctx, inv: dict[str, Any], sub: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """One invoice line from its spec: a subscription item (licensed in advance, metered from the meter)
    or an invoice item. Amounts are rounded once, per line, half-up."""
    if spec["kind"] == "invoiceitem":
        ii = need(ctx, "invoiceitem", spec["id"])
        price = ctx.store.get("price", ii["pricing"]["price_details"]["price"]) if ii["pricing"] else None
        return {
            "id": "il_" + ii["id"][3:],
            "object": "line_item",
            "amount": ii["amount"],
            "currency": ii["currency"],
            "description": ii["description"],
            "period": ii["period"],
            "quantity": ii["quantity"],
            "quantity_decimal": ii["quantity_decimal"],
            "pricing": ii["pricing"] and dict(ii["pricing"]),
            "parent": {
                "type": "invoice_item_details",
                "subscription_item_details": None,
                "invoice_item_details": {
                    "invoice_item": ii["id"],
                    "proration": ii["proration"],
                    "proration_details": {"credited_items": None},
                    "subscription": sub["id"],
                },
            },
            "_metered": bool(price and price["recurring"] and price["recurring"]["usage_type"] == "metered"),
            "_price": price["id"] if price else None,
        }
    price = ctx.store.get("price", spec["price"]) or {}
    if spec["kind"] == "metered":
        qty_int, amount = metered_cents(ctx, sub["customer"], price, spec["start"], spec["end"])
        qty = Decimal(qty_int)
    else:
        qty = Decimal(spec["quantity"] or 0)
        amount = round_cents(exact_amount(price, qty) * Decimal(spec.get("factor") or "1"))
    nick = price.get("nickname") or (ctx.store.get("product", price.get("product", "")) or {}).get("name")
    return {
        "id": f"il_{spec['item'][3:]}_{spec['start']}_{spec['kind'][0]}",
        "object": "line_item",
        "amount": amount,
        "currency": price["currency"],
        "description": spec.get("description") or f"{nick} ({spec['kind']})",
        "period": {"start": spec["start"], "end": spec["end"]},
        "quantity": int(qty),
        "quantity_decimal": format(qty, "f"),
        "pricing": {
            "type": "price_details",
            "price_details": {"price": price["id"], "product": price["product"]},
            "unit_amount_decimal": price.get("unit_amount_decimal"),
        },
        "parent": {
            "type": "subscription_item_details",
            "invoice_item_details": None,
            "subscription_item_details": {
                "subscription": sub["id"],
                "subscription_item": spec["item"],
                "invoice_item": None,
                "proration": bool(spec.get("proration")),
                "proration_details": {"credited_items": None},
            },
        },
        "_metered": spec["kind"] == "metered",
        "_price": price["id"],
    }


def compute_invoice(ctx: Ctx, inv: dict[str, Any], *, record: bool) -> dict[str, Any]:
    """(Re)compute lines, credits and totals of ``inv``; ``record`` writes credit/balance transactions."""
    sub = need(ctx, "subscription", inv["_subscription"])
    lines = []
    for spec in inv["_specs"]:
        line = _line(ctx, inv, sub, spec) | {
            "discount_amounts": [],
            "discountable": True,
            "discounts": [],
            "invoice": inv["id"],
            "livemode": False,
            "metadata": {},
            "pretax_credit_amounts": [],
            "subscription": sub["id"],
            "taxes": [],
        }
        line["subtotal"] = line["amount"]
        lines.append(line)
    grants, available = grants_available(ctx, sub["customer"])
    credit_lines = [
        CreditLine(i, ln["_price"], ln["currency"], ln["amount"]) for i, ln in enumerate(lines) if ln["_metered"]
    ]
    apply_credits(credit_lines, grants, available)
    total_credits: list[dict[str, Any]] = []
    for cl in credit_lines:
        line = lines[cl.index]
        for gid, cents in cl.applied:
            txn_id = new_id("credtxn") if record else None
            if record:
                ctx.store.put(
                    "billing.credit_balance_transaction",
                    base("billing.credit_balance_transaction", txn_id or "", ctx)
                    | {
                        "credit": None,
                        "credit_grant": gid,
                        "customer": sub["customer"],
                        "customer_account": None,
                        "effective_at": ctx.now,
                        "test_clock": None,
                        "type": "debit",
                        "debit": {
                            "type": "credits_applied",
                            "amount": {"type": "monetary", "monetary": {"currency": cl.currency, "value": cents}},
                            "credits_applied": {"invoice": inv["id"], "invoice_line_item": line["id"]},
                        },
                    },
                )
            entry = {
                "amount": cents,
                "type": "credit_balance_transaction",
                "credit_balance_transaction": txn_id,
                "discount": None,
            }
            line["pretax_credit_amounts"].append(entry)
            total_credits.append(entry)
    for line in lines:
        line.pop("_metered")
        line.pop("_price")
    subtotal = sum(ln["amount"] for ln in lines)
    total = subtotal - sum(c["amount"] for c in total_credits)
    inv.update(
        {
            "lines": {"object": "list", "data": lines, "has_more": False, "url": f"/v1/invoices/{inv['id']}/lines"},
            "subtotal": subtotal,
            "subtotal_excluding_tax": subtotal,
            "total": total,
            "total_excluding_tax": total,
            "total_pretax_credit_amounts": total_credits,
            "amount_due": max(total, 0),
            "amount_remaining": max(total, 0),
            "currency": sub["currency"],
        }
    )
    if record:
        customer = need(ctx, "customer", sub["customer"])
        starting = int(customer.get("balance") or 0)
        same_currency = customer.get("currency") in (None, sub["currency"])
        inv["starting_balance"] = starting
        if total < 0:  # a net credit (a downgrade's prorations) goes to the customer balance, as on Stripe
            inv["ending_balance"] = starting + total
            inv["amount_due"] = inv["amount_remaining"] = 0
            add_balance_transaction(
                ctx,
                customer,
                total,
                sub["currency"],
                type_="adjustment",
                invoice=inv["id"],
                description=f"Credit from invoice {inv['id']}",
            )
            return inv
        # a credit (negative balance) lowers what is due down to 0; a debit raises it
        applied = (max(starting, -total) if starting < 0 else starting) if same_currency else 0
        inv["ending_balance"] = starting - applied
        inv["amount_due"] = inv["amount_remaining"] = total + applied
        if applied:
            add_balance_transaction(
                ctx,
                customer,
                -applied,
                sub["currency"],
                type_="applied_to_invoice",
                invoice=inv["id"],
                description=f"Applied to invoice {inv['id']}",
            )
    return inv


def new_invoice(
    ctx: Ctx, sub: dict[str, Any], start: int, end: int, ident: str, reason: str = "subscription_cycle"
) -> dict[str, Any]:
    return base("invoice", ident, ctx) | {
        "customer": sub["customer"],
        "status": "draft",
        "billing_reason": reason,
        "collection_method": "charge_automatically",
        "period_start": start,
        "period_end": end,
        "parent": {
            "type": "subscription_details",
            "quote_details": None,
            "subscription_details": {"subscription": sub["id"], "metadata": sub["metadata"]},
        },
        "amount_paid": 0,
        "amount_overpaid": 0,
        "amount_shipping": 0,
        "amount_paid_off_stripe": 0,
        "attempt_count": 0,
        "attempted": False,
        "auto_advance": True,
        "automatically_finalizes_at": end + GRACE,
        "automatic_tax": {
            "enabled": False,
            "liability": None,
            "provider": None,
            "status": None,
            "disabled_reason": None,
        },
        "default_tax_rates": [],
        "issuer": {"type": "self"},
        "payment_settings": {"default_mandate": None, "payment_method_options": None, "payment_method_types": None},
        "discounts": [],
        "metadata": {},
        "number": None,
        "starting_balance": 0,
        "ending_balance": None,
        "total_discount_amounts": [],
        "total_taxes": [],
        "effective_at": None,
        "post_payment_credit_notes_amount": 0,
        "pre_payment_credit_notes_amount": 0,
        "status_transitions": {
            "finalized_at": None,
            "paid_at": None,
            "voided_at": None,
            "marked_uncollectible_at": None,
        },
        "_subscription": sub["id"],
        "_specs": [],
    }


def _take_pending(ctx: Ctx, inv: dict[str, Any], sub: dict[str, Any]) -> None:
    """Attach the customer's pending invoice items (of this subscription, or of none) to ``inv``."""
    for ii in reversed(
        ctx.store.list_objects("invoiceitem", lambda x: x["invoice"] is None and x["customer"] == sub["customer"])
    ):
        parent = ii.get("parent") or {}
        owner = (parent.get("subscription_details") or {}).get("subscription")
        if owner not in (None, sub["id"]):
            continue
        ii["invoice"] = inv["id"]
        ctx.store.put("invoiceitem", ii)
        inv["_specs"].append({"kind": "invoiceitem", "id": ii["id"]})


def issue_invoice(
    ctx: Ctx, sub: dict[str, Any], reason: str, start: int, end: int, specs: list[dict[str, Any]]
) -> dict[str, Any]:
    """An invoice outside the cycle (``subscription_create`` / ``subscription_update``), finalized at once."""
    inv = new_invoice(ctx, sub, start, end, new_id("in"), reason)
    inv["_specs"] = list(specs)
    _take_pending(ctx, inv, sub)
    ctx.store.put("invoice", inv)
    return finalize(ctx, inv)


def public_invoice(inv: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in inv.items() if not k.startswith("_")}


def finalize(ctx: Ctx, inv: dict[str, Any]) -> dict[str, Any]:
    if inv["status"] != "draft":
        raise invalid(
            "invoice",
            f"Invoice {inv['id']} is already finalized (status {inv['status']}).",
            code="invoice_not_editable",
        )
    compute_invoice(ctx, inv, record=True)
    inv["status"] = "paid" if inv["amount_due"] == 0 else "open"
    inv["number"] = f"LOCAL-{ctx.store.next_number('invoice'):05d}"
    inv["effective_at"] = inv["status_transitions"]["finalized_at"] = ctx.now
    inv["automatically_finalizes_at"] = None
    if inv["status"] == "paid":
        inv["status_transitions"]["paid_at"] = ctx.now
    return ctx.store.put("invoice", inv)


def cycle_specs(ctx: Ctx, sub: dict[str, Any], start: int, end: int) -> list[dict[str, Any]]:
    """Metered usage of ``[start, end)`` per metered item (from when the item was added)."""
    return [
        {
            "kind": "metered",
            "item": it["id"],
            "price": it["price"]["id"],
            "start": max(start, int(it.get("_usage_from", start))),
            "end": end,
        }
        for it in sub["items"]["data"]
        if is_metered(it["price"])
    ]


def advance_specs(ctx: Ctx, sub: dict[str, Any], start: int, end: int) -> list[dict[str, Any]]:
    """Licensed items billed in advance for ``[start, end)``."""
    return [
        {
            "kind": "licensed",
            "item": it["id"],
            "price": it["price"]["id"],
            "quantity": it["quantity"],
            "start": start,
            "end": end,
            "factor": "1",
            "description": _label(ctx, it),
        }
        for it in sub["items"]["data"]
        if not is_metered(it["price"])
    ]


def tick(ctx: Ctx, *, finalize_now: bool = False) -> list[str]:
    """Cut invoices for ended periods and finalize due drafts; returns the ids touched."""
    touched: list[str] = []
    for sub in ctx.store.list_objects("subscription", lambda s: s["status"] == "active"):
        while sub["status"] == "active" and sub["items"]["data"][0]["current_period_end"] <= ctx.now:
            start, end = current_period(sub)
            inv = new_invoice(ctx, sub, start, end, new_id("in"))
            inv["_specs"] = cycle_specs(ctx, sub, start, end)
            _take_pending(ctx, inv, sub)
            set_period(sub, int(sub["_period_index"]) + 1)
            if sub["cancel_at_period_end"]:
                sub["status"] = "canceled"
                sub["canceled_at"] = sub["ended_at"] = end
            else:
                nxt_start, nxt_end = current_period(sub)
                inv["_specs"] += advance_specs(ctx, sub, nxt_start, nxt_end)
            compute_invoice(ctx, inv, record=False)
            ctx.store.put("invoice", inv)
            sub["latest_invoice"] = inv["id"]
            touched.append(inv["id"])
        ctx.store.put("subscription", sub)
    for inv in reversed(ctx.store.list_objects("invoice", lambda i: i["status"] == "draft")):
        if finalize_now or (inv["automatically_finalizes_at"] or 0) <= ctx.now:
            finalize(ctx, inv)
            if inv["id"] not in touched:
                touched.append(inv["id"])
    return touched


def need_invoice(ctx: Ctx, iid: str) -> dict[str, Any]:
    return need(ctx, "invoice", iid, "invoice", "invoice")


@route("GET", "/v1/invoices")
def list_invoices(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    tick(ctx)
    cid = p_str(params, "customer")
    sid = p_str(params, "subscription")
    status = p_str(params, "status")
    items = ctx.store.list_objects(
        "invoice",
        lambda i: (
            (cid is None or i["customer"] == cid)
            and (sid is None or i["_subscription"] == sid)
            and (status is None or i["status"] == status)
        ),
    )
    return list_response(ctx, [public_invoice(i) for i in items], params)


@route("GET", "/v1/invoices/{iid}")
def get_invoice(ctx: Ctx, params: dict[str, Any], iid: str) -> dict[str, Any]:
    tick(ctx)
    return public_invoice(need_invoice(ctx, iid))


@route("GET", "/v1/invoices/{iid}/lines")
def list_invoice_lines(ctx: Ctx, params: dict[str, Any], iid: str) -> dict[str, Any]:
    inv = need_invoice(ctx, iid)
    return list_response(ctx, inv["lines"]["data"], params)


@route("POST", "/v1/invoices/{iid}/finalize")
def finalize_invoice(ctx: Ctx, params: dict[str, Any], iid: str) -> dict[str, Any]:
    return public_invoice(finalize(ctx, need_invoice(ctx, iid)))


@route("POST", "/v1/invoices/create_preview")
def create_preview(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    """The next cycle invoice as it stands: usage so far, pending items, the next period in advance.

    ``customer`` is optional when ``subscription`` is given (spec3.json: "at least one of
    `customer`, `customer_account` or `subscription`")."""
    cid = p_str(params, "customer")
    sid = p_str(params, "subscription")
    if cid is None and sid is None:
        raise missing("customer")
    if sid is None:
        need(ctx, "customer", cid or "", param="customer")
        subs = ctx.store.list_objects("subscription", lambda s: s["customer"] == cid and s["status"] == "active")
        if not subs:
            raise ApiError(400, f"Customer {cid} has no active subscription to preview.", code="invoice_upcoming_none")
        sub = subs[0]
    else:
        sub = need(ctx, "subscription", sid, param="subscription")
        if cid is not None and sub["customer"] != cid:
            raise invalid("subscription", f"Subscription {sid} does not belong to customer {cid}.")
    start, end = current_period(sub)
    inv = new_invoice(ctx, sub, start, end, "upcoming_in_" + secrets.token_hex(12), "upcoming")
    inv["_specs"] = cycle_specs(ctx, sub, start, end)
    for ii in reversed(
        ctx.store.list_objects("invoiceitem", lambda x: x["invoice"] is None and x["customer"] == sub["customer"])
    ):
        inv["_specs"].append({"kind": "invoiceitem", "id": ii["id"]})
    if not sub["cancel_at_period_end"]:
        k = int(sub["_period_index"]) + 1
        nxt = period_bounds(sub, k)
        inv["_specs"] += advance_specs(ctx, sub, *nxt)
    return public_invoice(compute_invoice(ctx, inv, record=False))


# ----------------------------------------------------------------------------- test clock / periods


@route("GET", "/_test/clock")
def get_clock(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    return {"now": ctx.now, "offset": ctx.store.clock_offset}


@route("POST", "/_test/clock")
def move_clock(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    if params.get("set") is not None:
        ctx.now = ctx.store.set_clock(int(params["set"]))
    else:
        ctx.now = ctx.store.advance_clock(int(params.get("advance", 0)))
    touched = tick(ctx)
    return {"now": ctx.now, "offset": ctx.store.clock_offset, "invoices": touched}


@route("POST", "/_test/close_periods")
def close_periods(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    return {"now": ctx.now, "invoices": tick(ctx, finalize_now=p_bool(params, "finalize", default=True))}


def is_metered(price: dict[str, Any]) -> bool:
    return bool(price["recurring"]) and price["recurring"]["usage_type"] == "metered"


def _label(ctx: Ctx, item: dict[str, Any]) -> str:
    product = ctx.store.get("product", item["price"]["product"]) or {}
    qty = "" if item["quantity"] is None else f"{item['quantity']} × "
    return f"{qty}{product.get('name') or item['price']['product']}"
