"""Exact values of the plans domain: amounts, token counts, instants, and the ONE rounding.

Units (the whole contract of this package):

- Money is integer **picos** (1e-12 currency unit), as everywhere in meterline
  (:mod:`meterline.core.money`: the scale and the picos <-> Decimal conversions). Plan files state
  amounts as Decimal currency units (``"200.00"``, at most 12 decimals) and overage rates as
  Decimal currency units **per million tokens** (at most 6 decimals, so a rate is a whole number of
  picos per token). Nothing is rounded on the way in: a more precise value is rejected.
- Two rules *define* a value at pico (or whole-token) resolution: a proration (``fee × s / S``)
  and a multiplier over the customer's charge. Both are resolved to the nearest pico / token,
  ties to even (:func:`define_share`), the same argument as ``RateCard.charge_picos``: a price
  definition at 1e-12, not a rounding of money. Every other step is integer arithmetic.
- A bill's total is rounded to the currency's minor unit exactly once, in :func:`round_total`.
- Subscription instants are integer seconds since the Unix epoch (UTC): proration is by seconds,
  so a sub-second instant is rejected rather than silently truncated.

Nothing in this package touches ``float``.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

from meterline.core import money
from meterline.core.errors import InputError

MAX_AMOUNT = Decimal(10) ** 12  # sanity cap on any fee / cap / commitment / allowance amount
MAX_TOKENS = 10**18  # sanity cap on any token count in a plan file
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# ISO 4217 minor units that differ from 2 (the default). Rounding happens once, at the total.
_MINOR_UNITS: dict[str, int] = {
    **{
        c: 0
        for c in (
            "BIF",
            "CLP",
            "DJF",
            "GNF",
            "ISK",
            "JPY",
            "KMF",
            "KRW",
            "PYG",
            "RWF",
            "UGX",
            "UYI",
            "VND",
            "VUV",
            "XAF",
            "XOF",
            "XPF",
        )
    },
    **{c: 3 for c in ("BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND")},
}


class PlanFileError(InputError):
    """A plan catalog file (or a ``plans`` topic record) that cannot be loaded."""

    reason_code = "invalid_plan_file"


class SubscriptionError(InputError):
    """A subscription fact that breaks the timeline's rules (e.g. a change with no subscription)."""

    reason_code = "invalid_subscription"


# --------------------------------------------------------------------------- parsing


def to_decimal(value: Any, *, where: str) -> Decimal:
    """A non-negative finite Decimal from an int, Decimal or numeric string; floats are refused."""
    if isinstance(value, (bool, float)):
        raise PlanFileError(
            f'{where}: {value!r} is a binary float; write the amount as a quoted decimal string, e.g. "2.50"',
            field=where,
        )
    if isinstance(value, int):
        d = Decimal(value)
    elif isinstance(value, Decimal):
        d = value
    elif isinstance(value, str):
        try:
            d = Decimal(value.strip().replace("_", ""))
        except InvalidOperation:
            raise PlanFileError(f"{where}: {value!r} is not a decimal number", field=where) from None
    else:
        raise PlanFileError(f"{where}: expected a decimal number, got {type(value).__name__}", field=where)
    if not d.is_finite():
        raise PlanFileError(f"{where}: {value!r} is not a finite number", field=where)
    if d < 0:
        raise PlanFileError(f"{where}: {value!r} is negative", field=where)
    return d


def scaled_int(d: Decimal, places: int, *, where: str, what: str) -> int:
    """``d × 10**places`` as an exact int; more than ``places`` decimals is a PlanFileError."""
    sign, digits, exp = d.as_tuple()
    assert isinstance(exp, int)
    n = int("".join(map(str, digits)) or "0")
    shift = exp + places
    if shift >= 0:
        n *= 10**shift
    else:
        q, r = divmod(n, int(10 ** (-shift)))
        if r:
            raise PlanFileError(
                f"{where}: {format(d, 'f')} has more than {places} decimal places {what}; plans are exact and never round",
                field=where,
            )
        n = q
    return -n if sign else n


def amount_picos(value: Any, *, where: str) -> int:
    """A money amount in currency units -> integer picos (at most 12 decimals)."""
    d = to_decimal(value, where=where)
    if d > MAX_AMOUNT:
        raise PlanFileError(f"{where}: {value!r} is above the sanity limit of {MAX_AMOUNT}", field=where)
    return scaled_int(d, 12, where=where, what="(the limit is 12)")


def per_million_picos(value: Any, *, where: str) -> int:
    """A rate per million tokens -> integer picos per token (at most 6 decimals)."""
    d = to_decimal(value, where=where)
    if d > Decimal(1_000_000):
        raise PlanFileError(f"{where}: {value!r} is above the sanity limit of 1000000 per million", field=where)
    return scaled_int(d, 6, where=where, what="per million tokens (the limit is 6)")


def multiplier_of(value: Any, *, where: str) -> Fraction:
    """A multiplier (at most 6 decimals, at most 1000) as an exact Fraction."""
    d = to_decimal(value, where=where)
    if d > 1000:
        raise PlanFileError(f"{where}: {value!r} is above the sanity limit of 1000", field=where)
    return Fraction(scaled_int(d, 6, where=where, what="(the limit is 6)"), 10**6)


def token_count(value: Any, *, where: str, allow_zero: bool = False) -> int:
    """A whole, positive (or zero) number of tokens; strings of digits are accepted."""
    if isinstance(value, bool) or isinstance(value, float):
        raise PlanFileError(f"{where}: expected a whole number of tokens, got {value!r}", field=where)
    if isinstance(value, (str, Decimal)):
        try:
            d = Decimal(str(value).strip().replace("_", ""))
        except InvalidOperation:
            raise PlanFileError(f"{where}: {value!r} is not a whole number of tokens", field=where) from None
        if not d.is_finite() or d != d.to_integral_value():
            raise PlanFileError(f"{where}: {value!r} is not a whole number of tokens", field=where)
        value = int(d)
    if not isinstance(value, int):
        raise PlanFileError(f"{where}: expected a whole number of tokens, got {type(value).__name__}", field=where)
    if value < 0 or (value == 0 and not allow_zero) or value > MAX_TOKENS:
        raise PlanFileError(f"{where}: {value} is out of range (1..{MAX_TOKENS})", field=where)
    return value


def parse_instant(value: Any, *, where: str, error: type[InputError] = PlanFileError) -> int:
    """ISO-8601 text (or an aware datetime) with a timezone and whole seconds -> epoch seconds."""
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.strip())
        except ValueError:
            raise error(
                f"{where}: {value!r} is not an ISO-8601 timestamp (e.g. 2026-01-01T00:00:00Z)", field=where
            ) from None
    else:
        raise error(f"{where}: expected an ISO-8601 timestamp string, got {type(value).__name__}", field=where)
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise error(f"{where}: {value!r} has no timezone; write e.g. 2026-01-01T00:00:00Z", field=where)
    if dt.microsecond:
        raise error(f"{where}: {value!r} is finer than a second (plans prorate by whole seconds)", field=where)
    delta = dt.astimezone(UTC) - _EPOCH
    return delta.days * 86_400 + delta.seconds


def format_instant(seconds: int) -> str:
    """Epoch seconds -> ``2026-01-01T00:00:00Z``."""
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def instant_of(dt: datetime) -> int:
    """An aware datetime -> epoch seconds (sub-second part dropped: callers pass whole seconds)."""
    delta = dt.astimezone(UTC) - _EPOCH
    return delta.days * 86_400 + delta.seconds


# --------------------------------------------------------------------------- money out


def define_share(whole: int, num: int, den: int) -> int:
    """``whole × num / den`` to the nearest integer, ties to even: a *definition* at pico (or
    token) resolution used by proration and multipliers, never a rounding of money."""
    return round(Fraction(whole * num, den))


def minor_unit(currency: str) -> int:
    return _MINOR_UNITS.get(currency.upper(), 2)


def round_total(picos: int, currency: str) -> Decimal:
    """THE rounding: an exact bill total in picos -> currency units at the currency's minor unit,
    half away from zero (what Stripe and ``meterline statement`` do)."""
    places = minor_unit(currency)
    return money.to_decimal(picos).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)


def short_hash(payload: Any) -> str:
    """First 12 hex digits of the SHA-256 of the canonical JSON of ``payload``."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def canon(d: Decimal) -> str:
    """Canonical text of a Decimal ('5.00' and '5' both give '5'; never an exponent)."""
    s = format(d, "f")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return "0" if s in ("", "-0") else s


def picos_text(picos: int) -> str:
    """Canonical text of a pico amount in currency units (used in records and hashes)."""
    return canon(money.to_decimal(picos))


def per_million_text(picos_per_token: int) -> str:
    return canon(Decimal(picos_per_token).scaleb(-6))


def fraction_text(f: Fraction) -> str:
    """An exact decimal text of a Fraction whose denominator divides a power of ten."""
    d = Decimal(f.numerator) / Decimal(f.denominator)
    return canon(d)
