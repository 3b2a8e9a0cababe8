-- usage_rejected: one row per dead letter (an event that could not be validated, priced or decoded).
-- reason_code is the stable snake_case code from meterline.errors (e.g. invalid_event, no_price,
-- undecodable). Optional strings are '' when unknown. occurred_at is NULL when the event had none.
-- payload holds the original record bytes as they were on the source topic.
-- No PARTITION BY on purpose: a replayed dead letter (possibly with a later failed_at) must land in
-- the same part set to collapse, and rejected volume is small.
CREATE TABLE IF NOT EXISTS usage_rejected
(
    reason_code      LowCardinality(String),
    reason           String,
    field            String,
    source_topic     LowCardinality(String),
    source_partition UInt32,
    source_offset    UInt64,
    customer_id      String,
    event_id         String,
    occurred_at      Nullable(DateTime64(3, 'UTC')),
    payload          String,
    payload_format   LowCardinality(String),
    failed_at        DateTime64(3, 'UTC'),
    inserted_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY (source_topic, source_partition, source_offset, event_id)
