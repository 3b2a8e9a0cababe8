-- Dead letters that are still open: rejected events that have not been priced since (a re-driven
-- event that priced successfully closes its rejection). Undecodable records (event_id '') stay open.
CREATE VIEW IF NOT EXISTS v_rejected_open AS
SELECT *
FROM usage_rejected FINAL
WHERE (customer_id, event_id) NOT IN (SELECT customer_id, event_id FROM usage_priced)
