-- Hourly and daily rollups of usage_priced, fed by materialized views at insert time.
-- SummingMergeTree: rows with the same key are summed at merge time, so ALWAYS read them with
-- sum(...) GROUP BY (never read a single row as "the total"). Money stays Decimal(38, 12): exact.
-- currency is part of the key: charges in different currencies are never added together.
-- pipeline/sink.py rebuild_rollups() recomputes both tables from usage_priced FINAL with the same
-- SELECT (a test keeps the two in step).
CREATE TABLE IF NOT EXISTS usage_hourly
(
    hour                DateTime('UTC'),
    customer_id         String,
    provider            LowCardinality(String),
    model               LowCardinality(String),
    project             LowCardinality(String),
    feature             LowCardinality(String),
    currency            LowCardinality(String),
    events              UInt64,
    requests            UInt64,
    input_tokens        UInt64,
    output_tokens       UInt64,
    cached_input_tokens UInt64,
    cache_write_tokens  UInt64,
    reasoning_tokens    UInt64,
    cost                Decimal(38, 12),
    charge              Decimal(38, 12)
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (customer_id, hour, provider, model, project, feature, currency);

CREATE TABLE IF NOT EXISTS usage_daily
(
    day                 Date,
    customer_id         String,
    provider            LowCardinality(String),
    model               LowCardinality(String),
    project             LowCardinality(String),
    feature             LowCardinality(String),
    currency            LowCardinality(String),
    events              UInt64,
    requests            UInt64,
    input_tokens        UInt64,
    output_tokens       UInt64,
    cached_input_tokens UInt64,
    cache_write_tokens  UInt64,
    reasoning_tokens    UInt64,
    cost                Decimal(38, 12),
    charge              Decimal(38, 12)
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (customer_id, day, provider, model, project, feature, currency);

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_hourly_mv TO usage_hourly AS
SELECT
    toStartOfHour(toDateTime(occurred_at, 'UTC')) AS hour,
    customer_id,
    provider,
    model,
    project,
    feature,
    currency,
    count()                  AS events,
    sum(requests)            AS requests,
    sum(input_tokens)        AS input_tokens,
    sum(output_tokens)       AS output_tokens,
    sum(cached_input_tokens) AS cached_input_tokens,
    sum(cache_write_tokens)  AS cache_write_tokens,
    sum(reasoning_tokens)    AS reasoning_tokens,
    sum(cost)                AS cost,
    sum(charge)              AS charge
FROM usage_priced
GROUP BY hour, customer_id, provider, model, project, feature, currency;

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_daily_mv TO usage_daily AS
SELECT
    toDate(occurred_at, 'UTC') AS day,
    customer_id,
    provider,
    model,
    project,
    feature,
    currency,
    count()                  AS events,
    sum(requests)            AS requests,
    sum(input_tokens)        AS input_tokens,
    sum(output_tokens)       AS output_tokens,
    sum(cached_input_tokens) AS cached_input_tokens,
    sum(cache_write_tokens)  AS cache_write_tokens,
    sum(reasoning_tokens)    AS reasoning_tokens,
    sum(cost)                AS cost,
    sum(charge)              AS charge
FROM usage_priced
GROUP BY day, customer_id, provider, model, project, feature, currency
