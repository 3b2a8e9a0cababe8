"""The plan catalog: plan versions with their fee, allowances, overage rule and limits.

The file format (YAML or JSON) is in ``docs/plans.md``; the keys mean exactly what issue #12 says.
Validation is as strict as a price file: unknown keys, floats, over-precise amounts, duplicate
keys and duplicate ids are all errors naming the field (``plans[0].allowances[1].tokens``).

Two rules beyond the syntax keep every bill a pure function of *aggregated* usage, whatever the
order events arrived in (so live burn-down and the period's bill are the same computation):

- **Allowance scopes are disjoint**: no (provider, model, token class) matches two allowances.
- **Allowances and overage share one unit**: token allowances with a token overage (``per_million``
  or ``tiers`` with ``unit: tokens``), amount allowances with an amount overage (``rate_card`` or
  ``tiers`` with ``unit: amount``). A token allowance with a rate-card overage would make the
  overage depend on *which* model's tokens used up the allowance first.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

from meterline.core.catalog_files import read_catalog
from meterline.core.plans._calendar import INTERVALS
from meterline.core.plans._values import (
    PlanFileError,
    amount_picos,
    format_instant,
    fraction_text,
    multiplier_of,
    parse_instant,
    per_million_picos,
    per_million_text,
    picos_text,
    short_hash,
    token_count,
)

TOKEN_CLASSES: tuple[str, ...] = ("input", "output", "cached_input", "cache_write", "reasoning")
ON_EXHAUSTED: tuple[str, ...] = ("allow", "block", "cap")
MAX_NAME_LEN = 128
_CURRENCY_RE = re.compile(r"^[A-Z]{3}$")
PLAN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

_TOP_KEYS = frozenset({"currency", "plans"})
_PLAN_KEYS = frozenset(
    {
        "id",
        "version",
        "name",
        "effective_from",
        "interval",
        "fee",
        "allowances",
        "overage",
        "on_exhausted",
        "cap",
        "minimum_commitment",
    }
)
_ALLOWANCE_KEYS = frozenset({"id", "tokens", "amount", "token_classes", "models", "rollover"})
_OVERAGE_KEYS = frozenset({"per_million", "rate_card", "tiers"})
_TIERS_KEYS = frozenset({"mode", "unit", "steps"})
PLAN_KEY_PREFIX = "plan:"


# --------------------------------------------------------------------------- value types


@dataclass(frozen=True, slots=True)
class ModelScope:
    provider: str
    model: str


@dataclass(frozen=True, slots=True)
class Allowance:
    """Included usage per period: ``included`` tokens (unit ``tokens``) or picos of charge
    (unit ``amount``). ``token_classes`` (tokens only) and ``models`` (empty = every model) scope it.
    ``rollover_max``: unused included usage carried to the next period, at most this much."""

    id: str
    unit: str  # "tokens" | "amount"
    included: int
    token_classes: tuple[str, ...] = TOKEN_CLASSES
    models: tuple[ModelScope, ...] = ()
    rollover_max: int | None = None

    def matches_model(self, provider: str, model: str) -> bool:
        return not self.models or any(m.provider == provider and m.model == model for m in self.models)

    def matches(self, provider: str, model: str, token_class: str | None) -> bool:
        """Does usage of this model (and, for token allowances, this class) count against it?"""
        if token_class is not None and token_class not in self.token_classes:
            return False
        return self.matches_model(provider, model)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id}
        if self.unit == "tokens":
            d["tokens"] = self.included
            d["token_classes"] = list(self.token_classes)
        else:
            d["amount"] = picos_text(self.included)
        if self.models:
            d["models"] = [{"provider": m.provider, "model": m.model} for m in self.models]
        if self.rollover_max is not None:
            d["rollover"] = {"max": self.rollover_max if self.unit == "tokens" else picos_text(self.rollover_max)}
        return d


@dataclass(frozen=True, slots=True)
class TierStep:
    """One step of a tiered overage: ``up_to`` (inclusive, tokens or picos; None = infinity) and
    its rate: ``rate_picos`` per token (unit tokens) or ``multiplier`` of the charge (unit amount)."""

    up_to: int | None
    rate_picos: int = 0
    multiplier: Fraction = Fraction(0)


@dataclass(frozen=True, slots=True)
class Overage:
    """How usage beyond the allowances is priced.

    ``kind``: ``per_million`` (flat rate per token; ``"0"`` = unlimited flat-rate plan),
    ``rate_card`` (the customer's pay-per-token charge × ``multiplier``) or ``tiers``
    (``mode`` graduated | volume over ``unit`` tokens | amount, exactly as Stripe computes them).
    """

    kind: str
    unit: str  # "tokens" | "amount"
    rate_picos: int = 0
    multiplier: Fraction = Fraction(1)
    mode: str | None = None
    steps: tuple[TierStep, ...] = ()

    def to_json(self) -> dict[str, Any]:
        if self.kind == "per_million":
            return {"per_million": per_million_text(self.rate_picos)}
        if self.kind == "rate_card":
            return {"rate_card": {"multiplier": fraction_text(self.multiplier)}}
        steps: list[dict[str, Any]] = []
        for s in self.steps:
            up: Any = None if s.up_to is None else (s.up_to if self.unit == "tokens" else picos_text(s.up_to))
            rate = (
                {"per_million": per_million_text(s.rate_picos)}
                if self.unit == "tokens"
                else {"multiplier": fraction_text(s.multiplier)}
            )
            steps.append({"up_to": up, **rate})
        return {"tiers": {"mode": self.mode, "unit": self.unit, "steps": steps}}


@dataclass(frozen=True, slots=True)
class PlanVersion:
    """One immutable version of a plan. ``plan_hash`` covers everything that affects a bill."""

    plan_id: str
    version: int
    effective_from: int  # epoch seconds
    interval: str
    fee: int  # picos per period, billed in advance
    allowances: tuple[Allowance, ...]
    overage: Overage
    on_exhausted: str = "allow"
    cap: int | None = None  # picos of invoiced overage per period (on_exhausted: cap)
    minimum_commitment: int | None = None  # picos per period
    currency: str = "USD"
    name: str | None = None
    plan_hash: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "plan_hash", short_hash(self.to_json()))

    @property
    def key(self) -> str:
        """``pro@1``: how bills and records name this version."""
        return f"{self.plan_id}@{self.version}"

    @property
    def unit(self) -> str:
        return self.overage.unit

    def allowance_for(self, provider: str, model: str, token_class: str | None) -> Allowance | None:
        """The one allowance (scopes are disjoint) this usage counts against, if any."""
        for a in self.allowances:
            if a.matches(provider, model, token_class):
                return a
        return None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.plan_id,
            "version": self.version,
            "effective_from": format_instant(self.effective_from),
            "interval": self.interval,
            "fee": picos_text(self.fee),
            "allowances": [a.to_json() for a in self.allowances],
            "overage": self.overage.to_json(),
            "on_exhausted": self.on_exhausted,
        }
        if self.name is not None:
            d["name"] = self.name
        if self.cap is not None:
            d["cap"] = picos_text(self.cap)
        if self.minimum_commitment is not None:
            d["minimum_commitment"] = picos_text(self.minimum_commitment)
        return d


# --------------------------------------------------------------------------- reading


def _read(source: str | Path | Mapping[str, Any]) -> Mapping[str, Any]:
    return read_catalog(source, error=PlanFileError, what="plan file", top="'currency' and 'plans'")


def _check_keys(entry: Any, allowed: frozenset[str], where: str) -> Mapping[str, Any]:
    if not isinstance(entry, Mapping):
        raise PlanFileError(f"{where}: expected a mapping", field=where)
    unknown = sorted(str(k) for k in entry if k not in allowed)
    if unknown:
        raise PlanFileError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}", field=where
        )
    return entry


def _ident(value: Any, where: str) -> str:
    if not isinstance(value, str) or not PLAN_ID_RE.fullmatch(value):
        raise PlanFileError(
            f"{where}: expected an id of letters, digits, '_', '.', '-' (at most 128, not starting with a symbol), got {value!r}",
            field=where,
        )
    return value


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip() or value != value.strip() or len(value) > MAX_NAME_LEN:
        raise PlanFileError(
            f"{where}: expected a non-empty string of at most {MAX_NAME_LEN} characters, got {value!r}", field=where
        )
    return value


def parse_currency(value: Any, where: str = "currency") -> str:
    if not isinstance(value, str) or not _CURRENCY_RE.fullmatch(value):
        raise PlanFileError(f"{where}: expected an ISO 4217 code such as USD, got {value!r}", field=where)
    return value


def _list(value: Any, where: str, *, non_empty: bool = False) -> list[Any]:
    if not isinstance(value, list) or (non_empty and not value):
        raise PlanFileError(f"{where}: expected a {'non-empty ' if non_empty else ''}list", field=where)
    return value


def _parse_allowance(entry: Any, where: str) -> Allowance:
    e = _check_keys(entry, _ALLOWANCE_KEYS, where)
    if "id" not in e:
        raise PlanFileError(f"{where}.id: required", field=f"{where}.id")
    aid = _ident(e["id"], f"{where}.id")
    if ("tokens" in e) == ("amount" in e):
        raise PlanFileError(f"{where}: give exactly one of tokens or amount", field=where)
    unit = "tokens" if "tokens" in e else "amount"
    included = (
        token_count(e["tokens"], where=f"{where}.tokens")
        if unit == "tokens"
        else amount_picos(e["amount"], where=f"{where}.amount")
    )
    if unit == "amount" and included == 0:
        raise PlanFileError(f"{where}.amount: must be above 0", field=f"{where}.amount")
    classes = TOKEN_CLASSES
    if "token_classes" in e:
        if unit == "amount":
            raise PlanFileError(
                f"{where}.token_classes: an amount allowance covers whole events (a charge is not split by token class); "
                "scope it with models, or use a tokens allowance",
                field=f"{where}.token_classes",
            )
        raw = _list(e["token_classes"], f"{where}.token_classes", non_empty=True)
        for i, c in enumerate(raw):
            if c not in TOKEN_CLASSES:
                raise PlanFileError(
                    f"{where}.token_classes[{i}]: unknown token class {c!r}; known: {', '.join(TOKEN_CLASSES)}",
                    field=f"{where}.token_classes[{i}]",
                )
        if len(set(raw)) != len(raw):
            raise PlanFileError(f"{where}.token_classes: repeats a class", field=f"{where}.token_classes")
        classes = tuple(c for c in TOKEN_CLASSES if c in raw)
    models: list[ModelScope] = []
    if "models" in e:
        for i, m in enumerate(_list(e["models"], f"{where}.models", non_empty=True)):
            mw = f"{where}.models[{i}]"
            me = _check_keys(m, frozenset({"provider", "model"}), mw)
            for k in ("provider", "model"):
                if k not in me:
                    raise PlanFileError(f"{mw}.{k}: required", field=f"{mw}.{k}")
            scope = ModelScope(_name(me["provider"], f"{mw}.provider"), _name(me["model"], f"{mw}.model"))
            if scope in models:
                raise PlanFileError(f"{mw}: repeats {scope.provider}/{scope.model}", field=mw)
            models.append(scope)
    rollover: int | None = None
    if "rollover" in e:
        rw = f"{where}.rollover"
        re_ = _check_keys(e["rollover"], frozenset({"max"}), rw)
        if "max" not in re_:
            raise PlanFileError(f"{rw}.max: required", field=f"{rw}.max")
        rollover = (
            token_count(re_["max"], where=f"{rw}.max")
            if unit == "tokens"
            else amount_picos(re_["max"], where=f"{rw}.max")
        )
    models.sort(key=lambda m: (m.provider, m.model))
    return Allowance(aid, unit, included, classes, tuple(models), rollover)


def _parse_overage(entry: Any, where: str) -> Overage:
    e = _check_keys(entry, _OVERAGE_KEYS, where)
    if len(e) != 1:
        raise PlanFileError(f"{where}: give exactly one of per_million, rate_card, tiers", field=where)
    if "per_million" in e:
        return Overage(
            "per_million", "tokens", rate_picos=per_million_picos(e["per_million"], where=f"{where}.per_million")
        )
    if "rate_card" in e:
        rw = f"{where}.rate_card"
        rc = _check_keys(e["rate_card"], frozenset({"multiplier"}), rw)
        mult = multiplier_of(rc.get("multiplier", "1"), where=f"{rw}.multiplier")
        return Overage("rate_card", "amount", multiplier=mult)
    tw = f"{where}.tiers"
    t = _check_keys(e["tiers"], _TIERS_KEYS, tw)
    mode, unit = t.get("mode"), t.get("unit", "tokens")
    if mode not in ("graduated", "volume"):
        raise PlanFileError(f"{tw}.mode: expected graduated or volume, got {mode!r}", field=f"{tw}.mode")
    if unit not in ("tokens", "amount"):
        raise PlanFileError(f"{tw}.unit: expected tokens or amount, got {unit!r}", field=f"{tw}.unit")
    raw_steps = _list(t.get("steps"), f"{tw}.steps", non_empty=True)
    steps: list[TierStep] = []
    prev = 0
    for i, s in enumerate(raw_steps):
        sw = f"{tw}.steps[{i}]"
        rate_key = "per_million" if unit == "tokens" else "multiplier"
        se = _check_keys(s, frozenset({"up_to", rate_key}), sw)
        if "up_to" not in se:
            raise PlanFileError(f"{sw}.up_to: required (null for the last step)", field=f"{sw}.up_to")
        if rate_key not in se:
            raise PlanFileError(f"{sw}.{rate_key}: required for unit {unit}", field=f"{sw}.{rate_key}")
        last = i == len(raw_steps) - 1
        raw_up = se["up_to"]
        if raw_up is None:
            if not last:
                raise PlanFileError(f"{sw}.up_to: only the last step may be unbounded (null)", field=f"{sw}.up_to")
            up: int | None = None
        else:
            if last:
                raise PlanFileError(f"{sw}.up_to: the last step must be unbounded (up_to: null)", field=f"{sw}.up_to")
            up = (
                token_count(raw_up, where=f"{sw}.up_to")
                if unit == "tokens"
                else amount_picos(raw_up, where=f"{sw}.up_to")
            )
            if up <= prev:
                raise PlanFileError(f"{sw}.up_to: must be above the previous step's", field=f"{sw}.up_to")
            prev = up
        if unit == "tokens":
            steps.append(TierStep(up, rate_picos=per_million_picos(se["per_million"], where=f"{sw}.per_million")))
        else:
            steps.append(TierStep(up, multiplier=multiplier_of(se["multiplier"], where=f"{sw}.multiplier")))
    return Overage("tiers", unit, mode=mode, steps=tuple(steps))


def _overlaps(a: Allowance, b: Allowance) -> bool:
    if a.unit == "tokens" and b.unit == "tokens" and not set(a.token_classes) & set(b.token_classes):
        return False
    if not a.models or not b.models:
        return True
    return bool(set(a.models) & set(b.models))


def parse_plan(entry: Any, *, currency: str, where: str) -> PlanVersion:
    """One ``plans[]`` entry -> :class:`PlanVersion` (PlanFileError on any defect)."""
    e = _check_keys(entry, _PLAN_KEYS, where)
    for k in ("id", "version", "effective_from", "interval", "fee", "overage"):
        if k not in e:
            raise PlanFileError(f"{where}.{k}: required", field=f"{where}.{k}")
    pid = _ident(e["id"], f"{where}.id")
    version = e["version"]
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= 1_000_000:
        raise PlanFileError(
            f"{where}.version: expected a whole number from 1, got {version!r}", field=f"{where}.version"
        )
    eff = parse_instant(e["effective_from"], where=f"{where}.effective_from")
    interval = e["interval"]
    if interval not in INTERVALS:
        raise PlanFileError(
            f"{where}.interval: expected one of {', '.join(INTERVALS)}, got {interval!r}", field=f"{where}.interval"
        )
    fee = amount_picos(e["fee"], where=f"{where}.fee")
    allowances: list[Allowance] = []
    for i, a in enumerate(_list(e.get("allowances", []) or [], f"{where}.allowances")):
        allowance = _parse_allowance(a, f"{where}.allowances[{i}]")
        for j, other in enumerate(allowances):
            if other.id == allowance.id:
                raise PlanFileError(
                    f"{where}.allowances[{i}].id: duplicate of allowances[{j}]", field=f"{where}.allowances[{i}].id"
                )
            if _overlaps(other, allowance):
                raise PlanFileError(
                    f"{where}.allowances[{i}]: its scope overlaps allowances[{j}] ({other.id}); allowance scopes must be "
                    "disjoint (token classes or models) so that a bill does not depend on the order of events",
                    field=f"{where}.allowances[{i}]",
                )
        allowances.append(allowance)
    overage = _parse_overage(e["overage"], f"{where}.overage")
    for i, a in enumerate(allowances):
        if a.unit != overage.unit:
            raise PlanFileError(
                f"{where}.allowances[{i}]: a {a.unit} allowance needs a {a.unit} overage "
                f"({'per_million or tiers unit tokens' if a.unit == 'tokens' else 'rate_card or tiers unit amount'}); "
                "otherwise the overage would depend on which usage came first",
                field=f"{where}.allowances[{i}]",
            )
    on_exhausted = e.get("on_exhausted", "allow")
    if on_exhausted not in ON_EXHAUSTED:
        raise PlanFileError(
            f"{where}.on_exhausted: expected one of {', '.join(ON_EXHAUSTED)}, got {on_exhausted!r}",
            field=f"{where}.on_exhausted",
        )
    cap = None
    if on_exhausted == "cap":
        if "cap" not in e:
            raise PlanFileError(f"{where}.cap: required with on_exhausted: cap", field=f"{where}.cap")
        cap = amount_picos(e["cap"], where=f"{where}.cap")
    elif "cap" in e:
        raise PlanFileError(f"{where}.cap: only meaningful with on_exhausted: cap", field=f"{where}.cap")
    commitment = None
    if "minimum_commitment" in e:
        commitment = amount_picos(e["minimum_commitment"], where=f"{where}.minimum_commitment")
    name = _name(e["name"], f"{where}.name") if "name" in e else None
    return PlanVersion(
        pid, version, eff, interval, fee, tuple(allowances), overage, on_exhausted, cap, commitment, currency, name
    )


# --------------------------------------------------------------------------- the catalog


@dataclass(frozen=True, slots=True)
class PlanCatalog:
    """Validated plan versions in a canonical order (plan id, version)."""

    currency: str
    versions: tuple[PlanVersion, ...]

    def get(self, plan_id: str, version: int) -> PlanVersion | None:
        for v in self.versions:
            if v.plan_id == plan_id and v.version == version:
                return v
        return None

    def versions_of(self, plan_id: str) -> list[PlanVersion]:
        return [v for v in self.versions if v.plan_id == plan_id]

    def current(self, plan_id: str, at: int) -> PlanVersion | None:
        """The highest version of ``plan_id`` in force at ``at`` (effective_from <= at)."""
        best = None
        for v in self.versions_of(plan_id):
            if v.effective_from <= at and (best is None or v.version > best.version):
                best = v
        return best

    def merged(self, other: PlanCatalog) -> PlanCatalog:
        """This catalog plus ``other``'s versions (``other`` wins on the same plan@version)."""
        by_key = {v.key: v for v in self.versions}
        by_key.update({v.key: v for v in other.versions})
        return PlanCatalog(other.currency, _sorted(by_key.values()))

    def to_records(self) -> list[tuple[str, bytes]]:
        """Deterministic (key, JSON value) pairs for the compacted ``plans`` topic:
        ``plan:<id>@<version>`` -> the canonical version with its currency and plan_hash."""
        return [(PLAN_KEY_PREFIX + v.key, _dumps(plan_record_value(v))) for v in self.versions]


def _sorted(versions: Iterable[PlanVersion]) -> tuple[PlanVersion, ...]:
    return tuple(sorted(versions, key=lambda v: (v.plan_id, v.version)))


def _dumps(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def plan_record_value(v: PlanVersion) -> dict[str, Any]:
    return {"kind": "plan", "currency": v.currency, "plan_hash": v.plan_hash, **v.to_json()}


def decode_plan_record(key: str, value: bytes) -> PlanVersion:
    """Parse and verify one ``plans`` topic record (the inverse of :meth:`PlanCatalog.to_records`)."""
    try:
        d = json.loads(value.decode("utf-8"), parse_float=Decimal)
    except (UnicodeDecodeError, ValueError) as exc:
        raise PlanFileError(f"record {key!r}: not JSON: {exc}", field=key) from None
    if not isinstance(d, dict) or d.pop("kind", None) != "plan":
        raise PlanFileError(f"record {key!r}: not a plan record", field=key)
    h = d.pop("plan_hash", None)
    cur = parse_currency(d.pop("currency", None), f"{key}.currency")
    v = parse_plan(d, currency=cur, where=key)
    if PLAN_KEY_PREFIX + v.key != key or h != v.plan_hash:
        raise PlanFileError(f"record {key!r}: content does not match its key or hash", field=key)
    return v


def catalog_from_records(records: Iterable[tuple[str, bytes | None]]) -> PlanCatalog:
    """The catalog a topic describes: the last record per key wins, tombstones delete, and a
    record that does not decode is skipped (it was validated when published)."""
    last: dict[str, bytes | None] = {}
    for k, v in records:
        if k.startswith(PLAN_KEY_PREFIX):
            last[k] = v
    versions: list[PlanVersion] = []
    currency = "USD"
    for k, raw in last.items():
        if raw is None:
            continue
        try:
            pv = decode_plan_record(k, raw)
        except PlanFileError:
            continue
        versions.append(pv)
        currency = pv.currency
    return PlanCatalog(currency, _sorted(versions))


def load_plan_catalog(source: str | Path | Mapping[str, Any]) -> PlanCatalog:
    """Load and validate a plan file from a path, YAML/JSON text or a parsed mapping.

    Raises :class:`PlanFileError` naming the field at fault.
    """
    data = _read(source)
    _check_keys(data, _TOP_KEYS, "plan file")
    currency = parse_currency(data.get("currency"))
    raw = _list(data.get("plans"), "plans", non_empty=True)
    versions = [parse_plan(p, currency=currency, where=f"plans[{i}]") for i, p in enumerate(raw)]
    seen: dict[str, int] = {}
    for i, v in enumerate(versions):
        if v.key in seen:
            raise PlanFileError(f"plans[{i}]: duplicate of plans[{seen[v.key]}] ({v.key})", field=f"plans[{i}]")
        seen[v.key] = i
    by_plan: dict[str, list[PlanVersion]] = {}
    for v in versions:
        by_plan.setdefault(v.plan_id, []).append(v)
    for vs in by_plan.values():
        vs.sort(key=lambda v: v.version)
        for a, b in itertools.pairwise(vs):
            if b.effective_from < a.effective_from:
                raise PlanFileError(
                    f"plans: {b.key} takes effect before {a.key}; a later version cannot be effective earlier",
                    field=f"plans[{seen[b.key]}].effective_from",
                )
    return PlanCatalog(currency, _sorted(versions))


def version_conflicts(new: PlanCatalog, published: PlanCatalog) -> list[str]:
    """Versions ``new`` would *change*: a published plan@version is immutable (publish a new
    version and migrate instead). Re-publishing identical content is fine (idempotent)."""
    out = []
    for v in new.versions:
        old = published.get(v.plan_id, v.version)
        if old is not None and old.plan_hash != v.plan_hash:
            out.append(v.key)
    if published.versions and new.currency != published.currency:
        out.append(f"currency {new.currency} (published plans are in {published.currency})")
    return out
