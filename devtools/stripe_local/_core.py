"""Customers, customer balance transactions, products and prices (subscriptions: ``_subscriptions``)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from devtools.stripe_local._billing import INTERVALS
from devtools.stripe_local._params import (
    fmt_decimal,
    invalid,
    missing,
    not_found,
    p_bool,
    p_decimal,
    p_dict,
    p_int,
    p_list,
    p_metadata,
    p_str,
)
from devtools.stripe_local._routes import Ctx, base, list_response, route
from devtools.stripe_local._store import new_id


def need(ctx: Ctx, kind: str, ident: str, label: str | None = None, param: str = "id") -> dict[str, Any]:
    obj = ctx.store.get(kind, ident)
    if obj is None:
        raise not_found(label or kind, ident, param)
    return obj


# ----------------------------------------------------------------------------- customers


@route("POST", "/v1/customers")
def create_customer(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    obj = base("customer", new_id("cus"), ctx) | {
        "email": p_str(params, "email"),
        "name": p_str(params, "name"),
        "description": p_str(params, "description"),
        "metadata": p_metadata(params),
        "balance": p_int(params, "balance", default=0),
        "currency": None,
        "delinquent": False,
        "invoice_prefix": None,
        "test_clock": None,
    }
    return ctx.store.put("customer", obj)


@route("GET", "/v1/customers/{cid}")
def get_customer(ctx: Ctx, params: dict[str, Any], cid: str) -> dict[str, Any]:
    return need(ctx, "customer", cid)


@route("POST", "/v1/customers/{cid}")
def update_customer(ctx: Ctx, params: dict[str, Any], cid: str) -> dict[str, Any]:
    obj = need(ctx, "customer", cid)
    for key in ("email", "name", "description"):
        if key in params:
            obj[key] = p_str(params, key)
    obj["metadata"] = p_metadata(params, obj["metadata"])
    return ctx.store.put("customer", obj)


@route("GET", "/v1/customers")
def list_customers(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    email = p_str(params, "email")
    items = ctx.store.list_objects("customer", lambda c: email is None or c.get("email") == email)
    return list_response(ctx, items, params)


def add_balance_transaction(
    ctx: Ctx,
    customer: dict[str, Any],
    amount: int,
    currency: str,
    *,
    type_: str,
    description: str | None = None,
    invoice: str | None = None,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Record a balance change (negative = credit to the customer) and update ``customer.balance``."""
    customer["balance"] = int(customer.get("balance") or 0) + amount
    customer["currency"] = customer.get("currency") or currency
    ctx.store.put("customer", customer)
    txn = base("customer_balance_transaction", new_id("cbtxn"), ctx) | {
        "amount": amount,
        "currency": currency,
        "customer": customer["id"],
        "description": description,
        "ending_balance": customer["balance"],
        "invoice": invoice,
        "type": type_,
        "metadata": metadata or {},
        "credit_note": None,
    }
    return ctx.store.put("customer_balance_transaction", txn)


@route("POST", "/v1/customers/{cid}/balance_transactions")
def create_balance_transaction(ctx: Ctx, params: dict[str, Any], cid: str) -> dict[str, Any]:
    customer = need(ctx, "customer", cid, param="customer")
    amount = p_int(params, "amount", required=True)
    currency = (p_str(params, "currency", required=True) or "").lower()
    if customer.get("currency") and customer["currency"] != currency:
        raise invalid("currency", f"Customer balance is in {customer['currency']}, not {currency}.")
    return add_balance_transaction(
        ctx,
        customer,
        int(amount or 0),
        currency,
        type_="adjustment",
        description=p_str(params, "description"),
        metadata=p_metadata(params),
    )


@route("GET", "/v1/customers/{cid}/balance_transactions")
def list_balance_transactions(ctx: Ctx, params: dict[str, Any], cid: str) -> dict[str, Any]:
    need(ctx, "customer", cid, param="customer")
    items = ctx.store.list_objects("customer_balance_transaction", lambda t: t["customer"] == cid)
    return list_response(ctx, items, params)


@route("GET", "/v1/customers/{cid}/balance_transactions/{tid}")
def get_balance_transaction(ctx: Ctx, params: dict[str, Any], cid: str, tid: str) -> dict[str, Any]:
    txn = need(ctx, "customer_balance_transaction", tid)
    if txn["customer"] != cid:
        raise not_found("customer_balance_transaction", tid)
    return txn


# ----------------------------------------------------------------------------- products


@route("POST", "/v1/products")
def create_product(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    obj = base("product", p_str(params, "id") or new_id("prod"), ctx) | {
        "name": p_str(params, "name", required=True),
        "active": p_bool(params, "active", default=True),
        "description": p_str(params, "description"),
        "metadata": p_metadata(params),
        "default_price": None,
        "updated": ctx.now,
        "type": "service",
        "images": [],
        "marketing_features": [],
        "package_dimensions": None,
        "shippable": None,
        "statement_descriptor": None,
        "tax_code": None,
        "unit_label": None,
        "url": None,
    }
    if ctx.store.get("product", obj["id"]) is not None:
        raise invalid("id", f"Product already exists with ID {obj['id']}", code="resource_already_exists")
    return ctx.store.put("product", obj)


@route("GET", "/v1/products/{pid}")
def get_product(ctx: Ctx, params: dict[str, Any], pid: str) -> dict[str, Any]:
    return need(ctx, "product", pid)


@route("POST", "/v1/products/{pid}")
def update_product(ctx: Ctx, params: dict[str, Any], pid: str) -> dict[str, Any]:
    obj = need(ctx, "product", pid)
    for key in ("name", "description"):
        if key in params:
            obj[key] = p_str(params, key)
    obj["active"] = p_bool(params, "active", default=obj["active"])
    obj["metadata"] = p_metadata(params, obj["metadata"])
    obj["updated"] = ctx.now
    return ctx.store.put("product", obj)


@route("GET", "/v1/products")
def list_products(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    active = params.get("active")
    items = ctx.store.list_objects("product", lambda p: active is None or p["active"] == (active == "true"))
    return list_response(ctx, items, params)


# ----------------------------------------------------------------------------- prices


def _parse_tiers(params: dict[str, Any]) -> list[dict[str, Any]]:
    tiers = []
    raw = p_list(params, "tiers")
    if not raw:
        raise missing("tiers")
    for i, t in enumerate(raw):
        name = f"tiers[{i}]"
        if not isinstance(t, dict):
            raise invalid(name, f"Invalid {name}.")
        up_raw = t.get("up_to")
        if up_raw in (None, ""):
            raise missing(f"{name}[up_to]")
        up_to = None if up_raw == "inf" else p_int(t, "up_to", lo=1)
        unit = p_decimal(t, "unit_amount_decimal")
        if unit is None and t.get("unit_amount") not in (None, ""):
            unit = Decimal(p_int(t, "unit_amount", lo=0) or 0)
        flat = p_decimal(t, "flat_amount_decimal")
        if flat is None and t.get("flat_amount") not in (None, ""):
            flat = Decimal(p_int(t, "flat_amount", lo=0) or 0)
        tiers.append(
            {
                "up_to": up_to,
                "unit_amount": int(unit) if unit is not None and unit == unit.to_integral_value() else None,
                "unit_amount_decimal": fmt_decimal(unit) if unit is not None else None,
                "flat_amount": int(flat) if flat is not None and flat == flat.to_integral_value() else None,
                "flat_amount_decimal": fmt_decimal(flat) if flat is not None else None,
            }
        )
    if tiers[-1]["up_to"] is not None:
        raise invalid("tiers", "The last tier must have up_to=inf.")
    ups = [t["up_to"] for t in tiers[:-1]]
    if None in ups or ups != sorted(ups) or len(set(ups)) != len(ups):
        raise invalid("tiers", "Tiers must be in increasing up_to order with only the last one unbounded.")
    return tiers


@route("POST", "/v1/prices")
def create_price(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    currency = (p_str(params, "currency", required=True) or "").lower()
    product_id = p_str(params, "product")
    if product_id is None:
        pdata = p_dict(params, "product_data")
        if not pdata:
            raise missing("product")
        product_id = create_product(ctx, {k: v for k, v in pdata.items()})["id"]
    need(ctx, "product", product_id, param="product")
    scheme = p_str(params, "billing_scheme", default="per_unit", choices=("per_unit", "tiered"))
    recurring = p_dict(params, "recurring")
    rec: dict[str, Any] | None = None
    if recurring:
        interval = p_str(recurring, "interval", required=True, choices=INTERVALS)
        usage_type = p_str(recurring, "usage_type", default="licensed", choices=("licensed", "metered"))
        meter = p_str(recurring, "meter")
        if usage_type == "metered":
            if meter is None:
                raise invalid(
                    "recurring[meter]",
                    "Metered prices must be backed by a meter: pass recurring[meter].",
                    code="parameter_missing",
                )
            m = ctx.store.get("billing.meter", meter)
            if m is None:
                raise not_found("billing meter", meter, "recurring[meter]")
            if m["status"] != "active":
                raise invalid("recurring[meter]", f"Meter {meter} is not active.")
        elif meter is not None:
            raise invalid("recurring[meter]", "recurring[meter] is only allowed with usage_type=metered.")
        rec = {
            "interval": interval,
            "interval_count": p_int(recurring, "interval_count", default=1, lo=1, hi=36),
            "usage_type": usage_type,
            "meter": meter,
            "trial_period_days": None,
        }
    unit_dec: Decimal | None = None
    tiers = None
    tiers_mode = None
    if scheme == "per_unit":
        if "unit_amount" in params and "unit_amount_decimal" in params:
            raise invalid("unit_amount", "Pass only one of unit_amount and unit_amount_decimal.")
        unit_dec = p_decimal(params, "unit_amount_decimal")
        if unit_dec is None:
            ua = p_int(params, "unit_amount", lo=0)
            if ua is None:
                raise missing("unit_amount")
            unit_dec = Decimal(ua)
    else:
        tiers_mode = p_str(params, "tiers_mode", required=True, choices=("graduated", "volume"))
        tiers = _parse_tiers(params)
        if "transform_quantity" in params:
            raise invalid("transform_quantity", "transform_quantity cannot be combined with tiered pricing.")
    tq = None
    if "transform_quantity" in params:
        raw = p_dict(params, "transform_quantity")
        tq = {
            "divide_by": p_int(raw, "divide_by", required=True, lo=1),
            "round": p_str(raw, "round", required=True, choices=("up", "down")),
        }
    obj = base("price", new_id("price"), ctx) | {
        "active": p_bool(params, "active", default=True),
        "billing_scheme": scheme,
        "currency": currency,
        "custom_unit_amount": None,
        "lookup_key": p_str(params, "lookup_key"),
        "metadata": p_metadata(params),
        "nickname": p_str(params, "nickname"),
        "product": product_id,
        "recurring": rec,
        "tax_behavior": "unspecified",
        "tiers": tiers,
        "tiers_mode": tiers_mode,
        "transform_quantity": tq,
        "type": "recurring" if rec else "one_time",
        "unit_amount": int(unit_dec) if unit_dec is not None and unit_dec == unit_dec.to_integral_value() else None,
        "unit_amount_decimal": fmt_decimal(unit_dec) if unit_dec is not None else None,
    }
    return public_price(ctx.store.put("price", obj), expands(params, "tiers"))


def expands(params: dict[str, Any], field: str) -> bool:
    """Whether ``expand[]`` names ``field`` (a dotted path such as ``data.tiers``)."""
    raw = params.get("expand")
    values = raw if isinstance(raw, list) else [raw] if isinstance(raw, str) else []
    return field in values


def public_price(price: dict[str, Any], expand_tiers: bool) -> dict[str, Any]:
    """A price as Stripe returns it: ``tiers`` is "included only if requested" (``expand[]=tiers``)
    and then never null (an empty list for a per-unit price)."""
    out = {k: v for k, v in price.items() if k != "tiers"}
    if expand_tiers:
        out["tiers"] = price.get("tiers") or []
    return out


@route("GET", "/v1/prices/{pid}")
def get_price(ctx: Ctx, params: dict[str, Any], pid: str) -> dict[str, Any]:
    return public_price(need(ctx, "price", pid), expands(params, "tiers"))


@route("POST", "/v1/prices/{pid}")
def update_price(ctx: Ctx, params: dict[str, Any], pid: str) -> dict[str, Any]:
    obj = need(ctx, "price", pid)
    obj["active"] = p_bool(params, "active", default=obj["active"])
    for key in ("nickname", "lookup_key"):
        if key in params:
            obj[key] = p_str(params, key)
    obj["metadata"] = p_metadata(params, obj["metadata"])
    return public_price(ctx.store.put("price", obj), expands(params, "tiers"))


@route("GET", "/v1/prices")
def list_prices(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    product = p_str(params, "product")
    active = params.get("active")
    keys = p_list(params, "lookup_keys")
    items = ctx.store.list_objects(
        "price",
        lambda p: (
            (product is None or p["product"] == product)
            and (active is None or p["active"] == (active == "true"))
            and (not keys or p.get("lookup_key") in keys)
        ),
    )
    return list_response(ctx, [public_price(p, expands(params, "data.tiers")) for p in items], params)
