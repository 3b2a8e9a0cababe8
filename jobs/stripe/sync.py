"""``meterline stripe sync``: push priced usage from ClickHouse to Stripe meters, exactly once per window.

What is pushed
    Per customer x meter x window (``sync.window_seconds``, default an hour) the quantity of
    ``usage_priced FINAL``: in ``cost`` mode the charge in meter units (``charge x 10**unit_exponent``,
    micro-dollars by default), in ``itemized`` mode the tokens of one model x token class. A window is
    pushed once it ended ``settle_seconds`` ago; the meter event's timestamp is the window start.

Rounding (cost mode), once per pushed revision, with the remainder carried
    ``exact = delta x 10**unit_exponent + carry_before``; ``value = floor(exact)``;
    ``carry_after = exact - value`` (0 <= carry < 1 unit) goes to the customer x meter's next push.
    So the sum of values ever pushed = the exact charge total - the current carry (< 1 unit =
    0.000001 USD): nothing is lost over a period, and values are whole non-negative numbers.

The cursor (``stripe_pushes``) and the order of every run — each step is safe to crash after:
    1. re-read the cursor; windows whose usage grew get a new revision ``r{n+1}`` carrying the
       delta (late usage); windows older than ``max_age_seconds`` (Stripe: 35 days) are recorded
       ``too_old`` and reported, never silently dropped, except a cost-meter window Stripe already
       bills (an acked revision) that grew: its growth is a ``credited`` revision with a positive
       amount, i.e. a positive corrective amount on the next invoice (jobs/stripe/corrective.py);
       windows whose usage went down (a re-rating correction, docs/corrections.md) get their acked
       revisions planned ``canceling`` and a new revision re-pushing the rest, when every acked
       revision is younger than Stripe's 24 h cancellation window (by Stripe's clock ``now``);
       otherwise (cost mode) the delta is recorded as a ``credited`` revision: a corrective amount
       on the customer's next invoice (jobs/stripe/corrective.py); token meters report ``shrunk``;
    2. insert the new revisions as ``pending`` (intent log) BEFORE sending anything;
    2a. record the credited revisions and the plan-bill corrections as pending corrective amounts;
    2b. cancel every ``canceling`` revision (meter event adjustment) -> ``canceled``; a window whose
       cancellation failed keeps its re-push pending (retried next run);
    3. send every ``pending`` row (older runs' too) with identifier
       ``ml:{customer}:{meter}:{window_start}:r{revision}`` and Idempotency-Key ``ml-me-{identifier}``;
       Stripe answers "already exists" for one it has: that counts as delivered;
    4. record ``acked`` / ``too_old`` / ``failed`` (in batches of 100 and on exit);
    5. send every pending corrective amount as an invoice item (found by metadata first, then
       created with a deterministic Idempotency-Key) and record it ``sent``.
    A crash between 3 and 4 re-sends only un-acknowledged rows; the identifier makes that harmless
    (within Stripe's 24 h identifier window: a run must not stay crashed for a day — see docs).
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any

from jobs.stripe._config import REPO_ROOT, BillingConfig, MeterSpec, StripeTarget, meter_specs
from jobs.stripe._send import STREAM_BATCH, MeterEventSender
from jobs.stripe._store import (
    ACKED,
    CANCELED,
    CANCELING,
    CREDITED,
    FAILED,
    PENDING,
    TOO_OLD,
    Push,
    acked_at,
    insert_pushes,
    last_carry,
    load_customers,
    load_pushes,
    utc,
)
from jobs.stripe.corrective import (
    PLAN_CORRECTION_KIND,
    Corrective,
    record_plan_corrections,
    record_window_corrections,
    send_corrections,
    window_correction_id,
)
from meterline.stack.metrics import STRIPE_METER_EVENTS

MAX_VALUE = 10**15 - 1  # Stripe: at most 15 significant digits
CANCEL_WINDOW_S = 23 * 3600  # Stripe cancels a meter event within 24 h of receipt; 1 h of slack
MAX_IDENTIFIER = 100
ACK_FLUSH = 100
UsageKey = tuple[str, str, int]  # (customer_id, meter event_name, window_start)


@dataclass
class SyncSummary:
    windows: int = 0  # customer x meter x window quantities read from ClickHouse
    planned: int = 0  # new revisions planned this run
    resent: int = 0  # pending revisions of an earlier run sent again
    sent: int = 0  # events sent to Stripe
    acked: int = 0  # of which Stripe has them (incl. "already exists")
    carried: int = 0  # revisions that rounded to 0 units (all carried forward, nothing sent)
    retries: int = 0
    transport: str = "v1"
    too_old: list[Push] = field(default_factory=list)
    failed: list[Push] = field(default_factory=list)
    shrunk: list[str] = field(default_factory=list)  # windows whose usage went DOWN (cannot un-push)
    unmapped: list[str] = field(default_factory=list)  # customers / models with no Stripe mapping
    other_currency_events: int = 0
    cancels: int = 0  # acked revisions planned for cancellation (their window shrank: re-rating)
    canceled: int = 0  # of which Stripe cancelled this run
    plan_updates: list[str] = field(default_factory=list)  # plan subscriptions created / updated
    true_ups: list[str] = field(default_factory=list)  # minimum-commitment true-ups added ("customer:period")
    credited: int = 0  # shrunk windows Stripe can no longer cancel: recorded for a corrective amount
    corrections: list[Corrective] = field(default_factory=list)  # corrective amounts sent this run
    corrections_failed: list[Corrective] = field(default_factory=list)  # refused by Stripe (reported)

    @property
    def ok(self) -> bool:
        return not (self.too_old or self.failed or self.shrunk or self.unmapped or self.corrections_failed)


def identifier(customer: str, meter: str, window_start: int, revision: int) -> str:
    """``ml:{customer}:{meter}:{window_start}:r{revision}``; hashed when over Stripe's 100 chars."""
    ident = f"ml:{customer}:{meter}:{window_start}:r{revision}"
    if len(ident) <= MAX_IDENTIFIER:
        return ident
    digest = hashlib.sha256(f"{customer}\x00{meter}".encode()).hexdigest()[:32]
    return f"ml:h{digest}:{window_start}:r{revision}"


# --------------------------------------------------------------------------- reading usage


def aggregate_usage(
    ch: Any,
    cfg: BillingConfig,
    specs: list[MeterSpec],
    since: int,
    until: int,
    summary: SyncSummary | None = None,
    customer: str | None = None,
) -> dict[UsageKey, Decimal]:
    """Exact quantity per (customer, meter, window_start) for windows in [since, until)."""
    w = cfg.sync.window_seconds
    params: dict[str, Any] = {"w": w, "since": utc(since), "until": utc(until), "cur": cfg.currency}
    where = "occurred_at >= {since:DateTime64(3)} AND occurred_at < {until:DateTime64(3)}"
    if customer is not None:
        where += " AND customer_id = {customer:String}"
        params["customer"] = customer
    ws = "intDiv(toUnixTimestamp(occurred_at), {w:UInt32}) * {w:UInt32}"
    from jobs.stripe.plans import plan_windows

    plan_customers, out = plan_windows(ch, cfg, since, until, customer)  # plan customers: their own buckets
    if plan_customers:
        where += " AND customer_id NOT IN {plan_customers:Array(String)}"
        params["plan_customers"] = sorted(plan_customers)
    if summary is not None:
        summary.other_currency_events = int(
            ch.query(
                f"SELECT count() FROM usage_priced FINAL WHERE {where} AND lower(currency) != {{cur:String}}",
                parameters=params,
            ).result_rows[0][0]
        )
    if cfg.mode == "cost":
        # usage_priced + the re-rating corrections (jobs/reprice): a corrected window grows (a new
        # revision, like late usage) or shrinks (cancel and re-push, or credit: see plan()). A re-rated
        # plan bill (provider 'plan') is no window's usage: it is a corrective amount of its own.
        rows = ch.query(
            f"SELECT customer_id, {ws} AS ws, sum(charge) FROM ("
            f"SELECT customer_id, occurred_at, charge, currency FROM usage_priced FINAL WHERE {where} "
            f"UNION ALL SELECT customer_id, occurred_at, charge, currency FROM usage_corrections FINAL "
            f"WHERE {where} AND kind != {{plan_row:String}}) WHERE lower(currency) = {{cur:String}} "
            "GROUP BY customer_id, ws",
            parameters={**params, "plan_row": PLAN_CORRECTION_KIND},
        ).result_rows
        for cust, start, charge in rows:
            out[(cust, specs[0].event_name, int(start))] = Decimal(charge)
        return out
    index = {(s.provider, s.model, s.model_version, s.token_class): s.event_name for s in specs}
    rows = ch.query(
        f"SELECT customer_id, {ws} AS ws, provider, model, model_version, sum(input_tokens), "
        "sum(output_tokens), sum(cached_input_tokens), sum(cache_write_tokens), sum(reasoning_tokens) "
        f"FROM usage_priced FINAL WHERE {where} AND lower(currency) = {{cur:String}} "
        "GROUP BY customer_id, ws, provider, model, model_version",
        parameters=params,
    ).result_rows
    classes = ("input", "output", "cached_input", "cache_write", "reasoning")
    for cust, start, provider, model, version, *tokens in rows:
        for cls, n in zip(classes, tokens):
            if not n:
                continue
            name = index.get((provider, model, version or None, cls)) or index.get((provider, model, None, cls))
            if name is None:
                if summary is not None and f"{provider}/{model}:{cls}" not in summary.unmapped:
                    summary.unmapped.append(f"{provider}/{model}:{cls}")
                continue
            key = (cust, name, int(start))
            out[key] = out.get(key, Decimal(0)) + Decimal(int(n))
    return out


# --------------------------------------------------------------------------- planning


def plan(
    ch: Any, cfg: BillingConfig, usage: dict[UsageKey, Decimal], *, now: int, since: int, summary: SyncSummary
) -> list[Push]:
    """New revisions for every window whose usage grew since it was last planned (not yet stored)."""
    from jobs.stripe.plans import PLAN_EVENT, PLAN_METERS

    cost_scale = Decimal(10) ** cfg.cost.unit_exponent if cfg.mode == "cost" else Decimal(1)
    by_key: dict[UsageKey, list[Push]] = defaultdict(list)
    for p in load_pushes(ch, since=since):
        by_key[(p.customer_id, p.meter, p.window_start)].append(p)
    carry = last_carry(ch)
    oldest_ok = now - cfg.sync.max_age_seconds + 60  # one minute of slack for clock skew and transit
    money = cfg.mode == "cost"  # the cost meter's windows are money: a shrink can be credited
    groups: dict[tuple[str, str], str] = {}  # (customer, meter) -> this run's corrective amount id
    new: list[Push] = []
    for key in sorted(usage):
        cust, meter, ws = key
        prior = by_key.get(key, [])
        delta = usage[key] - sum((p.amount for p in prior), Decimal(0))
        if delta == 0:
            continue
        rev = max((p.revision for p in prior), default=-1) + 1
        seq, before = carry.get((cust, meter), (0, Decimal(0)))
        seq += 1
        ident = identifier(cust, meter, ws, rev)
        scale = Decimal(1) if meter == PLAN_EVENT else cost_scale  # the plan meter counts tokens
        if delta < 0:  # a re-rating lowered the window: cancel what Stripe has, re-push the rest
            live = [p for p in prior if p.status == ACKED and p.value > 0]
            if any(p.status in (PENDING, CANCELING) for p in prior):  # not settled yet: the next run
                summary.shrunk.append(
                    f"{cust} {meter} {utc(ws):%Y-%m-%dT%H:%MZ}: usage {usage[key]} < pushed {usage[key] - delta}"
                )
                continue
            acked = acked_at(ch, cust, meter, ws) if live else {}
            fresh = bool(live) and all(now - acked.get(p.revision, 0) < CANCEL_WINDOW_S for p in live)
            exact = delta * scale + sum(p.value for p in live) + before
            if fresh and exact >= 0:
                value = int(exact.to_integral_value(rounding=ROUND_FLOOR))
                new.extend(p.with_status(CANCELING) for p in live)
                push = Push(cust, meter, ws, rev, ident, seq, delta, value, exact - value, PENDING if value else ACKED)
                summary.cancels += len(live)
            elif money and meter not in PLAN_METERS:
                # Stripe can no longer cancel them (received > 24 h ago): the delta becomes a corrective
                # amount on the next invoice (jobs/stripe/corrective.py); the meter's carry is untouched
                group = groups.setdefault((cust, meter), window_correction_id(cust, meter, seq))
                push = Push(cust, meter, ws, rev, group, seq, delta, 0, before, CREDITED)
                summary.credited += 1
            else:  # tokens (itemized mode, the plan meter) or a plan's charge (an input of its bill,
                # which reprice corrects as a plan-bill row): a late plan fact, not re-rated money
                summary.shrunk.append(
                    f"{cust} {meter} {utc(ws):%Y-%m-%dT%H:%MZ}: usage {usage[key]} < pushed {usage[key] - delta}"
                )
                continue
        elif ws < oldest_ok and money and meter not in PLAN_METERS and any(p.status == ACKED for p in prior):
            # a window Stripe bills grew after its 35 days (a price raised after the fact): a meter
            # event would be refused, so the growth is a positive corrective amount on the next
            # invoice, recorded like a shrunk window's credit (carry untouched)
            group = groups.setdefault((cust, meter), window_correction_id(cust, meter, seq))
            push = Push(cust, meter, ws, rev, group, seq, delta, 0, before, CREDITED)
            summary.credited += 1
        elif ws < oldest_ok:
            push = Push(
                cust,
                meter,
                ws,
                rev,
                ident,
                seq,
                delta,
                0,
                before,
                TOO_OLD,
                f"window older than {cfg.sync.max_age_seconds}s: Stripe refuses it",
            )
        else:
            exact = delta * scale + before
            value = int(exact.to_integral_value(rounding=ROUND_FLOOR))
            push = Push(cust, meter, ws, rev, ident, seq, delta, value, exact - value, PENDING if value else ACKED)
            if value > MAX_VALUE:
                push = push.with_status(FAILED, f"value {value} has more than 15 digits: use a shorter window")
        carry[(cust, meter)] = (seq, push.carry_after)
        new.append(push)
    return new


# --------------------------------------------------------------------------- the job


def sync(
    target: StripeTarget,
    ch: Any,
    cfg: BillingConfig,
    *,
    now: int | None = None,
    root: Path = REPO_ROOT,
    progress: bool = False,
    on_sent: Callable[[Push], None] | None = None,
    on_corrected: Callable[[Corrective], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> SyncSummary:
    """One sync run (see the module docstring). ``now`` is Stripe's clock (default: wall time).

    ``on_sent(push)`` runs after Stripe answered for ``push`` and before the cursor records it
    (crash-injection point for tests); ``on_corrected(c)`` the same for a corrective amount.
    Raises TransientError when Stripe stays unavailable
    (acknowledged rows are recorded first; the rest stay pending for the next run).
    """
    now = int(time.time()) if now is None else int(now)
    w = cfg.sync.window_seconds
    summary = SyncSummary()
    specs = meter_specs(cfg, root)
    since = (now - 2 * cfg.sync.max_age_seconds) // w * w  # older late usage is still reported
    until = (now - cfg.sync.settle_seconds) // w * w  # only windows that ended settle_seconds ago
    usage = aggregate_usage(ch, cfg, specs, since, until, summary)
    summary.windows = len(usage)
    before = load_pushes(ch, since=since)
    pending_before = [p for p in before if p.status == PENDING]
    new = plan(ch, cfg, usage, now=now, since=since, summary=summary)
    insert_pushes(ch, new)  # step 2: the intent log, before anything is sent
    # 2a. credited revisions (this run's, or an earlier run's that crashed here) and plan-bill
    # corrections become pending corrective amounts, recorded before anything is sent
    record_window_corrections(ch, cfg)
    record_plan_corrections(ch, cfg)
    summary.planned = len(new)
    summary.resent = len(pending_before)
    summary.carried = sum(1 for p in new if p.status == ACKED)
    summary.too_old = [p for p in new if p.status == TOO_OLD]
    summary.failed = [p for p in new if p.status == FAILED]
    sender = MeterEventSender(target, max_attempts=cfg.sync.max_attempts, backoff=cfg.sync.backoff_seconds, sleep=sleep)
    # Cancellations first (a shrunk window's acked revisions): its re-push goes out only once they are done.
    blocked: set[UsageKey] = set()
    cancelled: list[Push] = []
    for p in [q for q in before if q.status == CANCELING] + [q for q in new if q.status == CANCELING]:
        status, error = sender.cancel_one(p)
        if status == CANCELED:
            cancelled.append(p.with_status(CANCELED))
        else:
            blocked.add((p.customer_id, p.meter, p.window_start))
            summary.failed.append(p.with_status(FAILED, error))  # stays `canceling` in the cursor: retried
    insert_pushes(ch, cancelled)
    summary.canceled = len(cancelled)
    to_send = sorted(
        [
            p
            for p in pending_before + [p for p in new if p.status == PENDING]
            if (p.customer_id, p.meter, p.window_start) not in blocked
        ],
        key=lambda p: (p.window_start, p.customer_id, p.meter, p.revision),
    )
    links = _customer_links(target, ch, cfg, {p.customer_id for p in to_send}, root, summary, now)
    to_send = [p for p in to_send if p.customer_id in links]
    summary.transport = "v2" if len(to_send) > cfg.sync.stream_threshold else "v1"
    done: list[Push] = []

    def record(push: Push, status: str, error: str) -> None:
        if on_sent is not None:
            on_sent(push)
        summary.sent += 1
        STRIPE_METER_EVENTS.labels(status).inc()
        final = push.with_status(status, error)
        if status == ACKED:
            summary.acked += 1
        elif status == TOO_OLD:
            summary.too_old.append(final)
        else:
            summary.failed.append(final)
        done.append(final)
        if len(done) >= ACK_FLUSH:
            insert_pushes(ch, done)
            done.clear()

    bar, task = _progress(progress, len(to_send))
    try:
        if summary.transport == "v2":
            for i in range(0, len(to_send), STREAM_BATCH):
                batch = to_send[i : i + STREAM_BATCH]
                results = sender.send_stream([(p, links[p.customer_id]) for p in batch])
                for p, (status, error) in zip(batch, results):
                    record(p, status, error)
                if bar is not None:
                    bar.advance(task, len(batch))
        else:
            for p in to_send:
                status, error = sender.send_one(p, links[p.customer_id])
                record(p, status, error)
                if bar is not None:
                    bar.advance(task)
    finally:
        insert_pushes(ch, done)  # step 4 on every exit path: what Stripe acknowledged is never re-planned
        summary.retries = sender.retries
        if bar is not None:
            bar.stop()
    # 3b. every pending corrective amount (this run's and earlier runs') as an invoice item, once
    corr = send_corrections(target.client(), ch, load_customers(ch), sender.retrying, on_sent=on_corrected)
    summary.corrections, summary.corrections_failed = corr.sent, corr.failed
    summary.unmapped.extend(
        f"customer {c} (not provisioned): corrective amount waits" for c in sorted(set(corr.waiting))
    )
    if _has_plans(ch):  # after the pushes: a plan change bills the replaced price's usage reported so far
        from jobs.stripe.plans import true_ups

        _apply_plans(target, ch, cfg, now, summary)
        summary.true_ups = true_ups(target.client(), ch, cfg)
    return summary


def _has_plans(ch: Any) -> bool:
    from jobs.stripe.plans import plan_customers

    try:
        return bool(plan_customers(ch))
    except Exception:  # no subscription_events table
        return False


def _apply_plans(target: StripeTarget, ch: Any, cfg: BillingConfig, now: int, summary: SyncSummary) -> None:
    """Keep plan subscriptions in step with the timeline (a change since the last run) before pushing."""
    if not (cfg.sync.auto_provision_customers and _has_plans(ch)):
        return
    from jobs.stripe.plans import apply_plans

    client, meter_id = _plan_meter(target)
    report = apply_plans(client, ch, cfg, meter_id, now=now)
    summary.plan_updates = report.created + report.updated
    summary.unmapped.extend(report.unmapped)


def _new_plan_subscriptions(target: StripeTarget, ch: Any, cfg: BillingConfig, customers: list[str], now: int) -> Any:
    from jobs.stripe.plans import apply_plans

    client, meter_id = _plan_meter(target)
    return apply_plans(client, ch, cfg, meter_id, now=now, customers=customers, changes=False)


def _plan_meter(target: StripeTarget) -> tuple[Any, str]:
    """A client and the plan meter's id (created when missing), for mapping plans at sync time."""
    from jobs.stripe._meters import ensure_meter
    from jobs.stripe.plans import PLAN_METER
    from jobs.stripe.provision import ProvisionReport

    client = target.client()
    existing = {m.event_name: m for m in client.v1.billing.meters.list({"limit": 100}).auto_paging_iter()}
    return client, ensure_meter(client, PLAN_METER, existing, ProvisionReport())


def _customer_links(
    target: StripeTarget,
    ch: Any,
    cfg: BillingConfig,
    customers: set[str],
    root: Path,
    summary: SyncSummary,
    now: int,
) -> dict[str, str]:
    links = {cid: link.stripe_customer_id for cid, link in load_customers(ch).items() if cid in customers}
    missing = sorted(customers - set(links))
    if missing:  # a plan customer gets its plan subscription (as `provision` does), never the pay-per-token one
        from jobs.stripe.plans import plan_customers

        try:
            on_plans = set(plan_customers(ch))
        except Exception:  # no subscription_events table yet
            on_plans = set()
        if cfg.sync.auto_provision_customers and on_plans.intersection(missing):
            # its plan came into force since `provision` ran: create the missing subscription before
            # pushing (changes to it wait for after the pushes, in _apply_plans), so its usage goes out now
            made = _new_plan_subscriptions(target, ch, cfg, sorted(on_plans.intersection(missing)), now)
            links.update({cid: link.stripe_customer_id for cid, link in made.customers.items()})
            summary.plan_updates.extend(made.created)
        missing = [c for c in missing if c not in on_plans]
    if missing and cfg.sync.auto_provision_customers:
        from jobs.stripe.provision import ensure_customers, price_ids

        client = target.client()
        made = ensure_customers(client, ch, cfg, missing, price_ids(client, cfg, root))
        links.update({cid: link.stripe_customer_id for cid, link in made.items()})
    summary.unmapped.extend(f"customer {cid} (not provisioned)" for cid in sorted(customers - set(links)))
    return links


def _progress(enabled: bool, total: int) -> tuple[Any, Any]:
    if not enabled or total == 0:
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("pushing meter events"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True
    )
    task = bar.add_task("push", total=total)
    bar.start()
    return bar, task
