-- Stripe invoicing jobs (jobs/stripe): customer mapping, the meter-event push cursor, mirrored
-- credit grants and processed webhook events. Written only by jobs/stripe; read with FINAL.
-- Status changes are new rows with a higher `ver` (ReplacingMergeTree keeps the highest).

-- meterline customer -> Stripe customer (+ the subscription provision created for it).
CREATE TABLE IF NOT EXISTS stripe_customers
(
    customer_id        String,
    stripe_customer_id String,
    subscription_id    String,
    mode               LowCardinality(String),
    updated_at         DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY customer_id;

-- One row per (customer, meter, window, revision) ever planned: the durable sync cursor.
-- status: pending (planned, maybe sent) -> acked (Stripe has it) | too_old | failed.
-- amount: the exact quantity this revision accounts for (currency units in cost mode, tokens
-- in itemized mode); value: the whole number sent; carry_after: sub-unit remainder carried on.
CREATE TABLE IF NOT EXISTS stripe_pushes
(
    customer_id  String,
    meter        LowCardinality(String),
    window_start DateTime('UTC'),
    revision     UInt32,
    identifier   String,
    seq          UInt64,
    amount       Decimal(38, 12),
    value        UInt64,
    carry_after  Decimal(38, 12),
    status       LowCardinality(String),
    error        String,
    ver          UInt8,
    updated_at   DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(ver)
ORDER BY (customer_id, meter, window_start, revision);

-- meterline credit grant (ledger grant / top_up) -> Stripe credit grant.
CREATE TABLE IF NOT EXISTS stripe_credit_grants
(
    grant_id        String,
    customer_id     String,
    stripe_grant_id String,
    amount_cents    Int64,
    currency        LowCardinality(String),
    status          LowCardinality(String),
    ver             UInt8,
    updated_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(ver)
ORDER BY grant_id;

-- Stripe webhook events already turned into ledger commands (exactly-once on redelivery).
CREATE TABLE IF NOT EXISTS stripe_webhook_events
(
    event_id    String,
    event_type  LowCardinality(String),
    command_id  String,
    received_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY event_id
