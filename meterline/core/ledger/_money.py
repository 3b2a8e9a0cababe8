"""The ledger's money and time helpers: amounts as integer picos (:mod:`meterline.core.money`), times as
epoch milliseconds.

One currency unit is ``PICOS_PER_UNIT`` (10**12) picos. ``parse_amount("10.00")`` is exactly
``10_000_000_000_000``; more than 12 decimals, floats, NaN and infinities are rejected. Times are
integer milliseconds since the Unix epoch (UTC); calendar periods are computed with integer
arithmetic only.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Literal

from meterline.core.errors import InputError
from meterline.core.money import PICOS_PER_UNIT, decimal_to_picos, format_picos, to_decimal

__all__ = ["PICOS_PER_UNIT", "format_picos", "to_decimal"]  # re-exported by meterline.core.ledger
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

Period = Literal["day", "month"]


class LedgerCommandError(InputError):
    """A ledger command (or one of its values) breaks the ledger's contract; never retried."""

    reason_code = "invalid_ledger_command"


def parse_amount(value: str | Decimal | int) -> int:
    """Money in currency units (``"10.00"``, ``Decimal("0.000001")``, ``3``) to integer picos.

    Raises LedgerCommandError(reason_code="invalid_amount") for floats, non-numbers, non-finite
    values and anything finer than 1e-12.
    """
    if isinstance(value, bool) or isinstance(value, float):
        raise LedgerCommandError("amounts must be str, Decimal or int, never float", reason_code="invalid_amount")
    if isinstance(value, int):
        return value * PICOS_PER_UNIT
    try:
        d = value if isinstance(value, Decimal) else Decimal(value.strip())
    except (InvalidOperation, AttributeError) as exc:
        raise LedgerCommandError(f"not a decimal amount: {value!r}", reason_code="invalid_amount") from exc
    if not d.is_finite():
        raise LedgerCommandError(f"amount must be finite: {value!r}", reason_code="invalid_amount")
    picos = decimal_to_picos(d)
    if picos is None:
        raise LedgerCommandError(f"more than 12 decimals: {value!r}", reason_code="invalid_amount")
    return picos


def to_ms(dt: datetime) -> int:
    """An aware datetime to integer epoch milliseconds (exact, no float)."""
    if dt.tzinfo is None:
        raise LedgerCommandError("datetimes must carry a timezone", reason_code="naive_datetime")
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def from_ms(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def period_key(ms: int, period: Period) -> str:
    """The UTC calendar period containing ``ms``: ``"2026-11-05"`` (day) or ``"2026-11"`` (month)."""
    dt = from_ms(ms)
    return f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}" if period == "day" else f"{dt.year:04d}-{dt.month:02d}"
