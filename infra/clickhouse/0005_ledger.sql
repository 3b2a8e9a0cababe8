-- ledger_entries: every entry of the prepaid-credit ledger, as the credit agent emitted it on the
-- ledger-entries topic (pipeline/credits). entry_id = "{customer_id}:{seq}" is deterministic: a
-- replayed record re-emits the same entry with the same id and content, so ReplacingMergeTree on
-- (customer_id, entry_id) collapses replays; the ledger sink also drops ids that are stored.
-- Read with FINAL (or GROUP BY entry_id) when exactness matters.
--
-- amount is in currency units, exact (Decimal(38, 12) = integer picos). Sign convention (the
-- ledger's fold, meterline.ledger.fold_entries): grant/top_up add to grant_id; debit subtracts from
-- grant_id, or adds to overage when grant_id = ''; expiry/void subtract the remainder;
-- adjustment is signed (+ = more credit; with grant_id = '' it reduces overage).
CREATE TABLE IF NOT EXISTS ledger_entries
(
    entry_id     String,
    at           DateTime64(3, 'UTC'),
    customer_id  String,
    seq          UInt64,
    kind         LowCardinality(String),
    amount       Decimal(38, 12),
    currency     LowCardinality(String),
    grant_id     String,
    event_id     String,
    reason       String,
    inserted_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY (customer_id, entry_id);

-- Credit effect per entry in one signed column: + credit added, − credit consumed/removed, for
-- entries against a grant; overage movements (grant_id = '') are in overage_delta instead.
CREATE VIEW IF NOT EXISTS ledger_balances AS
SELECT
    customer_id,
    currency,
    sumIf(multiIf(kind IN ('grant', 'top_up', 'adjustment'), amount, -amount), grant_id != '') AS credit_remaining,
    sumIf(if(kind = 'debit', amount, -amount), grant_id = '') AS overage,
    sumIf(amount, kind = 'debit') AS debited,
    count() AS entries
FROM ledger_entries FINAL
GROUP BY customer_id, currency;
