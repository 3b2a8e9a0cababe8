-- usage_priced: one row per priced usage event (the analysts' raw table).
-- Written only by pipeline/sink.py. Unqualified names: applied into whatever database the client uses.
-- Strings that are optional in the event are stored as '' (never NULL). Money is Decimal(38, 12), exact.
-- ReplacingMergeTree keyed by (customer_id, event_id): a replayed event collapses at merge time.
-- The sink already drops events that exist, so plain sums are exact (FINAL is the belt and braces).
CREATE TABLE IF NOT EXISTS usage_priced
(
    event_id            String,
    occurred_at         DateTime64(3, 'UTC'),
    customer_id         String,
    api_key_id          String,
    project             LowCardinality(String),
    feature             LowCardinality(String),
    user_id             String,
    session_id          String,
    gateway             LowCardinality(String),
    provider            LowCardinality(String),
    model               LowCardinality(String),
    model_version       LowCardinality(String),
    request_id          String,
    labels              Map(String, String),
    input_tokens        UInt64,
    output_tokens       UInt64,
    cached_input_tokens UInt64,
    cache_write_tokens  UInt64,
    reasoning_tokens    UInt64,
    requests            UInt64,
    cost                Decimal(38, 12),
    charge              Decimal(38, 12),
    currency            LowCardinality(String),
    price_version       LowCardinality(String),
    rate_card           LowCardinality(String),
    priced_at           DateTime64(3, 'UTC'),
    source_partition    UInt32,
    source_offset       UInt64,
    inserted_at         DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (customer_id, event_id)
