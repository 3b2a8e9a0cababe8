-- Convenience views for analysts. Plain (non-materialized) views over the rollups: always exact.
CREATE VIEW IF NOT EXISTS v_spend_daily AS
SELECT *, charge - cost AS margin
FROM
(
    SELECT
        day,
        customer_id,
        currency,
        sum(events)              AS events,
        sum(requests)            AS requests,
        sum(input_tokens)        AS input_tokens,
        sum(output_tokens)       AS output_tokens,
        sum(cached_input_tokens) AS cached_input_tokens,
        sum(cache_write_tokens)  AS cache_write_tokens,
        sum(reasoning_tokens)    AS reasoning_tokens,
        sum(cost)                AS cost,
        sum(charge)              AS charge
    FROM usage_daily
    GROUP BY day, customer_id, currency
);

CREATE VIEW IF NOT EXISTS v_rejected_daily AS
SELECT
    toDate(failed_at, 'UTC') AS day,
    reason_code,
    source_topic,
    count()                  AS rejected
FROM usage_rejected FINAL
GROUP BY day, reason_code, source_topic
