"""Billing meters and meter events through the real stripe SDK."""

from __future__ import annotations

import datetime as dt

import pytest
import stripe

from devtools.stripe_local import LocalStripe
from tests.stripe_local.conftest import make_metered, send, total


def test_meter_crud_and_unique_event_name(client: stripe.StripeClient) -> None:
    m = make_metered(client)
    meter = client.v1.billing.meters.retrieve(m.meter)
    assert isinstance(meter, stripe.billing.Meter)
    assert (meter.event_name, meter.default_aggregation.formula, meter.status) == ("llm_tokens", "sum", "active")
    assert meter.customer_mapping.event_payload_key == "stripe_customer_id"
    with pytest.raises(stripe.InvalidRequestError) as exc:
        make_metered(client)
    assert exc.value.param == "event_name"
    renamed = client.v1.billing.meters.update(m.meter, {"display_name": "Tokens (all models)"})
    assert renamed.display_name == "Tokens (all models)"
    off = client.v1.billing.meters.deactivate(m.meter)
    assert off.status == "inactive" and off.status_transitions.deactivated_at is not None
    assert [x.id for x in client.v1.billing.meters.list({"status": "inactive"}).data] == [m.meter]
    assert client.v1.billing.meters.reactivate(m.meter).status == "active"
    with pytest.raises(stripe.InvalidRequestError) as missing:
        client.v1.billing.meters.retrieve("mtr_nope")
    assert missing.value.http_status == 404


def test_identifier_dedupe(ls: LocalStripe, client: stripe.StripeClient) -> None:
    m = make_metered(client)
    first = send(client, m, 1500, identifier="req-1")
    assert isinstance(first, stripe.billing.MeterEvent) and first.identifier == "req-1"
    with pytest.raises(stripe.InvalidRequestError) as exc:
        send(client, m, 1500, identifier="req-1")
    assert exc.value.http_status == 400
    assert "An event already exists with identifier req-1" in str(exc.value.user_message)
    assert total(client, m, first.timestamp, first.timestamp + 1) == 1500
    # after 24 h (store clock) the identifier may be used again
    ls.advance_clock(24 * 3600 + 1)
    again = send(client, m, 10, identifier="req-1")
    assert again.identifier == "req-1"


def test_timestamp_window(ls: LocalStripe, client: stripe.StripeClient) -> None:
    m = make_metered(client)
    now = ls.now()
    with pytest.raises(stripe.InvalidRequestError) as past:
        send(client, m, 1, timestamp=now - 35 * 86400 - 60)
    assert (past.value.code, past.value.param) == ("timestamp_too_far_in_past", "timestamp")
    with pytest.raises(stripe.InvalidRequestError) as future:
        send(client, m, 1, timestamp=now + 600)
    assert future.value.code == "timestamp_in_future"
    assert send(client, m, 1, timestamp=now - 34 * 86400).timestamp == now - 34 * 86400
    assert send(client, m, 1, timestamp=now + 120).timestamp == now + 120


@pytest.mark.parametrize(
    "value,code",
    [
        ("12.5", "meter_event_invalid_value"),
        ("abc", "meter_event_invalid_value"),
        ("-3", "meter_event_invalid_value"),
        ("1234567890123456", "meter_event_value_too_many_digits"),
    ],
)
def test_payload_value_validation(client: stripe.StripeClient, value: str, code: str) -> None:
    m = make_metered(client)
    with pytest.raises(stripe.InvalidRequestError) as exc:
        send(client, m, value)
    assert (exc.value.code, exc.value.param) == (code, "payload[value]")


def test_fifteen_digits_accepted_exactly(client: stripe.StripeClient) -> None:
    m = make_metered(client)
    ev = send(client, m, "999999999999999")
    ev2 = send(client, m, "1")
    assert total(client, m, ev.timestamp, ev2.timestamp + 1) == 1_000_000_000_000_000


def test_unknown_customer_is_accepted_but_reported(ls: LocalStripe, client: stripe.StripeClient) -> None:
    m = make_metered(client)
    ev = client.v1.billing.meter_events.create(
        {"event_name": m.event_name, "payload": {"stripe_customer_id": "cus_ghost", "value": "5"}}
    )
    assert ev.identifier
    reports = ls.error_reports("meter_event_customer_not_found")
    assert [r["identifier"] for r in reports] == [ev.identifier]
    client.v1.billing.meter_events.create(
        {"event_name": "no_such_meter", "payload": {"stripe_customer_id": m.customer, "value": "5"}}
    )
    assert len(ls.error_reports("no_meter")) == 1


def test_summaries_hour_and_day(ls: LocalStripe, client: stripe.StripeClient) -> None:
    m = make_metered(client)
    now = ls.now()
    day0 = now - now % 86400 - 2 * 86400
    sent = [(day0 + 600, 100), (day0 + 1800, 200), (day0 + 5400, 50), (day0 + 86400 + 300, 7)]
    for ts, v in sent:
        send(client, m, v, timestamp=ts)
    hourly = client.v1.billing.meters.event_summaries.list(
        m.meter,
        {"customer": m.customer, "start_time": day0, "end_time": day0 + 2 * 86400, "value_grouping_window": "hour"},
    )
    expect_hour: dict[int, int] = {}
    for ts, v in sent:
        expect_hour[ts - ts % 3600] = expect_hour.get(ts - ts % 3600, 0) + v
    assert {s.start_time: s.aggregated_value for s in hourly.data} == expect_hour
    assert all(s.end_time - s.start_time == 3600 for s in hourly.data)
    daily = client.v1.billing.meters.event_summaries.list(
        m.meter,
        {"customer": m.customer, "start_time": day0, "end_time": day0 + 2 * 86400, "value_grouping_window": "day"},
    )
    assert {s.start_time: s.aggregated_value for s in daily.data} == {
        day0: sum(v for ts, v in sent if ts < day0 + 86400),
        day0 + 86400: sum(v for ts, v in sent if ts >= day0 + 86400),
    }
    # end is exclusive and times must be minute-aligned
    excl = client.v1.billing.meters.event_summaries.list(
        m.meter, {"customer": m.customer, "start_time": day0, "end_time": day0 + 1800}
    )
    assert excl.data[0].aggregated_value == 100
    with pytest.raises(stripe.InvalidRequestError) as exc:
        client.v1.billing.meters.event_summaries.list(
            m.meter, {"customer": m.customer, "start_time": day0 + 1, "end_time": day0 + 1800}
        )
    assert exc.value.param == "start_time"


@pytest.mark.parametrize("formula", ["count", "last"])
def test_count_and_last_formulas(ls: LocalStripe, client: stripe.StripeClient, formula: str) -> None:
    m = make_metered(client, formula=formula)
    now = ls.now()
    values = [(now - 300, 5), (now - 100, 9), (now - 200, 4)]
    for ts, v in values:
        send(client, m, v, timestamp=ts)
    expected = len(values) if formula == "count" else max(values)[1]
    assert total(client, m, now - 300, now) == expected


def test_adjustment_cancels_event(ls: LocalStripe, client: stripe.StripeClient) -> None:
    m = make_metered(client)
    keep = send(client, m, 40, identifier="keep")
    send(client, m, 60, identifier="drop-me")
    adj = client.v1.billing.meter_event_adjustments.create(
        {"event_name": m.event_name, "type": "cancel", "cancel": {"identifier": "drop-me"}}
    )
    assert isinstance(adj, stripe.billing.MeterEventAdjustment) and adj.cancel.identifier == "drop-me"
    assert total(client, m, keep.timestamp, keep.timestamp + 1) == 40
    send(client, m, 1, identifier="late")
    ls.advance_clock(24 * 3600 + 5)
    with pytest.raises(stripe.InvalidRequestError):  # older than 24 h: no longer cancellable
        client.v1.billing.meter_event_adjustments.create(
            {"event_name": m.event_name, "type": "cancel", "cancel": {"identifier": "late"}}
        )


def _iso(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).isoformat().replace("+00:00", "Z")


def test_v2_session_and_stream(ls: LocalStripe, client: stripe.StripeClient) -> None:
    m = make_metered(client)
    session = client.v2.billing.meter_event_session.create()
    assert session.object == "v2.billing.meter_event_session" and session.authentication_token
    expires = dt.datetime.fromisoformat(session.expires_at)
    assert (expires - dt.datetime.fromisoformat(session.created)).total_seconds() == 15 * 60
    stream = ls.stream_client(session.authentication_token)
    now = ls.now()
    events = [
        {
            "event_name": m.event_name,
            "identifier": f"s-{i}",
            "timestamp": _iso(now - 60 + i),
            "payload": {"stripe_customer_id": m.customer, "value": str(10 + i)},
        }
        for i in range(100)
    ]
    stream.v2.billing.meter_event_stream.create({"events": events})
    # a resend (new idempotency key) of the same identifiers is deduplicated
    stream.v2.billing.meter_event_stream.create({"events": events[:10]})
    assert total(client, m, now - 60, now + 40) == sum(10 + i for i in range(100))
    with pytest.raises(stripe.InvalidRequestError):
        stream.v2.billing.meter_event_stream.create({"events": events + [events[0]]})
    # async validation: bad value is accepted, then reported
    stream.v2.billing.meter_event_stream.create(
        {
            "events": [
                {
                    "event_name": m.event_name,
                    "identifier": "bad",
                    "payload": {"stripe_customer_id": m.customer, "value": "1.5"},
                }
            ]
        }
    )
    assert [r["identifier"] for r in ls.error_reports("meter_event_invalid_value")] == ["bad"]
    # the stream refuses API keys and, after 15 minutes, the session token
    with pytest.raises(stripe.AuthenticationError):
        ls.stream_client("sk_test_123").v2.billing.meter_event_stream.create({"events": events[:1]})
    ls.advance_clock(15 * 60 + 1)
    with pytest.raises(stripe.TemporarySessionExpiredError) as exc:
        stream.v2.billing.meter_event_stream.create({"events": events[:1]})
    assert exc.value.http_status == 401 and exc.value.code == "billing_meter_event_session_expired"


def test_v2_meter_event_and_adjustment(ls: LocalStripe, client: stripe.StripeClient) -> None:
    m = make_metered(client)
    ev = client.v2.billing.meter_events.create(
        {"event_name": m.event_name, "identifier": "v2-1", "payload": {"stripe_customer_id": m.customer, "value": "25"}}
    )
    assert ev.object == "v2.billing.meter_event" and ev.identifier == "v2-1"
    adj = client.v2.billing.meter_event_adjustments.create(
        {"event_name": m.event_name, "type": "cancel", "cancel": {"identifier": "v2-1"}}
    )
    assert adj.status == "complete"
    now = ls.now()
    assert total(client, m, now - 60, now) == 0


def test_auth_required(ls: LocalStripe) -> None:
    with pytest.raises(stripe.AuthenticationError):
        ls.client("rk_live_nope").v1.customers.list()
