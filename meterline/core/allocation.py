"""Display rounding that adds up: split a rounded total over lines (largest remainder method).

An itemized statement shows each line to the cent. Rounding every line on its own can make the
lines add up to a cent or more less (or more) than the rounded total, and a customer who adds up
the invoice must get the total. So the total is rounded once (half-up, to the cent), each line is
rounded *down* to the cent, and the cents still missing go one each to the lines with the largest
remainders (ties: the earlier line). Every line then differs from its exact amount by less than
one cent, and the lines sum exactly to the rounded total.

Pure: Decimal in, Decimal out; no I/O. The exact amounts stay the source of truth (CSV, ClickHouse).
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import ROUND_FLOOR, ROUND_HALF_UP, Decimal

__all__ = ["CENT", "RULE", "allocate", "round_total"]

CENT = Decimal("0.01")

RULE = (
    "Line amounts are rounded so that they add up to the rounded total: the total is rounded "
    "half-up to the cent, every line is rounded down to the cent, and the cents left over go one "
    "each to the lines with the largest remainders (largest remainder method; ties go to the "
    "earlier line). Each line is within one cent of its exact amount, shown beside it."
)


def round_total(total: Decimal, quantum: Decimal = CENT) -> Decimal:
    """The one rounding of a total: half-up to ``quantum`` (a tiny negative amount gives 0.00, not -0.00)."""
    rounded = total.quantize(quantum, rounding=ROUND_HALF_UP)
    return abs(rounded) if rounded == 0 else rounded


def allocate(amounts: Sequence[Decimal], quantum: Decimal = CENT) -> list[Decimal]:
    """``amounts`` rounded to ``quantum`` so that they sum to ``round_total(sum(amounts))``.

    Works for negative amounts too (floors go towards -inf, remainders stay in [0, quantum)).
    """
    exact = [Decimal(a) for a in amounts]
    floors = [a.quantize(quantum, rounding=ROUND_FLOOR) for a in exact]
    target = round_total(sum(exact, Decimal(0)), quantum)
    missing = int((target - sum(floors, Decimal(0))) / quantum)
    # 0 <= missing <= len(amounts): the remainders sum to R in [0, n * quantum), and rounding R
    # half-up to the quantum gives a whole number of quanta in [0, n].
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - floors[i]), i))
    out = list(floors)
    for i in order[:missing]:
        out[i] += quantum
    return out
