-- UsageEvent v2 (issue 14): the token classes, tool calls and service tier a priced row carries
-- beyond v1. Rows written before this migration read 0 / '' (the v1 meaning: none of them).
-- New columns only; 0001 is never edited (migrations are checksummed).
ALTER TABLE usage_priced
    ADD COLUMN IF NOT EXISTS cache_write_long_tokens UInt64 DEFAULT 0 AFTER reasoning_tokens,
    ADD COLUMN IF NOT EXISTS input_audio_tokens      UInt64 DEFAULT 0 AFTER cache_write_long_tokens,
    ADD COLUMN IF NOT EXISTS output_audio_tokens     UInt64 DEFAULT 0 AFTER input_audio_tokens,
    ADD COLUMN IF NOT EXISTS input_image_tokens      UInt64 DEFAULT 0 AFTER output_audio_tokens,
    ADD COLUMN IF NOT EXISTS output_image_tokens     UInt64 DEFAULT 0 AFTER input_image_tokens,
    ADD COLUMN IF NOT EXISTS web_search_requests     UInt64 DEFAULT 0 AFTER requests,
    ADD COLUMN IF NOT EXISTS service_tier            LowCardinality(String) DEFAULT '' AFTER web_search_requests;
