"""Value records of the ledger: grants (policies), entries (facts), policies, budgets, holds,
commands and effects. All frozen; all amounts are integer picos; all times integer epoch ms (UTC).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from meterline.core.ledger._money import LedgerCommandError, Period

Category = Literal["paid", "promotional"]
OveragePolicy = Literal["block", "allow", "credit_limit"]
EntryKind = Literal["grant", "top_up", "debit", "expiry", "void", "adjustment"]
BudgetScope = Literal["customer", "project", "api_key"]
BlockReason = Literal[
    "credit_exhausted",
    "credit_limit_reached",
    "budget_exceeded",
    "runaway_guard",
    "manual",
    "allowance_exhausted",
    "plan_cap_reached",
]
#: Blocks a subscription plan's overage policy sets (``SetPlanGate``; see docs/plans.md).
PLAN_BLOCK_REASONS: tuple[str, ...] = ("allowance_exhausted", "plan_cap_reached")

BLOCK_REASONS: tuple[str, ...] = (
    "manual",
    "credit_limit_reached",
    "credit_exhausted",
    "allowance_exhausted",
    "plan_cap_reached",
    "budget_exceeded",
    "runaway_guard",
)  # precedence: the first present reason is the one ``status`` reports
DERIVED_REASONS = frozenset({"credit_exhausted", "credit_limit_reached", "budget_exceeded", *PLAN_BLOCK_REASONS})
MAX_PRIORITY = 100
NO_EXPIRY = 2**63 - 1  # sort key for grants without expires_at: consumed last


def _err(msg: str, code: str = "invalid_ledger_command") -> LedgerCommandError:
    return LedgerCommandError(msg, reason_code=code)


@dataclass(frozen=True, slots=True)
class GrantScope:
    """What a grant may pay for. ``None`` in a dimension means "any"; a usage is covered only if
    every restricted dimension contains its value (a usage without a project is not covered by a
    project-restricted grant)."""

    providers: frozenset[str] | None = None
    models: frozenset[str] | None = None
    projects: frozenset[str] | None = None

    def covers(self, provider: str | None, model: str | None, project: str | None) -> bool:
        return (
            (self.providers is None or provider in self.providers)
            and (self.models is None or model in self.models)
            and (self.projects is None or project in self.projects)
        )


@dataclass(frozen=True, slots=True)
class CreditGrant:
    """A credit grant is a policy: how much, from when to when, in what order, for what.

    ``priority`` follows Stripe: 0–100, **lower number = consumed first** (default 50).
    ``expires_at_ms`` is exclusive: the grant pays for usage with effective_at ≤ occurred_at < expires_at.
    """

    grant_id: str
    customer_id: str
    amount_picos: int
    currency: str
    effective_at_ms: int
    expires_at_ms: int | None = None
    priority: int = 50
    category: Category = "paid"
    scope: GrantScope | None = None

    def __post_init__(self) -> None:
        if not self.grant_id or not self.customer_id:
            raise _err("grant_id and customer_id are required")
        if self.amount_picos <= 0:
            raise _err("a grant amount must be positive", "invalid_amount")
        if not 0 <= self.priority <= MAX_PRIORITY:
            raise _err("priority must be 0..100")
        if self.category not in ("paid", "promotional"):
            raise _err("category must be paid or promotional")
        if self.expires_at_ms is not None and self.expires_at_ms <= self.effective_at_ms:
            raise _err("expires_at must be after effective_at")
        object.__setattr__(self, "currency", self.currency.lower())

    def order_key(self) -> tuple[int, int, int, str]:
        """Debit order: priority, soonest expiry (none last), oldest effective_at, grant_id."""
        exp = NO_EXPIRY if self.expires_at_ms is None else self.expires_at_ms
        return (self.priority, exp, self.effective_at_ms, self.grant_id)

    def valid_at(self, ms: int) -> bool:
        return self.effective_at_ms <= ms and (self.expires_at_ms is None or ms < self.expires_at_ms)


@dataclass(frozen=True, slots=True)
class GrantState:
    """A grant plus the fold of its entries: ``granted`` = amount ± adjustments, ``remaining`` after
    debits, expiry and void; ``state`` live | expired | voided."""

    grant: CreditGrant
    granted: int
    remaining: int
    state: Literal["live", "expired", "voided"] = "live"


@dataclass(frozen=True, slots=True)
class VelocityRule:
    """Runaway-loop guard: spend in the last ``window_ms`` (kept as buckets of ``bucket_ms``) trips
    when above ``abs_cap_picos`` or above ``baseline_multiple`` × the trailing per-window average over
    the ``baseline_ms`` before that window (the multiple rule needs a non-zero baseline and at least
    ``min_picos`` in the window). ``block`` also blocks the scope until a manual unblock."""

    window_ms: int = 60_000
    bucket_ms: int = 10_000
    baseline_ms: int = 3_600_000
    abs_cap_picos: int | None = None
    baseline_multiple: int | None = None
    min_picos: int = 0
    block: bool = False

    def __post_init__(self) -> None:
        if self.bucket_ms <= 0 or self.window_ms % self.bucket_ms or self.baseline_ms % self.bucket_ms:
            raise _err("window_ms and baseline_ms must be positive multiples of bucket_ms")
        if self.baseline_ms <= self.window_ms:
            raise _err("baseline_ms must be longer than window_ms")


DAY_MS = 86_400_000


#: Upper bound of ``Policy.dedupe_max_ids``: the remembered ids live in the customer's state value,
#: which must fit in one Kafka message whatever the customer's activity (20 bytes per id packed).
MAX_DEDUPE_IDS = 10_000
#: Open holds one customer may have at once; an authorize beyond it is denied ``too_many_holds``
#: (each hold lives in the state value, which must stay bounded).
MAX_OPEN_HOLDS = 2_000


@dataclass(frozen=True, slots=True)
class Policy:
    """Per-customer enforcement policy. ``credit_limit_picos`` is used only with ``credit_limit``."""

    overage: OveragePolicy = "block"
    credit_limit_picos: int = 0
    used_alert_pcts: tuple[int, ...] = (50, 80, 100)
    low_balance_picos: tuple[int, ...] = ()
    hold_ttl_ms: int = 300_000
    runaway_customer: VelocityRule | None = None
    runaway_api_key: VelocityRule | None = None
    dedupe_window_ms: int = 35 * DAY_MS
    dedupe_max_ids: int = 10_000

    def __post_init__(self) -> None:
        if self.overage not in ("block", "allow", "credit_limit"):
            raise _err("overage must be block, allow or credit_limit")
        if self.credit_limit_picos < 0 or self.hold_ttl_ms <= 0 or not 0 < self.dedupe_max_ids <= MAX_DEDUPE_IDS:
            raise _err(
                f"credit_limit_picos ≥ 0, hold_ttl_ms > 0 and 0 < dedupe_max_ids ≤ {MAX_DEDUPE_IDS} are required"
            )
        if any(not 0 < p <= 1000 for p in self.used_alert_pcts):
            raise _err("used_alert_pcts must be in 1..1000")


@dataclass(frozen=True, slots=True)
class Budget:
    """Spend budget over a UTC calendar day or month for the customer, a project or an api key.
    Soft budgets alert; hard budgets also block their scope until the period rolls over."""

    budget_id: str
    scope: BudgetScope
    scope_value: str | None
    period: Period
    limit_picos: int
    hard: bool = False
    alert_pcts: tuple[int, ...] = (80, 100)

    def __post_init__(self) -> None:
        if self.scope not in ("customer", "project", "api_key") or self.period not in ("day", "month"):
            raise _err("budget scope must be customer|project|api_key and period day|month")
        if (self.scope == "customer") != (self.scope_value is None):
            raise _err("scope_value is required for project/api_key budgets and must be None for customer")
        if self.limit_picos <= 0 or any(not 0 < p <= 1000 for p in self.alert_pcts):
            raise _err("a budget needs a positive limit and alert_pcts in 1..1000")

    @property
    def block_scope(self) -> str:
        return "customer" if self.scope == "customer" else f"{self.scope}:{self.scope_value}"

    def matches(self, project: str | None, api_key_id: str | None) -> bool:
        if self.scope == "customer":
            return True
        return (project if self.scope == "project" else api_key_id) == self.scope_value


@dataclass(frozen=True, slots=True)
class BudgetState:
    budget: Budget
    spent: tuple[tuple[str, int], ...] = ()  # (period_key, picos), the two most recent periods
    fired: tuple[tuple[str, int], ...] = ()  # (period_key, pct) already alerted

    def spent_in(self, key: str) -> int:
        return next((v for k, v in self.spent if k == key), 0)


@dataclass(frozen=True, slots=True)
class Hold:
    """A reservation made by ``authorize``: picos reserved per grant, plus overage headroom reserved
    under allow / credit_limit policies. Settled (released) by the usage carrying its request_id."""

    request_id: str
    amount_picos: int
    allocations: tuple[tuple[str, int], ...]
    overage_picos: int
    created_ms: int
    expires_ms: int
    project: str | None = None
    api_key_id: str | None = None


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """What happened. ``amount_picos`` is ≥ 0 except for adjustments (signed, + = more credit).
    Fold: grant/top_up +grant; debit −grant (or +overage when grant_id is None); expiry/void −grant;
    adjustment ±grant (or ∓overage when grant_id is None). ``entry_id`` = ``{customer}:{seq}``."""

    entry_id: str
    customer_id: str
    seq: int
    kind: EntryKind
    amount_picos: int
    currency: str
    at_ms: int
    grant_id: str | None = None
    event_id: str | None = None
    reason: str | None = None


AlertKind = Literal["credit_used", "low_balance", "budget", "runaway"]


@dataclass(frozen=True, slots=True)
class Alert:
    alert_id: str  # deterministic: same commands → same ids (downstream dedupes on it)
    customer_id: str
    kind: AlertKind
    scope: str
    threshold: int  # percent for credit_used / budget, picos for low_balance / runaway cap
    value_picos: int
    at_ms: int


@dataclass(frozen=True, slots=True)
class StatusChange:
    customer_id: str
    scope: str  # "customer" | "project:<p>" | "api_key:<k>"
    reason: str
    blocked: bool
    at_ms: int


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str | None
    request_id: str
    hold: Hold | None
    available_picos: int


@dataclass(frozen=True, slots=True)
class Effects:
    entries: tuple[LedgerEntry, ...] = ()
    status_changes: tuple[StatusChange, ...] = ()
    alerts: tuple[Alert, ...] = ()
    decision: Decision | None = None
    skipped: Literal["offset", "duplicate"] | None = None


# ---------------------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class SourcePos:
    """Where a command came from: the source record's topic, partition and offset."""

    topic: str
    partition: int
    offset: int

    @property
    def key(self) -> str:
        return f"{self.topic}:{self.partition}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ApplyPricedUsage:
    event_id: str
    occurred_at_ms: int
    charge_picos: int
    currency: str
    provider: str
    model: str
    project: str | None = None
    api_key_id: str | None = None
    request_id: str | None = None  # settles the hold made by authorize for this request
    source: SourcePos | None = None

    @property
    def time_ms(self) -> int:
        return self.occurred_at_ms


@dataclass(frozen=True, slots=True, kw_only=True)
class Grant:
    grant: CreditGrant
    at_ms: int
    source: SourcePos | None = None

    @property
    def time_ms(self) -> int:
        return self.at_ms


@dataclass(frozen=True, slots=True, kw_only=True)
class TopUp:
    """A paid grant (written as a ``top_up`` entry)."""

    grant: CreditGrant
    at_ms: int
    source: SourcePos | None = None

    @property
    def time_ms(self) -> int:
        return self.at_ms


@dataclass(frozen=True, slots=True, kw_only=True)
class Void:
    grant_id: str
    at_ms: int
    reason: str = "voided"
    source: SourcePos | None = None

    @property
    def time_ms(self) -> int:
        return self.at_ms


@dataclass(frozen=True, slots=True, kw_only=True)
class Adjust:
    """Signed correction, + = more credit for the customer. With ``grant_id``: the grant's remaining
    (never below 0). Without: the overage (+ forgives / settles overage, never below 0; − adds)."""

    adjustment_id: str
    amount_picos: int
    reason: str
    at_ms: int
    grant_id: str | None = None
    source: SourcePos | None = None

    @property
    def time_ms(self) -> int:
        return self.at_ms


@dataclass(frozen=True, slots=True, kw_only=True)
class ExpireDue:
    """Processing time has reached ``now_ms``: expire grants with expires_at ≤ now, drop holds past TTL."""

    now_ms: int
    source: SourcePos | None = None

    @property
    def time_ms(self) -> int:
        return self.now_ms


@dataclass(frozen=True, slots=True, kw_only=True)
class SetPolicy:
    policy: Policy
    at_ms: int
    source: SourcePos | None = None

    @property
    def time_ms(self) -> int:
        return self.at_ms


@dataclass(frozen=True, slots=True, kw_only=True)
class SetBudget:
    budget: Budget
    at_ms: int
    remove: bool = False
    source: SourcePos | None = None

    @property
    def time_ms(self) -> int:
        return self.at_ms


@dataclass(frozen=True, slots=True, kw_only=True)
class SetBlock:
    """Operator block / unblock of a scope. Unblocking with reason ``runaway_guard`` clears a guard block."""

    scope: str
    blocked: bool
    at_ms: int
    reason: Literal["manual", "runaway_guard"] = "manual"
    source: SourcePos | None = None

    @property
    def time_ms(self) -> int:
        return self.at_ms


@dataclass(frozen=True, slots=True, kw_only=True)
class SetPlanGate:
    """What a subscription plan in force says about enforcement (sent by the credit processor,
    which folds the plan; the ledger itself knows no plans). ``governs``: a plan is in force, so
    its ``on_exhausted`` replaces the prepaid policy (no ``credit_exhausted`` /
    ``credit_limit_reached`` block, authorize does not deny for lack of credit: the plan's
    allowances and policy decide). ``block``: the plan's block reason now (one of
    ``PLAN_BLOCK_REASONS``) or None."""

    governs: bool
    block: str | None
    at_ms: int
    source: SourcePos | None = None

    def __post_init__(self) -> None:
        if self.block is not None and self.block not in PLAN_BLOCK_REASONS:
            raise _err(f"plan block reason must be one of {', '.join(PLAN_BLOCK_REASONS)}")

    @property
    def time_ms(self) -> int:
        return self.at_ms


@dataclass(frozen=True, slots=True, kw_only=True)
class Authorize:
    """Reserve a worst-case charge (computed by the caller from model prices) before a request."""

    request_id: str
    estimate_picos: int
    now_ms: int
    provider: str
    model: str
    project: str | None = None
    api_key_id: str | None = None
    ttl_ms: int | None = None  # None = policy.hold_ttl_ms
    source: SourcePos | None = None

    @property
    def time_ms(self) -> int:
        return self.now_ms


Command = (
    ApplyPricedUsage
    | Grant
    | TopUp
    | Void
    | Adjust
    | ExpireDue
    | SetPolicy
    | SetBudget
    | SetBlock
    | SetPlanGate
    | Authorize
)
