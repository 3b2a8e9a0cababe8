"""``meterline stripe reconcile --period ...``: ClickHouse vs the sync cursor vs Stripe's meter summaries.

Per customer x meter, over the windows starting in ``[start, end)``, three numbers in meter units:

* ``clickhouse`` — the exact usage (``charge x 10**unit_exponent`` in cost mode, tokens in itemized);
* ``pushed``     — the sum of values the cursor says Stripe acknowledged (``stripe_pushes`` acked);
* ``stripe``     — Stripe's ``event_summaries`` aggregate for the customer over the same range.

Usage in a window that has not settled yet is **pending**, not drift: the sync pushes a window only
once it ended ``settle_seconds`` ago (``sync.until``), so right after a sync the current window (and
the previous one, within the settle time) is rightly held back. ``pending`` is that quantity and
``due_at`` the unix second from which the next sync pushes all of it (last pending window's end +
``settle_seconds``).

A window that shrank after Stripe's 24 h cancellation window (a re-rating) keeps its meter events;
its delta went to Stripe as a corrective amount (an invoice item on the next invoice): ``credited``.
So Stripe's meter summary − the credit = the corrected figure.

A row drifts when ``|clickhouse − pending − (pushed − credited)| >= 1`` unit (the carried sub-unit remainder is
< 1 unit, so anything above is real: unpushed, too old, failed or shrunk usage) or when
``pushed != stripe`` (an event lost, deleted or double counted at Stripe), or when a corrective
amount of the row's windows is not at Stripe as recorded (pending, failed, missing, another amount).
A re-rated plan bill (a corrective amount of kind ``plan``, period starting in the range) is checked
the same way on the customer's plan-meter row (the plan charge meter's for a rate-card plan). A row with pending usage
and no drift has the status ``pending``; only ``drift`` is an error (the CLI exits 1 on it alone). Summaries are eventually consistent at real
Stripe: reconcile a period some minutes after the last sync.
"""

from __future__ import annotations

import calendar
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import stripe

from jobs.stripe._config import REPO_ROOT, BillingConfig, meter_specs
from jobs.stripe._store import ACKED, CANCELED, CANCELING, CREDITED, load_customers, load_pushes
from jobs.stripe.corrective import MINOR_UNITS, PLAN, Corrective, load_corrections, stripe_cents
from jobs.stripe.sync import aggregate_usage
from meterline.core.errors import InputError


@dataclass(frozen=True, slots=True)
class Drift:
    customer_id: str
    meter: str
    clickhouse: Decimal
    pushed: int
    stripe: Decimal | None  # None: the customer has no Stripe mapping
    unpushed: Decimal  # clickhouse quantity the cursor holds as pending / too_old / failed
    pending: Decimal = Decimal(0)  # clickhouse quantity in windows not due yet (settle_seconds)
    due_at: int | None = None  # unix s from which a sync pushes all of ``pending`` (None: nothing pending)
    # Windows that shrank after Stripe's 24 h cancellation window are settled by corrective amounts
    # (invoice items, jobs/stripe/corrective.py): ``credited`` is their exact quantity in meter units
    # (positive = a credit to the customer), ``credited_stripe`` what Stripe's invoice items for
    # them hold (whole cents, in meter units), ``credit_issues`` items missing or unlike the store.
    credited: Decimal = Decimal(0)
    credited_stripe: Decimal = Decimal(0)
    credit_issues: tuple[str, ...] = ()

    @property
    def drifted(self) -> bool:
        due = self.clickhouse - self.pending
        return (
            abs(due - (self.pushed - self.credited)) >= 1
            or self.stripe is None
            or self.stripe != self.pushed
            or bool(self.credit_issues)
        )

    @property
    def status(self) -> str:
        """``drift`` (real), ``pending`` (only usage not due yet is unpushed) or ``ok``."""
        if self.drifted:
            return "drift"
        return "pending" if self.pending > 0 else "ok"


def parse_period(text: str) -> tuple[int, int]:
    """``YYYY-MM`` (a UTC month), ``YYYY-MM-DD`` (a day) or ``START..END`` (dates or ISO instants, end
    exclusive) -> unix seconds ``[start, end)``."""

    def instant(s: str) -> int:
        s = s.strip()
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", s):
            return calendar.timegm(date.fromisoformat(s).timetuple())
        when = datetime.fromisoformat(s.replace("Z", "+00:00"))
        return int((when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp())

    try:
        if ".." in text:
            a, b = text.split("..", 1)
            start, end = instant(a), instant(b)
        elif re.fullmatch(r"\d{4}-\d{2}", text.strip()):
            y, m = (int(x) for x in text.strip().split("-"))
            start = calendar.timegm((y, m, 1, 0, 0, 0))
            end = calendar.timegm((y + m // 12, m % 12 + 1, 1, 0, 0, 0))
        else:
            start = instant(text)
            end = start + 86400
    except ValueError as exc:
        raise InputError(f"bad period {text!r}: use YYYY-MM, YYYY-MM-DD or START..END", field="period") from exc
    if end <= start:
        raise InputError(f"empty period {text!r}", field="period")
    return start, end


def reconcile(
    client: stripe.StripeClient,
    ch: Any,
    cfg: BillingConfig,
    start: int,
    end: int,
    *,
    customer: str | None = None,
    root: Path = REPO_ROOT,
    now: int | None = None,
) -> list[Drift]:
    """One row per customer x meter with usage or pushes in the period (sorted). ``now`` is
    Stripe's clock as the sync sees it (default: wall time); it decides which windows are due."""
    now = int(time.time()) if now is None else int(now)
    w = cfg.sync.window_seconds
    horizon = (now - cfg.sync.settle_seconds) // w * w  # the sync pushes windows starting before this
    specs = meter_specs(cfg, root)
    scale = Decimal(10) ** cfg.cost.unit_exponent if cfg.mode == "cost" else Decimal(1)
    usage = aggregate_usage(ch, cfg, specs, start, end, customer=customer)
    ch_units: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    from jobs.stripe.plans import PLAN_CHARGE_EVENT, PLAN_EVENT

    pending: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    due_at: dict[tuple[str, str], int] = {}
    for (cust, meter, ws), amount in usage.items():
        units = amount * (Decimal(1) if meter == PLAN_EVENT else scale)
        ch_units[(cust, meter)] += units
        if ws >= horizon:  # not settled yet: the sync holds it back until the window end + settle time
            pending[(cust, meter)] += units
            due_at[(cust, meter)] = max(due_at.get((cust, meter), 0), ws + w + cfg.sync.settle_seconds)
    pushed: dict[tuple[str, str], int] = defaultdict(int)
    unpushed: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    credited: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    corrections: dict[tuple[str, str], set[str]] = defaultdict(set)
    for p in load_pushes(ch, since=start, until=end, customer=customer):
        if p.status == CREDITED:  # settled by a corrective amount (its id is the identifier)
            credited[(p.customer_id, p.meter)] -= p.amount * scale
            corrections[(p.customer_id, p.meter)].add(p.identifier)
        elif p.status in (ACKED, CANCELING):  # a canceling revision is still counted at Stripe
            pushed[(p.customer_id, p.meter)] += p.value
        elif p.status == CANCELED:
            continue
        else:
            unpushed[(p.customer_id, p.meter)] += p.amount * (Decimal(1) if p.meter == PLAN_EVENT else scale)
    links = load_customers(ch)
    meter_ids = {m.event_name: m.id for m in client.v1.billing.meters.list({"limit": 100}).auto_paging_iter()}
    lo, hi = start - start % 60, end - end % 60  # minute-aligned; windows are whole minutes
    out = []
    # re-rated plan bills of periods starting in the range: checked on the customer's plan meter row
    plan_bills: dict[tuple[str, str], list[Corrective]] = defaultdict(list)
    for c in load_corrections(ch, customer=customer):
        if c.kind == PLAN and start <= c.period_start < end:
            # on the row of the meter its plan's usage goes to (tokens, or the charge of a rate-card plan)
            on_charge = (c.customer_id, PLAN_CHARGE_EVENT) in ch_units or (c.customer_id, PLAN_CHARGE_EVENT) in pushed
            plan_bills[(c.customer_id, PLAN_CHARGE_EVENT if on_charge else PLAN_EVENT)].append(c)
    per_cent = scale / MINOR_UNITS  # meter units per cent (cost mode: unit_exponent >= 2)
    for key in sorted(set(ch_units) | set(pushed) | set(unpushed) | set(credited) | set(plan_bills)):
        cust, meter = key
        issues: list[str] = []
        at_stripe_credit = Decimal(0)
        if corrections.get(key):
            records = load_corrections(ch, ids=corrections[key])
            issues = [f"{i}: not recorded" for i in sorted(corrections[key] - {c.correction_id for c in records})]
            cents, wrong = stripe_cents(client, records)
            issues += wrong
            at_stripe_credit = -cents * per_cent
        if plan_bills.get(key):  # money, not plan-meter tokens: only whether Stripe holds them as recorded
            issues += stripe_cents(client, plan_bills[key])[1]
        link, mid = links.get(cust), meter_ids.get(meter)
        at_stripe: Decimal | None = None
        if link is not None and mid is not None:
            res = client.v1.billing.meters.event_summaries.list(
                mid, {"customer": link.stripe_customer_id, "start_time": lo, "end_time": hi}
            )
            at_stripe = sum((Decimal(str(s.aggregated_value)) for s in res.auto_paging_iter()), Decimal(0))
        out.append(
            Drift(
                cust,
                meter,
                ch_units.get(key, Decimal(0)),
                pushed.get(key, 0),
                at_stripe,
                unpushed.get(key, Decimal(0)),
                pending.get(key, Decimal(0)),
                due_at.get(key),
                credited.get(key, Decimal(0)),
                at_stripe_credit,
                tuple(issues),
            )
        )
    return out
