"""Demo gateway traffic and the live summary that ``meterline up --demo`` prints.

The traffic is what a real AI gateway sends: several customers with different habits, several
models (chat and reasoning, with prompt caching), and the mistakes real producers make — a
retried report of an event already sent (must not be charged twice) and a model nobody priced
(must land in ``usage_rejected`` with its reason, never at $0).
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from schemas.models import UsageEvent

SEED_PRICES = "infra/prices/seed.yaml"


@dataclass(frozen=True)
class DemoCustomer:
    customer_id: str
    weight: int
    models: tuple[tuple[str, str, str | None], ...]
    projects: tuple[str, ...]


CUSTOMERS: tuple[DemoCustomer, ...] = (
    DemoCustomer(
        "acme",
        5,
        (("openai", "gpt-4o", None), ("anthropic", "claude-3-5-sonnet", "20241022"), ("openai", "o1", None)),
        ("support-bot", "search"),
    ),
    DemoCustomer("globex", 3, (("google", "gemini-1.5-pro", None), ("meta", "llama-3.1-405b", None)), ("summaries",)),
    DemoCustomer(
        "initech",
        2,
        (("mistral", "mistral-large-2", None), ("mistral", "mixtral-8x22b", None)),
        ("tps-reports", "agents"),
    ),
    DemoCustomer("umbrella", 1, (("meta", "llama-3-70b", None), ("openai", "gpt-4o", None)), ("research",)),
    DemoCustomer("hooli", 1, (("openai", "o1", None),), ("agents",)),
)

# Credit story of the demo: umbrella prepaid a little and runs out (blocked: credit_exhausted);
# hooli's agent gets stuck in a loop after RUNAWAY_AFTER_S and trips the runaway guard (blocked).
UMBRELLA_CREDIT = "1.50"
RUNAWAY_CUSTOMER = "hooli"
RUNAWAY_AFTER_S = 12.0
RUNAWAY_CAP_PER_MINUTE = "5.00"


def demo_credit_commands() -> list[dict[str, Any]]:
    """Ledger commands the demo publishes at start (deterministic ids: re-running changes nothing)."""
    from pipeline.credits.client import grant_command, policy_command

    return [
        policy_command("umbrella", {"overage": "block", "command_id": "demo:umbrella:policy"}),
        grant_command(
            {
                "customer_id": "umbrella",
                "grant_id": "demo-umbrella-prepaid",
                "amount": UMBRELLA_CREDIT,
                "currency": "usd",
            }
        ),
        policy_command(
            RUNAWAY_CUSTOMER,
            {
                "overage": "allow",
                "command_id": "demo:hooli:policy",
                "runaway_customer": {
                    "window_ms": 60_000,
                    "bucket_ms": 10_000,
                    "baseline_ms": 600_000,
                    "abs_cap": RUNAWAY_CAP_PER_MINUTE,
                    "block": True,
                },
            },
        ),
    ]


# Plan story (infra/plans/demo.yaml), beside the pay-per-token customers acme, umbrella and hooli:
# initech is on a small `block` plan and is blocked at its allowance (allowance_exhausted), with a
# minimum commitment it does not reach (trued up); globex is on an `allow` plan with a small
# allowance and pays overage per million tokens. Both subscribe when the demo starts.
DEMO_PLANS = "infra/plans/demo.yaml"
PLAN_SUBSCRIPTIONS: tuple[tuple[str, str], ...] = (("initech", "demo-starter"), ("globex", "demo-growth"))


def plan_customer_ids() -> set[str]:
    return {customer for customer, _plan in PLAN_SUBSCRIPTIONS}


UNPRICED_MODEL = ("openai", "gpt-7-preview", None)


class DemoTraffic:
    """Produces demo usage through a :class:`meterline.stack.producer.UsageProducer` at a steady rate."""

    def __init__(
        self,
        producer: Any,
        *,
        rate_per_s: float = 200.0,
        seed: int = 7,
        allowed: Callable[[str], bool] | None = None,
        runaway_after_s: float | None = RUNAWAY_AFTER_S,
    ) -> None:
        self.producer = producer
        self.allowed = allowed or (lambda _customer: True)
        self.runaway_after_s = runaway_after_s
        self.refused: Counter[str] = Counter()
        self._started = time.monotonic()
        self.rate_per_s = rate_per_s
        self.rng = random.Random(seed)
        self.sent = 0
        self.resent = 0
        self.unpriced = 0
        self._recent: list[UsageEvent] = []
        self._weights = [c.weight for c in CUSTOMERS]

    def make_event(self) -> UsageEvent:
        rng = self.rng
        customer = rng.choices(CUSTOMERS, weights=self._weights)[0]
        provider, model, version = rng.choice(customer.models)
        prompt = int(rng.lognormvariate(6.5, 0.9)) + 1
        cached = prompt // 2 if rng.random() < 0.3 and provider in ("openai", "anthropic", "google") else 0
        write = prompt // 4 if provider == "anthropic" and rng.random() < 0.1 else 0
        output = int(rng.lognormvariate(5.0, 0.8)) + 1
        reasoning = int(output * rng.uniform(1, 4)) if model == "o1" else 0
        return UsageEvent(
            event_id=str(uuid.UUID(int=rng.getrandbits(128))),
            occurred_at=datetime.now(UTC),
            customer_id=customer.customer_id,
            api_key_id=f"key-{customer.customer_id}-1",
            project=rng.choice(customer.projects),
            feature=rng.choice(("chat", "completion", "agent-step")),
            gateway="demo-gateway",
            provider=provider,
            model=model,
            model_version=version,
            request_id=f"req_{rng.getrandbits(48):012x}",
            input_tokens=prompt - cached - write,
            cached_input_tokens=cached,
            cache_write_tokens=write,
            output_tokens=output,
            reasoning_tokens=reasoning,
        )

    def _send(self, event: UsageEvent) -> bool:
        """The demo gateway: refuse requests of a customer whose live status is blocked."""
        if not self.allowed(event.customer_id):
            self.refused[event.customer_id] += 1
            return False
        self.producer.send(event)
        return True

    def runaway_events(self, n: int) -> list[UsageEvent]:
        """An agent stuck in a loop: the same expensive reasoning call, again and again."""
        base = self.make_event()
        return [
            base.model_copy(
                update={
                    "event_id": str(uuid.UUID(int=self.rng.getrandbits(128))),
                    "customer_id": RUNAWAY_CUSTOMER,
                    "api_key_id": f"key-{RUNAWAY_CUSTOMER}-1",
                    "provider": "openai",
                    "model": "o1",
                    "model_version": None,
                    "project": "agents",
                    "input_tokens": 20_000,
                    "cached_input_tokens": 0,
                    "cache_write_tokens": 0,
                    "output_tokens": 2_000,
                    "reasoning_tokens": 3_000,
                }
            )
            for _ in range(n)
        ]

    def tick(self, n: int) -> None:
        if self.runaway_after_s is not None and time.monotonic() - self._started >= self.runaway_after_s:
            for event in self.runaway_events(5):
                if self._send(event):
                    self.sent += 1
        for _ in range(n):
            roll = self.rng.random()
            if roll < 0.02 and self._recent:
                if self._send(self.rng.choice(self._recent)):  # a gateway retry: same event_id
                    self.resent += 1
                continue
            event = self.make_event()
            if roll > 0.995:
                provider, model, _ = UNPRICED_MODEL
                event = event.model_copy(update={"provider": provider, "model": model, "model_version": None})
            if not self._send(event):
                continue
            if roll > 0.995:
                self.unpriced += 1
            self.sent += 1
            self._recent.append(event)
            if len(self._recent) > 200:
                self._recent.pop(0)

    def run(self, stop: threading.Event) -> None:
        interval = 0.1
        per_tick = max(1, int(self.rate_per_s * interval))
        while not stop.is_set():
            started = time.monotonic()
            self.tick(per_tick)
            stop.wait(max(0.0, interval - (time.monotonic() - started)))
        self.producer.flush(10)


SUMMARY_QUERIES = {
    "customers": """
        SELECT customer_id, count() AS events,
               sum(input_tokens + cached_input_tokens + cache_write_tokens) AS prompt_tokens,
               sum(output_tokens + reasoning_tokens) AS completion_tokens,
               sum(cost) AS cost, sum(charge) AS charge
        FROM usage_priced GROUP BY customer_id ORDER BY customer_id""",
    "models": """
        SELECT provider, model, count() AS events, sum(charge) AS charge
        FROM usage_priced GROUP BY provider, model ORDER BY charge DESC""",
    "rejected": """
        SELECT reason_code, count() AS events FROM usage_rejected FINAL GROUP BY reason_code ORDER BY reason_code""",
}


def collect_summary(query: Any) -> dict[str, list[tuple[Any, ...]]]:
    """Run the summary queries with ``query(sql) -> rows``."""
    return {name: list(query(sql)) for name, sql in SUMMARY_QUERIES.items()}


def money(value: Decimal, places: int = 6) -> str:
    """Display only: money keeps full precision everywhere else."""
    return f"${value.quantize(Decimal(1).scaleb(-places)):,}"
