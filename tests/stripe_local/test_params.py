"""Form parsing and the package's public surface."""

from __future__ import annotations

from decimal import Decimal

import meterline.stripe_local as pkg
from meterline.stripe_local._billing import exact_amount, round_cents
from meterline.stripe_local._params import parse_form


def test_public_surface() -> None:
    assert pkg.__all__ == ["Faults", "LocalStripe", "StripeServer"]


def test_bracket_notation() -> None:
    body = ("payload[value]=1500&payload[stripe_customer_id]=cus_1&items[0][price]=p1&items[1][price]=p2"
            "&items[1][quantity]=3&metadata[k]=v&expand[]=a&expand[]=b&tiers[0][up_to]=inf&empty=")
    assert parse_form(body) == {
        "payload": {"value": "1500", "stripe_customer_id": "cus_1"},
        "items": [{"price": "p1"}, {"price": "p2", "quantity": "3"}],
        "metadata": {"k": "v"}, "expand": ["a", "b"], "tiers": [{"up_to": "inf"}], "empty": ""}


def test_rounding_is_once_per_line_half_up() -> None:
    price = {"billing_scheme": "per_unit", "unit_amount_decimal": "0.005"}
    assert exact_amount(price, Decimal(1)) == Decimal("0.005")
    assert round_cents(exact_amount(price, Decimal(100))) == 1  # 0.5 -> 1 (half-up)
    assert round_cents(exact_amount(price, Decimal(99))) == 0  # 0.495 -> 0
