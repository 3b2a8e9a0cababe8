"""ClickHouse access for the Stripe jobs: the tables of ``infra/clickhouse/0006_stripe.sql``.

Every table is a ReplacingMergeTree written append-only (a status change is a new row with a higher
``ver``) and read with ``FINAL``, so readers always see the latest state of each key.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from meterline.core.errors import ClickHouseUnavailable

PENDING, ACKED, TOO_OLD, FAILED = "pending", "acked", "too_old", "failed"
# An acked revision whose window shrank (a re-rating correction, docs/corrections.md) is cancelled
# at Stripe: canceling (planned) -> canceled (Stripe dropped it). Higher ver: the later state wins.
CANCELING, CANCELED = "canceling", "canceled"
# A window that shrank after Stripe's 24 h cancellation window: its (negative) delta is recorded as
# a credited revision (nothing sent as a meter event) and goes to Stripe as a corrective amount on
# the customer's next invoice (jobs/stripe/corrective.py); its identifier is that amount's id.
CREDITED = "credited"
_VER = {PENDING: 1, ACKED: 2, TOO_OLD: 2, FAILED: 2, CREDITED: 2, CANCELING: 3, CANCELED: 4}

PUSH_COLUMNS = (
    "customer_id",
    "meter",
    "window_start",
    "revision",
    "identifier",
    "seq",
    "amount",
    "value",
    "carry_after",
    "status",
    "error",
    "ver",
)


def utc(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def epoch(value: datetime) -> int:
    if value.tzinfo is None:  # chDB returns naive datetimes holding UTC
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp())


def _run(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # clickhouse-connect raises its own tree; surface as transient
        raise ClickHouseUnavailable(f"ClickHouse: {exc}") from exc


# --------------------------------------------------------------------------- customers


@dataclass(frozen=True, slots=True)
class CustomerLink:
    customer_id: str
    stripe_customer_id: str
    subscription_id: str


def load_customers(ch: Any) -> dict[str, CustomerLink]:
    rows = _run(
        ch.query, "SELECT customer_id, stripe_customer_id, subscription_id FROM stripe_customers FINAL"
    ).result_rows
    return {r[0]: CustomerLink(r[0], r[1], r[2]) for r in rows}


def save_customer(ch: Any, link: CustomerLink, mode: str) -> None:
    _run(
        ch.insert,
        "stripe_customers",
        [(link.customer_id, link.stripe_customer_id, link.subscription_id, mode)],
        column_names=["customer_id", "stripe_customer_id", "subscription_id", "mode"],
    )


# --------------------------------------------------------------------------- pushes (the cursor)


@dataclass(frozen=True, slots=True)
class Push:
    """One planned meter event: a (customer, meter, window, revision) and what it carries."""

    customer_id: str
    meter: str
    window_start: int  # unix seconds (also the meter event's timestamp)
    revision: int
    identifier: str
    seq: int
    amount: Decimal  # exact quantity accounted by this revision (currency units or tokens)
    value: int  # the whole number sent to Stripe
    carry_after: Decimal  # sub-unit remainder (in meter units) carried to the next push
    status: str = PENDING
    error: str = ""

    def with_status(self, status: str, error: str = "") -> Push:
        return replace(self, status=status, error=error[:500])

    def row(self) -> tuple[Any, ...]:
        return (
            self.customer_id,
            self.meter,
            utc(self.window_start),
            self.revision,
            self.identifier,
            self.seq,
            self.amount,
            self.value,
            self.carry_after,
            self.status,
            self.error,
            _VER[self.status],
        )


def insert_pushes(ch: Any, pushes: list[Push]) -> None:
    if pushes:
        _run(ch.insert, "stripe_pushes", [p.row() for p in pushes], column_names=list(PUSH_COLUMNS))


def load_pushes(
    ch: Any, *, since: int | None = None, until: int | None = None, customer: str | None = None
) -> list[Push]:
    """Latest state of every push with ``since <= window_start < until`` (all when None)."""
    where, params = ["1"], {}
    if since is not None:
        where.append("window_start >= {since:DateTime}")
        params["since"] = utc(since)
    if until is not None:
        where.append("window_start < {until:DateTime}")
        params["until"] = utc(until)
    if customer is not None:
        where.append("customer_id = {customer:String}")
        params["customer"] = customer
    sql = (
        f"SELECT {', '.join(PUSH_COLUMNS[:-1])} FROM stripe_pushes FINAL WHERE {' AND '.join(where)} "
        "ORDER BY customer_id, meter, window_start, revision"
    )
    rows = _run(ch.query, sql, parameters=params).result_rows
    return [
        Push(r[0], r[1], epoch(r[2]), int(r[3]), r[4], int(r[5]), Decimal(r[6]), int(r[7]), Decimal(r[8]), r[9], r[10])
        for r in rows
    ]


def last_carry(ch: Any) -> dict[tuple[str, str], tuple[int, Decimal]]:
    """(customer, meter) -> (highest seq, carry after it) over the whole cursor."""
    rows = _run(
        ch.query,
        "SELECT customer_id, meter, max(seq), argMax(carry_after, seq) "
        "FROM stripe_pushes FINAL GROUP BY customer_id, meter",
    ).result_rows
    return {(r[0], r[1]): (int(r[2]), Decimal(r[3])) for r in rows}


# --------------------------------------------------------------------------- credit grants, webhooks


def load_grants(ch: Any) -> dict[str, tuple[str, str, int]]:
    """grant_id -> (stripe_grant_id, status, amount_cents)."""
    rows = _run(
        ch.query, "SELECT grant_id, stripe_grant_id, status, amount_cents FROM stripe_credit_grants FINAL"
    ).result_rows
    return {r[0]: (r[1], r[2], int(r[3])) for r in rows}


def save_grant(
    ch: Any, grant_id: str, customer_id: str, stripe_grant_id: str, amount_cents: int, currency: str, status: str
) -> None:
    ver = {"active": 1, "voided": 2, "skipped": 1}.get(status, 1)
    _run(
        ch.insert,
        "stripe_credit_grants",
        [(grant_id, customer_id, stripe_grant_id, amount_cents, currency, status, ver)],
        column_names=["grant_id", "customer_id", "stripe_grant_id", "amount_cents", "currency", "status", "ver"],
    )


def webhook_seen(ch: Any, event_id: str) -> bool:
    rows = _run(
        ch.query, "SELECT count() FROM stripe_webhook_events WHERE event_id = {e:String}", parameters={"e": event_id}
    ).result_rows
    return bool(rows[0][0])


def record_webhook(ch: Any, event_id: str, event_type: str, command_id: str) -> None:
    _run(
        ch.insert,
        "stripe_webhook_events",
        [(event_id, event_type, command_id)],
        column_names=["event_id", "event_type", "command_id"],
    )


def acked_at(ch: Any, customer: str, meter: str, window_start: int) -> dict[int, int]:
    """revision -> when the cursor recorded it acked (unix seconds, ~ Stripe's receipt time)."""
    rows = _run(
        ch.query,
        "SELECT revision, toUnixTimestamp(min(updated_at)) FROM stripe_pushes WHERE customer_id = "
        "{c:String} AND meter = {m:String} AND window_start = {w:DateTime} AND status = 'acked' "
        "GROUP BY revision",
        parameters={"c": customer, "m": meter, "w": utc(window_start)},
    ).result_rows
    return {int(r): int(t) for r, t in rows}
