"""Billing meters, meter events (v1 sync, v2 sync, v2 session + stream), adjustments, summaries.

Validation split (mirrors Stripe):
- synchronous (v1 ``meter_events``, v2 ``meter_events``) -> 400 for a duplicate identifier within
  24 h, a timestamp outside [now - 35 days, now + 5 min], or a payload value that is not a
  non-negative whole number of at most 15 significant digits;
- asynchronous (v2 ``meter_event_stream``) -> the request is accepted and each bad event becomes
  an error report (``/_test/error_reports``); duplicates are dropped silently;
- in both modes an unknown customer, a missing meter or an inactive meter is an error report
  (Stripe's ``v1.billing.meter.error_report_triggered``) and the event is not counted.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from decimal import Decimal
from typing import Any

from devtools.stripe_local._billing import aggregate
from devtools.stripe_local._params import ApiError, invalid, missing, not_found, p_dict, p_str
from devtools.stripe_local._routes import Ctx, base, list_response, route
from devtools.stripe_local._store import new_id

PAST_WINDOW = 35 * 86400
FUTURE_SKEW = 300
IDENTIFIER_WINDOW = 24 * 3600
SESSION_TTL = 15 * 60
MAX_STREAM_EVENTS = 100
_WHOLE = re.compile(r"^\d+$")


def iso(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def parse_iso(value: Any, param: str) -> int:
    try:
        parsed = dt.datetime.fromisoformat(str(value))
    except ValueError:
        raise invalid(param, f"Invalid timestamp {value!r}: expected ISO-8601.") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return int(parsed.timestamp())


# ----------------------------------------------------------------------------- meters


@route("POST", "/v1/billing/meters")
def create_meter(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    event_name = p_str(params, "event_name", required=True, max_len=100) or ""
    display_name = p_str(params, "display_name", required=True, max_len=250)
    agg = p_dict(params, "default_aggregation", required=True)
    formula = p_str(agg, "formula", required=True, choices=("sum", "count", "last"))
    cm = p_dict(params, "customer_mapping")
    vs = p_dict(params, "value_settings")
    if ctx.store.list_objects("billing.meter", lambda m: m["event_name"] == event_name):
        raise invalid(
            "event_name", f"A meter with event_name '{event_name}' already exists.", code="resource_already_exists"
        )
    obj = base("billing.meter", new_id("mtr"), ctx) | {
        "display_name": display_name,
        "event_name": event_name,
        "default_aggregation": {"formula": formula},
        "customer_mapping": {
            "type": p_str(cm, "type", default="by_id", choices=("by_id",)),
            "event_payload_key": p_str(cm, "event_payload_key", default="stripe_customer_id"),
        },
        "value_settings": {"event_payload_key": p_str(vs, "event_payload_key", default="value")},
        "event_time_window": p_str(params, "event_time_window", choices=("day", "hour")),
        "status": "active",
        "status_transitions": {"deactivated_at": None},
        "updated": ctx.now,
    }
    return ctx.store.put("billing.meter", obj)


def need_meter(ctx: Ctx, mid: str) -> dict[str, Any]:
    meter = ctx.store.get("billing.meter", mid)
    if meter is None:
        raise not_found("billing meter", mid)
    return meter


@route("GET", "/v1/billing/meters/{mid}")
def get_meter(ctx: Ctx, params: dict[str, Any], mid: str) -> dict[str, Any]:
    return need_meter(ctx, mid)


@route("POST", "/v1/billing/meters/{mid}")
def update_meter(ctx: Ctx, params: dict[str, Any], mid: str) -> dict[str, Any]:
    meter = need_meter(ctx, mid)
    extra = set(params) - {"display_name", "expand"}
    if extra:
        raise invalid(sorted(extra)[0], "Only display_name can be updated on a meter.", code="parameter_unknown")
    meter["display_name"] = p_str(params, "display_name", default=meter["display_name"])
    meter["updated"] = ctx.now
    return ctx.store.put("billing.meter", meter)


@route("GET", "/v1/billing/meters")
def list_meters(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    status = p_str(params, "status", choices=("active", "inactive"))
    return list_response(
        ctx, ctx.store.list_objects("billing.meter", lambda m: status is None or m["status"] == status), params
    )


def _set_status(ctx: Ctx, mid: str, status: str) -> dict[str, Any]:
    meter = need_meter(ctx, mid)
    if meter["status"] == status:
        raise invalid("id", f"Meter {mid} is already {status}.")
    meter["status"] = status
    meter["status_transitions"]["deactivated_at"] = ctx.now if status == "inactive" else None
    meter["updated"] = ctx.now
    return ctx.store.put("billing.meter", meter)


@route("POST", "/v1/billing/meters/{mid}/deactivate")
def deactivate_meter(ctx: Ctx, params: dict[str, Any], mid: str) -> dict[str, Any]:
    return _set_status(ctx, mid, "inactive")


@route("POST", "/v1/billing/meters/{mid}/reactivate")
def reactivate_meter(ctx: Ctx, params: dict[str, Any], mid: str) -> dict[str, Any]:
    return _set_status(ctx, mid, "active")


# ----------------------------------------------------------------------------- ingestion


def error_report(ctx: Ctx, code: str, message: str, *, event_name: str, identifier: str, meter: str | None) -> None:
    ctx.store.put(
        "error_report",
        base("billing.meter_error_report", new_id("mtrerr"), ctx)
        | {
            "code": code,
            "message": message,
            "event_name": event_name,
            "identifier": identifier,
            "meter": meter,
        },
    )


def ingest(
    ctx: Ctx, *, event_name: Any, payload: Any, identifier: Any, timestamp: int | None, sync: bool, prefix: str = ""
) -> tuple[str, int] | None:
    """Validate and store one event; returns ``(identifier, timestamp)`` or None when dropped (async).

    ``sync`` raises ``ApiError`` for request-level problems; otherwise they become error reports.
    """
    if not isinstance(event_name, str) or not event_name:
        raise missing(prefix + "event_name")
    if not isinstance(payload, dict) or not payload:
        raise missing(prefix + "payload")
    ident = identifier if isinstance(identifier, str) and identifier else "evt_" + secrets.token_hex(12)
    if len(ident) > 100:
        raise invalid(prefix + "identifier", "identifier must be at most 100 characters.")
    ts = ctx.now if timestamp is None else timestamp
    meter_list = ctx.store.list_objects("billing.meter", lambda m: m["event_name"] == event_name)
    meter = meter_list[0] if meter_list else None
    value_key = meter["value_settings"]["event_payload_key"] if meter else "value"
    customer_key = meter["customer_mapping"]["event_payload_key"] if meter else "stripe_customer_id"
    raw_value = payload.get(value_key)
    value = str(raw_value) if isinstance(raw_value, (str, int)) and not isinstance(raw_value, bool) else None

    problem: tuple[str, str, str] | None = None  # (code, message, param)
    if ctx.store.recent_event(ident, ctx.now - IDENTIFIER_WINDOW) is not None:
        if not sync:
            return None
        raise ApiError(
            400,
            f"An event already exists with identifier {ident}.",
            code="duplicate_meter_event",
            param=prefix + "identifier",
        )
    if ts < ctx.now - PAST_WINDOW:
        problem = (
            "timestamp_too_far_in_past",
            f"Timestamp {ts} is more than 35 days in the past (now {ctx.now}).",
            "timestamp",
        )
    elif ts > ctx.now + FUTURE_SKEW:
        problem = (
            "timestamp_in_future",
            f"Timestamp {ts} is more than 5 minutes in the future (now {ctx.now}).",
            "timestamp",
        )
    elif meter is None or meter["default_aggregation"]["formula"] != "count" or value is not None:
        if value is None:
            problem = (
                "meter_event_invalid_value",
                f"The payload must contain '{value_key}' as a string.",
                f"payload[{value_key}]",
            )
        elif not _WHOLE.match(value):
            problem = (
                "meter_event_invalid_value",
                f"The value in the event payload must be a non-negative whole number. Received {value}.",
                f"payload[{value_key}]",
            )
        elif len(value.lstrip("0")) > 15:
            problem = (
                "meter_event_value_too_many_digits",
                f"The value in the event payload can have at most 15 digits. Received {value}.",
                f"payload[{value_key}]",
            )
    if problem is not None:
        if sync:
            raise ApiError(400, problem[1], code=problem[0], param=prefix + problem[2])
        error_report(
            ctx, problem[0], problem[1], event_name=event_name, identifier=ident, meter=meter["id"] if meter else None
        )
        return None

    customer = payload.get(customer_key)
    status, code, message = "valid", None, ""
    if meter is None:
        code, message = "no_meter", f"No active meter was found for event_name {event_name}."
    elif meter["status"] != "active":
        code, message = "archived_meter", f"Meter {meter['id']} is inactive."
    elif not isinstance(customer, str) or not customer:
        code, message = "meter_event_no_customer_defined", f"The payload must contain '{customer_key}'."
    elif ctx.store.get("customer", customer) is None:
        code, message = "meter_event_customer_not_found", f"No customer found with id {customer}."
    if code is not None:
        status = "invalid"
        error_report(ctx, code, message, event_name=event_name, identifier=ident, meter=meter["id"] if meter else None)
    ctx.store.insert_event(
        event_name=event_name,
        identifier=ident,
        customer=customer if isinstance(customer, str) else None,
        value=value or "0",
        timestamp=ts,
        received=ctx.now,
        status=status,
        error_code=code,
        payload={str(k): str(v) for k, v in payload.items()},
    )
    return ident, ts


@route("POST", "/v1/billing/meter_events")
def create_meter_event(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    ts_raw = params.get("timestamp")
    ts = None
    if ts_raw not in (None, ""):
        try:
            ts = int(str(ts_raw))
        except ValueError:
            raise invalid("timestamp", f"Invalid integer: {ts_raw}") from None
    result = ingest(
        ctx,
        event_name=params.get("event_name"),
        payload=params.get("payload"),
        identifier=params.get("identifier"),
        timestamp=ts,
        sync=True,
    )
    assert result is not None
    return {
        "object": "billing.meter_event",
        "created": ctx.now,
        "event_name": params["event_name"],
        "identifier": result[0],
        "livemode": False,
        "payload": params["payload"],
        "timestamp": result[1],
    }


@route("POST", "/v2/billing/meter_events")
def create_meter_event_v2(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    ts = parse_iso(params["timestamp"], "timestamp") if params.get("timestamp") else None
    result = ingest(
        ctx,
        event_name=params.get("event_name"),
        payload=params.get("payload"),
        identifier=params.get("identifier"),
        timestamp=ts,
        sync=True,
    )
    assert result is not None
    return {
        "object": "v2.billing.meter_event",
        "created": iso(ctx.now),
        "event_name": params["event_name"],
        "identifier": result[0],
        "livemode": False,
        "payload": params["payload"],
        "timestamp": iso(result[1]),
    }


@route("POST", "/v2/billing/meter_event_session")
def create_session(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    token = "mes_tok_" + secrets.token_urlsafe(24)
    obj = {
        "id": new_id("mes"),
        "object": "v2.billing.meter_event_session",
        "authentication_token": token,
        "created": iso(ctx.now),
        "expires_at": iso(ctx.now + SESSION_TTL),
        "livemode": False,
    }
    ctx.store.put("meter_event_session", obj | {"_token": token, "_expires": ctx.now + SESSION_TTL})
    return obj


def check_session_token(ctx: Ctx) -> None:
    """Raise 401 unless ``ctx.token`` is a live meter event session token."""
    found = ctx.store.list_objects("meter_event_session", lambda s: s["_token"] == ctx.token)
    if not found:
        raise ApiError(
            401,
            "Invalid meter event session authentication token.",
            type="authentication_error",
            code="invalid_api_key",
        )
    if found[0]["_expires"] <= ctx.now:
        raise ApiError(
            401,
            "The meter event session has expired; create a new session.",
            type="temporary_session_expired",
            code="billing_meter_event_session_expired",
        )


@route("POST", "/v2/billing/meter_event_stream")
def meter_event_stream(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    check_session_token(ctx)
    events = params.get("events")
    if not isinstance(events, list) or not events:
        raise missing("events")
    if len(events) > MAX_STREAM_EVENTS:
        raise invalid("events", f"At most {MAX_STREAM_EVENTS} events are allowed per request; got {len(events)}.")
    parsed = []
    for i, ev in enumerate(events):
        if not isinstance(ev, dict):
            raise invalid(f"events[{i}]", "Each event must be an object.")
        ts = parse_iso(ev["timestamp"], f"events[{i}].timestamp") if ev.get("timestamp") else None
        if not isinstance(ev.get("event_name"), str) or not isinstance(ev.get("payload"), dict):
            raise missing(
                f"events[{i}].event_name" if not isinstance(ev.get("event_name"), str) else f"events[{i}].payload"
            )
        parsed.append((ev, ts))
    for i, (ev, ts) in enumerate(parsed):
        ingest(
            ctx,
            event_name=ev["event_name"],
            payload=ev["payload"],
            identifier=ev.get("identifier"),
            timestamp=ts,
            sync=False,
            prefix=f"events[{i}].",
        )
    return {}


# ----------------------------------------------------------------------------- adjustments


def cancel_event(ctx: Ctx, event_name: str, identifier: str, param: str) -> None:
    ev = ctx.store.recent_event(identifier, ctx.now - IDENTIFIER_WINDOW)
    if ev is None or ev.event_name != event_name:
        raise invalid(
            param,
            f"No meter event with identifier {identifier} for {event_name} received in the last 24 hours.",
            code="resource_missing",
        )
    if ev.status == "canceled":
        raise invalid(param, f"The meter event {identifier} is already canceled.")
    ctx.store.set_event_status(ev.seq, "canceled")


def _adjustment_params(params: dict[str, Any], sep: str) -> tuple[str, str]:
    event_name = p_str(params, "event_name", required=True) or ""
    p_str(params, "type", required=True, choices=("cancel",))
    ident = p_str(p_dict(params, "cancel", required=True), "identifier")
    if ident is None:
        raise missing(f"cancel{sep}identifier")
    return event_name, ident


@route("POST", "/v1/billing/meter_event_adjustments")
def create_adjustment(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    event_name, ident = _adjustment_params(params, "[")
    cancel_event(ctx, event_name, ident, "cancel[identifier]")
    return {
        "object": "billing.meter_event_adjustment",
        "cancel": {"identifier": ident},
        "event_name": event_name,
        "livemode": False,
        "status": "complete",
        "type": "cancel",
    }


@route("POST", "/v2/billing/meter_event_adjustments")
def create_adjustment_v2(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    event_name, ident = _adjustment_params(params, ".")
    cancel_event(ctx, event_name, ident, "cancel.identifier")
    return {
        "id": new_id("mtradj"),
        "object": "v2.billing.meter_event_adjustment",
        "created": iso(ctx.now),
        "cancel": {"identifier": ident},
        "event_name": event_name,
        "livemode": False,
        "status": "complete",
        "type": "cancel",
    }


# ----------------------------------------------------------------------------- summaries


def json_number(value: Decimal) -> int | float:
    """Exact Decimal -> JSON number (integral values stay exact ints)."""
    return int(value) if value == value.to_integral_value() else float(value)


def _bucket_start(ts: int, window: str) -> int:
    size = 3600 if window == "hour" else 86400
    return ts - ts % size


@route("GET", "/v1/billing/meters/{mid}/event_summaries")
def event_summaries(ctx: Ctx, params: dict[str, Any], mid: str) -> dict[str, Any]:
    meter = need_meter(ctx, mid)
    customer = p_str(params, "customer", required=True) or ""
    bounds = []
    for name in ("start_time", "end_time"):
        raw = params.get(name)
        if raw in (None, ""):
            raise missing(name)
        try:
            value = int(str(raw))
        except ValueError:
            raise invalid(name, f"Invalid integer: {raw}") from None
        if value % 60:
            raise invalid(name, f"{name} must be aligned with minute boundaries.")
        bounds.append(value)
    start, end = bounds
    if start >= end:
        raise invalid("end_time", "end_time must be after start_time.")
    window = p_str(params, "value_grouping_window", choices=("hour", "day"))
    if window is not None:  # spec3.json: start/end "must be aligned with value_grouping_window boundaries"
        size = 3600 if window == "hour" else 86400
        for name, value in (("start_time", start), ("end_time", end)):
            if value % size:
                raise invalid(name, f"{name} must be aligned with value_grouping_window ({window}) boundaries.")
    formula = meter["default_aggregation"]["formula"]
    events = ctx.store.valid_events(meter["event_name"], customer, start, end)
    ranges: list[tuple[int, int]]
    if window is None:
        ranges = [(start, end)]
    else:
        size = 3600 if window == "hour" else 86400
        starts = sorted({_bucket_start(e.timestamp, window) for e in events})
        ranges = [(max(s, start), min(s + size, end)) for s in starts]
    out = []
    for lo, hi in ranges:
        in_range = [e for e in events if lo <= e.timestamp < hi]
        out.append(
            {
                "id": f"mtrusum_{mid[4:]}_{lo}_{hi}",
                "object": "billing.meter_event_summary",
                "aggregated_value": json_number(aggregate(formula, in_range)),
                "start_time": lo,
                "end_time": hi,
                "livemode": False,
                "meter": mid,
            }
        )
    return list_response(ctx, out, params)


@route("GET", "/_test/error_reports")
def list_error_reports(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    code = p_str(params, "code")
    items = ctx.store.list_objects("error_report", lambda r: code is None or r["code"] == code)
    return {"object": "list", "data": items, "has_more": False, "url": ctx.path}


@route("GET", "/_test/meter_events")
def list_raw_events(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    rows = ctx.store.all_events(p_str(params, "event_name"))
    data = [
        {
            "identifier": e.identifier,
            "event_name": e.event_name,
            "customer": e.customer,
            "value": e.value,
            "timestamp": e.timestamp,
            "received": e.received,
            "status": e.status,
            "error_code": e.error_code,
            "payload": e.payload,
        }
        for e in rows
    ]
    return {"object": "list", "data": data, "has_more": False, "url": ctx.path}


@route("POST", "/_test/delete_meter_event")
def delete_meter_event(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    ident = p_str(params, "identifier", required=True) or ""
    deleted = ctx.store.delete_event(ident)
    if not deleted:
        raise not_found("meter event", ident, "identifier")
    return {"deleted": deleted, "identifier": ident}
