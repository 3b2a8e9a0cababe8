"""Form parsing and the package's public surface."""

from __future__ import annotations

from decimal import Decimal

import devtools.stripe_local as pkg
from devtools.stripe_local._billing import exact_amount, round_cents
from devtools.stripe_local._params import parse_form


def test_public_surface() -> None:
    assert pkg.__all__ == ["Faults", "LocalStripe", "StripeServer"]


def test_bracket_notation() -> None:
    body = (
        "payload[value]=1500&payload[stripe_customer_id]=cus_1&items[0][price]=p1&items[1][price]=p2"
        "&items[1][quantity]=3&metadata[k]=v&expand[]=a&expand[]=b&tiers[0][up_to]=inf&empty="
    )
    assert parse_form(body) == {
        "payload": {"value": "1500", "stripe_customer_id": "cus_1"},
        "items": [{"price": "p1"}, {"price": "p2", "quantity": "3"}],
        "metadata": {"k": "v"},
        "expand": ["a", "b"],
        "tiers": [{"up_to": "inf"}],
        "empty": "",
    }


def test_rounding_is_once_per_line_half_up() -> None:
    price = {"billing_scheme": "per_unit", "unit_amount_decimal": "0.005"}
    assert exact_amount(price, Decimal(1)) == Decimal("0.005")
    assert round_cents(exact_amount(price, Decimal(100))) == 1  # 0.5 -> 1 (half-up)
    assert round_cents(exact_amount(price, Decimal(99))) == 0  # 0.495 -> 0


def test_every_stripe_route_has_its_parameter_list_and_the_list_matches_the_sdk() -> None:
    """stripe_params.json covers every /v1 and /v2 route the server serves, and regenerating it from
    the pinned SDK's spec-generated parameter types gives the same file (an SDK upgrade that changes
    a parameter list fails here until the file is regenerated and reviewed)."""
    import json

    from devtools.stripe_local._spec import PARAMS_FILE
    from devtools.stripe_local.gen_params import generate, served_routes

    stored = json.loads(PARAMS_FILE.read_text())
    assert set(served_routes()) == set(stored)
    assert generate(served_routes()) == stored
