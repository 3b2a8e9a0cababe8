"""Pure pricing domain: list prices, rate cards and the exact per-event pricing engine.

No I/O beyond reading a price file; no Kafka, ClickHouse or Stripe. Units: rates are Decimal per
million tokens in files, integer picos (1e-12 currency units) per token inside; costs and
charges are integer picos and are never rounded here. See ``docs/pricing.md``.
"""

from __future__ import annotations

from meterline.core.money import PICOS_PER_UNIT
from meterline.core.pricing._book import PriceBook, load_price_book
from meterline.core.pricing._engine import PricedAmounts, PricingEngine
from meterline.core.pricing._litellm import ImportReport, import_litellm
from meterline.core.pricing._model import (
    TOKEN_CLASSES,
    Override,
    PriceVersion,
    RateCard,
    Rates,
)

__all__ = [
    "PICOS_PER_UNIT",
    "TOKEN_CLASSES",
    "ImportReport",
    "Override",
    "PriceBook",
    "PriceVersion",
    "PricedAmounts",
    "PricingEngine",
    "RateCard",
    "Rates",
    "import_litellm",
    "load_price_book",
]
