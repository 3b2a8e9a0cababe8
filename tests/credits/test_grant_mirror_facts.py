"""Stripe follows the ledger's facts, not requests: the grant mirror reads the grants the credit
agent applied (ClickHouse ledger_entries + the terms of its snapshot), so a grant command the ledger
refused never reaches Stripe. Real Tansu broker, faust worker, ledger sink, chDB and the stripe SDK
against the bundled Stripe-compatible server."""

from __future__ import annotations

import time
from typing import Any

from devtools.stripe_local import LocalStripe
from jobs.stripe import BillingConfig, StripeTarget, load_billing_config, provision
from jobs.stripe.credits import ledger_grant_facts, mirror_grants
from tests.credits.conftest import CreditPipeline
from tests.credits.helpers import enc, grant_msg


def test_a_refused_grant_never_reaches_stripe(credit_pipeline: CreditPipeline) -> None:
    p = credit_pipeline
    p.publish_prices()
    p.start_worker()
    now = int(time.time() * 1000)
    p.send("ledger-commands", "acme", enc(grant_msg("acme", "g-ok", "5.00", now, priority=20)), now)
    # refused by the ledger: a grant must be positive (LedgerCommandError -> dead letter, no entry)
    p.send("ledger-commands", "acme", enc(grant_msg("acme", "g-refused", "0", now)), now)
    # a replayed grant id with other terms is refused too: the first one stands
    p.send("ledger-commands", "acme", enc({**grant_msg("acme", "g-ok", "500.00", now), "command_id": "again"}), now)
    p.flush()

    def mirrored_ready() -> bool:
        facts = ledger_grant_facts(p.ch, customer="acme")
        return any(f["grant_id"] == "g-ok" for f in facts)

    p.wait_for("the accepted grant's entry and snapshot in ClickHouse", mirrored_ready, 120)
    facts = ledger_grant_facts(p.ch, customer="acme")
    assert [(f["type"], f["grant_id"], f["amount"]) for f in facts] == [("grant", "g-ok", "5.000000000000")]
    assert facts[0]["priority"] == 20 and facts[0]["category"] == "paid"

    cfg: BillingConfig = load_billing_config()
    with LocalStripe() as ls:
        client = StripeTarget.local(ls.url).client()
        links = provision(client, p.ch, cfg, customers=["acme"]).customers
        summary = mirror_grants(client, p.ch, cfg, facts)
        assert summary.created == ["g-ok"] and not summary.skipped
        grants: list[Any] = list(
            client.v1.billing.credit_grants.list({"customer": links["acme"].stripe_customer_id}).auto_paging_iter()
        )
        assert [(g.metadata.to_dict()["meterline_grant_id"], g.amount.monetary.value) for g in grants] == [
            ("g-ok", 500)
        ]
        assert mirror_grants(client, p.ch, cfg, ledger_grant_facts(p.ch)).created == []  # a re-run adds nothing
