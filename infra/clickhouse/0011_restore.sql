-- Durable facts the one-box mode restores its money state from when the broker lost it
-- (issue #19.2; the embedded Tansu keeps nothing on disk). See docs/restore.md.
--
-- ledger_snapshots: the credit agent's state of a customer after a record (grants with their
-- definitions, policy, budgets, blocks, alert tracks, guard buckets, seq), carried in the record's
-- last ledger-entries message and stored by the ledger sink AFTER that message's entries. The
-- latest version per customer (FINAL) + the customer's ledger_entries (whose fold gives the exact
-- balances) is what a restore rebuilds. Holds, applied offsets and the outbox are not in it.
CREATE TABLE IF NOT EXISTS ledger_snapshots
(
    customer_id  String,
    version      UInt64,
    seq          UInt64,
    state        String,
    at           DateTime64(3, 'UTC'),
    inserted_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version)
ORDER BY customer_id;

-- price_records: every record ever published to a catalog topic (`prices`, and `plans` /
-- `subscriptions` where they exist; logical name in `topic`): key, value bytes as base64, once per
-- distinct record; republished in first-seen order when the broker lost the topic.
CREATE TABLE IF NOT EXISTS price_records
(
    topic        LowCardinality(String),
    digest       String,
    key          String,
    value_b64    String,
    first_seen   DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = ReplacingMergeTree
ORDER BY (topic, digest);

-- broker_epochs: one row per broker epoch seen at start. The epoch is a random id written to the
-- `epoch` topic; an empty `epoch` topic means the broker lost everything (restore from the facts
-- above); a known epoch means the broker kept its state (nothing is restored, never re-applied).
CREATE TABLE IF NOT EXISTS broker_epochs
(
    epoch        String,
    started_at   DateTime64(3, 'UTC'),
    restored     UInt32,
    note         String
)
ENGINE = ReplacingMergeTree
ORDER BY epoch;
