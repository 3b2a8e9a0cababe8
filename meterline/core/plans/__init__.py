"""Subscription plans: the catalog, subscription timelines, and rating (pure domain).

No Kafka, ClickHouse, Stripe or HTTP here. Money is integer picos inside and decimal strings at
the edges; subscription instants are epoch seconds (UTC). See ``docs/plans.md``.

    catalog = load_plan_catalog("plans.yaml")
    timeline = fold_timeline("acme", events, catalog)       # facts -> runs -> periods
    period = timeline.period_at(at)
    bill = rate_period(period, [[Usage("openai", "gpt-4o", {"input": 7_000_000})]])
    bill.total                                               # Decimal, rounded once

Live burn-down (the credit agent; the same code the bill runs):

    terms = terms_at(timeline, event_at, rollover_in)   # None: no plan then, pay-per-token
    consumption, split = consume(terms, consumption, Usage(provider, model, tokens, charge))
    # split.allowance: drawn per allowance; split.overage_amount: picos to debit from prepaid
    # grants, then the plan's on_exhausted policy (allow | block | cap):
    allowance_remaining(terms, consumption)   # what status shows / authorize reserves against
    policy_room(terms, invoiced_overage)      # None: unlimited; else picos left before blocking
"""

from __future__ import annotations

from meterline.core.money import PICOS_PER_UNIT, format_picos
from meterline.core.plans._calendar import INTERVALS, add_intervals, period_bounds, period_index
from meterline.core.plans._catalog import (
    ON_EXHAUSTED,
    PLAN_KEY_PREFIX,
    TOKEN_CLASSES,
    Allowance,
    ModelScope,
    Overage,
    PlanCatalog,
    PlanVersion,
    TierStep,
    catalog_from_records,
    decode_plan_record,
    load_plan_catalog,
    version_conflicts,
)
from meterline.core.plans._live import (
    ALERT_PCTS,
    MAX_FACTS,
    MAX_SEGMENT_CORRECTIONS,
    MAX_SEGMENTS,
    LivePlan,
    SegmentChange,
    SegmentUse,
    alerts_due,
    allowance_view,
    burn,
    correct_segment,
    gate,
    live_terms,
    segment_consumptions,
    usage_of_priced,
)
from meterline.core.plans._rating import (
    AllowanceUse,
    Band,
    Bill,
    BillLine,
    Consumption,
    Split,
    Terms,
    Usage,
    allowance_remaining,
    consume,
    overage_price,
    policy_room,
    rate_period,
    rate_periods,
    terms_at,
    terms_for,
)
from meterline.core.plans._timeline import (
    EVENT_TYPES,
    Period,
    Rejected,
    Run,
    Segment,
    SubscriptionEvent,
    Timeline,
    fold_timeline,
    parse_event,
)
from meterline.core.plans._values import (
    PlanFileError,
    SubscriptionError,
    format_instant,
    instant_of,
    parse_instant,
    round_total,
)

__all__ = [
    "ALERT_PCTS",
    "EVENT_TYPES",
    "INTERVALS",
    "MAX_FACTS",
    "MAX_SEGMENTS",
    "MAX_SEGMENT_CORRECTIONS",
    "ON_EXHAUSTED",
    "PICOS_PER_UNIT",
    "PLAN_KEY_PREFIX",
    "TOKEN_CLASSES",
    "Allowance",
    "AllowanceUse",
    "Band",
    "Bill",
    "BillLine",
    "Consumption",
    "LivePlan",
    "ModelScope",
    "Overage",
    "Period",
    "PlanCatalog",
    "PlanFileError",
    "PlanVersion",
    "Rejected",
    "Run",
    "Segment",
    "SegmentChange",
    "SegmentUse",
    "Split",
    "SubscriptionError",
    "SubscriptionEvent",
    "Terms",
    "TierStep",
    "Timeline",
    "Usage",
    "add_intervals",
    "alerts_due",
    "allowance_remaining",
    "allowance_view",
    "burn",
    "catalog_from_records",
    "consume",
    "correct_segment",
    "decode_plan_record",
    "fold_timeline",
    "format_instant",
    "format_picos",
    "gate",
    "instant_of",
    "live_terms",
    "load_plan_catalog",
    "overage_price",
    "parse_event",
    "parse_instant",
    "period_bounds",
    "period_index",
    "policy_room",
    "rate_period",
    "rate_periods",
    "round_total",
    "segment_consumptions",
    "terms_at",
    "terms_for",
    "usage_of_priced",
    "version_conflicts",
]
