"""The oracle of ``meterline verify``: exact expected totals from the seed price numbers (never
from :mod:`meterline.core.pricing`), and the pricing checks against ClickHouse."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal, Inexact, localcontext
from typing import Any

from devtools.verify.credit_plan import CreditPlan

# (provider, model, model_version) -> per-million list prices (seed.yaml's numbers, as text).
RATES: dict[tuple[str, str, str | None], dict[str, str]] = {
    ("openai", "gpt-4o", None): {"input": "5.00", "output": "15.00", "cached_input": "2.50"},
    ("openai", "o1", None): {"input": "15.00", "output": "60.00", "cached_input": "7.50"},
    ("anthropic", "claude-3-5-sonnet", "20241022"): {
        "input": "3.00",
        "output": "15.00",
        "cached_input": "0.30",
        "cache_write": "3.75",
    },
    ("google", "gemini-1.5-pro", None): {"input": "3.50", "output": "10.50", "cached_input": "0.875"},
    ("meta", "llama-3-70b", None): {"input": "0.59", "output": "0.79"},
    ("mistral", "mixtral-8x22b", None): {"input": "1.20", "output": "1.20"},
}
MARKUP_PCT: dict[str, str] = {"acme": "20", "globex": "7.5"}
CUSTOMERS: tuple[str, ...] = ("acme", "globex", "initech", "umbrella", "hooli", "edge.id:a@b+c=d-_9")
_MILLION = Decimal(1_000_000)
_EXACT = Context(prec=80, traps=[Inexact])  # the oracle raises rather than round
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
Query = Callable[[str], list[tuple[Any, ...]]]


def price_file() -> dict[str, Any]:
    """:data:`RATES` / :data:`MARKUP_PCT` as a price-file mapping (``load_price_book`` input)."""
    prices = []
    for (provider, model, version), rates in RATES.items():
        entry: dict[str, Any] = {
            "provider": provider,
            "model": model,
            "effective_from": "2024-01-01T00:00:00Z",
            "per_million": dict(rates),
        }
        if version is not None:
            entry["model_version"] = version
        prices.append(entry)
    cards = [{"customer_id": "*", "markup_pct": "0"}]
    cards += [{"customer_id": c, "markup_pct": pct} for c, pct in MARKUP_PCT.items()]
    return {"currency": "USD", "prices": prices, "rate_cards": cards}


# --------------------------------------------------------------------------- the oracle


@dataclass(frozen=True, slots=True)
class Delta:
    """One way the stored data differs from the expectation."""

    check: str
    subject: str
    expected: str
    observed: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.subject}: expected {self.expected}, observed {self.observed}"


@dataclass
class Expected:
    """What the stores must hold, computed independently of meterline.core.pricing.

    ``priced`` maps ``(customer_id, event_id)`` to ``(cost, charge)``; adding the same id twice is a
    no-op (a duplicate must not change any total). ``rejected`` counts hostile records / events that
    must each become exactly one ``usage_rejected`` row.
    """

    priced: dict[tuple[str, str], tuple[Decimal, Decimal]] = field(default_factory=dict)
    rejected: int = 0
    rejected_reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    occurred_ms: dict[tuple[str, str], int] = field(default_factory=dict)  # event time (Stripe windows)
    credit_plans: dict[str, CreditPlan] = field(default_factory=dict)  # customers set up in the ledger

    @staticmethod
    def cost_of(ev: Any) -> Decimal:
        with localcontext(_EXACT):
            return Expected._cost_of(ev)

    @staticmethod
    def _cost_of(ev: Any) -> Decimal:
        rates = {k: Decimal(v) for k, v in RATES[(ev.provider, ev.model, ev.model_version)].items()}
        out_rate = rates["output"]
        total = Decimal(ev.input_tokens) * rates["input"] + Decimal(ev.output_tokens) * out_rate
        total += Decimal(ev.reasoning_tokens) * rates.get("reasoning", out_rate)
        if ev.cached_input_tokens:
            total += Decimal(ev.cached_input_tokens) * rates["cached_input"]
        if ev.cache_write_tokens:
            total += Decimal(ev.cache_write_tokens) * rates["cache_write"]
        return total / _MILLION

    @staticmethod
    def charge_of(customer_id: str, cost: Decimal) -> Decimal:
        with localcontext(_EXACT):
            return cost * (1 + Decimal(MARKUP_PCT.get(customer_id, "0")) / 100)

    def add_priced(self, events: Iterable[Any]) -> None:
        for ev in events:
            key = (ev.customer_id, ev.event_id)
            if key in self.priced:
                continue
            cost = self.cost_of(ev)
            self.priced[key] = (cost, self.charge_of(ev.customer_id, cost))
            self.occurred_ms[key] = (ev.occurred_at - _EPOCH) // timedelta(milliseconds=1)

    def add_rejected(self, reason_code: str, n: int = 1) -> None:
        self.rejected += n
        self.rejected_reasons[reason_code] += n

    def per_customer(self) -> dict[str, tuple[int, Decimal, Decimal]]:
        out: dict[str, list[Any]] = defaultdict(lambda: [0, Decimal(0), Decimal(0)])
        with localcontext(_EXACT):
            for (customer, _), (cost, charge) in self.priced.items():
                t = out[customer]
                t[0] += 1
                t[1] += cost
                t[2] += charge
        return {c: (n, cost, charge) for c, (n, cost, charge) in out.items()}


InvariantCheck = Callable[[Query, Expected], list[Delta]]


def _norm(d: Decimal | int | None) -> Decimal:
    return Decimal(0) if d is None else Decimal(d)


def priced_totals_check(query: Query, expected: Expected) -> list[Delta]:
    """Per customer: row count, Σ cost, Σ charge of usage_priced (raw, no FINAL) = the oracle; no
    duplicate and no missing (customer_id, event_id)."""
    deltas: list[Delta] = []
    rows = query(
        "SELECT customer_id, count(), uniqExact(event_id), sum(cost), sum(charge) FROM usage_priced "
        "GROUP BY customer_id"
    )
    got = {str(c): (int(n), int(u), _norm(cost), _norm(charge)) for c, n, u, cost, charge in rows}
    want = expected.per_customer()
    for customer in sorted(set(got) | set(want)):
        n, u, cost, charge = got.get(customer, (0, 0, Decimal(0), Decimal(0)))
        wn, wcost, wcharge = want.get(customer, (0, Decimal(0), Decimal(0)))
        if n != u:
            deltas.append(Delta("no_double_rows", customer, f"{u} rows (one per event)", f"{n} rows"))
        for what, w, g in (("events", wn, u), ("cost", _norm(wcost), cost), ("charge", _norm(wcharge), charge)):
            if w != g:
                deltas.append(Delta("priced_totals", f"{customer} {what}", str(w), f"{g} (Δ {g - w})"))
    if deltas:  # name a few missing / unexpected ids to make the failure actionable
        stored = {(str(c), str(e)) for c, e in query("SELECT customer_id, event_id FROM usage_priced")}
        missing = sorted(set(expected.priced) - stored)[:5]
        extra = sorted(stored - set(expected.priced))[:5]
        if missing:
            deltas.append(Delta("priced_ids", "missing", "present", repr(missing)))
        if extra:
            deltas.append(Delta("priced_ids", "unexpected", "absent", repr(extra)))
    return deltas


def rejected_count_check(query: Query, expected: Expected) -> list[Delta]:
    """Every hostile record / invalid event is exactly one usage_rejected row with a reason_code."""
    n, empty = query("SELECT count(), countIf(reason_code = '') FROM usage_rejected")[0]
    deltas = []
    if int(n) != expected.rejected:
        deltas.append(Delta("rejected_rows", "usage_rejected", str(expected.rejected), str(n)))
    if int(empty):
        deltas.append(Delta("rejected_rows", "reason_code", "never empty", f"{empty} empty"))
    return deltas


_RAW_BY = (
    "SELECT customer_id, model, {bucket} AS b, count(), sum(cost), sum(charge), sum(input_tokens), "
    "sum(output_tokens) FROM usage_priced GROUP BY customer_id, model, b ORDER BY customer_id, model, b"
)
_ROLLUP_BY = (
    "SELECT customer_id, model, {name} AS b, sum(events), sum(cost), sum(charge), sum(input_tokens), "
    "sum(output_tokens) FROM {table} GROUP BY customer_id, model, b ORDER BY customer_id, model, b"
)


def rollup_check(query: Query, expected: Expected) -> list[Delta]:
    """usage_hourly / usage_daily (materialized views) equal the raw sums of usage_priced, exactly."""
    deltas = []
    for table, name, bucket in (
        ("usage_hourly", "hour", "toStartOfHour(toDateTime(occurred_at, 'UTC'))"),
        ("usage_daily", "day", "toDate(occurred_at, 'UTC')"),
    ):
        raw = [tuple(r) for r in query(_RAW_BY.format(bucket=bucket))]
        rolled = [tuple(r) for r in query(_ROLLUP_BY.format(name=name, table=table))]
        if raw != rolled:
            diff = sorted(set(rolled) ^ set(raw), key=repr)[:3]
            deltas.append(Delta("rollups", table, f"{len(raw)} groups equal to raw sums", f"differs: {diff}"))
    return deltas


PRICING_CHECKS: tuple[InvariantCheck, ...] = (priced_totals_check, rejected_count_check, rollup_check)


def check_invariants(
    query: Query, expected: Expected, checks: Sequence[InvariantCheck] = PRICING_CHECKS
) -> list[Delta]:
    """Run every check; an empty list means the invariant holds."""
    return [d for check in checks for d in check(query, expected)]
