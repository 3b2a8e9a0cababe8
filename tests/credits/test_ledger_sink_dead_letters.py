"""The ledger sink never writes ``usage_rejected`` itself: an undecodable ``ledger-entries`` value
goes, with its bytes and source position, to ``usage-dead-letter``, whose one writer (the usage
sink) lands it in ``usage_rejected``. Real Tansu broker and chDB."""

from __future__ import annotations

import time

from schemas.codec import decode_dead_letter
from tests.credits.conftest import CreditPipeline


def test_undecodable_entry_is_dead_lettered_not_written_by_the_ledger_sink(credit_pipeline: CreditPipeline) -> None:
    p = credit_pipeline
    before = p.query("SELECT count() FROM usage_rejected")[0][0]
    p.send("ledger-entries", "acme", b"\xff not json", int(time.time() * 1000))
    p.flush()
    p.wait_for("the ledger sink to dead-letter the value", lambda: p.sink.dead_lettered == 1, 60)

    letters = [decode_dead_letter(v) for _k, v, _p, _o in p.read("usage-dead-letter")]
    assert len(letters) == 1
    letter = letters[0]
    assert letter["reason_code"] == "invalid_ledger_message"
    assert letter["source_topic"] == p.settings.topic("ledger-entries")
    assert letter["payload"] == b"\xff not json"
    assert letter["customer_id"] == "acme"
    # the ledger sink committed past it and wrote nothing to usage_rejected (the usage sink does)
    p.wait_for("the ledger sink to flush", lambda: p.sink.messages_consumed >= 1, 30)
    assert p.query("SELECT count() FROM usage_rejected")[0][0] == before
