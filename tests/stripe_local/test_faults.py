"""Idempotency keys and injected faults, observed through the SDK's own retry logic."""

from __future__ import annotations

import httpx
import pytest
import stripe

from devtools.stripe_local import LocalStripe
from tests.stripe_local.conftest import make_metered, send, total


def test_dropped_response_is_replayed_by_idempotency_key(ls: LocalStripe, client: stripe.StripeClient) -> None:
    m = make_metered(client)
    ls.faults.drop_response(path_prefix="/v1/billing/meter_events")
    ev = send(client, m, 700)  # no identifier: only the Idempotency-Key protects against a double count
    assert ev.last_response is not None
    assert ev.last_response.headers.get("Idempotent-Replayed") == "true"
    assert ls.faults.armed() == []
    assert len(ls.meter_events(m.event_name)) == 1
    assert total(client, m, ev.timestamp, ev.timestamp + 1) == 700


def test_dropped_response_without_retries_surfaces_connection_error(ls: LocalStripe) -> None:
    client = ls.client(max_network_retries=0)
    m = make_metered(client)
    ls.faults.drop_response(path_prefix="/v1/billing/meter_events")
    with pytest.raises(stripe.APIConnectionError):
        send(client, m, 5, identifier="lost-ack")
    # the request was committed although the client never saw the answer; a resend is a duplicate
    with pytest.raises(stripe.InvalidRequestError, match="An event already exists with identifier lost-ack"):
        send(client, m, 5, identifier="lost-ack")


def test_same_key_replays_and_different_params_conflict(ls: LocalStripe, client: stripe.StripeClient) -> None:
    m = make_metered(client)
    first = send(client, m, 3, options={"idempotency_key": "k-1"})
    again = send(client, m, 3, options={"idempotency_key": "k-1"})
    assert again.identifier == first.identifier
    assert again.last_response is not None and again.last_response.headers["Idempotent-Replayed"] == "true"
    with pytest.raises(stripe.IdempotencyError):
        send(client, m, 4, options={"idempotency_key": "k-1"})
    assert len(ls.meter_events(m.event_name)) == 1
    # a stored 400 is replayed too
    with pytest.raises(stripe.InvalidRequestError) as e1:
        send(client, m, "x", options={"idempotency_key": "k-2"})
    with pytest.raises(stripe.InvalidRequestError) as e2:
        send(client, m, "x", options={"idempotency_key": "k-2"})
    assert e2.value.headers is not None and e2.value.headers.get("Idempotent-Replayed") == "true"
    assert e1.value.code == e2.value.code
    # keys expire after 24 h of store time
    ls.advance_clock(24 * 3600 + 1)
    fresh = send(client, m, 3, options={"idempotency_key": "k-1"})
    assert fresh.identifier != first.identifier


def test_rate_limit_is_retried(ls: LocalStripe, client: stripe.StripeClient) -> None:
    ls.faults.rate_limit(count=2, path_prefix="/v1/customers")
    cus = client.v1.customers.create({"email": "x@example.com"})
    assert cus.id.startswith("cus_")
    ls.faults.rate_limit(count=1, path_prefix="/v1/customers")
    with pytest.raises(stripe.RateLimitError) as exc:
        ls.client(max_network_retries=0).v1.customers.create({"email": "y@example.com"})
    assert exc.value.http_status == 429 and exc.value.headers is not None
    assert exc.value.headers["Retry-After"] == "1"
    assert [c.email for c in client.v1.customers.list().data] == ["x@example.com"]


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors_are_retried(ls: LocalStripe, client: stripe.StripeClient, status: int) -> None:
    ls.faults.server_error(status=status)
    assert client.v1.customers.create({"name": "Grace"}).name == "Grace"
    ls.faults.server_error(status=status)
    with pytest.raises(stripe.APIError) as exc:
        ls.client(max_network_retries=0).v1.customers.list()
    assert exc.value.http_status == status


def test_hang_times_out_then_retry_succeeds(ls: LocalStripe) -> None:
    client = ls.client(timeout=0.4, max_network_retries=1)
    ls.faults.hang(3, path_prefix="/v1/customers")
    cus = client.v1.customers.create({"name": "Slow"})
    assert [c.id for c in client.v1.customers.list().data] == [cus.id]  # the hung request was not processed
    ls.faults.hang(3)
    with pytest.raises(stripe.APIConnectionError):
        ls.client(timeout=0.4, max_network_retries=0).v1.customers.list()


def test_test_endpoints_reject_unknown_fault_kind(ls: LocalStripe) -> None:
    resp = httpx.post(ls.url + "/_test/faults", json={"kind": "explode"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "kind"
