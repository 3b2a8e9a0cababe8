-- Re-rating corrections (jobs/reprice, docs/corrections.md). History is never edited: a correction
-- is a new row carrying the signed difference (re-rated − as billed so far) for one
-- customer × hour × model × project × feature × currency. usage_priced + usage_corrections = the
-- re-rated totals. Written only by jobs/reprice, one INSERT per correction (all its rows in one
-- block), never twice: the job checks correction_id first (ReplacingMergeTree is the belt and braces).
-- events and token counts are 0 on purpose: a correction changes money, not usage.
CREATE TABLE IF NOT EXISTS usage_corrections
(
    correction_id  String,
    occurred_at    DateTime64(3, 'UTC'),  -- start of the corrected hour
    customer_id    String,
    provider       LowCardinality(String),
    model          LowCardinality(String),
    model_version  LowCardinality(String),
    project        LowCardinality(String),
    feature        LowCardinality(String),
    currency       LowCardinality(String),
    cost           Decimal(38, 12),       -- signed delta
    charge         Decimal(38, 12),       -- signed delta
    price_version  String,                -- the version(s) that re-rated the hour, comma-separated
    rate_card      String,                -- the card(s) that re-rated the hour, comma-separated
    created_at     DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (customer_id, correction_id, occurred_at, provider, model, model_version, project, feature, currency);

-- The rollups follow the corrections through their own materialized views (same buckets as
-- 0002_rollups.sql; events and tokens add 0).
CREATE MATERIALIZED VIEW IF NOT EXISTS usage_corrections_hourly_mv TO usage_hourly AS
SELECT
    toStartOfHour(toDateTime(occurred_at, 'UTC')) AS hour,
    customer_id, provider, model, project, feature, currency,
    toUInt64(0) AS events, toUInt64(0) AS requests, toUInt64(0) AS input_tokens, toUInt64(0) AS output_tokens,
    toUInt64(0) AS cached_input_tokens, toUInt64(0) AS cache_write_tokens, toUInt64(0) AS reasoning_tokens,
    sum(cost) AS cost,
    sum(charge) AS charge
FROM usage_corrections
GROUP BY hour, customer_id, provider, model, project, feature, currency;

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_corrections_daily_mv TO usage_daily AS
SELECT
    toDate(occurred_at, 'UTC') AS day,
    customer_id, provider, model, project, feature, currency,
    toUInt64(0) AS events, toUInt64(0) AS requests, toUInt64(0) AS input_tokens, toUInt64(0) AS output_tokens,
    toUInt64(0) AS cached_input_tokens, toUInt64(0) AS cache_write_tokens, toUInt64(0) AS reasoning_tokens,
    sum(cost) AS cost,
    sum(charge) AS charge
FROM usage_corrections
GROUP BY day, customer_id, provider, model, project, feature, currency;

-- Audit: one row per step of every applied correction (ReplacingMergeTree(ver): FINAL = latest
-- step). status: planned -> stored (usage_corrections written) -> ledger (commands acknowledged)
-- -> done. A run that is not done is finished by the next `meterline reprice` (resume).
CREATE TABLE IF NOT EXISTS reprice_runs
(
    correction_id    String,
    ran_by           String,
    reason           String,
    command          String,
    period_start     DateTime('UTC'),
    period_end       DateTime('UTC'),
    customer_filter  String,
    model_filter     String,
    versions_before  Array(String),
    versions_after   Array(String),
    cards_before     Array(String),
    cards_after      Array(String),
    customers        UInt32,
    old_charge       Decimal(38, 12),
    new_charge       Decimal(38, 12),
    delta            Decimal(38, 12),
    ledger_commands  String,               -- JSON list of the ledger commands (sent again on resume)
    status           LowCardinality(String),
    ver              UInt32,              -- +1 per step: the latest step wins
    created_at       DateTime64(3, 'UTC'),
    updated_at       DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(ver)
ORDER BY correction_id
