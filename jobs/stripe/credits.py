"""Prepaid credit is never invoiced twice: ledger grants are mirrored as Stripe credit grants.

Choice (docs/stripe.md): sync pushes ALL usage; every ledger grant / top-up the ledger ACCEPTED (its
``grant`` / ``top_up`` entry in ClickHouse ``ledger_entries``, see :func:`ledger_grant_facts`) becomes a
Stripe credit grant (``applicability_config.scope.price_type = metered``) of the same amount,
category, priority, effective and expiry times, and a ``void`` entry voids it. Stripe follows facts,
not requests: a grant command the ledger refused (a bad amount, a replayed grant id with other terms)
has no entry and never reaches Stripe. Stripe applies the grants
at invoice finalization, so the invoice reads "usage − credits" and ``amount_due`` is what the
ledger says is left to pay. The credit agent keeps enforcing the balance in real time; Stripe only
settles the period.

Exactly once: each grant is looked up in ``stripe_credit_grants`` (ClickHouse), then created with
Idempotency-Key ``ml-grant-{grant_id}`` and ``metadata.meterline_grant_id``; a replayed command
(same ``grant_id``) creates nothing.

Limits: Stripe's monetary value is integer cents, so an amount with sub-cent digits is floored to
the cent (reported); a grant scoped to providers/models/projects cannot be expressed on the one
``cost`` meter and is skipped and reported (``unsupported_scope``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from typing import Any

import stripe

from jobs.stripe._config import BillingConfig
from jobs.stripe._store import load_customers, load_grants, save_grant
from meterline.core.errors import InputError


@dataclass
class GrantSummary:
    created: list[str] = field(default_factory=list)  # grant ids
    existing: list[str] = field(default_factory=list)
    voided: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "grant_id: reason"
    ignored: int = 0  # commands of other types


def _cents(amount: str, grant_id: str, summary: GrantSummary) -> int:
    try:
        value = Decimal(amount)
    except InvalidOperation as exc:
        raise InputError(f"grant {grant_id}: amount {amount!r} is not a decimal", field="amount") from exc
    cents = (value * 100).to_integral_value(rounding=ROUND_FLOOR)
    if cents != value * 100:
        summary.skipped.append(f"{grant_id}: {amount} has sub-cent digits; granted {cents} cents")
    return int(cents)


def _scoped(scope: Mapping[str, Any] | None) -> bool:
    return bool(scope) and any(scope.get(k) for k in ("providers", "models", "projects"))  # type: ignore[union-attr]


def mirror_grants(
    client: stripe.StripeClient, ch: Any, cfg: BillingConfig, commands: Iterable[Mapping[str, Any]]
) -> GrantSummary:
    """Apply ledger commands (``schemas.credits`` message dicts) to Stripe credit grants, idempotently.

    Customers must be provisioned (``stripe_customers``); commands for unknown customers are skipped
    and reported (run provision, then mirror again: the replay is harmless).
    """
    summary = GrantSummary()
    links = load_customers(ch)
    known = load_grants(ch)
    for cmd in commands:
        kind = cmd.get("type")
        if kind not in ("grant", "top_up", "void"):
            summary.ignored += 1
            continue
        grant_id = str(cmd.get("grant_id") or "")
        if not grant_id:
            raise InputError(f"{kind} command {cmd.get('command_id')} has no grant_id", field="grant_id")
        if kind == "void":
            row = known.get(grant_id)
            if row is None or row[1] != "active":
                summary.skipped.append(f"{grant_id}: void of an unknown or inactive grant")
                continue
            try:
                client.v1.billing.credit_grants.void_grant(row[0])
            except stripe.InvalidRequestError as exc:
                if "already voided" not in str(exc):
                    raise
            save_grant(ch, grant_id, str(cmd.get("customer_id")), row[0], row[2], cfg.currency, "voided")
            known[grant_id] = (row[0], "voided", row[2])
            summary.voided.append(grant_id)
            continue
        if grant_id in known:
            summary.existing.append(grant_id)
            continue
        customer = str(cmd.get("customer_id"))
        currency = str(cmd.get("currency") or cfg.currency).lower()
        link = links.get(customer)
        if link is None:
            summary.skipped.append(f"{grant_id}: customer {customer} not provisioned in Stripe")
            continue
        if currency != cfg.currency:
            summary.skipped.append(f"{grant_id}: currency {currency} != billing currency {cfg.currency}")
            continue
        if _scoped(cmd.get("scope")):
            summary.skipped.append(f"{grant_id}: unsupported_scope {json.dumps(cmd.get('scope'), sort_keys=True)}")
            continue
        cents = _cents(str(cmd.get("amount")), grant_id, summary)
        if cents <= 0:
            summary.skipped.append(f"{grant_id}: amount below one cent")
            continue
        existing = _find_by_metadata(client, link.stripe_customer_id, grant_id)
        if existing is None:
            params: dict[str, Any] = {
                "customer": link.stripe_customer_id,
                "name": f"meterline {kind} {grant_id}"[:100],
                "category": "paid" if kind == "top_up" else str(cmd.get("category") or "promotional"),
                "priority": max(0, min(100, int(cmd.get("priority") if cmd.get("priority") is not None else 50))),
                "applicability_config": {"scope": {"price_type": "metered"}},
                "amount": {"type": "monetary", "monetary": {"currency": currency, "value": cents}},
                "metadata": {"meterline_grant_id": grant_id, "meterline_customer_id": customer},
            }
            if cmd.get("effective_at_ms"):
                params["effective_at"] = int(cmd["effective_at_ms"]) // 1000
            if cmd.get("expires_at_ms"):
                params["expires_at"] = int(cmd["expires_at_ms"]) // 1000
            existing = client.v1.billing.credit_grants.create(params, {"idempotency_key": f"ml-grant-{grant_id}"[:255]})  # type: ignore[arg-type]
            summary.created.append(grant_id)
        else:
            summary.existing.append(grant_id)
        save_grant(ch, grant_id, customer, str(existing.id), cents, currency, "active")
        known[grant_id] = (str(existing.id), "active", cents)
    return summary


def ledger_grant_facts(ch: Any, *, customer: str | None = None) -> list[dict[str, Any]]:
    """What the ledger did with grants, from ClickHouse: every ``grant`` / ``top_up`` / ``void``
    entry in ``ledger_entries`` (in ledger order), as the message-shaped dicts :func:`mirror_grants`
    takes. A grant's terms (category, priority, effective and expiry times, scope) come from the
    customer's latest ``ledger_snapshots`` state, which the ledger sink stores right after the
    entries; a grant whose snapshot has not landed yet is left for the next run."""
    where = " AND customer_id = {c:String}" if customer else ""
    params = {"c": customer} if customer else {}
    rows = ch.query(
        "SELECT customer_id, entry_id, kind, grant_id, amount, currency FROM ledger_entries FINAL"
        " WHERE kind IN ('grant', 'top_up', 'void')" + where + " ORDER BY customer_id, seq",
        parameters=params,
    ).result_rows
    snaps = ch.query(
        "SELECT customer_id, argMax(state, version) FROM ledger_snapshots WHERE 1" + where + " GROUP BY customer_id",
        parameters=params,
    ).result_rows
    terms: dict[tuple[str, str], dict[str, Any]] = {}
    for cust, state in snaps:
        for g in json.loads(state).get("grants", []):
            terms[(str(cust), str(g["g"]["id"]))] = g["g"]
    out: list[dict[str, Any]] = []
    for cust, entry_id, kind, grant_id, amount, currency in rows:
        if kind == "void":
            out.append({"type": "void", "command_id": entry_id, "customer_id": cust, "grant_id": grant_id})
            continue
        t = terms.get((cust, grant_id))
        if t is None:
            continue  # its snapshot is not stored yet: mirrored by a later run
        scope = t.get("scope")
        out.append({
            "type": kind, "command_id": entry_id, "customer_id": cust, "grant_id": grant_id,
            "amount": format(amount, "f"), "currency": currency, "category": t.get("cat"),
            "priority": t.get("prio"), "effective_at_ms": t.get("eff"), "expires_at_ms": t.get("exp"),
            "scope": None if not scope else {"providers": scope[0], "models": scope[1], "projects": scope[2]},
        })  # fmt: skip
    return out


def _find_by_metadata(client: stripe.StripeClient, stripe_customer: str, grant_id: str) -> Any:
    for g in client.v1.billing.credit_grants.list({"customer": stripe_customer, "limit": 100}).auto_paging_iter():
        meta = g.metadata.to_dict() if g.metadata else {}
        if meta.get("meterline_grant_id") == grant_id:
            return g
    return None
