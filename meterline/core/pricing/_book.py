"""Loading, validating and publishing a price book (list prices + rate cards).

The file format (YAML or JSON, same structure) is documented in ``docs/pricing.md``. Every
problem is a :class:`~meterline.core.errors.PriceFileError` whose ``field`` says where, e.g.
``prices[3].per_million.cached_input`` or ``rate_cards[acme].markup_pct``.

Numbers: integers and numeric strings are taken as written. YAML/JSON *floats* are read from
their original text (``5.0`` → ``Decimal("5.0")``), never through a binary float, so they are
exact too; quoting amounts is still the recommended style.

Publishing: :meth:`PriceBook.to_records` gives the deterministic (key, JSON value) pairs of the
compacted ``prices`` topic; :meth:`PricingEngine.apply_record` consumes them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from meterline.core.errors import PriceFileError
from meterline.core.naming import normalize_service_tier
from meterline.core.pricing._model import (
    MAX_AMOUNT,
    TOOL_FEES,
    Override,
    PriceVersion,
    RateCard,
    Rates,
    fee_to_picos,
    parse_rates,
    parse_timestamp,
    to_decimal,
)

MAX_NAME_LEN = 128
_CURRENCY_RE = re.compile(r"^[A-Z]{3}$")
_PRICE_KEYS = frozenset(
    {
        "provider",
        "model",
        "model_version",
        "aliases",
        "effective_from",
        "per_million",
        "request_fee",
        "tool_fees",
        "service_tier",
    }
)
_CARD_KEYS = frozenset({"customer_id", "markup_pct", "discount_pct", "overrides"})
_OVERRIDE_KEYS = frozenset({"provider", "model", "model_version", "per_million", "request_fee"})
_TOP_KEYS = frozenset({"currency", "prices", "rate_cards"})

PRICE_KEY_PREFIX = "price:"
CARD_KEY_PREFIX = "card:"


# --------------------------------------------------------------------------- YAML / JSON reading


class _ExactLoader(yaml.SafeLoader):
    """SafeLoader that keeps float scalars as Decimal (from their text) and timestamps as text,
    and rejects a mapping that repeats a key (plain YAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int)) and key in seen:
                line = key_node.start_mark.line + 1
                raise PriceFileError(f"line {line}: duplicate key {key!r}", field=f"line {line}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    text = str(loader.construct_scalar(node))
    try:
        d = Decimal(text.replace("_", ""))
    except Exception:
        d = None
    if d is None or not d.is_finite():
        raise PriceFileError(
            f'line {node.start_mark.line + 1}: {text!r} is not a finite decimal number; quote amounts, e.g. "2.50"',
            field=f"line {node.start_mark.line + 1}",
        )
    return d


def _construct_timestamp(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    return str(loader.construct_scalar(node))


_ExactLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)
_ExactLoader.add_constructor("tag:yaml.org,2002:timestamp", _construct_timestamp)


def _read(source: str | Path | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source
    is_json = False
    if isinstance(source, Path) or ("\n" not in source and source.rstrip().endswith((".yaml", ".yml", ".json"))):
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PriceFileError(f"cannot read price file {path}: {exc}", field="source") from None
        is_json = path.suffix.lower() == ".json"
    else:
        text = source
    is_json = is_json or text.lstrip().startswith("{")
    try:
        data = json.loads(text, parse_float=Decimal) if is_json else yaml.load(text, Loader=_ExactLoader)
    except (ValueError, yaml.YAMLError) as exc:
        raise PriceFileError(
            f"price file is not valid {'JSON' if is_json else 'YAML'}: {exc}", field="source"
        ) from None
    if not isinstance(data, Mapping):
        raise PriceFileError("price file: the top level must be a mapping with 'currency' and 'prices'", field="source")
    return data


# --------------------------------------------------------------------------- entry parsing


def _name(entry: Mapping[str, Any], key: str, where: str, *, optional: bool = False) -> str | None:
    v = entry.get(key)
    fw = f"{where}.{key}"
    if v is None:
        if optional:
            return None
        raise PriceFileError(f"{fw}: required", field=fw)
    return _check_name(v, fw)


def _check_name(v: Any, fw: str) -> str:
    if not isinstance(v, str) or not v.strip() or len(v) > MAX_NAME_LEN or v != v.strip():
        raise PriceFileError(
            f"{fw}: expected a non-empty string of at most {MAX_NAME_LEN} characters without surrounding "
            f'spaces, got {v!r} (quote values such as versions: "20241022")',
            field=fw,
        )
    return v


def _check_keys(entry: Any, allowed: frozenset[str], where: str) -> Mapping[str, Any]:
    if not isinstance(entry, Mapping):
        raise PriceFileError(f"{where}: expected a mapping", field=where)
    unknown = sorted(str(k) for k in entry if k not in allowed)
    if unknown:
        raise PriceFileError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}", field=where
        )
    return entry


def parse_currency(value: Any, where: str = "currency") -> str:
    if not isinstance(value, str) or not _CURRENCY_RE.match(value):
        raise PriceFileError(f"{where}: expected an ISO 4217 code such as USD, got {value!r}", field=where)
    return value


def parse_price(entry: Any, *, currency: str, where: str) -> PriceVersion:
    """One ``prices[]`` entry -> :class:`PriceVersion` (PriceFileError on any defect)."""
    e = _check_keys(entry, _PRICE_KEYS, where)
    provider = _name(e, "provider", where)
    model = _name(e, "model", where)
    mv = _name(e, "model_version", where, optional=True)
    raw_aliases = e.get("aliases") or []
    if not isinstance(raw_aliases, list):
        raise PriceFileError(f"{where}.aliases: expected a list of model names", field=f"{where}.aliases")
    aliases = tuple(_check_name(a, f"{where}.aliases[{i}]") for i, a in enumerate(raw_aliases))
    if model in aliases or len(set(aliases)) != len(aliases):
        raise PriceFileError(f"{where}.aliases: repeats a name or the model itself", field=f"{where}.aliases")
    if "effective_from" not in e:
        raise PriceFileError(f"{where}.effective_from: required", field=f"{where}.effective_from")
    eff = parse_timestamp(e["effective_from"], where=f"{where}.effective_from")
    r = parse_rates(e.get("per_million"), e.get("request_fee"), where=where)
    rates = Rates(
        input=r["input"],  # type: ignore[arg-type]
        output=r["output"],  # type: ignore[arg-type]
        cached_input=r.get("cached_input"),
        cache_write=r.get("cache_write"),
        reasoning=r.get("reasoning"),
        request_fee=r.get("request_fee") or Decimal(0),
        cache_write_long=r.get("cache_write_long"),
        input_audio=r.get("input_audio"),
        output_audio=r.get("output_audio"),
        input_image=r.get("input_image"),
        output_image=r.get("output_image"),
        tool_fees=_tool_fees(e.get("tool_fees"), where=where),
    )
    tier_name = _name(e, "service_tier", where, optional=True)
    tier = normalize_service_tier(tier_name)
    if tier_name is not None and tier != tier_name:
        raise PriceFileError(
            f"{where}.service_tier: write the tier as the engine names it ({tier!r}; the standard tier is "
            "written by leaving service_tier out)",
            field=f"{where}.service_tier",
        )
    assert provider is not None and model is not None
    return PriceVersion(provider, model, mv, eff, rates, currency, tuple(sorted(aliases)), tier)


def _tool_fees(raw: Any, *, where: str) -> tuple[tuple[str, Decimal], ...]:
    """``tool_fees: {web_search: "0.01"}`` (currency units per call, at most 12 decimals)."""
    if raw is None:
        return ()
    fw = f"{where}.tool_fees"
    if not isinstance(raw, Mapping):
        raise PriceFileError(f"{fw}: expected a mapping of tool to fee per call", field=fw)
    out: list[tuple[str, Decimal]] = []
    for key, value in raw.items():
        kw = f"{fw}.{key}"
        if key not in TOOL_FEES:
            raise PriceFileError(f"{kw}: unknown tool fee {key!r}; known: {', '.join(TOOL_FEES)}", field=kw)
        d = to_decimal(value, where=kw)
        fee_to_picos(d, where=kw)
        if d > MAX_AMOUNT:
            raise PriceFileError(f"{kw}: {value!r} is above the sanity limit of {MAX_AMOUNT}", field=kw)
        out.append((key, d))
    return tuple(sorted(out))


def parse_card(entry: Any, *, where: str) -> RateCard:
    """One ``rate_cards[]`` entry -> :class:`RateCard` (PriceFileError on any defect)."""
    e = _check_keys(entry, _CARD_KEYS, where)
    cid = _name(e, "customer_id", where)
    assert cid is not None
    where = f"rate_cards[{cid}]"
    if "markup_pct" in e and "discount_pct" in e:
        raise PriceFileError(f"{where}: give markup_pct or discount_pct, not both", field=f"{where}.markup_pct")
    markup = to_decimal(e["markup_pct"], where=f"{where}.markup_pct") if "markup_pct" in e else Decimal(0)
    discount = to_decimal(e["discount_pct"], where=f"{where}.discount_pct") if "discount_pct" in e else Decimal(0)
    if discount > 100:
        raise PriceFileError(f"{where}.discount_pct: {discount} is above 100", field=f"{where}.discount_pct")
    raw_overrides = e.get("overrides") or []
    if not isinstance(raw_overrides, list):
        raise PriceFileError(f"{where}.overrides: expected a list", field=f"{where}.overrides")
    overrides: list[Override] = []
    seen: set[tuple[str, str, str | None]] = set()
    for i, o in enumerate(raw_overrides):
        ow = f"{where}.overrides[{i}]"
        oe = _check_keys(o, _OVERRIDE_KEYS, ow)
        p, m = _name(oe, "provider", ow), _name(oe, "model", ow)
        v = _name(oe, "model_version", ow, optional=True)
        assert p is not None and m is not None
        rates = parse_rates(oe.get("per_million") or {}, oe.get("request_fee"), where=ow, require_io=False)
        if not rates:
            raise PriceFileError(
                f"{ow}.per_million: an override must state at least one rate", field=f"{ow}.per_million"
            )
        if (p, m, v) in seen:
            raise PriceFileError(f"{ow}: duplicate override for {p}/{m} version {v}", field=ow)
        seen.add((p, m, v))
        overrides.append(Override(p, m, v, {k: d for k, d in rates.items() if d is not None}))
    overrides.sort(key=lambda o: (o.provider, o.model, o.model_version or ""))
    return RateCard(cid, markup_pct=markup, discount_pct=discount, overrides=tuple(overrides))


# --------------------------------------------------------------------------- the book


@dataclass(frozen=True, slots=True)
class PriceBook:
    """A validated price file: list-price versions and rate cards, in a canonical order."""

    currency: str
    versions: tuple[PriceVersion, ...]
    cards: tuple[RateCard, ...]

    def to_records(self) -> list[tuple[str, bytes]]:
        """Deterministic (key, JSON value) pairs for the compacted ``prices`` topic.

        ``price:<version_id>`` per price version (the id embeds a content hash, so a corrected
        price gets a new key — tombstone the old one, see :meth:`superseded_keys`) and
        ``card:<customer_id>`` per rate card (the value's ``card_id`` carries the content hash; a
        changed card replaces the old one under the same key).
        """
        out = [(PRICE_KEY_PREFIX + v.version_id, _dumps(price_record_value(v))) for v in self.versions]
        out += [(CARD_KEY_PREFIX + c.customer_id, _dumps(card_record_value(c))) for c in self.cards]
        return out

    def superseded_keys(self, existing_keys: Iterable[str]) -> list[str]:
        """Keys of published price versions this book *corrects*: same model and effective_from
        (the part of the version id before ``#``) but different content. Publish tombstones for
        them. Versions merely absent from this book are kept (publishing is additive, so late
        events keep their old prices)."""
        mine = {k for k, _ in self.to_records()}
        slots = {k.rpartition("#")[0] for k in mine if k.startswith(PRICE_KEY_PREFIX)}
        return sorted(
            k
            for k in set(existing_keys)
            if k.startswith(PRICE_KEY_PREFIX) and k not in mine and k.rpartition("#")[0] in slots
        )


def _dumps(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def price_record_value(v: PriceVersion) -> dict[str, Any]:
    return {"kind": "price", "version_id": v.version_id, "currency": v.currency, **v.to_json()}


def card_record_value(c: RateCard) -> dict[str, Any]:
    return {"kind": "card", "card_id": c.card_id, **c.to_json()}


def decode_record(key: str, value: bytes) -> PriceVersion | RateCard:
    """Parse and verify one ``prices`` topic record (the inverse of :meth:`PriceBook.to_records`)."""
    try:
        d = json.loads(value.decode("utf-8"), parse_float=Decimal)
    except (UnicodeDecodeError, ValueError) as exc:
        raise PriceFileError(f"record {key!r}: not JSON: {exc}", field=key) from None
    if not isinstance(d, dict):
        raise PriceFileError(f"record {key!r}: expected a JSON object", field=key)
    kind = d.pop("kind", None)
    if key.startswith(PRICE_KEY_PREFIX) and kind == "price":
        vid = d.pop("version_id", None)
        cur = parse_currency(d.pop("currency", None), f"{key}.currency")
        pv = parse_price(d, currency=cur, where=key)
        if PRICE_KEY_PREFIX + pv.version_id != key or vid != pv.version_id:
            raise PriceFileError(f"record {key!r}: content does not match its version id ({pv.version_id})", field=key)
        return pv
    if key.startswith(CARD_KEY_PREFIX) and kind == "card":
        cid = d.pop("card_id", None)
        card = parse_card(d, where=key)
        if CARD_KEY_PREFIX + card.customer_id != key or cid != card.card_id:
            raise PriceFileError(f"record {key!r}: content does not match its card id ({card.card_id})", field=key)
        return card
    raise PriceFileError(f"record {key!r}: unknown record kind {kind!r}", field=key)


def load_price_book(source: str | Path | Mapping[str, Any]) -> PriceBook:
    """Load and validate a price book from a path, YAML/JSON text, or an already-parsed mapping.

    A ``str`` is a path when it is one line ending in ``.yaml``/``.yml``/``.json``; otherwise text.
    Raises :class:`PriceFileError` naming the price index / customer id / field at fault.
    """
    data = _read(source)
    _check_keys(data, _TOP_KEYS, "price file")
    currency = parse_currency(data.get("currency"))
    raw_prices = data.get("prices")
    if not isinstance(raw_prices, list) or not raw_prices:
        raise PriceFileError("prices: expected a non-empty list", field="prices")
    versions = [parse_price(p, currency=currency, where=f"prices[{i}]") for i, p in enumerate(raw_prices)]

    slots: dict[tuple[str, str, str | None, str | None, int], int] = {}
    models: dict[tuple[str, str | None], set[str]] = {}
    alias_owner: dict[tuple[str, str, str | None], str] = {}
    for i, v in enumerate(versions):
        slot = (v.provider, v.model, v.model_version, v.service_tier, v.effective_ms)
        if slot in slots:
            raise PriceFileError(
                f"prices[{i}]: duplicate of prices[{slots[slot]}] (same provider, model, model_version, "
                f"service_tier and effective_from)",
                field=f"prices[{i}]",
            )
        slots[slot] = i
        models.setdefault((v.provider, v.model_version), set()).add(v.model)
    for i, v in enumerate(versions):
        for a in v.aliases:
            if a in models.get((v.provider, v.model_version), ()):
                raise PriceFileError(
                    f"prices[{i}].aliases: {a!r} is itself a priced model", field=f"prices[{i}].aliases"
                )
            owner = alias_owner.setdefault((v.provider, a, v.model_version), v.model)
            if owner != v.model:
                raise PriceFileError(
                    f"prices[{i}].aliases: {a!r} is already an alias of {v.provider}/{owner}",
                    field=f"prices[{i}].aliases",
                )

    raw_cards = data.get("rate_cards") or []
    if not isinstance(raw_cards, list):
        raise PriceFileError("rate_cards: expected a list", field="rate_cards")
    cards: dict[str, RateCard] = {}
    for i, c in enumerate(raw_cards):
        card = parse_card(c, where=f"rate_cards[{i}]")
        if card.customer_id in cards:
            raise PriceFileError(f"rate_cards[{card.customer_id}]: duplicate card", field=f"rate_cards[{i}]")
        cards[card.customer_id] = card

    versions.sort(key=lambda v: (v.provider, v.model, v.model_version or "", v.service_tier or "", v.effective_ms))
    return PriceBook(currency, tuple(versions), tuple(cards[k] for k in sorted(cards)))
