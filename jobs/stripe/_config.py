"""The billing configuration (``infra/stripe/billing.yaml``), the meters it implies, and the Stripe target.

Contract:

* :func:`load_billing_config` validates the YAML into a frozen :class:`BillingConfig` or raises
  :class:`~meterline.core.errors.ConfigError`.
* :func:`meter_specs` lists the meters + prices the config describes, deterministically: the same
  config always gives the same event names, lookup keys and amounts (provisioning relies on it).
* :class:`StripeTarget` builds ``stripe.StripeClient`` objects for the real API or the local
  server; :func:`target_from_settings` picks one from ``Settings``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import stripe
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from meterline.core.config import Settings
from meterline.core.errors import ConfigError, MeterlineError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "infra" / "stripe" / "billing.yaml"
MAX_EVENT_NAME = 100


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CostMode(_Frozen):
    event_name: str = "meterline_charge"
    display_name: str = "AI usage (charge)"
    # meter value = charge x 10**unit_exponent (an integer number of "units"); 6 = micro-currency.
    unit_exponent: int = Field(default=6, ge=2, le=12)


class ItemizedMode(_Frozen):
    price_book: Path = Path("infra/prices/seed.yaml")
    token_classes: tuple[str, ...] = ("input", "output", "cached_input", "cache_write", "reasoning")


class SyncOptions(_Frozen):
    window_seconds: int = Field(default=3600, ge=60, le=86400)
    settle_seconds: int = Field(default=300, ge=0)
    max_age_seconds: int = Field(default=35 * 86400, ge=3600)
    stream_threshold: int = Field(default=1000, ge=0)
    max_attempts: int = Field(default=6, ge=1, le=50)
    backoff_seconds: float = Field(default=0.5, ge=0)
    auto_provision_customers: bool = True


class BillingConfig(_Frozen):
    mode: Literal["cost", "itemized"] = "cost"
    currency: str = "usd"
    interval: Literal["day", "week", "month", "year"] = "month"
    product_name: str = "AI usage"
    cost: CostMode = CostMode()
    itemized: ItemizedMode = ItemizedMode()
    sync: SyncOptions = SyncOptions()

    def with_sync(self, **changes: Any) -> BillingConfig:
        """A copy with some sync options changed (tests, CLI flags)."""
        return self.model_copy(update={"sync": self.sync.model_copy(update=changes)})


def load_billing_config(path: str | Path | None = None, **overrides: Any) -> BillingConfig:
    """Read and validate the billing YAML (default ``infra/stripe/billing.yaml``)."""
    p = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(p.read_text()) or {}
        raw.update(overrides)
        cfg = BillingConfig.model_validate(raw)
    except (OSError, yaml.YAMLError, ValidationError, AttributeError) as exc:
        raise ConfigError(f"billing config {p}: {exc}") from exc
    if cfg.sync.window_seconds % 60 or 86400 % cfg.sync.window_seconds:
        raise ConfigError("sync.window_seconds must be whole minutes and divide a day")
    return cfg.model_copy(update={"currency": cfg.currency.lower()})


# --------------------------------------------------------------------------- meters and prices


@dataclass(frozen=True, slots=True)
class MeterSpec:
    """One Stripe meter + its metered price. ``key`` (= the meter's event_name) is the stable id."""

    event_name: str
    display_name: str
    lookup_key: str
    unit_amount_decimal: str  # cents per meter unit, <= 12 decimals
    provider: str | None = None
    model: str | None = None
    model_version: str | None = None
    token_class: str | None = None


def product_id(cfg: BillingConfig) -> str:
    return f"ml_prod_{cfg.mode}_{cfg.currency}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _cents_string(cents: Decimal, where: str) -> str:
    if cents != cents.quantize(Decimal("1e-12")):
        raise ConfigError(f"{where}: {cents} cents needs more than 12 decimals (Stripe's limit)")
    return format(cents.normalize(), "f")


def meter_specs(cfg: BillingConfig, root: Path = REPO_ROOT) -> list[MeterSpec]:
    """The meters + prices of ``cfg``: one in cost mode, one per model x token class in itemized mode."""
    if cfg.mode == "cost":
        cents = Decimal(1).scaleb(2 - cfg.cost.unit_exponent)
        return [
            MeterSpec(
                event_name=cfg.cost.event_name,
                display_name=cfg.cost.display_name,
                lookup_key=f"ml_cost_{cfg.cost.event_name}_{cfg.currency}_{cfg.interval}",
                unit_amount_decimal=_cents_string(cents, "cost.unit_exponent"),
            )
        ]
    from meterline.core.pricing import load_price_book

    path = cfg.itemized.price_book if cfg.itemized.price_book.is_absolute() else root / cfg.itemized.price_book
    try:
        book = load_price_book(path)
    except MeterlineError as exc:
        raise ConfigError(f"itemized.price_book {path}: {exc}") from exc
    if book.currency.lower() != cfg.currency:
        raise ConfigError(f"price book currency {book.currency} != billing currency {cfg.currency}")
    latest: dict[tuple[str, str, str | None], Any] = {}
    for v in book.versions:  # the version in force last (Stripe prices are fixed; see docs/stripe.md)
        if v.model_key not in latest or v.effective_from > latest[v.model_key].effective_from:
            latest[v.model_key] = v
    specs: list[MeterSpec] = []
    for (provider, model, version), pv in sorted(latest.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or "")):
        for cls in cfg.itemized.token_classes:
            rate = pv.rates.get(cls)
            if rate is None and cls == "reasoning":
                rate = pv.rates.output  # reasoning omitted = output rate (docs/pricing.md)
            if rate is None:
                continue  # no price for that class: such usage is unpriceable upstream anyway
            name = "ml_tok_" + "_".join(_slug(x) for x in (provider, model, version or "") if x) + f"_{cls}"
            if len(name) > MAX_EVENT_NAME - 20:
                name = f"ml_tok_{hashlib.sha256(name.encode()).hexdigest()[:24]}_{cls}"
            label = f"{provider}/{model}" + (f":{version}" if version else "")
            specs.append(
                MeterSpec(
                    event_name=name,
                    display_name=f"{label} {cls} tokens",
                    lookup_key=f"{name}_{cfg.currency}_{cfg.interval}",
                    unit_amount_decimal=_cents_string(rate / Decimal(10_000), f"{label}.{cls}"),
                    provider=provider,
                    model=model,
                    model_version=version,
                    token_class=cls,
                )
            )
    return specs


# --------------------------------------------------------------------------- Stripe target


@dataclass(frozen=True)
class StripeTarget:
    """Where the Stripe API is: the real one (``base_addresses=None``) or a local server."""

    api_key: str
    base_addresses: dict[str, str] | None = None
    max_network_retries: int = 2
    timeout: float | None = None

    def client(self, api_key: str | None = None) -> stripe.StripeClient:
        http_client = stripe.RequestsClient(timeout=self.timeout) if self.timeout is not None else None
        kwargs: dict[str, Any] = {"max_network_retries": self.max_network_retries, "http_client": http_client}
        if self.base_addresses:
            kwargs["base_addresses"] = self.base_addresses
        return stripe.StripeClient(api_key or self.api_key, **kwargs)

    def now(self) -> int:
        """Stripe's clock in unix seconds: wall time, or a local server's test clock
        (``GET /_test/clock``) when this target is one that answers it."""
        import time

        if self.base_addresses and "api.stripe.com" not in self.base_addresses.get("api", ""):
            import httpx

            try:
                resp = httpx.get(self.base_addresses["api"].rstrip("/") + "/_test/clock", timeout=5)
                if resp.status_code == 200:
                    return int(resp.json()["now"])
            except (httpx.HTTPError, ValueError, KeyError):
                pass
        return int(time.time())

    @classmethod
    def local(cls, url: str, **kwargs: Any) -> StripeTarget:
        return cls("sk_test_meterline_local", {"api": url, "meter_events": url}, **kwargs)


def target_from_settings(settings: Settings) -> StripeTarget | None:
    """The configured Stripe (a key, optionally with ``stripe_base_url``); None = use a local server."""
    if settings.stripe_api_key is not None and settings.stripe_api_key.get_secret_value():
        key = settings.stripe_api_key.get_secret_value()
        if settings.stripe_base_url:
            url = settings.stripe_base_url.rstrip("/")
            return StripeTarget(key, {"api": url, "meter_events": url})
        return StripeTarget(key)
    if settings.stripe_base_url:
        return StripeTarget.local(settings.stripe_base_url.rstrip("/"))
    return None


def idem_key(kind: str, name: str, params: Any) -> str:
    """Deterministic Idempotency-Key: same object + same params -> same key (≤255 chars)."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:20]
    name = name if name.isascii() else "h" + hashlib.sha256(name.encode()).hexdigest()[:32]  # headers are latin-1
    return f"ml-{kind}-{name[:160]}-{digest}"
