-- Re-rating plan customers (jobs/reprice/plans.py, docs/corrections.md "Subscription plans").
-- A plan customer's bill is not the sum of its events' pay-per-token charges: it is the plan's
-- fee + overage − write-offs + true-up of each billing period. When re-rating changes such a bill
-- (amount allowances, rate-card overage, amount tiers, a commitment), the difference is written as
-- ONE row per customer × billing period with kind = 'plan':
--   occurred_at  = the period's start, period_end = where the period stops (its natural end, or
--                  earlier when the run stopped), provider/model/model_version/project/feature = '',
--   currency     = the plan's currency (lower case, like usage_priced),
--   cost = 0,  charge = new bill − bill as billed so far (exact, before the one rounding),
--   ledger_charge = the part the ledger carries: Δ(overage − cap/block write-offs),
--   price_version = the plan versions of the period (pro@1,pro@2), rate_card = ''.
-- Every other row is kind = 'usage' (per customer × hour × model, as before; for events inside a
-- plan run only their cost is corrected: their charge is an input of the plan bill, not what the
-- customer pays). ledger_charge of usage rows is 0 (their ledger amount is their charge).
ALTER TABLE usage_corrections ADD COLUMN IF NOT EXISTS kind LowCardinality(String) DEFAULT 'usage';
ALTER TABLE usage_corrections ADD COLUMN IF NOT EXISTS period_end DateTime64(3, 'UTC') DEFAULT occurred_at;
ALTER TABLE usage_corrections ADD COLUMN IF NOT EXISTS ledger_charge Decimal(38, 12) DEFAULT 0;
