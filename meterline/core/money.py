"""Money, exactly: integer picos inside, Decimal at the edges, one rounding at invoicing.

One currency unit is ``PICOS_PER_UNIT`` (10**12) picos. Every price, cost, charge, balance and sum in
meterline is an integer number of picos, so arithmetic is exact and order-independent; ClickHouse
stores the same values as ``Decimal(38, 12)``. Rounding to a currency's minor unit happens once, at
invoicing (Stripe jobs, bills), never here.

This module is the one definition of the scale and of the conversions; pricing, the ledger, plans
and the sinks import it.
"""

from __future__ import annotations

from decimal import Context, Decimal, Inexact, InvalidOperation

MONEY_SCALE = 12
PICOS_PER_UNIT: int = 10**MONEY_SCALE

# Exact context for conversions: 38 digits (ClickHouse Decimal(38, 12)); an inexact result raises.
_EXACT = Context(prec=60, traps=[Inexact, InvalidOperation])


def to_decimal(picos: int) -> Decimal:
    """Integer picos to an exact Decimal in currency units."""
    return Decimal(int(picos)).scaleb(-MONEY_SCALE, _EXACT)


def format_picos(picos: int) -> str:
    """Integer picos to a Decimal string with at least 2 and at most 12 decimals (``"10.00"``)."""
    d = to_decimal(picos).normalize(_EXACT)
    exponent = d.as_tuple().exponent
    if isinstance(exponent, int) and exponent > -2:
        d = d.quantize(Decimal("0.01"))
    return f"{d:f}"


def decimal_to_picos(value: Decimal) -> int | None:
    """An exact Decimal in currency units to integer picos; None if it is not finite or is finer
    than 1e-12 (callers turn that into their own error)."""
    if not value.is_finite():
        return None
    scaled = value.scaleb(MONEY_SCALE, _EXACT)
    if scaled != scaled.to_integral_value():
        return None
    return int(scaled)
