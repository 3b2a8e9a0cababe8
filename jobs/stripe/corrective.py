"""Corrective amounts: money a re-rating changed that Stripe can no longer take as meter events.

Meter events cannot be negative and Stripe cancels one only within 24 h of receipt. So when a
re-rating (``meterline reprice``, docs/corrections.md) lowers a window whose events Stripe received
more than 24 h ago, or changes a plan bill (money, while the plan meter counts tokens), the
difference goes to Stripe as an **invoice item on the customer's next invoice**: a negative amount
is a credit that lowers ``amount_due`` (Stripe: "Passing in a negative amount will reduce the
amount_due on the invoice"), a positive one a charge. One item per customer and sync run (an
invoice holds at most 250 items), with ``period`` = the corrected usage, ``metadata`` naming it and
``subscription`` = the customer's subscription, so it lands on that subscription's next invoice.

Where they come from
    * ``window``: the sync records a shrunk window's delta (or the growth of a window Stripe bills,
      after Stripe's 35-day meter event limit: a positive amount) as a ``credited`` revision in its cursor
      (``stripe_pushes``), whose identifier is the corrective amount's id
      (:func:`window_correction_id`); :func:`record_window_corrections` turns credited revisions
      with no corrective amount yet into one (so a crash between the two inserts loses nothing).
    * ``plan``: a plan-bill correction row of ``usage_corrections`` (``kind = 'plan'``: the
      re-rated plan bill minus the billed one, per customer x period, written by ``reprice``);
      :func:`record_plan_corrections` turns each reprice correction id of a customer into one.

Money, exact
    ``exact = amount x 100 + carry_before`` (minor units); ``cents = exact`` rounded toward zero;
    ``carry_after = exact - cents`` (|carry| < 1 cent), carried into the customer's next corrective
    amount. So the cents ever sent = the exact corrective total - the current carry: nothing lost,
    never more credited or charged than re-rated.

Exactly once
    Recorded ``pending`` (the intent log) before anything is sent; then looked up at Stripe by
    ``metadata.meterline_correction`` and only then created with a deterministic Idempotency-Key;
    recorded ``sent`` with the invoice item id. A crash between Stripe's answer and the record
    finds the item (or replays the key) on the next run: created once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from decimal import ROUND_DOWN, Decimal
from typing import Any

import stripe

from jobs.stripe._config import BillingConfig, idem_key
from jobs.stripe._store import CREDITED, FAILED, PENDING, CustomerLink, _run, epoch, utc

SENT = "sent"
WINDOW, PLAN = "window", "plan"
PLAN_CORRECTION_KIND = "plan"  # usage_corrections.kind of the rows that carry a plan-bill delta (0013)
META_CORRECTION = "meterline_correction"
MINOR_UNITS = Decimal(100)  # the billing currency is a 2-decimal currency (docs/stripe.md)
_VER = {PENDING: 1, SENT: 2, FAILED: 2}
COLUMNS = (
    "correction_id",
    "customer_id",
    "kind",
    "seq",
    "amount",
    "cents",
    "carry_after",
    "currency",
    "period_start",
    "period_end",
    "source",
    "stripe_id",
    "status",
    "error",
    "ver",
)


@dataclass(frozen=True, slots=True)
class Corrective:
    """One corrective amount of a customer (see the module docstring)."""

    correction_id: str
    customer_id: str
    kind: str
    seq: int
    amount: Decimal  # exact signed money (currency units); negative = a credit
    cents: int  # what Stripe gets (minor units, toward zero)
    carry_after: Decimal  # the customer's sub-cent remainder after it (minor units)
    currency: str
    period_start: int
    period_end: int
    source: str
    stripe_id: str = ""
    status: str = PENDING
    error: str = ""

    def with_status(self, status: str, *, stripe_id: str = "", error: str = "") -> Corrective:
        return replace(self, status=status, stripe_id=stripe_id or self.stripe_id, error=error[:500])

    def row(self) -> tuple[Any, ...]:
        return (
            self.correction_id,
            self.customer_id,
            self.kind,
            self.seq,
            self.amount,
            self.cents,
            self.carry_after,
            self.currency,
            utc(self.period_start),
            utc(self.period_end),
            self.source[:2000],
            self.stripe_id,
            self.status,
            self.error,
            _VER[self.status],
        )

    @property
    def label(self) -> str:
        return f"{self.customer_id} {self.correction_id}: {self.cents} minor units ({self.amount} {self.currency})"


def window_correction_id(customer: str, meter: str, seq: int) -> str:
    """``w:{customer}:{meter}:s{seq}`` (seq: the cursor seq of the run's first credited revision
    of that customer x meter: the same on a re-plan after a crash); hashed when over 100 chars."""
    ident = f"w:{customer}:{meter}:s{seq}"
    if len(ident) <= 100:
        return ident
    digest = hashlib.sha256(f"{customer}\x00{meter}".encode()).hexdigest()[:32]
    return f"w:h{digest}:s{seq}"


def plan_correction_id(customer: str, correction_id: str) -> str:
    ident = f"p:{customer}:{correction_id}"
    if len(ident) <= 100:
        return ident
    digest = hashlib.sha256(f"{customer}\x00{correction_id}".encode()).hexdigest()[:40]
    return f"p:h{digest}"


# --------------------------------------------------------------------------- the store


def insert_corrections(ch: Any, items: Iterable[Corrective]) -> None:
    rows = [c.row() for c in items]
    if rows:
        _run(ch.insert, "stripe_corrections", rows, column_names=list(COLUMNS))


def load_corrections(
    ch: Any, *, customer: str | None = None, ids: Iterable[str] | None = None, status: str | None = None
) -> list[Corrective]:
    """Latest state of the corrective amounts (by customer, then seq)."""
    where: list[str] = ["1"]
    params: dict[str, Any] = {}
    if customer is not None:
        where.append("customer_id = {c:String}")
        params["c"] = customer
    if ids is not None:
        where.append("correction_id IN {ids:Array(String)}")
        params["ids"] = sorted(set(ids))
    if status is not None:
        where.append("status = {s:String}")
        params["s"] = status
    rows = _run(
        ch.query,
        f"SELECT {', '.join(COLUMNS[:-1])} FROM stripe_corrections FINAL WHERE {' AND '.join(where)} "
        "ORDER BY customer_id, seq",
        parameters=params,
    ).result_rows
    return [
        Corrective(
            r[0],
            r[1],
            r[2],
            int(r[3]),
            Decimal(r[4]),
            int(r[5]),
            Decimal(r[6]),
            r[7],
            epoch(r[8]),
            epoch(r[9]),
            r[10],
            r[11],
            r[12],
            r[13],
        )
        for r in rows
    ]


def _last(ch: Any) -> dict[str, tuple[int, Decimal]]:
    """customer -> (highest seq, carry after it)."""
    rows = _run(
        ch.query,
        "SELECT customer_id, max(seq), argMax(carry_after, seq) FROM stripe_corrections FINAL GROUP BY customer_id",
    ).result_rows
    return {r[0]: (int(r[1]), Decimal(r[2])) for r in rows}


def _assign(ch: Any, cfg: BillingConfig, found: list[tuple[str, str, str, Decimal, int, int, str]]) -> list[Corrective]:
    """(id, customer, kind, amount, start, end, source) -> corrective amounts with seq, cents, carry."""
    last = _last(ch)
    out = []
    for cid, cust, kind, amount, start, end, source in found:
        seq, before = last.get(cust, (0, Decimal(0)))
        exact = amount * MINOR_UNITS + before
        cents = int(exact.to_integral_value(rounding=ROUND_DOWN))
        c = Corrective(cid, cust, kind, seq + 1, amount, cents, exact - cents, cfg.currency, start, end, source)
        last[cust] = (c.seq, c.carry_after)
        out.append(c)
    return out


def record_window_corrections(ch: Any, cfg: BillingConfig) -> list[Corrective]:
    """Credited cursor revisions with no corrective amount yet -> pending corrective amounts (stored)."""
    rows = _run(
        ch.query,
        "SELECT identifier, customer_id, sum(amount), toUnixTimestamp(min(window_start)), "
        "toUnixTimestamp(max(window_start)), count(), min(seq) FROM stripe_pushes FINAL "
        "WHERE status = {s:String} AND identifier NOT IN (SELECT correction_id FROM stripe_corrections) "
        "GROUP BY identifier, customer_id ORDER BY customer_id, min(seq), identifier",
        parameters={"s": CREDITED},
    ).result_rows
    w = cfg.sync.window_seconds
    found = [
        (str(i), str(c), WINDOW, Decimal(a), int(lo), int(hi) + w, f"{int(n)} window(s)")
        for i, c, a, lo, hi, n, _ in rows
    ]
    items = _assign(ch, cfg, found)
    insert_corrections(ch, items)
    return items


def record_plan_corrections(ch: Any, cfg: BillingConfig) -> list[Corrective]:
    """Plan-bill correction rows of ``usage_corrections`` with no corrective amount yet -> pending ones
    (the item's ``period``: the corrected billing periods, from their start to their ``period_end``)."""
    rows = _run(
        ch.query,
        "SELECT customer_id, correction_id, sum(charge), toUnixTimestamp(min(occurred_at)), "
        "toUnixTimestamp(max(greatest(period_end, occurred_at))), min(created_at) FROM usage_corrections FINAL "
        "WHERE kind = {p:String} AND lower(currency) = {cur:String} "
        "GROUP BY customer_id, correction_id ORDER BY customer_id, min(created_at), correction_id",
        parameters={"p": PLAN_CORRECTION_KIND, "cur": cfg.currency},
    ).result_rows
    if not rows:
        return []
    known = {c.correction_id for c in load_corrections(ch, ids=[plan_correction_id(r[0], r[1]) for r in rows])}
    found = [
        (plan_correction_id(c, rid), str(c), PLAN, Decimal(a), int(lo), max(int(hi), int(lo) + 1), f"reprice {rid}")
        for c, rid, a, lo, hi, _ in rows
        if plan_correction_id(c, rid) not in known and Decimal(a) != 0
    ]
    items = _assign(ch, cfg, found)
    insert_corrections(ch, items)
    return items


# --------------------------------------------------------------------------- Stripe


def invoice_item_params(c: Corrective, link: CustomerLink) -> dict[str, Any]:
    what = "usage re-rated after the fact" if c.kind == WINDOW else "plan bill re-rated after the fact"
    period = f"{utc(c.period_start):%Y-%m-%d %H:%MZ}..{utc(c.period_end):%Y-%m-%d %H:%MZ}"
    params: dict[str, Any] = {
        "customer": link.stripe_customer_id,
        "amount": c.cents,
        "currency": c.currency,
        "description": f"Correction: {what} ({period})"[:500],
        "period": {"start": c.period_start, "end": c.period_end},
        "metadata": {
            META_CORRECTION: c.correction_id,
            "meterline_customer_id": c.customer_id,
            "meterline_amount": format(c.amount, "f"),
        },
    }
    if link.subscription_id:
        params["subscription"] = link.subscription_id
    return params


def find_item(client: stripe.StripeClient, stripe_customer: str, correction_id: str) -> Any:
    """The invoice item Stripe holds for ``correction_id`` (by metadata), or None."""
    items = client.v1.invoice_items.list({"customer": stripe_customer, "limit": 100})
    for ii in items.auto_paging_iter():
        if (ii.metadata.to_dict() if ii.metadata else {}).get(META_CORRECTION) == correction_id:
            return ii
    return None


@dataclass
class CorrectiveRun:
    sent: list[Corrective]
    failed: list[Corrective]
    waiting: list[str]  # customers not provisioned yet (their amounts stay pending)


def send_corrections(
    client: stripe.StripeClient,
    ch: Any,
    links: dict[str, CustomerLink],
    retrying: Callable[[str, Callable[[], Any]], Any],
    *,
    on_sent: Callable[[Corrective], None] | None = None,
) -> CorrectiveRun:
    """Send every pending corrective amount (this run's and earlier runs'), once each.

    ``retrying(what, call)`` backs off on 429 / 5xx / connection errors (the meter event sender's
    loop). ``on_sent(c)`` runs after Stripe answered and before the store records it (tests)."""
    run = CorrectiveRun([], [], [])
    for c in load_corrections(ch, status=PENDING):
        if c.cents == 0:  # all of it carried into the customer's next corrective amount
            insert_corrections(ch, [c.with_status(SENT)])
            run.sent.append(c.with_status(SENT))
            continue
        link = links.get(c.customer_id)
        if link is None:
            run.waiting.append(c.customer_id)
            continue
        params = invoice_item_params(c, link)

        def call(c: Corrective = c, params: dict[str, Any] = params, link: CustomerLink = link) -> tuple[str, str]:
            try:
                found = find_item(client, link.stripe_customer_id, c.correction_id)
                if found is None:
                    found = client.v1.invoice_items.create(
                        params,  # type: ignore[arg-type]
                        {"idempotency_key": idem_key("corr", c.correction_id, params)},
                    )
            except (stripe.InvalidRequestError, stripe.IdempotencyError) as exc:
                return FAILED, f"{exc.code or ''}: {exc.user_message or exc}"
            return SENT, str(found.id)

        status, detail = retrying(f"corrective amount {c.correction_id}", call)
        if on_sent is not None:
            on_sent(c)
        if status == SENT:
            done = c.with_status(SENT, stripe_id=detail)
            run.sent.append(done)
        else:
            done = c.with_status(FAILED, error=detail)
            run.failed.append(done)
        insert_corrections(ch, [done])
    return run


def stripe_cents(client: stripe.StripeClient, items: Iterable[Corrective]) -> tuple[int, list[str]]:
    """Σ of the invoice items Stripe holds for sent corrective amounts, and what does not match the
    store (missing, another amount or currency, not sent). Amounts of 0 cents have no item."""
    total, wrong = 0, []
    for c in items:
        if c.status != SENT:
            wrong.append(f"{c.correction_id}: {c.status} {c.error}".strip())
            continue
        if c.cents == 0:
            continue
        try:
            ii = client.v1.invoice_items.retrieve(c.stripe_id)
        except stripe.InvalidRequestError:
            wrong.append(f"{c.correction_id}: invoice item {c.stripe_id} missing at Stripe")
            continue
        meta = ii.metadata.to_dict() if ii.metadata else {}
        if int(ii.amount) != c.cents or ii.currency != c.currency or meta.get(META_CORRECTION) != c.correction_id:
            wrong.append(f"{c.correction_id}: Stripe holds {ii.amount} {ii.currency}, recorded {c.cents}")
            continue
        total += int(ii.amount)
    return total, wrong
