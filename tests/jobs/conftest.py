"""Fixtures for the Stripe jobs: a LocalStripe server, a target pointing at it, priced-usage rows.

Usage rows are inserted straight into ``usage_priced`` with ``pipeline.sink.priced_row`` (the
sink's own row mapping); money is given as integer picos so expectations are exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from devtools.stripe_local import LocalStripe
from jobs.stripe import BillingConfig, StripeTarget, load_billing_config
from pipeline.sink import PRICED_COLUMNS, priced_row

HOUR = 3600
DAY = 86400


@pytest.fixture
def ls() -> Iterator[LocalStripe]:
    with LocalStripe() as server:
        yield server


@pytest.fixture
def target(ls: LocalStripe) -> StripeTarget:
    return StripeTarget.local(ls.url, max_network_retries=2)


@pytest.fixture
def cfg() -> BillingConfig:
    """The shipped cost-mode config with fast back-off and a 0 s settle time."""
    return load_billing_config().with_sync(settle_seconds=0, backoff_seconds=0.01)


class Usage:
    """Insert priced usage rows; remembers the exact charge per customer."""

    def __init__(self, ch: Any) -> None:
        self.ch = ch
        self.n = 0
        self.charges: dict[str, Decimal] = {}

    def add(
        self,
        customer: str,
        ts: int,
        charge_picos: int,
        *,
        model: str = "gpt-4o",
        provider: str = "openai",
        project: str = "chat",
        input_tokens: int = 1000,
        output_tokens: int = 100,
        currency: str = "usd",
    ) -> None:
        self.add_many(
            [(customer, ts, charge_picos)],
            model=model,
            provider=provider,
            project=project,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            currency=currency,
        )

    def add_many(self, items: list[tuple[str, int, int]], **kw: Any) -> None:
        rows = []
        for customer, ts, picos in items:
            self.n += 1
            ev = {
                "event_id": f"ev-{self.n:06d}",
                "occurred_at": ts * 1000,
                "customer_id": customer,
                "provider": kw.get("provider", "openai"),
                "model": kw.get("model", "gpt-4o"),
                "project": kw.get("project", "chat"),
                "input_tokens": kw.get("input_tokens", 1000),
                "output_tokens": kw.get("output_tokens", 100),
                "requests": 1,
                "labels": {},
                "cost_picos": picos,
                "charge_picos": picos,
                "currency": kw.get("currency", "usd"),
                "price_version": "pv",
                "rate_card": "default",
                "priced_at": ts * 1000,
                "source_partition": 0,
                "source_offset": self.n,
            }
            rows.append(priced_row(ev, partition=0, offset=self.n))
            if ev["currency"] == "usd":
                self.charges[customer] = self.charges.get(customer, Decimal(0)) + Decimal(picos).scaleb(-12)
        self.ch.insert("usage_priced", rows, column_names=list(PRICED_COLUMNS))


@pytest.fixture
def usage(clickhouse: Any) -> Usage:
    return Usage(clickhouse)
