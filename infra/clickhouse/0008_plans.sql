-- Plans and subscription facts (issue #12), landed by pipeline/plans_sink.py from the `plans` and
-- `subscriptions` topics. Both are facts with deterministic ids, so ReplacingMergeTree collapses
-- replays; the sinks also drop ids that are stored. Read with FINAL when exactness matters.
--
-- plans: one row per immutable plan version. Amounts in currency units, exact (Decimal(38, 12)).
-- Allowances are parallel arrays (ARRAY JOIN them); allowance_included is tokens for unit
-- 'tokens' and currency units for unit 'amount'. `definition` is the canonical JSON of the version.
CREATE TABLE IF NOT EXISTS plans
(
    version_key          String,                 -- 'pro@1'
    effective_from       DateTime('UTC'),
    plan_id              String,
    version              UInt32,
    plan_hash            String,
    name                 String,
    interval             LowCardinality(String), -- day | week | month | year
    currency             LowCardinality(String),
    fee                  Decimal(38, 12),
    overage_kind         LowCardinality(String), -- per_million | rate_card | tiers
    overage_unit         LowCardinality(String), -- tokens | amount
    overage_per_million  Decimal(38, 12),        -- per_million plans; 0 otherwise
    on_exhausted         LowCardinality(String), -- allow | block | cap
    cap                  Decimal(38, 12),        -- 0 when on_exhausted != 'cap'
    minimum_commitment   Decimal(38, 12),        -- 0 when none
    allowance_ids        Array(String),
    allowance_units      Array(String),
    allowance_included   Array(Decimal(38, 12)),
    definition           String,
    inserted_at          DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY (plan_id, version_key);

-- subscription_events: every subscription fact, as `meterline plans ...` published it. version 0
-- means "the version in force at `at`". A customer's timeline is the fold of its rows
-- (meterline.plans.fold_timeline): never edit or delete a row, publish a new fact.
CREATE TABLE IF NOT EXISTS subscription_events
(
    event_id       String,
    at             DateTime('UTC'),
    customer_id    String,
    type           LowCardinality(String),       -- subscribed | changed | cancelled | migrated
    plan_id        String,
    version        UInt32,
    at_period_end  UInt8,
    inserted_at    DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY (customer_id, event_id);

-- plan_bills: one row per closed billing period (`meterline bill close`), the bill meterline
-- computed from usage_priced and the subscription timeline. Re-closing a period (late usage)
-- writes a newer row that replaces the older one (ReplacingMergeTree on closed_at): read FINAL.
-- plan_id/version: the plan in force at the period's end. usage_charge: what the same usage costs
-- pay-per-token at the customer's rate card (sum of usage_priced.charge), for break-even analysis.
-- total is rounded to the currency's minor unit; every other amount is exact.
CREATE TABLE IF NOT EXISTS plan_bills
(
    customer_id    String,
    period_start   DateTime('UTC'),
    period_end     DateTime('UTC'),
    period_stop    DateTime('UTC'),
    plan_id        String,
    version        UInt32,
    currency       LowCardinality(String),
    fee            Decimal(38, 12),
    overage        Decimal(38, 12),
    written_off    Decimal(38, 12),              -- cap / block write-offs (negative)
    true_up        Decimal(38, 12),
    prepaid        Decimal(38, 12),              -- prepaid credit applied (negative)
    subtotal       Decimal(38, 12),
    total          Decimal(38, 12),
    usage_charge   Decimal(38, 12),
    lines          String,                       -- the bill's lines, JSON
    closed_at      DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(closed_at)
ORDER BY (customer_id, period_start);

-- plan_allowance_usage: each allowance of each closed period (one row per segment of a period
-- split by a plan change). included is prorated; tokens or currency units per `unit`.
CREATE TABLE IF NOT EXISTS plan_allowance_usage
(
    customer_id    String,
    period_start   DateTime('UTC'),
    segment        UInt16,
    allowance_id   String,
    plan_id        String,
    version        UInt32,
    unit           LowCardinality(String),
    included       Decimal(38, 12),
    rolled_in      Decimal(38, 12),
    used           Decimal(38, 12),
    remaining      Decimal(38, 12),
    rollover_out   Decimal(38, 12),
    closed_at      DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(closed_at)
ORDER BY (customer_id, period_start, segment, allowance_id);
