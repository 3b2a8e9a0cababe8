"""Value types of the pricing domain and the exact unit conversions they rest on.

Units (the whole contract of this package):

- A price file states rates as :class:`~decimal.Decimal` currency units **per million tokens**.
- Internally every rate is an integer number of **picos per token** (1 pico = 1e-12 currency
  unit): ``$5.00 / M = 5e-6 $/token = 5_000_000 picos/token``. The conversion is exact, so a
  rate may carry at most 6 decimal places per million; more precision is rejected, never rounded.
- A per-request fee is a Decimal per request with at most 12 decimal places (integer picos).
- A cost is an integer number of picos (= ClickHouse ``Decimal(38, 12)`` exactly). Costs are never
  rounded here; rounding to the invoice's minor unit happens once, at invoicing.

Nothing in this package touches ``float``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

from meterline.core.errors import PriceFileError

PICOS_PER_TOKEN_PER_UNIT_PER_MILLION = 10**6  # 1 unit / M tokens = 1e6 picos / token

# Sanity cap on any rate per million tokens and on a request fee (keeps every event cost far
# inside ClickHouse Decimal(38, 12) even at 10**12 tokens).
MAX_AMOUNT = Decimal(1_000_000)

BASE_CLASSES: tuple[str, ...] = ("input", "output", "cached_input", "cache_write", "reasoning")
#: Classes UsageEvent v2 added (long-retention cache writes, audio, separately reported images).
EXTRA_CLASSES: tuple[str, ...] = ("cache_write_long", "input_audio", "output_audio", "input_image", "output_image")
TOKEN_CLASSES: tuple[str, ...] = (*BASE_CLASSES, *EXTRA_CLASSES)
REQUIRED_CLASSES: frozenset[str] = frozenset({"input", "output"})
#: A class whose rate the price does not state is priced at this other class's rate. Reasoning
#: tokens are output tokens; image input is billed as input by the chat models that report it.
#: Every other absent class is "no price" (``no_rate_for_token_class``), never 0.
CLASS_FALLBACK: dict[str, str] = {"reasoning": "output", "input_image": "input"}
#: Per-call tool fees a price may state (``tool_fees``), by name; each counts one event field.
TOOL_FEES: tuple[str, ...] = ("web_search",)
# Token class / tool fee -> the usage record field that counts it.
CLASS_TO_FIELD: dict[str, str] = {
    "input": "input_tokens",
    "output": "output_tokens",
    "cached_input": "cached_input_tokens",
    "cache_write": "cache_write_tokens",
    "reasoning": "reasoning_tokens",
    "cache_write_long": "cache_write_long_tokens",
    "input_audio": "input_audio_tokens",
    "output_audio": "output_audio_tokens",
    "input_image": "input_image_tokens",
    "output_image": "output_image_tokens",
    "web_search": "web_search_requests",
}
#: The record fields priced by the "extra" part of an engine entry, in entry order.
EXTRA_RATED: tuple[str, ...] = (*EXTRA_CLASSES, *TOOL_FEES)
EXTRA_FIELDS: tuple[str, ...] = tuple(CLASS_TO_FIELD[c] for c in EXTRA_RATED)


# --------------------------------------------------------------------------- exact conversions


def to_decimal(value: Any, *, where: str) -> Decimal:
    """A non-negative finite Decimal from an int, a Decimal or a numeric string; else PriceFileError.

    ``float`` and ``bool`` are refused: a binary float cannot say which decimal it meant (the
    loaders turn YAML/JSON float *text* into Decimal before it gets here).
    """
    if isinstance(value, bool) or isinstance(value, float):
        raise PriceFileError(
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
            raise PriceFileError(f"{where}: {value!r} is not a decimal number", field=where) from None
    else:
        raise PriceFileError(f"{where}: expected a decimal number, got {type(value).__name__}", field=where)
    if not d.is_finite():
        raise PriceFileError(f"{where}: {value!r} is not a finite number", field=where)
    if d < 0:
        raise PriceFileError(f"{where}: {value!r} is negative", field=where)
    return d


def scaled_int(d: Decimal, places: int, *, where: str, what: str) -> int:
    """``d × 10**places`` as an exact int, or PriceFileError if ``d`` has more than ``places`` decimals."""
    sign, digits, exp = d.as_tuple()
    assert isinstance(exp, int)
    n: int = int("".join(map(str, digits)) or "0")
    shift = exp + places
    if shift >= 0:
        n *= int(10**shift)
    else:
        q, r = divmod(n, 10**-shift)
        if r:
            raise PriceFileError(
                f"{where}: {format(d, 'f')} has more than {places} decimal places {what}; "
                f"meterline prices exactly and does not round rates",
                field=where,
            )
        n = q
    return -n if sign else n


def per_million_to_picos(d: Decimal, *, where: str) -> int:
    """Per-million rate -> integer picos per token (exact; > 6 decimals is a PriceFileError)."""
    return scaled_int(d, 6, where=where, what="per million tokens (the limit is 6)")


def fee_to_picos(d: Decimal, *, where: str) -> int:
    """Per-request fee -> integer picos per request (exact; > 12 decimals is a PriceFileError)."""
    return scaled_int(d, 12, where=where, what="per request (the limit is 12)")


def canon(d: Decimal) -> str:
    """Canonical text of a Decimal: '5.00' and '5' both give '5'; never an exponent."""
    s = format(d, "f")  # exact: formatting uses no context precision (normalize() would round)
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return "0" if s in ("", "-0") else s


def picos_to_per_million(picos: int) -> Decimal:
    """Inverse of :func:`per_million_to_picos` (exact)."""
    return Decimal(picos).scaleb(-6)


def parse_timestamp(value: Any, *, where: str) -> datetime:
    """An aware UTC datetime with whole milliseconds from ISO-8601 text (or an aware datetime)."""
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.strip())
        except ValueError:
            raise PriceFileError(
                f"{where}: {value!r} is not an ISO-8601 timestamp (e.g. 2024-05-13T00:00:00Z)", field=where
            ) from None
    else:
        raise PriceFileError(f"{where}: expected an ISO-8601 timestamp string, got {type(value).__name__}", field=where)
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise PriceFileError(f"{where}: {value!r} has no timezone; write e.g. 2024-05-13T00:00:00Z", field=where)
    dt = dt.astimezone(UTC)
    if dt.microsecond % 1000:
        raise PriceFileError(f"{where}: {value!r} is finer than a millisecond", field=where)
    return dt


def epoch_ms(dt: datetime) -> int:
    """Milliseconds since the Unix epoch of an aware datetime (exact integer arithmetic)."""
    delta = dt - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def format_timestamp(dt: datetime) -> str:
    """``2024-05-13T00:00:00Z`` (``.123`` milliseconds only when non-zero)."""
    base = dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    ms = dt.microsecond // 1000
    return f"{base}.{ms:03d}Z" if ms else f"{base}Z"


def short_hash(payload: Any) -> str:
    """First 8 hex digits of the SHA-256 of the canonical JSON of ``payload``."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return hashlib.sha256(blob).hexdigest()[:8]


# --------------------------------------------------------------------------- value types


@dataclass(frozen=True, slots=True)
class Rates:
    """List rates per million tokens (Decimal) and per request.

    ``input``/``output`` are required. ``reasoning`` absent means "the output rate".
    ``cached_input``/``cache_write`` absent means "no price": an event that *has* tokens of that
    class is unpriceable (``no_rate_for_token_class``) rather than priced at 0.
    """

    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None
    cache_write: Decimal | None = None
    reasoning: Decimal | None = None
    request_fee: Decimal = Decimal(0)
    cache_write_long: Decimal | None = None
    input_audio: Decimal | None = None
    output_audio: Decimal | None = None
    input_image: Decimal | None = None
    output_image: Decimal | None = None
    tool_fees: tuple[tuple[str, Decimal], ...] = ()  # (fee name, per call), sorted by name

    def get(self, cls: str) -> Decimal | None:
        return getattr(self, cls)  # type: ignore[no-any-return]

    def tool_fee(self, name: str) -> Decimal | None:
        for k, v in self.tool_fees:
            if k == name:
                return v
        return None

    def extra_picos(self) -> tuple[int | None, ...]:
        """List picos of :data:`EXTRA_RATED` (per token, then per tool call); None = no price.

        An absent class with a :data:`CLASS_FALLBACK` takes that class's rate.
        """
        w = "rates"
        out: list[int | None] = []
        for cls in EXTRA_CLASSES:
            v = self.get(cls)
            if v is None and cls in CLASS_FALLBACK:
                v = self.get(CLASS_FALLBACK[cls])
            out.append(None if v is None else per_million_to_picos(v, where=w))
        for name in TOOL_FEES:
            fee = self.tool_fee(name)
            out.append(None if fee is None else fee_to_picos(fee, where=w))
        return tuple(out)

    def per_million(self) -> dict[str, str]:
        """The stated (not defaulted) rates as canonical strings, by token class."""
        out: dict[str, str] = {}
        for cls in TOKEN_CLASSES:
            v = self.get(cls)
            if v is not None:
                out[cls] = canon(v)
        return out

    def picos(self) -> tuple[int, int, int | None, int | None, int, int]:
        """(input, output, cached_input, cache_write, reasoning, request_fee) in integer picos."""
        w = "rates"
        out = per_million_to_picos(self.output, where=w)
        return (
            per_million_to_picos(self.input, where=w),
            out,
            None if self.cached_input is None else per_million_to_picos(self.cached_input, where=w),
            None if self.cache_write is None else per_million_to_picos(self.cache_write, where=w),
            out if self.reasoning is None else per_million_to_picos(self.reasoning, where=w),
            fee_to_picos(self.request_fee, where=w),
        )


def parse_rates(
    per_million: Any, request_fee: Any, *, where: str, require_io: bool = True
) -> dict[str, Decimal | None]:
    """Validate a ``per_million`` mapping (+ optional fee) and return Decimal values by class.

    Keys outside :data:`TOKEN_CLASSES` are rejected, as are values that are negative, floats, or
    more precise than 6 decimals per million (or 12 per request for the fee).
    """
    if not isinstance(per_million, Mapping):
        raise PriceFileError(
            f"{where}.per_million: expected a mapping of token class to rate", field=f"{where}.per_million"
        )
    out: dict[str, Decimal | None] = {}
    for key, raw in per_million.items():
        fw = f"{where}.per_million.{key}"
        if key not in TOKEN_CLASSES:
            raise PriceFileError(f"{fw}: unknown token class {key!r}; known: {', '.join(TOKEN_CLASSES)}", field=fw)
        d = to_decimal(raw, where=fw)
        per_million_to_picos(d, where=fw)
        if d > MAX_AMOUNT:
            raise PriceFileError(f"{fw}: {raw!r} is above the sanity limit of {MAX_AMOUNT} per million", field=fw)
        out[key] = d
    if require_io:
        for key in ("input", "output"):
            if key not in out:
                raise PriceFileError(f"{where}.per_million.{key}: required", field=f"{where}.per_million.{key}")
    if request_fee is not None:
        fw = f"{where}.request_fee"
        d = to_decimal(request_fee, where=fw)
        fee_to_picos(d, where=fw)
        if d > MAX_AMOUNT:
            raise PriceFileError(f"{fw}: {request_fee!r} is above the sanity limit of {MAX_AMOUNT}", field=fw)
        out["request_fee"] = d
    return out


@dataclass(frozen=True, slots=True)
class PriceVersion:
    """One list price of one model, in force from ``effective_from`` until the next version's.

    ``version_id`` is deterministic: ``provider/model[:model_version]@<effective_from>#<hash8>``
    where the hash covers everything that affects a price (not the aliases).
    """

    provider: str
    model: str
    model_version: str | None
    effective_from: datetime
    rates: Rates
    currency: str
    aliases: tuple[str, ...] = ()
    service_tier: str | None = None  # None = the standard tier
    version_id: str = field(init=False)
    effective_ms: int = field(init=False)

    def __post_init__(self) -> None:
        name = f"{self.provider}/{self.model}" + (f":{self.model_version}" if self.model_version is not None else "")
        if self.service_tier is not None:
            name += f"~{self.service_tier}"
        ts = format_timestamp(self.effective_from)
        hashed: dict[str, Any] = {
            "provider": self.provider,
            "model": self.model,
            "model_version": self.model_version,
            "effective_from": ts,
            "currency": self.currency,
            "per_million": self.rates.per_million(),
            "request_fee": canon(self.rates.request_fee),
        }
        # Only when set, so the ids of prices without them are what they always were.
        if self.service_tier is not None:
            hashed["service_tier"] = self.service_tier
        if self.rates.tool_fees:
            hashed["tool_fees"] = {k: canon(v) for k, v in self.rates.tool_fees}
        digest = short_hash(hashed)
        object.__setattr__(self, "version_id", f"{name}@{ts}#{digest}")
        object.__setattr__(self, "effective_ms", epoch_ms(self.effective_from))

    @property
    def model_key(self) -> tuple[str, str, str | None]:
        return (self.provider, self.model, self.model_version)

    @property
    def lookup_key(self) -> tuple[str, str, str | None, str | None]:
        """(provider, model, model_version, service_tier): one price timeline."""
        return (self.provider, self.model, self.model_version, self.service_tier)

    def to_json(self) -> dict[str, Any]:
        """The canonical dict of this version (the ``prices`` topic value and the file entry)."""
        d: dict[str, Any] = {
            "provider": self.provider,
            "model": self.model,
            "effective_from": format_timestamp(self.effective_from),
            "per_million": self.rates.per_million(),
        }
        if self.model_version is not None:
            d["model_version"] = self.model_version
        if self.aliases:
            d["aliases"] = list(self.aliases)
        if self.rates.request_fee:
            d["request_fee"] = canon(self.rates.request_fee)
        if self.rates.tool_fees:
            d["tool_fees"] = {k: canon(v) for k, v in self.rates.tool_fees}
        if self.service_tier is not None:
            d["service_tier"] = self.service_tier
        return d


@dataclass(frozen=True, slots=True)
class Override:
    """Customer rates that replace the marked-up list rates of one model (per stated class)."""

    provider: str
    model: str
    model_version: str | None
    rates: Mapping[str, Decimal]  # token class (or "request_fee") -> Decimal

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "provider": self.provider,
            "model": self.model,
            "per_million": {k: canon(v) for k, v in sorted(self.rates.items()) if k != "request_fee"},
        }
        if self.model_version is not None:
            d["model_version"] = self.model_version
        if "request_fee" in self.rates:
            d["request_fee"] = canon(self.rates["request_fee"])
        return d


@dataclass(frozen=True, slots=True)
class RateCard:
    """How one customer (or ``"*"``, everyone without a card) is charged relative to list price.

    The charge rate per token is ``list × (1 + markup_pct/100)`` or ``list × (1 − discount_pct/100)``,
    *defined* once (see :meth:`charge_picos`) as integer picos per token. Overrides replace that
    rate for the classes they state, for every price version of the model they name.
    """

    customer_id: str
    markup_pct: Decimal = Decimal(0)
    discount_pct: Decimal = Decimal(0)
    overrides: tuple[Override, ...] = ()
    card_id: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "card_id", f"{self.customer_id}#{short_hash(self.to_json())}")

    @property
    def factor(self) -> Fraction:
        """The exact multiplier applied to list rates."""
        if self.discount_pct:
            return 1 - Fraction(self.discount_pct) / 100
        return 1 + Fraction(self.markup_pct) / 100

    def charge_picos(self, list_picos: int) -> int:
        """Define the customer's rate from a list rate: ``list × factor`` to the nearest integer
        pico per token (ties to even).

        This is a *price definition* at 1e-6 currency units per million tokens, resolved once per
        (card, price version), not a rounding of money: every charge is then exact integer
        arithmetic on that defined rate.
        """
        return round(list_picos * self.factor)

    def override_for(self, provider: str, model: str, model_version: str | None) -> Override | None:
        """Most specific override: exact (provider, model, version), then (provider, model, None)."""
        generic = None
        for o in self.overrides:
            if o.provider == provider and o.model == model:
                if o.model_version == model_version and model_version is not None:
                    return o
                if o.model_version is None:
                    generic = o
        return generic

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"customer_id": self.customer_id}
        if self.discount_pct:
            d["discount_pct"] = canon(self.discount_pct)
        else:
            d["markup_pct"] = canon(self.markup_pct)
        d["overrides"] = [o.to_json() for o in self.overrides]
        return d


DEFAULT_CARD_ID = "*"
# Charge = cost; used when neither the customer nor "*" has a card. Its id is the plain "none".
NO_CARD = RateCard(customer_id="*")
object.__setattr__(NO_CARD, "card_id", "none")
