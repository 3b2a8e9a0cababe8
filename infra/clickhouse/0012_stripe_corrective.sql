-- Corrective amounts on Stripe (jobs/stripe/corrective.py, docs/corrections.md "Stripe"): money a
-- re-rating changed after Stripe can no longer take it back as meter events (a window shrunk more
-- than 24 h after it was pushed) or cannot take it as tokens (a plan bill re-rated), sent as one
-- invoice item on the customer's next invoice. Written only by jobs/stripe; read with FINAL.
-- status: pending (recorded, maybe sent) -> sent (Stripe has it; stripe_id) | failed.
-- amount: the exact signed money delta (currency units; negative = a credit to the customer);
-- cents: the whole minor units sent (toward zero); carry_after: the customer's sub-cent remainder
-- (in minor units) after it, carried into the customer's next corrective amount.
CREATE TABLE IF NOT EXISTS stripe_corrections
(
    correction_id String,
    customer_id   String,
    kind          LowCardinality(String),  -- window | plan
    seq           UInt64,                  -- per customer, in the order the amounts were recorded
    amount        Decimal(38, 12),
    cents         Int64,
    carry_after   Decimal(38, 12),
    currency      LowCardinality(String),
    period_start  DateTime('UTC'),         -- the corrected usage: first window / period start
    period_end    DateTime('UTC'),
    source        String,                  -- what it corrects (windows, reprice correction ids)
    stripe_id     String,                  -- the invoice item (empty when cents = 0: all carried)
    status        LowCardinality(String),
    error         String,
    ver           UInt8,
    updated_at    DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(ver)
ORDER BY (customer_id, correction_id);
