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

from meterline.stripe_local._billing import (
    CreditLine,
    aggregate,
    apply_credits,
    grant_available,
    grant_covers,
    line_amount_cents,
)
from meterline.stripe_local._core import add_balance_transaction, need, set_period
from meterline.stripe_local._params import (
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
from meterline.stripe_local._routes import Ctx, base, list_response, route
from meterline.stripe_local._store import new_id

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
        "category": p_str(params, "category", required=True, choices=("paid", "promotional")),
        "customer": cid, "customer_account": None, "effective_at": effective_at, "expires_at": expires_at,
        "metadata": p_metadata(params), "name": p_str(params, "name", max_len=100),
        "priority": p_int(params, "priority", default=50, lo=0, hi=100), "test_clock": None,
        "updated": ctx.now, "voided_at": None,
    }
    return ctx.store.put("billing.credit_grant", obj)


@route("GET", "/v1/billing/credit_grants/{gid}")
def get_grant(ctx: Ctx, params: dict[str, Any], gid: str) -> dict[str, Any]:
    return need(ctx, "billing.credit_grant", gid, "billing.credit_grant")


@route("GET", "/v1/billing/credit_grants")
def list_grants(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    cid = p_str(params, "customer")
    return list_response(ctx, ctx.store.list_objects(
        "billing.credit_grant", lambda g: cid is None or g["customer"] == cid), params)


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
    balances = [{"available_balance": {"type": "monetary", "monetary": {"currency": c, "value": v}},
                 "ledger_balance": {"type": "monetary", "monetary": {"currency": c, "value": v}}}
                for c, v in sorted(per_currency.items())]
    return {"object": "billing.credit_balance_summary", "balances": balances, "customer": cid,
            "customer_account": None, "livemode": False}


@route("GET", "/v1/billing/credit_balance_transactions")
def list_credit_transactions(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    cid = p_str(params, "customer", required=True)
    gid = p_str(params, "credit_grant")
    return list_response(ctx, ctx.store.list_objects("billing.credit_balance_transaction", lambda t: t[
        "customer"] == cid and (gid is None or t["credit_grant"] == gid)), params)


@route("GET", "/v1/billing/credit_balance_transactions/{tid}")
def get_credit_transaction(ctx: Ctx, params: dict[str, Any], tid: str) -> dict[str, Any]:
    return need(ctx, "billing.credit_balance_transaction", tid, "billing.credit_balance_transaction")


# ----------------------------------------------------------------------------- invoices


def _line(ctx: Ctx, inv_id: str, sub: dict[str, Any], item: dict[str, Any], start: int, end: int) -> dict[str, Any]:
    price = ctx.store.get("price", item["price"]["id"]) or item["price"]
    rec = price["recurring"]
    if rec["usage_type"] == "metered":
        meter = ctx.store.get("billing.meter", rec["meter"])
        formula = meter["default_aggregation"]["formula"] if meter else "sum"
        events = ctx.store.valid_events(meter["event_name"], sub["customer"], start, end) if meter else []
        qty = aggregate(formula, events)
    else:
        qty = Decimal(item["quantity"] or 0)
    amount = line_amount_cents(price, qty)
    return {
        "id": "il_" + item["id"][3:] + "_" + str(start), "object": "line_item", "amount": amount,
        "currency": price["currency"], "description": f"{price.get('nickname') or price['product']} ({rec['usage_type']})",
        "discount_amounts": [], "discountable": True, "discounts": [], "invoice": inv_id, "livemode": False,
        "metadata": {}, "period": {"start": start, "end": end}, "pretax_credit_amounts": [],
        "parent": {"type": "subscription_item_details", "invoice_item_details": None,
                   "subscription_item_details": {"subscription": sub["id"], "subscription_item": item["id"],
                                                 "invoice_item": None, "proration": False,
                                                 "proration_details": {"credited_items": None}}},
        "pricing": {"type": "price_details", "price_details": {"price": price["id"], "product": price["product"]},
                    "unit_amount_decimal": price.get("unit_amount_decimal")},
        "quantity": int(qty) if qty == qty.to_integral_value() else None,
        "quantity_decimal": format(qty, "f"), "subscription": sub["id"], "subtotal": amount, "taxes": [],
        "_metered": rec["usage_type"] == "metered", "_price": price["id"],
    }


def compute_invoice(ctx: Ctx, inv: dict[str, Any], *, record: bool) -> dict[str, Any]:
    """(Re)compute lines, credits and totals of ``inv``; ``record`` writes credit/balance transactions."""
    sub = need(ctx, "subscription", inv["_subscription"])
    start, end = inv["period_start"], inv["period_end"]
    lines = [_line(ctx, inv["id"], sub, item, start, end) for item in sub["items"]["data"]]
    grants, available = grants_available(ctx, sub["customer"])
    credit_lines = [CreditLine(i, ln["_price"], ln["currency"], ln["amount"])
                    for i, ln in enumerate(lines) if ln["_metered"]]
    apply_credits(credit_lines, grants, available)
    total_credits: list[dict[str, Any]] = []
    for cl in credit_lines:
        line = lines[cl.index]
        for gid, cents in cl.applied:
            txn_id = new_id("credtxn") if record else None
            if record:
                ctx.store.put("billing.credit_balance_transaction", base(
                    "billing.credit_balance_transaction", txn_id or "", ctx) | {
                    "credit": None, "credit_grant": gid, "customer": sub["customer"], "customer_account": None,
                    "effective_at": ctx.now, "test_clock": None, "type": "debit",
                    "debit": {"type": "credits_applied",
                              "amount": {"type": "monetary", "monetary": {"currency": cl.currency, "value": cents}},
                              "credits_applied": {"invoice": inv["id"], "invoice_line_item": line["id"]}}})
            entry = {"amount": cents, "type": "credit_balance_transaction", "credit_balance_transaction": txn_id,
                     "discount": None}
            line["pretax_credit_amounts"].append(entry)
            total_credits.append(entry)
    for line in lines:
        line.pop("_metered")
        line.pop("_price")
    subtotal = sum(ln["amount"] for ln in lines)
    total = subtotal - sum(c["amount"] for c in total_credits)
    inv.update({"lines": {"object": "list", "data": lines, "has_more": False, "url": f"/v1/invoices/{inv['id']}/lines"},
                "subtotal": subtotal, "subtotal_excluding_tax": subtotal, "total": total, "total_excluding_tax": total,
                "total_pretax_credit_amounts": total_credits, "amount_due": total, "amount_remaining": total,
                "currency": sub["currency"]})
    if record:
        customer = need(ctx, "customer", sub["customer"])
        starting = int(customer.get("balance") or 0)
        applied = max(starting, -total) if starting < 0 else starting
        if customer.get("currency") not in (None, sub["currency"]):
            applied = 0
        inv["starting_balance"] = starting
        inv["ending_balance"] = starting - applied
        inv["amount_due"] = inv["amount_remaining"] = total + applied
        if applied:
            add_balance_transaction(ctx, customer, -applied, sub["currency"], type_="applied_to_invoice",
                                    invoice=inv["id"], description=f"Applied to invoice {inv['id']}")
    return inv


def new_invoice(ctx: Ctx, sub: dict[str, Any], start: int, end: int, ident: str) -> dict[str, Any]:
    return base("invoice", ident, ctx) | {
        "customer": sub["customer"], "status": "draft", "billing_reason": "subscription_cycle",
        "collection_method": "charge_automatically", "period_start": start, "period_end": end,
        "parent": {"type": "subscription_details", "quote_details": None,
                   "subscription_details": {"subscription": sub["id"], "metadata": sub["metadata"]}},
        "amount_paid": 0, "amount_overpaid": 0, "amount_shipping": 0, "attempt_count": 0, "attempted": False,
        "auto_advance": True, "automatically_finalizes_at": end + GRACE, "discounts": [], "metadata": {},
        "number": None, "starting_balance": 0, "ending_balance": None, "total_discount_amounts": [],
        "total_taxes": [], "effective_at": None, "post_payment_credit_notes_amount": 0,
        "pre_payment_credit_notes_amount": 0,
        "status_transitions": {"finalized_at": None, "paid_at": None, "voided_at": None,
                               "marked_uncollectible_at": None},
        "_subscription": sub["id"],
    }


def public_invoice(inv: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in inv.items() if not k.startswith("_")}


def finalize(ctx: Ctx, inv: dict[str, Any]) -> dict[str, Any]:
    if inv["status"] != "draft":
        raise invalid("invoice", f"Invoice {inv['id']} is already finalized (status {inv['status']}).",
                      code="invoice_not_editable")
    compute_invoice(ctx, inv, record=True)
    inv["status"] = "paid" if inv["amount_due"] == 0 else "open"
    inv["number"] = f"LOCAL-{ctx.store.next_number('invoice'):05d}"
    inv["effective_at"] = inv["status_transitions"]["finalized_at"] = ctx.now
    inv["automatically_finalizes_at"] = None
    if inv["status"] == "paid":
        inv["status_transitions"]["paid_at"] = ctx.now
    return ctx.store.put("invoice", inv)


def tick(ctx: Ctx, *, finalize_now: bool = False) -> list[str]:
    """Cut invoices for ended periods and finalize due drafts; returns the ids touched."""
    touched: list[str] = []
    for sub in ctx.store.list_objects("subscription", lambda s: s["status"] == "active"):
        while sub["items"]["data"][0]["current_period_end"] <= ctx.now:
            item0 = sub["items"]["data"][0]
            inv = new_invoice(ctx, sub, item0["current_period_start"], item0["current_period_end"], new_id("in"))
            compute_invoice(ctx, inv, record=False)
            ctx.store.put("invoice", inv)
            sub["latest_invoice"] = inv["id"]
            set_period(sub, int(sub["_period_index"]) + 1)
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
    items = ctx.store.list_objects("invoice", lambda i: (cid is None or i["customer"] == cid) and (
        sid is None or i["_subscription"] == sid) and (status is None or i["status"] == status))
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
    cid = p_str(params, "customer", required=True) or ""
    need(ctx, "customer", cid, param="customer")
    sid = p_str(params, "subscription")
    if sid is None:
        subs = ctx.store.list_objects("subscription", lambda s: s["customer"] == cid and s["status"] == "active")
        if not subs:
            raise ApiError(400, f"Customer {cid} has no active subscription to preview.", code="invoice_upcoming_none")
        sub = subs[0]
    else:
        sub = need(ctx, "subscription", sid, param="subscription")
        if sub["customer"] != cid:
            raise invalid("subscription", f"Subscription {sid} does not belong to customer {cid}.")
    item0 = sub["items"]["data"][0]
    inv = new_invoice(ctx, sub, item0["current_period_start"], item0["current_period_end"],
                      "upcoming_in_" + secrets.token_hex(12))
    inv["billing_reason"] = "upcoming"
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
