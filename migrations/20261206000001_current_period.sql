-- The current period's usage beside the running total (docs/architecture.md "Usage periods").
--
-- Before, every batch upserted two rows per consumer: its running total, and its total in the
-- batch's period in consumer_period_totals. That doubled the writes of the hot path (at 10M
-- consumers a batch took 56-61 s instead of 27-30 s, docs/benchmarks.md). Now a consumer's
-- row keeps the usage of its newest period too (period_start, period_total), updated by the
-- same upsert that adds to its total; the period moves to consumer_period_totals when a later
-- period replaces it. With many batches per period, a consumer's period row is written once
-- per period, not once per batch.
--
-- The upsert decides, under the row's lock, what moves: the row's old period when the batch
-- brings a newer one, or the batch's own amount when it is for an older period (a late file).
-- PostgreSQL 15 cannot return a row's old values from an upsert, so the upsert records what it
-- moved in moved_start / moved_total (NULL when nothing moved), returns them, and the same
-- statement adds them to consumer_period_totals. Their values only mean something to the
-- statement that set them.
--
-- Readers read usage from the view consumer_usage: the period rows and the current periods
-- together. A (consumer, period) can be in both (rows written before this migration, or moved
-- by `tally rollup`); readers sum.
ALTER TABLE consumer_totals
    ADD COLUMN period_start TIMESTAMPTZ,
    ADD COLUMN period_total NUMERIC,
    ADD COLUMN moved_start  TIMESTAMPTZ,
    ADD COLUMN moved_total  NUMERIC;

CREATE VIEW consumer_usage (consumer_id, period_start, total) AS
    SELECT consumer_id, period_start, total FROM consumer_period_totals
    UNION ALL
    SELECT consumer_id, period_start, period_total FROM consumer_totals
    WHERE period_start IS NOT NULL;
