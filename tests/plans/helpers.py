"""Shared builders for the plans domain tests."""

from __future__ import annotations

from typing import Any

from meterline.core.plans import (
    PlanCatalog,
    SubscriptionEvent,
    Timeline,
    Usage,
    fold_timeline,
    load_plan_catalog,
    parse_instant,
)

JAN = "2026-01-01T00:00:00Z"
M = 1_000_000


def ts(text: str) -> int:
    return parse_instant(text, where="test")


def plan(**over: Any) -> dict[str, Any]:
    """The issue's $200 plan: 10M tokens included, $30 per extra million."""
    d: dict[str, Any] = {
        "id": "pro",
        "version": 1,
        "effective_from": JAN,
        "interval": "month",
        "fee": "200.00",
        "allowances": [{"id": "tokens", "tokens": 10_000_000, "token_classes": ["input", "output"]}],
        "overage": {"per_million": "30.00"},
        "on_exhausted": "allow",
    }
    d.update(over)
    return d


def catalog(*plans: dict[str, Any], currency: str = "USD") -> PlanCatalog:
    return load_plan_catalog({"currency": currency, "plans": list(plans) or [plan()]})


def subscribed(
    cat: PlanCatalog, customer: str = "acme", plan_id: str = "pro", at: str = JAN, *more: SubscriptionEvent
) -> Timeline:
    events = [SubscriptionEvent("subscribed", customer, ts(at), plan_id), *more]
    return fold_timeline(customer, events, cat)


def tokens(
    n_in: int, n_out: int = 0, *, provider: str = "openai", model: str = "gpt-4o", charge: int = 0, **other: int
) -> Usage:
    return Usage(provider, model, {"input": n_in, "output": n_out, **other}, charge)
